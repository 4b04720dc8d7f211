"""The `cnntrain` command: subcommand dispatch and error reporting.

Kept import-light (no torch, no Hydra at import time) so that `cnntrain --help` answers at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnntrain import __version__
from cnntrain.errors import UserError, did_you_mean

COMMANDS = {
    "fit": "train a CNN from the composed config (Hydra overrides, --multirun, --cfg job, --help)",
    "evaluate": "score a checkpoint on a dataset split: per-class metrics, confusion matrix, figures",
    "predict": "classify image files (file, folder or glob) with a checkpoint; top-k table and CSV",
    "explain": "Grad-CAM heat maps: which pixels drove each prediction",
    "export": "write the model as TorchScript, ONNX or a state_dict, checked against the eager model",
    "list": "the options of every config group, with descriptions",
    "report": "one table of a sweep's jobs (overrides, best metric, test, time, status, errors), plus a CSV",
    "lr-find": "learning-rate range test: loss against an exponentially growing lr, plot and suggested lr",
}

# After-training commands: each module has main(args); imported only when its command runs.
_COMMAND_MODULES = {"evaluate": "evaluate", "predict": "predict", "explain": "explain", "export": "export",
                    "list": "catalog", "report": "report", "lr-find": "lr_find"}

USAGE = """\
usage: cnntrain <command> [options and Hydra overrides]

Train convolutional neural networks for image classification from Hydra configs.

commands:
{commands}

examples:
  cnntrain fit                                      # the seed CNN on the embedded MNIST digits
  cnntrain fit model=resnet8 optimizer.lr=3e-3 trainer.epochs=20
  cnntrain fit experiment=smoke                     # a 10-second end-to-end run
  cnntrain fit --multirun optimizer.lr=1e-3,3e-3    # a sweep, one run directory per job
  cnntrain fit --cfg job                            # print the composed config and exit
  cnntrain fit --help                               # config groups, their options and Hydra flags
  cnntrain fit resume=runs/default/<run>            # continue an interrupted run
  cnntrain evaluate ckpt=runs/default/<run>         # test metrics, confusion matrix, figures
  cnntrain predict ckpt=runs/default/<run> inputs=photos/

Run `cnntrain <command> --help` for a command's own help. Version {version}.
"""

# One tag per process: keeps two runs started in the same second in different directories.
_RUN_TAG = secrets.token_hex(2)


def config_dir() -> Path:
    """configs/ of a git clone (beside the package) or of an installed wheel (inside it)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "fit.yaml").is_file():
            return candidate
    raise UserError(f"cannot find cnntrain's configs (looked in {here / 'configs'} and {here.parent / 'configs'}); "
                    "reinstall cnntrain")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(len(c) for c in COMMANDS)
        commands = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
        print(USAGE.format(commands=commands, version=__version__))
        return
    if argv[0] in ("-V", "--version"):
        print(f"cnntrain {__version__}")
        return
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        _fail(f"unknown command '{command}'{did_you_mean(command, COMMANDS)}; commands: {', '.join(COMMANDS)}", 2)
    try:
        if command == "fit":
            _run_hydra_app("fit", args)
        else:
            import importlib

            importlib.import_module(f"cnntrain.{_COMMAND_MODULES[command]}").main(args)
    except UserError as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def _fail(message: str, code: int) -> None:
    print(f"cnntrain: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cnntrain_tag"):
        OmegaConf.register_new_resolver("cnntrain_tag", lambda: _RUN_TAG)
    if not OmegaConf.has_resolver("cnntrain_dirname"):
        # Job directory names come from overrides; a "/" in a value (val/loss) must not nest folders.
        OmegaConf.register_new_resolver("cnntrain_dirname", lambda s: str(s).replace("/", "-") or "defaults")
    if not OmegaConf.has_resolver("cnntrain_direction"):
        # Optuna's direction follows trainer.monitor: accuracy up, loss down.
        OmegaConf.register_new_resolver("cnntrain_direction", lambda m: "maximize" if "acc" in str(m) else "minimize")
    if not OmegaConf.has_resolver("cnntrain_sqlite"):
        OmegaConf.register_new_resolver("cnntrain_sqlite", _sqlite_url)


