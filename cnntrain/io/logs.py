"""Where messages go: every command's info and warnings into its log file, warnings also onto the console as
one `cnntrain: warning: ...` line, and library chatter into the log only.

`cnntrain fit` gets its handlers from Hydra (configs/hydra/job_logging/cnntrain.yaml: `fit.log` in the run
directory; configs/hydra/hydra_logging/cnntrain.yaml: `multirun.log` in a sweep's directory); the other
commands call `setup_command` at the start and `log_to` once they know their output folder (records logged
before that are kept and written then). `warnings.warn` goes through the `cnntrain` logger in both cases.

A closed standard output (`cnntrain fit | head`) stops the display, not the command: `closed_stdout_safe`.
Kept free of torch, Hydra and rich: the CLI imports it before any of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOGGER = "cnntrain"
FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"


class ConsoleFormatter(logging.Formatter):
    """`cnntrain: warning: message` on one line: no source path, no excerpt, line breaks folded."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            message = f"{message} ({record.exc_info[1]})"
        return f"cnntrain: {record.levelname.lower()}: {' '.join(message.split())}"


class StderrHandler(logging.StreamHandler):
    """A console handler that writes to whatever sys.stderr is when a record comes (not when it was made)."""

    def __init__(self, level: int | str = logging.NOTSET) -> None:
        super().__init__(sys.stderr)
        self.setLevel(level)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class SweepLogHandler(logging.Handler):
    """`<sweep dir>/multirun.log` for what is logged around the jobs of a sweep (library chatter, Optuna's
    study messages); the folder is made on the first record. Nothing in a single run (`mode` RUN)."""

    def __init__(self, directory: str, mode: str, name: str = "multirun.log") -> None:
        super().__init__()
        self._path = Path(directory) / name if str(mode).upper().endswith("MULTIRUN") else None
        self._file: logging.FileHandler | None = None
        self.setFormatter(logging.Formatter(FILE_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if self._path is None:
            return
        try:
            if self._file is None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._file = logging.FileHandler(self._path, encoding="utf-8")
                self._file.setFormatter(self.formatter)
            self._file.emit(record)
        except Exception:  # noqa: BLE001 - a log line must never stop a sweep
            self.handleError(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


class _Pending(logging.Handler):
    """Keeps a command's records until it knows where its log file goes."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 10_000:
            self.records.append(record)


def route_warnings() -> None:
    """`warnings.warn` (cnntrain's own and libraries') -> the `cnntrain` logger: one line on the console and a
    line in the log file, instead of Python's source path and excerpt on stderr."""

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = str(message)
        if category is not UserWarning and isinstance(category, type):
            text = f"{category.__name__}: {text}"
        logging.getLogger(LOGGER).warning("%s", text)

    warnings.showwarning = show


def setup_command() -> None:
    """Logging of a command that Hydra does not run: warnings to stderr as one line; info and warnings kept
    for the log file that `log_to` opens."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "cnntrain", False)]:
        root.removeHandler(handler)
        handler.close()
    console, pending = StderrHandler(logging.WARNING), _Pending()
    console.setFormatter(ConsoleFormatter())
    for handler in (console, pending):
        handler.cnntrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    route_warnings()


def log_to(path: Path) -> None:
    """Write this command's log to `path` from now on, starting with what was logged so far."""
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.cnntrain = True  # type: ignore[attr-defined]
    for old in [h for h in root.handlers if getattr(h, "cnntrain", False) and not isinstance(h, StderrHandler)]:
        if isinstance(old, _Pending):
            for record in old.records:
                handler.handle(record)
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)


class _Echo:
    """sys.stdout, with each line also logged (at info level, so to the log file and not again to the
    console): the log of a command that prints its results holds what it printed, as fit.log does."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._partial = ""
        self._log = logging.getLogger(f"{LOGGER}.output")

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._log.info("%s", line.rstrip())
        return self._stream.write(text)

    def finish(self) -> None:
        if self._partial:
            self._log.info("%s", self._partial.rstrip())
            self._partial = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def output_to_log() -> Iterator[None]:
    """Run a command whose printed results also go to its log file (evaluate, predict, explain, export)."""
    original = sys.stdout
    if original is None:
        yield
        return
    echo = _Echo(original)
    sys.stdout = echo
    try:
        yield
    finally:
        echo.finish()
        if sys.stdout is echo:
            sys.stdout = original


class _PipeSafe:
    """sys.stdout, except that once the reader has gone (EPIPE), what is written is thrown away: standard
    output is pointed at /dev/null, one warning says so (stderr and the log), and the program goes on."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.closed_pipe = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._divert()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._divert()

    def _divert(self) -> None:
        if self.closed_pipe:
            return
        self.closed_pipe = True
        with contextlib.suppress(OSError, ValueError):  # not a real file (a test's capture): nothing to point
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        logging.getLogger(LOGGER).warning(
            "the standard output was closed (its reader, such as `head`, exited); "
            "the display stops here, the command goes on and writes its files and log"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def closed_stdout_safe() -> Iterator[None]:
    """Run a command with a standard output whose reader may go away (`| head`) without stopping it."""
    original = sys.stdout
    if original is None or isinstance(original, _PipeSafe):
        yield
        return
    safe = _PipeSafe(original)
    sys.stdout = safe
    try:
        yield
    finally:
        safe.flush()  # what is still buffered, while a closed pipe is still caught
        if sys.stdout is safe:
            sys.stdout = original
