"""The `cnntrain` command: subcommand dispatch and error reporting.

Kept import-light (no torch, no Hydra at import time) so that `cnntrain --help` answers at once.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from cnntrain import __version__
from cnntrain.errors import UserError, did_you_mean

COMMANDS = {
    "fit": "train a CNN from the composed config (Hydra overrides, --multirun, --cfg job, --help)",
}

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
    if name == "fit":
        args = expand_resume(args)

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=name)
    def app(cfg: DictConfig) -> float | None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        from cnntrain.train import fit

        return fit(cfg, run_dir)

    saved_argv = sys.argv
    sys.argv = [f"cnntrain {name}", *args]
    try:
        app()
    except UserError:
        raise
    except Exception as e:  # Hydra / OmegaConf composition and override errors
        message = hydra_error_message(e)
        if message is None:
            raise
        raise UserError(message) from None
    finally:
        sys.argv = saved_argv


def expand_resume(args: list[str]) -> list[str]:
    """`resume=<run dir>`: compose the run's own overrides again, then the new ones, in its directory."""
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("resume=")), None)
    if resume in (None, "", "null", "auto"):
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


def hydra_error_message(e: BaseException) -> str | None:
    """One actionable line for the errors Hydra and OmegaConf raise while composing a config."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, MissingConfigException):
        return _missing_option_message(e)
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override: {_first_line(e)}; write overrides as key=value or group=option"
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
    return f"unknown {group} '{option}'{did_you_mean(option, options)}; available: {', '.join(options)}"


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