def _sqlite_url(path: str) -> str:
    """An SQLite URL for an Optuna study file; its folder is created (SQLite will not)."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def _run_hydra_app(name: str, args: list[str]) -> None:
    """Run a Hydra app with our config dir; turn composition errors into one-line messages."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from cnntrain.config import register_configs

    register_configs()
    _register_resolvers()
    # Let exceptions reach us (instead of Hydra's own printer) so every error reads the same.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    job = _JobState()

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=name)
    @_guard_single_run(job)
    def app(cfg: DictConfig) -> float | None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        from cnntrain import sweep
        from cnntrain.train import fit

        # Sweep jobs: resume=auto / requeue may point elsewhere or find the job already done.
        run_dir, recorded = sweep.prepare_job(cfg, run_dir)
        if recorded is not None:
            return recorded
        try:
            return fit(cfg, run_dir)
        except BaseException as e:  # record it for `cnntrain report`, then let Hydra see it as before
            sweep.record_failure(run_dir, e)
            raise

    saved_argv = sys.argv
    scratch = None
    try:
        if name == "fit":
            args = expand_resume(args)
            job.snapshot_resumed_run(args)
            if os.environ.get("RANK", "0") != "0":
                # torchrun: only rank 0's Hydra keeps a run directory; the others write into a scratch one.
                import tempfile

                scratch = tempfile.mkdtemp(prefix="cnntrain-rank")
                args = [*args, "hydra.output_subdir=null", f"hydra.run.dir={scratch}", "hydra/job_logging=disabled"]
        sys.argv = [f"cnntrain {name}", *args]
        app()
        if job.failure is not None:
            raise job.failure
    except UserError as e:
        job.restore_resumed_run()
        raise _with_sweep_hint(e) from None
    except KeyboardInterrupt:
        job.restore_resumed_run()
        raise
    except Exception as e:  # Hydra / OmegaConf composition and override errors
        message = hydra_error_message(e)
        if message is None and isinstance(e, OSError) and not job.started:
            # Hydra could not create the run directory (read-only place, a file in the way...).
            where = e.filename or "the run directory"
            message = f"cannot create the run directory {where}: {e.strerror or e}; set hydra.run.dir=DIR to a writable place"
        if message is None:
            raise
        raise UserError(message) from None
    finally:
        sys.argv = saved_argv
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)


class _JobState:
    """What the Hydra app of one `cnntrain fit` learns, for the code around `app()`."""

    def __init__(self) -> None:
        self.started = False  # Hydra got as far as calling the task (the run directory exists)
        self.failure: UserError | None = None  # a single run's error, raised once Hydra has returned
        self._saved: dict[Path, bytes] = {}
        self._last: tuple[Path, tuple[int, int] | None] | None = None

    def snapshot_resumed_run(self, args: list[str]) -> None:
        """Hydra rewrites the resumed run's .hydra/*.yaml before fit starts: keep the old ones to put back."""
        run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")), None)
        if run_dir is None or not any(a.startswith("resume=") for a in args):
            return
        hydra_dir = Path(run_dir) / ".hydra"
        self._saved = {f: f.read_bytes() for f in hydra_dir.glob("*.yaml")}
        last = Path(run_dir) / "checkpoints" / "last.pt"
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


