"""`cnntrain fit`: the Hydra app. Everything that adjusts a job's config happens here, once, at the top:

validation, resume resolution for sweep jobs, threads and GPUs under parallel launchers. Below this
the config is read-only, and typed: the engine gets the schema's dataclasses (config.typed). A start that fails leaves no run directory (a sweep job leaves a failure
record instead), and every error reaches the user as one line.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from cnntrain.cli.precheck import check_overrides
from cnntrain.cli.resume import expand_resume
from cnntrain.config.compose import (
    config_dir,
    fit_help,
    hydra_error_message,
    register_configs,
    register_resolvers,
    take_config_dir_flags,
)
from cnntrain.config.keys import check_options
from cnntrain.errors import UserError, user_path_error
from cnntrain.io.files import RunDir
from cnntrain.sweep import study
from cnntrain.sweep.pruning import PRUNED, Pruned


def run_fit(args: list[str]) -> None:
    """Run the Hydra app of `cnntrain fit` with these arguments; errors come out as UserError."""
    given = args
    if any(a in ("-h", "--help") for a in args):
        topics = [a for a in args if "=" not in a and not a.startswith("-")]
        if topics:  # `fit --help dataset`: the group's keys with what each means (Hydra's help lists groups)
            from cnntrain.config.describe import help_text

            print(help_text(topics))
            return
    args = take_config_dir_flags(args)  # the user's config folder joins the search path (register_configs)
    text = fit_help(args)
    if text is not None:  # Hydra's own --help composes every option of every group: seconds
        print(text)
        return
    check_options(given)  # `--lr 0.01`: one line naming optimizer.lr=0.01, not argparse's usage
    typed = list(given)
    import hydra
    from omegaconf import DictConfig

    register_configs()
    register_resolvers()
    study.register_resolvers()  # hydra/sweeper=optuna_study's
    check_overrides(args, typed)  # a sweep without --multirun; every job of a sweep validated before any trains
    # Let exceptions reach us (instead of Hydra's own printer) so every error reads the same.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    job = _JobState()
    job.args = list(args)  # as the user typed them (resume= adds more below)

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="fit")
    def app(cfg: DictConfig) -> float | None:
        return _job(cfg, job)

    saved_argv = sys.argv
    scratch = None
    command = list(args)
    try:
        args = fold_sweep(args)
        args = expand_resume(args)
        job.snapshot_resumed_run(args)
        if os.environ.get("RANK", "0") != "0":
            # torchrun: only rank 0's Hydra keeps a run directory; the others write into a scratch one.
            scratch = tempfile.mkdtemp(prefix="cnntrain-rank")
            args = [*args, "hydra.output_subdir=null", f"hydra.run.dir={scratch}", "hydra/job_logging=disabled"]
        sys.argv = ["cnntrain fit", *args]
        app()
        if job.failure is not None:
            raise job.failure
    except UserError as e:
        job.restore_resumed_run()
        raise _with_sweep_hint(e) from None
    except KeyboardInterrupt:
        job.restore_resumed_run()
        if job.sweep or "-m" in command or "--multirun" in command:
            _sweep_resume_hint(command, job)
            raise
        raise _interrupted(job) from None
    except SystemExit as e:
        if isinstance(e.code, int) and e.code > 128:  # a job stopped by a signal (130, 143): it saved last.pt
            _sweep_resume_hint(command, job)
        raise
    except Exception as e:  # Hydra / OmegaConf composition and override errors
        message = hydra_error_message(e)
        if message is None and isinstance(e, OSError) and not job.started:
            # Hydra could not create the run directory (read-only place, a file in the way...).
            where = e.filename or "the run directory"
            message = (
                f"cannot create the run directory {where}: {e.strerror or e}; set hydra.run.dir=DIR to a writable place"
            )
        if message is None:
            raise
        raise UserError(message) from None
    finally:
        sys.argv = saved_argv
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _interrupted(job: _JobState) -> UserError:
    """Ctrl-C that reached here, before the loop's own handler (or a second one): say what is left of the run."""
    run_dir = job.run_dir
    if run_dir is not None and RunDir(run_dir).last.is_file():
        error = UserError(f"interrupted; the last checkpoint of the run is kept: cnntrain fit resume={run_dir}")
    elif run_dir is not None and run_dir.is_dir():
        error = UserError(
            f"interrupted before the run's first checkpoint: there is nothing to resume (its log and "
            f"metrics so far are in {run_dir})"
        )
    else:
        error = UserError("interrupted before training started: nothing was saved, and there is nothing to resume")
    error.exit_code = 130
    return error


def fold_sweep(args: list[str]) -> list[str]:
    """`trainer.folds=K` on the command line: the K folds become the jobs of one sweep (trainer.fold=0..K-1),
    run by whatever launcher the command names, so they resume, report and fail like any sweep's jobs."""
    folds = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0].lstrip("+") == "trainer.folds"), None)
    if folds is None or any(a.split("=", 1)[0].lstrip("+") == "trainer.fold" for a in args):
        return args
    try:
        k = int(folds)
    except ValueError:
        return args  # not a number: the schema says so, with the key
    if k < 2:
        return args  # validate() refuses it in one line
    # The flag first: argparse takes no more overrides after a flag (resume=auto appends hydra.sweep.dir).
    return [*([] if {"-m", "--multirun"} & set(args) else ["--multirun"]), *args, f"trainer.fold=range(0,{k})"]


def _sweep_resume_hint(command: list[str], job: _JobState) -> None:
    """A sweep stopped by Ctrl-C or SIGTERM: print the command that continues all of it (resume=auto: finished
    jobs are not run again, stopped ones continue from their last.pt, the rest start)."""
    if not (job.sweep or "-m" in command or "--multirun" in command):
        return
    import shlex

    again = [a for a in command if a.split("=", 1)[0].lstrip("+~") != "resume"]
    print(
        f"the sweep was stopped; continue it with:\n  {shlex.join(['cnntrain', 'fit', *again, 'resume=auto'])}",
        flush=True,
    )


