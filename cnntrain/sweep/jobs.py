"""Sweep jobs: resources under parallel launchers, `resume=auto`, and a record of every failure.

A sweep job is recognised by Hydra's run mode (MULTIRUN). The rules, in the order a job meets them:

* `prepare_job` (before fit): with `resume=auto`, the same job (same overrides, `resume` and display-only
  keys aside) that already completed is not run again; one that stopped early continues from its last.pt.
  A job whose own directory already holds last.pt (a SLURM job requeued by submitit) continues too.
* `apply_launcher_resources` (before fit, in cnntrain.cli.fit): concurrent jobs share the cores instead of each taking
  all of them, and GPU jobs go round-robin over the visible GPUs.
* `record_failure` (when fit raises): summary.json says `failed` and why, so `cnntrain report` lists the
  job with its error instead of losing it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cnntrain.io.cpus import usable_cores
from cnntrain.io.files import RunDir, read_json, status, write_json

# Keys that do not change what a job computes: ignored when matching a job to an earlier run of it
# (and left out of the job directory names, see hydra.job.config.override_dirname in configs/fit.yaml).
IGNORED_KEYS = frozenset({"resume", "trainer.progress"})


# ----------------------------------------------------------------------------- Hydra state


def hydra_config() -> Any | None:
    """The running Hydra job's `hydra` node, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def in_sweep() -> bool:
    from hydra.types import RunMode

    hc = hydra_config()
    return hc is not None and hc.mode == RunMode.MULTIRUN


# ----------------------------------------------------------------------------- matching jobs