def _guard_single_run(job: _JobState) -> Callable:
    """Wrap the Hydra task of a single run (sweeps are left to their launcher and cnntrain.sweep).

    * The config's range checks run before torch is imported, so a bad value fails in a second.
    * A UserError is kept and raised after Hydra returns: raised through Hydra it would first
      print "Error executing job with overrides: ..." above our one-line message.
    * A start that failed (or was interrupted) before training leaves no run directory behind.
    """

    def wrap(task: Callable) -> Callable:
        @functools.wraps(task)
        def guarded(cfg: Any) -> Any:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            job.started = True
            hc = HydraConfig.get()
            if hc.mode != RunMode.RUN:
                return task(cfg)
            run_dir = Path(hc.runtime.output_dir)
            try:
                from cnntrain.config import validate

                validate(cfg)
                return task(cfg)
            except UserError as e:
                job.failure = e
                if cfg.resume is None:
                    _discard_failed_start(run_dir)
                return None
            except RuntimeError as e:
                op = nondeterministic_op(e)
                if op is None:
                    raise
                job.failure = UserError(f"trainer.deterministic=true, but {op} has no deterministic implementation on "
                                        "this device; set trainer.deterministic=false or pick a model without it")
                return None
            except KeyboardInterrupt:
                if cfg.resume is None:
                    _discard_failed_start(run_dir)
                raise

        return guarded

    return wrap


def nondeterministic_op(e: BaseException) -> str | None:
    """The op torch names when trainer.deterministic=true meets one without a deterministic kernel
    (e.g. adaptive_avg_pool2d_backward_cuda in the ResNets on a GPU), else None."""
    import re

    m = re.match(r"(\S+) does not have a deterministic implementation", str(e))
    return m.group(1) if m else None


def _discard_failed_start(run_dir: Path) -> None:
    """Remove the directory of a run that never started training (no summary.json, no checkpoint)."""
    import shutil

    if (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()  # the experiment's folder, if this was its only run


def _with_sweep_hint(e: UserError) -> UserError:
    """A sweep raises the first failed job's error after running the others: say where all of them are."""
    sweep_dir = getattr(e, "sweep_dir", None)  # set by cnntrain.sweep.record_failure in the job
    if sweep_dir is None:
        return e
    hinted = UserError(f"{e} (a job of the sweep failed; `cnntrain report {sweep_dir}` lists every job)")
    hinted.exit_code = e.exit_code
    return hinted


def expand_resume(args: list[str]) -> list[str]:
    """`resume=<run dir>`: compose the run's own overrides again, then the new ones, in its directory."""
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("resume=")), None)
    if resume == "auto":
        return _expand_auto_resume(args)
    if resume in (None, "", "null"):
        return args
    from cnntrain.checkpoint import find_checkpoint

    path = find_checkpoint(resume)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise UserError(f"{run_dir} is not a cnntrain run directory (no .hydra/overrides.yaml); "
                        "resume takes a run directory or its checkpoints/last.pt")
    from omegaconf import OmegaConf

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    merged: dict[str, str] = {}
    for override in [*OmegaConf.load(saved), *args]:
        override = str(override)
        if key(override) != "resume":
            merged[key(override)] = override
    return [*merged.values(), f"resume={path}", f"hydra.run.dir={run_dir}"]


# Hydra flags that take a value: the token after them is not an override.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun"}