def _job(cfg: Any, job: _JobState) -> float | None:
    """One job: adjust the config at the top, freeze it, train; clean up or record a failure once."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from cnntrain.config import typed, validate
    from cnntrain.io.files import discard_run_dir
    from cnntrain.io.trackers import check_logger
    from cnntrain.sweep import jobs as sweep

    job.started = True
    hc = HydraConfig.get()
    single = hc.mode == RunMode.RUN
    job.sweep = not single
    run_dir = Path(hc.runtime.output_dir)
    job.run_dir = run_dir
    resuming = cfg.resume is not None
    try:
        validate(cfg)  # before torch is imported: a bad value fails in a second
        check_logger(cfg)  # logger=mlflow: its package and tracking store, before any data are loaded
        check_pruner(cfg, hc)
        # Sweep jobs: resume=auto / a requeue may point elsewhere or find the job already done.
        run_dir, resume, recorded = sweep.prepare_job(cfg, run_dir)
        if recorded is not None:
            return recorded
        cfg.resume = resume
        sweep.apply_launcher_resources(cfg)
        OmegaConf.set_readonly(cfg, True)
        from cnntrain.engine.loop import fit

        # The engine works on the schema's dataclasses, made here once: each builder takes its own part.
        result = fit(typed(cfg), run_dir)
        if cfg.trainer.dry_run:
            discard_run_dir(run_dir)
        return result
    except Pruned:
        return PRUNED  # the Optuna sweeper tells the study; summary.json says pruned
    except BaseException as e:
        if single and not resuming:
            discard_run_dir(run_dir)  # a start that failed before training leaves nothing under runs/
        sweep.record_failure(run_dir, e)  # for `cnntrain report`: summary.json says failed and why
        if not single or isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        error = e if isinstance(e, UserError) else nondeterministic_error(e)
        if error is None and isinstance(e, OSError):  # a path given on the command line that cannot be used
            error = user_path_error(e, job.args)
        if error is None:
            raise
        # Kept and raised after Hydra returns: raised through Hydra it would first print
        # "Error executing job with overrides: ..." above our one-line message.
        job.failure = error
        return None


def check_pruner(cfg: Any, hc: Any) -> None:
    """sweep.pruner works through the trial the Optuna sweeper gives each job; anywhere else it would do nothing."""
    if cfg.sweep.pruner == "none":
        return
    target = str(getattr(hc.sweeper, "_target_", "") or "")
    if not target.endswith("OptunaSweeper") or cfg.sweep.trial is None:
        raise UserError(
            f"sweep.pruner={cfg.sweep.pruner} prunes the trials of an Optuna study; run it as one: "
            f"cnntrain fit --multirun hydra/sweeper=optuna sweep.pruner={cfg.sweep.pruner} ... "
            "(or experiment=tune)"
        )


class _JobState:
    """What the Hydra app of one `cnntrain fit` learns, for the code around `app()`."""

    def __init__(self) -> None:
        self.started = False  # Hydra got as far as calling the task (the run directory exists)
        self.sweep = False  # ... as a job of a sweep (--multirun)
        self.args: list[str] = []  # the command line's arguments, before resume= expanded them
        self.failure: UserError | None = None  # a single run's error, raised once Hydra has returned
        self.run_dir: Path | None = None  # the job's run directory, once Hydra has made it
        self._saved: dict[Path, bytes] = {}
        self._last: tuple[Path, tuple[int, int] | None] | None = None

    def snapshot_resumed_run(self, args: list[str]) -> None:
        """Hydra rewrites the resumed run's .hydra/*.yaml before fit starts: keep the old ones to put back."""
        run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")), None)
        if run_dir is None or not any(a.startswith("resume=") for a in args):
            return
        run = RunDir(Path(run_dir))
        self._saved = {f: f.read_bytes() for f in run.hydra.glob("*.yaml")}
        last = run.last
        self._last = (last, _stat_key(last))

    def restore_resumed_run(self) -> None:
        """A resume that failed before training anything leaves the run's recorded config as it was,
        so that a corrected `resume=<run>` composes the run's own overrides again, not the failed ones."""
        if self._last is None or _stat_key(self._last[0]) != self._last[1]:
            return
        for path, data in self._saved.items():
            path.write_bytes(data)


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def nondeterministic_op(e: BaseException) -> str | None:
    """The op torch names when trainer.deterministic=true meets one without a deterministic kernel
    (e.g. adaptive_avg_pool2d_backward_cuda in the ResNets on a GPU), else None."""
    import re

    m = re.match(r"(\S+) does not have a deterministic implementation", str(e))
    return m.group(1) if m else None


def nondeterministic_error(e: BaseException) -> UserError | None:
    op = nondeterministic_op(e) if isinstance(e, RuntimeError) else None
    if op is None:
        return None
    return UserError(
        f"trainer.deterministic=true, but {op} has no deterministic implementation on this device; "
        "set trainer.deterministic=false or pick a model without it"
    )


def _with_sweep_hint(e: UserError) -> UserError:
    """A sweep raises the first failed job's error after running the others: say where all of them are."""
    sweep_dir = getattr(e, "sweep_dir", None)  # set by cnntrain.sweep.jobs.record_failure in the job
    if sweep_dir is None:
        return e
    hinted = UserError(f"{e} (a job of the sweep failed; `cnntrain report {sweep_dir}` lists every job)")
    hinted.exit_code = e.exit_code
    return hinted