def job_key(overrides: Iterable[str]) -> frozenset[str]:
    """Overrides in a canonical spelling (`optimizer.lr=1e-3` == `optimizer.lr=0.001`), ignored keys dropped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = set()
    for text in overrides:
        text = str(text)
        try:
            (o,) = parser.parse_overrides([text])
        except Exception:  # not parseable: compare it as written
            out.add(text)
            continue
        if o.key_or_group in IGNORED_KEYS or o.is_hydra_override():
            continue
        out.add(f"{o.get_key_element()}={_canonical_value(o, text)}")
    return frozenset(out)


def _canonical_value(o: Any, text: str) -> str:
    if not o.is_sweep_override():
        return str(o.get_value_element_as_str())
    if o.is_choice_sweep():  # a,b,c: each value canonical, the order kept (it sets the job numbers)
        return ",".join(o.sweep_string_iterator())
    return text.split("=", 1)[1]  # range() / interval(): as written


def job_overrides(job_dir: Path) -> list[str] | None:
    """The overrides a job ran with: .hydra/overrides.yaml, or the copy in the record of a failed start."""
    saved = RunDir(job_dir).overrides
    if saved.is_file():
        from omegaconf import OmegaConf

        return [str(o) for o in OmegaConf.load(saved)]
    summary = read_json(RunDir(job_dir).summary) or {}
    overrides = summary.get("overrides")
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def resumable(run_dir: Path) -> bool:
    """Holds a trainer checkpoint and did not finish."""
    # A trial its study pruned is over too: continuing it would undo the pruner's decision.
    return RunDir(run_dir).last.is_file() and status(run_dir) not in ("completed", "pruned")


def newest_unfinished_run(base: Path) -> Path | None:
    """`resume=auto` for a single run: the newest resumable run directory directly under base (runs/<name>)."""
    if not base.is_dir():
        return None
    runs = [run for run in RunDir.with_last(base) if resumable(run.path)]
    newest = max(runs, key=lambda run: run.last.stat().st_mtime, default=None)
    return newest.path if newest is not None else None


def matching_sweep_dir(sweeps: Path, overrides: Iterable[str]) -> Path | None:
    """The newest earlier sweep under `sweeps` (runs/<name>/multirun) started with the same overrides."""
    if not sweeps.is_dir():
        return None
    from omegaconf import OmegaConf

    want = job_key(overrides)
    found = []
    for saved in sweeps.glob("*/multirun.yaml"):
        try:
            task = OmegaConf.load(saved).hydra.overrides.task
        except Exception:  # unreadable or foreign file: not ours to reuse
            continue
        if job_key(task) == want:
            found.append(saved.parent)
    return max(found, key=lambda d: (d / "multirun.yaml").stat().st_mtime, default=None)


# ----------------------------------------------------------------------------- before fit


def prepare_job(cfg: Any, run_dir: Path) -> tuple[Path, str | None, float | None]:
    """Where a sweep job runs and whether it must run: (run dir, what to resume or None, recorded objective of
    a finished job or None). The caller (the CLI, at the top) puts the resume into the config."""
    hc = hydra_config()
    if not in_sweep():
        return run_dir, cfg.resume, None
    auto = cfg.resume == "auto"
    requeued = cfg.resume is None and RunDir(run_dir).last.is_file()
    if not (auto or requeued):
        return run_dir, cfg.resume, None
    candidates = [run_dir]
    if auto:
        mine = job_key(hc.overrides.task)
        sweeps = Path(str(hc.sweep.dir)).parent
        for saved in sorted(sweeps.glob("*/*/.hydra/overrides.yaml")):
            job_dir = saved.parent.parent
            if job_dir.resolve() != run_dir.resolve() and job_key(job_overrides(job_dir) or []) == mine:
                candidates.append(job_dir)

    def best_key(d: Path) -> str:
        """A multi-label run records the metric it monitored (val/acc stands for val/map there)."""
        monitor = (read_json(RunDir(d).summary) or {}).get("monitor") or cfg.trainer.monitor
        return f"best_{str(monitor).replace('/', '_')}"

    def age(d: Path) -> float:
        summary = RunDir(d).summary
        return summary.stat().st_mtime if summary.exists() else 0.0

    done = [
        d
        for d in candidates
        if status(d) == "completed" and (read_json(RunDir(d).summary) or {}).get(best_key(d)) is not None
    ]
    if done:
        best = max(done, key=age)
        _point_to(run_dir, best, "completed earlier: not run again (resume=auto)")
        _log(
            f"{'resume=auto' if auto else 'requeued job'}: this job completed in {best}; "
            f"returning its recorded {cfg.trainer.monitor}"
        )
        return best, None, float(read_json(RunDir(best).summary)[best_key(best)])  # type: ignore[index]
    unfinished = [d for d in candidates if resumable(d)]
    if unfinished:
        target = max(unfinished, key=lambda d: RunDir(d).last.stat().st_mtime)
        _point_to(run_dir, target, "continued in its earlier directory (resume=auto)")
        _log(f"{'resume=auto' if auto else 'requeued job'}: continuing {target}")
        return target, str(target), None
    return run_dir, None, None


def _point_to(run_dir: Path, target: Path, why: str) -> None:
    """A job directory whose work lives elsewhere says so (cnntrain report follows the pointer)."""
    if target.resolve() != run_dir.resolve():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(RunDir(run_dir).summary, {"status": "moved", "run_dir": str(target), "reason": why})


def _log(message: str) -> None:
    import logging

    logging.getLogger("cnntrain").info(message)
    print(message, flush=True)


# ----------------------------------------------------------------------------- at the top of a job (cnntrain.cli.fit)


def cpu_count() -> int:
    """Cores this process may use: the affinity mask (SLURM, taskset), capped by a cgroup CPU quota."""
    return usable_cores()


def concurrent_jobs(launcher: Any) -> int:
    """How many jobs a launcher runs at once on this machine (joblib's n_jobs; 1 for the rest)."""
    n = launcher.get("n_jobs") if launcher is not None else None
    if not isinstance(n, int) or n == 0:
        return 1
    return n if n > 0 else max(1, cpu_count() + 1 + n)  # joblib: -1 = all cores, -2 = all but one...


def apply_launcher_resources(cfg: Any) -> None:
    """In a sweep job: a torch thread count that shares the cores, and a GPU of its own when several are visible.

    Only fills in what the user left open: trainer.num_threads=null and trainer.device=auto.
    """
    if not in_sweep():
        return
    hc = hydra_config()
    launcher = hc.get("launcher")
    parallel = concurrent_jobs(launcher)
    t = cfg.trainer
    if t.num_threads is None:
        slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
        cpus = launcher.get("cpus_per_task") if launcher is not None else None
        if slurm.isdigit():
            t.num_threads = int(slurm)
        elif isinstance(cpus, int) and cpus > 0:
            t.num_threads = cpus
        elif parallel > 1:
            t.num_threads = max(1, cpu_count() // parallel)
    if str(t.device).strip().lower() == "auto" and parallel > 1:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            t.device = f"cuda:{int(hc.job.num) % torch.cuda.device_count()}"


# ----------------------------------------------------------------------------- when fit raises


def error_line(exc: BaseException) -> str:
    from cnntrain.errors import UserError

    text = " ".join(str(exc).split())
    if isinstance(exc, UserError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def rerun_command(overrides: Iterable[str]) -> str:
    """The command that runs one job of a sweep again, on its own."""
    kept = [str(o) for o in overrides if not str(o).startswith(("resume=", "+resume="))]
    return shlex.join(["cnntrain", "fit", *kept])


def weights_command(checkpoint: Path, overrides: Iterable[str]) -> str:
    """The command that starts a new run from a checkpoint's weights, with a run's overrides."""
    return new_run_command(overrides, f"model.weights={checkpoint}")


def new_run_command(overrides: Iterable[str], *more: str) -> str:
    """`cnntrain fit` with a run's overrides (less resume, model.weights and Hydra's own), as a new run."""
    kept = [
        str(o)
        for o in overrides
        if str(o).split("=", 1)[0].lstrip("+~") not in ("resume", "model.weights")
        and not str(o).lstrip("+~").startswith("hydra")
    ]
    return shlex.join(["cnntrain", "fit", *kept, *more])


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """Leave a failed job's error where `cnntrain report` and people look: its summary.json."""
    path = RunDir(run_dir).summary
    summary = read_json(path)
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        # Our own stop handler already wrote `interrupted`; a hard exit (second Ctrl-C, a
        # launcher's signal handler) leaves `running`, which would be a lie.
        if summary is not None and summary.get("status") == "running":
            summary["status"] = "interrupted"
            write_json(path, summary)
        return
    message = error_line(exc)
    if in_sweep():
        # Travels with the exception (pickled too, for launchers that run jobs elsewhere) so the
        # command's one-line error can point at the report of the whole sweep.
        with contextlib.suppress(AttributeError, TypeError):
            exc.sweep_dir = str(hydra_config().sweep.dir)  # type: ignore[attr-defined]
    if summary is not None and summary.get("status") in ("running", "diverged", None):
        if summary.get("status") != "diverged":
            summary["status"] = "failed"
        summary["error"] = message
        write_json(path, summary)
        return
    if summary is None and in_sweep():
        # Failed before training started: fit removed the directory (right for a single run, where
        # the one-line error says it all); in a sweep keep a record so the report shows the job.
        overrides = [str(o) for o in hydra_config().overrides.task]
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            path,
            {
                "status": "failed",
                "run_dir": str(run_dir),
                "error": message,
                "overrides": overrides,
                "command": rerun_command(overrides),
            },
        )
