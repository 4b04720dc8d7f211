"""`cnntrain report <sweep dir>`: every job of a sweep in one table, best first, and the same as CSV.

Reads only what the jobs left on disk (summary.json, .hydra/overrides.yaml, metrics.csv), so it works
on a sweep that is still running, was interrupted, or had jobs fail. No torch import.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnntrain.errors import UserError, os_reason, path_error
from cnntrain.io.files import RunDir, read_json
from cnntrain.sweep.jobs import job_overrides, rerun_command

HELP = """\
usage: cnntrain report DIR [csv=FILE] [sort=metric|job|time] [figures=true]

One row per job of the sweep (or runs) under DIR: the overrides that differ between jobs, the
best validation metric (trainer.monitor) and its epoch, test accuracy (a multi-label run's test mAP), training time and status,
best first; trials an Optuna pruner stopped (sweep.pruner) have status "pruned". For a k-fold
sweep (trainer.folds=K), the mean ± std of each metric across the folds. Failed jobs are listed with their error and the command that runs them again;
unfinished ones with the command that continues them. The table is also written as CSV
(default DIR/report.csv). figures=true first draws the end-of-run figures of every run under DIR
that has them pending (trained with trainer.figures=off, or stopped before its figures were drawn).

examples:
  cnntrain report runs/default/multirun/2026-01-31_12-00-00_ab12
  cnntrain report runs/smoke/multirun/<sweep> csv=results.csv sort=job
"""


@dataclass
class ReportArgs:
    dir: str = ""
    # Where the CSV goes; default DIR/report.csv. `csv=null` writes none.
    csv: str | None = "auto"
    # metric (best first, failures last) | job (job number) | time
    sort: str = "metric"
    # Draw the pending end-of-run figures (figures/.pending.npz) of every run under DIR first.
    figures: bool = False


@dataclass
class Job:
    name: str
    job_dir: Path
    run_dir: Path  # where the work is (differs when resume=auto continued an earlier directory)
    status: str
    overrides: list[str] = field(default_factory=list)
    monitor: str | None = None
    best: float | None = None
    best_epoch: int | None = None
    epochs_done: int | None = None
    test_acc: float | None = None
    test_loss: float | None = None
    seconds: float | None = None
    test_balanced_acc: float | None = None
    test_macro_f1: float | None = None
    error: str = ""
    next_command: str = ""
    test_map: float | None = None  # a multi-label run's test metric, in place of test_acc


def _job_dirs(root: Path) -> list[Path]:
    """Directories that are runs: hold .hydra/overrides.yaml or summary.json (not under .submitit)."""
    found = {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    found |= {p.parent for p in root.rglob("summary.json")}
    return sorted(d for d in found if ".submitit" not in d.parts)


def _job_number(name: str) -> tuple[int, str]:
    head = name.split("_", 1)[0]
    return (int(head), name) if head.isdigit() else (1 << 30, name)


def _seconds(run_dir: Path, summary: dict[str, Any]) -> float | None:
    if isinstance(summary.get("train_seconds"), (int, float)):
        return float(summary["train_seconds"])
    try:  # unfinished: the epochs so far
        with open(RunDir(run_dir).metrics, newline="") as f:
            return sum(float(r["epoch_s"]) for r in csv.DictReader(f) if r.get("epoch_s")) or None
    except (OSError, ValueError, KeyError):
        return None


def _monitor(run_dir: Path, summary: dict[str, Any]) -> str | None:
    keys = [k for k in summary if k.startswith("best_val_")]
    if keys:
        return "val/" + keys[0].removeprefix("best_val_")
    cfg = RunDir(run_dir).config
    if cfg.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.select(OmegaConf.load(cfg), "trainer.monitor")
    return None


def read_job(job_dir: Path) -> Job:
    summary = read_json(RunDir(job_dir).summary) or {}
    run_dir = job_dir
    if summary.get("status") == "moved" and summary.get("run_dir"):
        run_dir = Path(summary["run_dir"])
        summary = read_json(RunDir(run_dir).summary) or {}
    overrides = job_overrides(job_dir) or job_overrides(run_dir) or []
    # The Optuna sweeper's record of the trial a job is: the job number says it, the table need not.
    overrides = [o for o in overrides if o.split("=", 1)[0] not in ("sweep.storage", "sweep.study", "sweep.trial")]
    status = str(summary.get("status") or ("pending" if not RunDir(run_dir).checkpoints.exists() else "running"))
    monitor = _monitor(run_dir, summary)
    key = f"best_{monitor.replace('/', '_')}" if monitor else ""
    job = Job(
        job_dir.name,
        job_dir,
        run_dir,
        status,
        overrides,
        monitor,
        summary.get(key),
        summary.get("best_epoch"),
        summary.get("epochs_done"),
        summary.get("test_acc"),
        summary.get("test_loss"),
        _seconds(run_dir, summary),
        summary.get("test_balanced_acc"),
        summary.get("test_macro_f1"),
        str(summary.get("error") or ""),
        test_map=summary.get("test_map"),
    )
    if status not in ("completed", "pruned"):  # a pruned trial was stopped on purpose: nothing to continue
        if RunDir(run_dir).last.is_file():
            job.next_command = f"cnntrain fit resume={run_dir}"
        elif status == "failed" or status == "pending":
            job.next_command = str(summary.get("command") or rerun_command(overrides))
    return job


def collect(root: Path) -> list[Job]:
    if not root.is_dir():
        raise UserError(f"report: {root} is not a directory; pass a sweep directory (runs/<name>/multirun/<sweep>)")
    jobs = [read_job(d) for d in _job_dirs(root)]
    if not jobs:
        raise UserError(
            f"report: no cnntrain runs under {root} (no summary.json or .hydra/overrides.yaml); "
            "pass a sweep directory such as runs/<name>/multirun/<sweep>"
        )
    return jobs


def sort_jobs(jobs: list[Job], by: str) -> list[Job]:
    if by == "job":
        return sorted(jobs, key=lambda j: _job_number(j.name))
    if by == "time":
        return sorted(jobs, key=lambda j: (j.seconds is None, j.seconds or 0.0))

    def key(j: Job) -> tuple[int, float, tuple[int, str]]:
        if j.best is None or not math.isfinite(j.best):
            return (1, 0.0, _job_number(j.name))
        higher_is_better = any(m in (j.monitor or "") for m in ("acc", "map"))
        return (0, -j.best if higher_is_better else j.best, _job_number(j.name))

    return sorted(jobs, key=key)


def split_overrides(jobs: list[Job]) -> tuple[list[str], list[str]]:
    """(overrides every job shares, keys whose values differ): the table shows only the second."""
    sets = [set(j.overrides) for j in jobs]
    common = set.intersection(*sets) if sets else set()
    order: list[str] = []
    for j in jobs:
        for o in j.overrides:
            if o not in common and o.split("=", 1)[0] not in order:
                order.append(o.split("=", 1)[0])
    first = jobs[0].overrides if jobs else []
    return [o for o in first if o in common], order


def _value(job: Job, key: str) -> str:
    return next((o.split("=", 1)[1] for o in job.overrides if o.split("=", 1)[0] == key), "")


def _short(value: str) -> str:
    """Optuna's 0.003538453590906551 as 0.003538 in the table (the CSV keeps every digit)."""
    if len(value) <= 8 or not any(c in value for c in ".e"):
        return value
    try:
        return format(float(value), ".4g")
    except ValueError:
        return value


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "" if x is None else format(x, spec)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or path.name
    except ValueError:
        return str(path)


def write_csv(path: Path, jobs: list[Job], keys: list[str]) -> None:
    columns = [
        "job",
        "status",
        *keys,
        "monitor",
        "best",
        "best_epoch",
        "epochs_done",
        "test_acc",
        "test_map",
        "test_loss",
        "train_seconds",
        "error",
        "command",
        "overrides",
        "run_dir",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for j in jobs:
            writer.writerow(
                [
                    j.name,
                    j.status,
                    *(_value(j, k) for k in keys),
                    j.monitor or "",
                    _fmt(j.best, ".6g"),
                    j.best_epoch if j.best_epoch is not None else "",
                    j.epochs_done or "",
                    _fmt(j.test_acc, ".6g"),
                    _fmt(j.test_map, ".6g"),
                    _fmt(j.test_loss, ".6g"),
                    _fmt(j.seconds, ".2f"),
                    j.error,
                    j.next_command,
                    " ".join(j.overrides),
                    str(j.run_dir),
                ]
            )


# Overrides that do not change a run's result (how it shows progress, where it writes, that it resumed):
# in the CSV, never a column of the table.
_NOT_RESULT = frozenset(
    {
        "resume",
        "trainer.progress",
        "trainer.log_every_n_steps",
        "trainer.checkpoint_every_n_steps",
        "trainer.dry_run",
        "dataset.download",
        "dataset.in_memory",
        "dataset.memory_limit_mb",
    }
)


def result_keys(keys: list[str]) -> list[str]:
    return [k for k in keys if k.lstrip("+~") not in _NOT_RESULT and not k.lstrip("+~").startswith("hydra")]


def short_names(keys: list[str]) -> dict[str, str]:
    """optimizer.lr -> lr for a column header, unless two keys end alike (then the full name)."""
    last = [k.lstrip("+~").rsplit(".", 1)[-1] for k in keys]
    return {k: name if last.count(name) == 1 else k for k, name in zip(keys, last, strict=True)}


def _label(job: Job, root: Path, one_sweep: bool) -> str:
    number = job.name.split("_", 1)[0]
    return number if one_sweep and number.isdigit() else _relative(job.job_dir, root)


def test_header(jobs: list[Job]) -> str:
    """The test column's name: `test acc` (single-label runs), `test mAP` (multi-label runs), `test` for both."""
    kinds = {"mAP" if j.test_acc is None else "acc" for j in jobs if j.test_acc is not None or j.test_map is not None}
    return f"test {kinds.pop()}" if len(kinds) == 1 else "test" if kinds else "test acc"


def _test_cell(j: Job, header: str) -> str:
    if j.test_acc is None and j.test_map is not None:
        return _fmt(j.test_map) if header == "test mAP" else f"mAP {_fmt(j.test_map)}"
    return _fmt(j.test_acc)


def _cells(j: Job, keys: list[str], header: str = "test acc") -> list[str]:
    return [
        *(_short(_value(j, k)) for k in keys),
        _fmt(j.best),
        str(j.best_epoch or ""),
        _test_cell(j, header),
        f"{j.seconds:.1f}s" if j.seconds else "",
        j.status + ("*" if j.run_dir.resolve() != j.job_dir.resolve() else ""),
    ]


def render(jobs: list[Job], common: list[str], keys: list[str], root: Path) -> None:
    """A table when every cell fits the terminal whole (short headers; the full keys are in the CSV), else one
    block per run; a run's name is never cut."""
    from cnntrain.commands.args import console

    out = console()
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:  # the width to fit in a pipe or log, as on a terminal
        out.width = int(columns)
    monitors = {j.monitor for j in jobs if j.monitor}
    metric = monitors.pop() if len(monitors) == 1 else "metric"
    keys = result_keys(keys)
    one_sweep = len({j.job_dir.parent for j in jobs}) == 1
    title = f"{root}  ({len(jobs)} jobs)"
    if common:
        out.print("common overrides: " + " ".join(common))
    test = test_header(jobs)
    shown, left_out = _fit_columns(jobs, keys, root, one_sweep, metric, out.width, test)
    if shown is None:
        _blocks(out, title, [[_label(j, root, one_sweep), *_cells(j, keys, test)] for j in jobs], keys, metric, test)
    else:
        headers = ["job", *short_names(shown).values(), f"best {metric}", "epoch", test, "time", "status"]
        _table(out, title, headers, [[_label(j, root, one_sweep), *_cells(j, shown, test)] for j in jobs], len(shown))
        if left_out:
            out.print(f"not shown, to fit {out.width} columns (they are in the CSV): {', '.join(left_out)}")
    if any(j.run_dir.resolve() != j.job_dir.resolve() for j in jobs):
        out.print("* ran in an earlier directory of the same job (resume=auto); its path is in the CSV's run_dir")
    for j in jobs:
        if j.error or j.next_command:
            out.print(f"job {j.name}: {j.status}{': ' + j.error if j.error else ''}")
            if j.next_command:
                out.print(f"  {'continue' if 'resume=' in j.next_command else 're-run'}: {j.next_command}")


def _fit_columns(
    jobs: list[Job], keys: list[str], root: Path, one_sweep: bool, metric: str, width: int, test: str
) -> tuple[list[str] | None, list[str]]:
    """The override columns of a table whose every cell is whole within `width`, leaving out the widest
    first; None when not even the run names and results fit (then one block per run)."""

    def needed(shown: list[str]) -> int:
        headers = ["job", *short_names(shown).values(), f"best {metric}", "epoch", test, "time", "status"]
        rows = [[_label(j, root, one_sweep), *_cells(j, shown, test)] for j in jobs]
        widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
        return sum(widths) + 3 * len(widths) + 1

    shown = list(keys)
    while needed(shown) > width and shown:
        widest = max(shown, key=lambda k: max(len(short_names(shown)[k]), *(len(_short(_value(j, k))) for j in jobs)))
        shown.remove(widest)
    if needed(shown) > width or (keys and not shown):
        return None, []
    return shown, [k for k in keys if k not in shown]


def _table(out: Any, title: str, headers: list[str], rows: list[list[str]], n_keys: int) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, name in enumerate(headers):
        right = i == 0 or i > n_keys and name != "status"
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _blocks(out: Any, title: str, rows: list[list[str]], keys: list[str], metric: str, test_name: str) -> None:
    """Too wide for a table: each run on its own lines, the name first and whole, then its values."""
    out.print(title)
    n = len(keys)
    for row in rows:
        label, values, (best, epoch, test, seconds, status) = row[0], row[1 : n + 1], row[n + 1 :]
        out.print(f"{label}")
        result = f"  {status}" + (f"  best {metric} {best}" if best else "") + (f" (epoch {epoch})" if epoch else "")
        out.print(result + (f"  {test_name} {test}" if test else "") + (f"  {seconds}" if seconds else ""))
        if keys:
            out.print("  " + "  ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True) if v))


FOLD_KEY = "trainer.fold"
FOLD_METRICS = (
    ("best", None),
    ("test acc", "test_acc"),
    ("test balanced acc", "test_balanced_acc"),
    ("test macro F1", "test_macro_f1"),
    ("test loss", "test_loss"),
)


def fold_groups(jobs: list[Job]) -> list[tuple[list[str], list[Job]]]:
    """Completed jobs of a k-fold sweep grouped by everything but their fold: (the shared overrides, jobs)."""
    groups: dict[tuple[str, ...], list[Job]] = {}
    for j in jobs:
        if j.status == "completed" and any(o.split("=", 1)[0] == FOLD_KEY for o in j.overrides):
            rest = tuple(sorted(o for o in j.overrides if o.split("=", 1)[0] != FOLD_KEY))
            groups.setdefault(rest, []).append(j)
    return [(list(k), v) for k, v in groups.items()]


def fold_stats(jobs: list[Job]) -> dict[str, tuple[float, float, int]]:
    """Metric -> (mean, standard deviation over the folds (n-1), folds counted)."""
    import statistics

    out = {}
    for label, attr in FOLD_METRICS:
        values = [v for j in jobs if (v := (j.best if attr is None else getattr(j, attr))) is not None]
        if values:
            out[label] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
    return out


def render_folds(jobs: list[Job], common: list[str]) -> None:
    from cnntrain.commands.args import console

    out = console()
    for shared, group in fold_groups(jobs):
        folds = next((o.split("=", 1)[1] for o in shared if o.startswith("trainer.folds=")), "?")
        monitor = group[0].monitor or "metric"
        extra = [o for o in shared if o not in common and not o.startswith("trainer.folds=")]
        out.print(
            f"cross-validation, {len(group)} of {folds} folds{' (' + ' '.join(extra) + ')' if extra else ''}: "
            "mean ± std"
        )
        for label, (mean, std, n) in fold_stats(group).items():
            name = f"best {monitor}" if label == "best" else label
            out.print(f"  {name:<20} {mean:.4f} ± {std:.4f}{'' if n == len(group) else f'  ({n} folds)'}")


def main(argv: list[str]) -> None:
    from cnntrain.commands.args import check_choice, parse_args, print_help, wants_help

    if wants_help(argv):
        print_help(HELP)
        return
    positional = [a for a in argv if "=" not in a]
    if len(positional) > 1:
        raise UserError(f"report takes one directory, got {len(positional)}: {' '.join(positional)}")
    keyed = [a for a in argv if "=" in a] + [f"dir={positional[0]}" for _ in positional[:1]]
    args = parse_args(ReportArgs, keyed, "report")
    if not args.dir:
        raise UserError(
            "report needs a directory: cnntrain report runs/<name>/multirun/<sweep> (see `cnntrain report --help`)"
        )
    check_choice("sort", args.sort, ("metric", "job", "time"))
    root = Path(args.dir).expanduser()
    if args.figures:
        _draw_pending(root)
    jobs = sort_jobs(collect(root), args.sort)
    common, keys = split_overrides(jobs)
    if args.csv is not None:  # first: a CSV path that cannot be written fails before any output
        given = args.csv != "auto"
        path = Path(args.csv).expanduser() if given else root / "report.csv"
        try:
            write_csv(path, jobs, keys)
        except OSError as e:
            if given:
                raise path_error(e, "csv", args.csv, "cannot write") from None
            raise UserError(
                f"cannot write the report's CSV {e.filename or path}: {os_reason(e)}; "
                "pass csv=FILE to write it elsewhere, or csv=null for none"
            ) from None
    render(jobs, common, keys, root)
    render_folds(jobs, common)
    if args.csv is not None:
        print(f"csv: {path}")
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


def _draw_pending(root: Path) -> None:
    from cnntrain.io.figures import PENDING, draw_pending

    runs = sorted(p.parent.parent for p in root.rglob(f"figures/{PENDING}"))
    for run_dir in runs:
        draw_pending(run_dir)
        print(f"figures: {run_dir / 'figures'}")
    if not runs:
        print(f"figures: none pending under {root}")
