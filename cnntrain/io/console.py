"""Terminal output: a rich live view on a terminal, plain lines in CI and pipes, or nothing.

Every line a reporter shows also goes to the log (the `cnntrain` logger at info level: fit.log), so the run's
record does not depend on the display. A closed standard output (`cnntrain fit | head`) stops the display,
not the run: see `cnntrain.io.logs.closed_stdout_safe`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

log = logging.getLogger("cnntrain")


def make_reporter(mode: str) -> Reporter:
    """trainer.progress: auto | rich | plain | none."""
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "plain"
    if mode == "rich":
        return RichReporter()
    return Reporter(quiet=mode == "none")


def _fmt_stats(stats: dict[str, float]) -> str:
    parts = []
    for key, value in stats.items():
        if key == "img/s":
            parts.append(f"{value:,.0f} img/s")
        elif key == "data":
            parts.append(f"data {value:.0%}")
        else:
            parts.append(f"{key} {value:.4f}")
    return "  ".join(parts)


class Reporter:
    """Plain text lines (no control codes): what CI logs and pipes get."""

    refresh_s = 10.0  # a progress line at most this often inside an epoch

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        # No colour, no cursor tricks, no wrapping at an imagined terminal width.
        self.console = Console(no_color=True, highlight=False, force_terminal=False, width=200, soft_wrap=True)

    def print(self, *args: Any) -> None:
        log.info("%s", " ".join(str(a) for a in args))
        if not self.quiet:
            self.console.print(*args)

    def start(self, title: str, rows: list[tuple[str, str]]) -> None:
        self.print(title)
        for key, value in rows:
            self.print(f"  {key:<10} {value}")

    def epoch_begin(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        self._epoch, self._epochs, self._steps = epoch, epochs, steps

    def epoch_update(self, done: int, stats: dict[str, float]) -> None:
        self.print(f"epoch {self._epoch}/{self._epochs} step {done}/{self._steps}  {_fmt_stats(stats)}")

    def epoch_end(self, line: str) -> None:
        self.print(line)

    def final(self, title: str, rows: list[tuple[str, str]]) -> None:
        self.print(title)
        for key, value in rows:
            self.print(f"  {key:<14} {value}")


class RichReporter(Reporter):
    """A live progress bar per epoch, a one-line summary after each, and tables."""

    refresh_s = 0.25

    def __init__(self) -> None:
        self.quiet = False
        self.console = Console(highlight=False)
        self._progress = None
        self._brief = False

    def start(self, title: str, rows: list[tuple[str, str]]) -> None:
        _log_rows(title, rows)
        table = Table(title=title, show_header=False, box=None, title_justify="left", title_style="bold")
        table.add_column(style="cyan", no_wrap=True)
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)

    def epoch_begin(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        # Narrow terminals drop whole columns (stats beyond loss and accuracy, then the bar, the stats and the
        # elapsed time) rather than let rich cut every cell to `22/…`; the epoch line after it has them all.
        width = self.console.width
        self._brief = width < 120
        columns: list[Any] = [TextColumn(f"[bold]epoch {epoch}/{epochs}")]
        if width >= 80:
            columns.append(BarColumn(bar_width=20 if width >= 120 else 10))
        columns.append(MofNCompleteColumn())
        if width >= 80:
            columns += [TextColumn("{task.fields[stats]}"), TimeElapsedColumn()]
        if width >= 40:
            columns += [TextColumn("eta"), TimeRemainingColumn()]
        self._progress = Progress(*columns, console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, completed=done, stats="")

    def epoch_update(self, done: int, stats: dict[str, float]) -> None:
        if self._brief:
            stats = {k: v for k, v in stats.items() if k in ("loss", "acc")}
        self._progress.update(self._task, completed=done, stats=_fmt_stats(stats))

    def epoch_end(self, line: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.print(line)

    def final(self, title: str, rows: list[tuple[str, str]]) -> None:
        _log_rows(title, rows)
        table = Table(title=title, show_header=False, title_justify="left", title_style="bold green")
        table.add_column(style="cyan", no_wrap=True)
        table.add_column(overflow="fold")
        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)


def _log_rows(title: str, rows: list[tuple[str, str]]) -> None:
    log.info("%s", title)
    for key, value in rows:
        log.info("  %s %s", f"{key:<14}", value)
