"""`cnntrain report <sweep dir>`: every job of a sweep in one table, best first, and the same as CSV.

Reads only what the jobs left on disk (summary.json, .hydra/overrides.yaml, metrics.csv), so it works
on a sweep that is still running, was interrupted, or had jobs fail. No torch import.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnntrain.errors import UserError, os_reason, path_error
from cnntrain.io.files import read_json
from cnntrain.sweep.jobs import job_overrides, rerun_command

HELP = """\
usage: cnntrain report DIR [csv=FILE] [sort=metric|job|time] [figures=true]

One row per job of the sweep (or runs) under DIR: the overrides that differ between jobs, the
best validation metric (trainer.monitor) and its epoch, test accuracy, training time and status,
best first. Failed jobs are listed with their error and the command that runs them again;
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
    error: str = ""
    next_command: str = ""


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
        with open(run_dir / "metrics.csv", newline="") as f:
            return sum(float(r["epoch_s"]) for r in csv.DictReader(f) if r.get("epoch_s")) or None
    except (OSError, ValueError, KeyError):
        return None


def _monitor(run_dir: Path, summary: dict[str, Any]) -> str | None:
    keys = [k for k in summary if k.startswith("best_val_")]
    if keys:
        return "val/" + keys[0].removeprefix("best_val_")
    cfg = run_dir / ".hydra" / "config.yaml"
    if cfg.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.select(OmegaConf.load(cfg), "trainer.monitor")
    return None


def read_job(job_dir: Path) -> Job:
    summary = read_json(job_dir / "summary.json") or {}
    run_dir = job_dir
    if summary.get("status") == "moved" and summary.get("run_dir"):
        run_dir = Path(summary["run_dir"])
        summary = read_json(run_dir / "summary.json") or {}
    overrides = job_overrides(job_dir) or job_overrides(run_dir) or []
    status = str(summary.get("status") or ("pending" if not (run_dir / "checkpoints").exists() else "running"))
    monitor = _monitor(run_dir, summary)
    key = f"best_{monitor.replace('/', '_')}" if monitor else ""
    job = Job(job_dir.name, job_dir, run_dir, status, overrides, monitor, summary.get(key),
              summary.get("best_epoch"), summary.get("epochs_done"), summary.get("test_acc"),
              summary.get("test_loss"), _seconds(run_dir, summary), str(summary.get("error") or ""))
    if status != "completed":
        if (run_dir / "checkpoints" / "last.pt").is_file():
            job.next_command = f"cnntrain fit resume={run_dir}"
        elif status == "failed" or status == "pending":
            job.next_command = str(summary.get("command") or rerun_command(overrides))
    return job


def collect(root: Path) -> list[Job]:
    if not root.is_dir():
        raise UserError(f"report: {root} is not a directory; pass a sweep directory (runs/<name>/multirun/<sweep>)")
    jobs = [read_job(d) for d in _job_dirs(root)]
    if not jobs:
        raise UserError(f"report: no cnntrain runs under {root} (no summary.json or .hydra/overrides.yaml); "
                        "pass a sweep directory such as runs/<name>/multirun/<sweep>")
    return jobs


def sort_jobs(jobs: list[Job], by: str) -> list[Job]:
    if by == "job":
        return sorted(jobs, key=lambda j: _job_number(j.name))
    if by == "time":
        return sorted(jobs, key=lambda j: (j.seconds is None, j.seconds or 0.0))

    def key(j: Job) -> tuple[int, float, tuple[int, str]]:
        if j.best is None or not math.isfinite(j.best):
            return (1, 0.0, _job_number(j.name))
        higher_is_better = "acc" in (j.monitor or "")
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
    columns = ["job", "status", *keys, "monitor", "best", "best_epoch", "epochs_done", "test_acc", "test_loss",
               "train_seconds", "error", "command", "overrides", "run_dir"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for j in jobs:
            writer.writerow([j.name, j.status, *(_value(j, k) for k in keys), j.monitor or "", _fmt(j.best, ".6g"),
                             j.best_epoch if j.best_epoch is not None else "", j.epochs_done or "",
                             _fmt(j.test_acc, ".6g"), _fmt(j.test_loss, ".6g"), _fmt(j.seconds, ".2f"),
                             j.error, j.next_command, " ".join(j.overrides), str(j.run_dir)])


def render(jobs: list[Job], common: list[str], keys: list[str], root: Path) -> None:
    from rich.table import Table

    from cnntrain.commands.args import console

    out = console()
    monitors = {j.monitor for j in jobs if j.monitor}
    metric = monitors.pop() if len(monitors) == 1 else "metric"
    table = Table(title=f"{root}  ({len(jobs)} jobs)", title_justify="left")
    table.add_column("job", justify="right")
    for k in keys:
        table.add_column(k)
    for name, justify in ((f"best {metric}", "right"), ("epoch", "right"), ("test acc", "right"),
                          ("time", "right"), ("status", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    one_sweep = len({j.job_dir.parent for j in jobs}) == 1
    for j in jobs:
        number = j.name.split("_", 1)[0]
        label = number if one_sweep and number.isdigit() else _relative(j.job_dir, root)
        moved = "*" if j.run_dir.resolve() != j.job_dir.resolve() else ""
        table.add_row(label, *(_short(_value(j, k)) for k in keys), _fmt(j.best), str(j.best_epoch or ""),
                      _fmt(j.test_acc), f"{j.seconds:.1f}s" if j.seconds else "", j.status + moved)
    if common:
        out.print("common overrides: " + " ".join(common))
    out.print(table)
    if any(j.run_dir.resolve() != j.job_dir.resolve() for j in jobs):
        out.print("* ran in an earlier directory of the same job (resume=auto); its path is in the CSV's run_dir")
    for j in jobs:
        if j.error or j.next_command:
            out.print(f"job {j.name}: {j.status}{': ' + j.error if j.error else ''}")
            if j.next_command:
                out.print(f"  {'continue' if 'resume=' in j.next_command else 're-run'}: {j.next_command}")


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
        raise UserError("report needs a directory: cnntrain report runs/<name>/multirun/<sweep> "
                        "(see `cnntrain report --help`)")
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
            raise UserError(f"cannot write the report's CSV {e.filename or path}: {os_reason(e)}; "
                            "pass csv=FILE to write it elsewhere, or csv=null for none") from None
    render(jobs, common, keys, root)
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