def _overrides_only(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in _VALUE_FLAGS:
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def _expand_auto_resume(args: list[str]) -> list[str]:
    """`resume=auto`: continue the newest unfinished run of this experiment, or start fresh.

    A single run looks in runs/<name>/ for a run with checkpoints/last.pt that did not complete. A sweep
    reuses the newest earlier sweep started with the same overrides, and each job then finds its own
    earlier run (cnntrain.sweep.prepare_job): finished jobs are skipped, unfinished ones continue.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cnntrain import sweep

    overrides = _overrides_only(args)
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [text for text, o in zip(overrides, parsed, strict=True) if not o.is_sweep_override() and o.key_or_group != "resume"]
    # Compose without running to learn where this experiment's runs live (runs/<name>/...).
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="fit", overrides=fixed, return_hydra_config=True)
    if "-m" in args or "--multirun" in args:
        if any(o.key_or_group == "hydra.sweep.dir" for o in parsed):
            return args  # the sweep directory is given: its jobs find themselves there
        task = [text for text, o in zip(overrides, parsed, strict=True) if not o.is_hydra_override()]
        previous = sweep.matching_sweep_dir(Path(str(cfg.hydra.sweep.dir)).parent, task)
        if previous is None:
            return args
        print(f"resume=auto: continuing the sweep in {previous}", flush=True)
        return [*args, f"hydra.sweep.dir={previous}"]
    base = Path(str(cfg.hydra.run.dir)).parent
    run = sweep.newest_unfinished_run(base)
    rest = [a for a in args if not a.startswith("resume=")]
    if run is None:
        print(f"resume=auto: no unfinished run in {base}; starting a new one", flush=True)
        return rest
    print(f"resume=auto: continuing {run}", flush=True)
    return expand_resume([*rest, f"resume={run}"])


def hydra_error_message(e: BaseException) -> str | None:
    """One actionable line for the errors Hydra and OmegaConf raise while composing a config."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, MissingConfigException):
        return _missing_option_message(e)
    if isinstance(e, OverrideParseException):
        override = getattr(e, "override", None)
        where = f" '{override}'" if override and override not in str(e) else ""
        return f"cannot parse the override{where}: {_first_line(e)}; write overrides as key=value or group=option"
    cause = e.__cause__ if isinstance(e, ConfigCompositionException) else e
    if isinstance(cause, OmegaConfBaseException):
        return _omegaconf_message(cause, e)
    if isinstance(e, ConfigCompositionException):
        text = " ".join(str(e).split())
        return text
    return None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _missing_option_message(e: BaseException) -> str:
    """'Could not find model/foo' + the available options -> unknown model 'foo' (did you mean ...)."""
    text = str(e)
    import re

    m = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if m is None:
        m2 = re.search(r"Could not load '([^']+)/([^'/]+)'", text)
        m = m2
    if m is None:
        return " ".join(text.split())
    group, option = m.group(1).split("/")[-1], m.group(2)
    options = re.findall(r"^\t(\S+)$", text, flags=re.M)
    if not options:
        options = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
    extra = _PLUGIN_EXTRAS.get(option)
    if extra is not None and option not in options:
        return f"the {group} '{option}' is a Hydra plugin that is not installed; pip install 'cnntrain[{extra}]'"
    return f"unknown {group} '{option}'{did_you_mean(option, options)}; available: {', '.join(options)}"


# Launchers and sweepers that come from optional Hydra plugins, and the extra that installs each.
# (Our presets optuna_study, parallel and slurm name these in their defaults, so they end up here too.)
_PLUGIN_EXTRAS = {"optuna": "optuna", "joblib": "joblib", "submitit_slurm": "slurm", "submitit_local": "slurm"}


def _omegaconf_message(cause: BaseException, outer: BaseException) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    full_key = getattr(cause, "full_key", None) or ""
    msg = getattr(cause, "msg", None) or _first_line(cause)
    msg = msg.strip().splitlines()[0]
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "not in" in msg:
        # Unknown key: suggest the closest declared one.
        parent_key, _, leaf = full_key.rpartition(".")
        known = _schema_keys(parent_key)
        hint = did_you_mean(leaf, known)
        where = f" in '{parent_key}'" if parent_key else ""
        return f"unknown key '{full_key}'{where}{hint}; known keys: {', '.join(known)}"
    if isinstance(cause, ValidationError):
        return f"{full_key}: {msg}" if full_key else msg
    return f"{full_key}: {msg}" if full_key else " ".join(str(outer).split())


def _schema_keys(group: str) -> list[str]:
    import dataclasses

    from cnntrain.config import FitConfig

    node = FitConfig
    for part in [p for p in group.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return []
        node = fields[part].default_factory  # type: ignore[assignment]
    return [f.name for f in dataclasses.fields(node)]
