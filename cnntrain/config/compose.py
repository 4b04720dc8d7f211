"""Hydra composition of the fit config: where the config groups live, the resolvers of the run directories'
names, and one-line messages for the errors Hydra and OmegaConf raise while composing.

Used by `cnntrain fit` (the Hydra app) and by the commands that compose a fit config without running
it (lr-find, resume=auto).

The search path, first match wins: the user's config folder (``--config-dir DIR`` / ``--config-path DIR``,
else ``./configs`` when there is one), then cnntrain's own ``configs/``, then the options of installed
plug-ins (``model=<entry point name>``). So a user's groups add options to the built-in ones, and a
user's file with the name of a built-in one replaces it (with a notice).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

from cnntrain.config import FitConfig
from cnntrain.config.keys import key_hint, schema_keys
from cnntrain.errors import UserError, did_you_mean

# One tag per process: keeps two runs started in the same second in different directories.
_RUN_TAG = secrets.token_hex(2)


def config_dir() -> Path:
    """configs/ of a git clone (beside the package) or of an installed wheel (inside it)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "fit.yaml").is_file():
            return candidate
    raise UserError(
        f"cannot find cnntrain's configs (looked in {here / 'configs'} and {here.parent / 'configs'}); "
        "reinstall cnntrain"
    )


# The user's config folder for this process: unset (look for ./configs), or a folder, or None (none).
_UNSET = object()
_user_dir: Any = _UNSET
# Flags that name the user's config folder (Hydra's spellings; cnntrain handles them itself).
CONFIG_DIR_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp")


def user_config_dir() -> Path | None:
    """The user's config folder: the one given by a flag, else ./configs (when it is not cnntrain's own)."""
    return _default_user_dir() if _user_dir is _UNSET else _user_dir


def _default_user_dir() -> Path | None:
    candidate = Path.cwd() / "configs"
    if not candidate.is_dir():
        return None
    try:
        if candidate.resolve() == config_dir().resolve():
            return None  # a clone of cnntrain: its configs are the built-in ones
    except UserError:
        pass
    return candidate.resolve()


def take_config_dir_flags(args: list[str]) -> list[str]:
    """Remove --config-dir/--config-path DIR (or -cd/-cp, or --flag=DIR) from args and make DIR the user's
    config folder for this process; without them, ./configs is (when it exists). Returns the other args."""
    global _user_dir
    rest, given, i = [], None, 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in CONFIG_DIR_FLAGS and arg.startswith("-"):
            if not eq:
                if i + 1 >= len(args):
                    raise UserError(f"{flag} needs a folder: {flag} DIR")
                value = args[i + 1]
                i += 1
            given = (flag, value)
        else:
            rest.append(arg)
        i += 1
    if given is not None:
        flag, value = given
        folder = Path(value).expanduser()
        if not folder.is_dir():
            raise UserError(
                f"{flag} {value}: no such folder; give the folder that holds your config groups "
                "(experiment/, model/, ...)"
            )
        _user_dir = folder.resolve()
    else:
        _user_dir = _UNSET
    return rest


def user_options(folder: Path | None = None) -> dict[str, list[str]]:
    """group -> option names in the user's config folder (group folders with .yaml files; nested with '/')."""
    folder = folder if folder is not None else user_config_dir()
    out: dict[str, list[str]] = {}
    if folder is None:
        return out
    for f in sorted(folder.rglob("*.yaml")):
        rel = f.relative_to(folder)
        if len(rel.parts) < 2:
            continue  # a primary config (fit.yaml) is not an option of a group
        out.setdefault("/".join(rel.parts[:-1]), []).append(rel.stem)
    return out


def clashes() -> list[tuple[str, str]]:
    """(group, option) of the user's files that replace a built-in file of the same name."""
    folder = user_config_dir()
    if folder is None:
        return []
    builtin = config_dir()
    found = [
        (g, o) for g, options in user_options(folder).items() for o in options if (builtin / g / f"{o}.yaml").is_file()
    ]
    if (folder / "fit.yaml").is_file():
        found.insert(0, ("", "fit"))
    return found


_noticed = False


def notice_clashes() -> None:
    """Once per process (rank 0 only under torchrun): say which built-in configs the user's files replace."""
    global _noticed
    if _noticed or os.environ.get("RANK", "0") != "0":
        return
    _noticed = True
    folder = user_config_dir()
    if folder is None:  # nothing of the user's to replace a built-in
        return
    for group, option in clashes():
        what = "the primary config fit.yaml" if not group else f"the built-in {group} option '{option}'"
        path = folder / group / f"{option}.yaml" if group else folder / "fit.yaml"
        print(f"cnntrain: note: your {path} replaces {what}", file=sys.stderr, flush=True)


def register_resolvers() -> None:
    """The resolvers of the run and sweep directories' names (fit.yaml); the Optuna study's are
    cnntrain.sweep.study's."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cnntrain_tag"):
        OmegaConf.register_new_resolver("cnntrain_tag", lambda: _RUN_TAG)
    if not OmegaConf.has_resolver("cnntrain_dirname"):
        # Job directory names come from overrides; a "/" in a value (val/loss) must not nest folders.
        OmegaConf.register_new_resolver("cnntrain_dirname", lambda s: str(s).replace("/", "-") or "defaults")


def register_configs() -> None:
    """Make the schema available to Hydra as ``fit_schema`` (named first in fit.yaml), put the user's
    config folder on the search path, and give each installed plug-in an option of its group."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from cnntrain.config import OPEN_GROUPS
    from cnntrain.config.searchpath import install
    from cnntrain.registry import DATASETS, MODELS

    schema = OmegaConf.structured(FitConfig)
    for group in OPEN_GROUPS:
        # Open for the keyword arguments of a _target_ or plug-in, from YAML files too;
        # config.check_known_keys still refuses unknown keys for every other option.
        OmegaConf.set_struct(schema[group], False)
    store = ConfigStore.instance()
    store.store(name="fit_schema", node=schema)
    builtin = config_dir()
    for group, registry in (("model", MODELS), ("dataset", DATASETS)):
        for name in registry.plugins():
            if not (builtin / group / f"{name}.yaml").is_file():  # a built-in name wins
                store.store(group=group, name=name, node={"name": name}, provider="cnntrain-plugins")
    install(user_config_dir())
    notice_clashes()


def chosen_option(group: str) -> str | None:
    """The option of a config group that the running `fit` composed (model=tiny_cnn: tiny_cnn), which a
    message shows as the user chose it; None outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get(group)
    return str(choice) if choice is not None else None


def fit_help(args: list[str]) -> str | None:
    """The text of `cnntrain fit --help`, as Hydra would print it, without running Hydra's app (which composes
    the config of every group option, about 2 s); None where only Hydra can say it: anything beside --help
    (overrides may change the text) or a user's folder that replaces fit.yaml or Hydra's own configs. Call it
    after take_config_dir_flags."""
    if args not in (["--help"], ["-h"]):
        return None
    user = user_config_dir()
    if user is not None and ((user / "fit.yaml").exists() or (user / "hydra").exists()):
        return None
    import string

    from omegaconf import OmegaConf

    from cnntrain.registry import DATASETS, MODELS

    options: dict[str, set[str]] = {}
    for folder in filter(None, (config_dir(), user)):
        for f in folder.rglob("*.yaml"):
            group = f.parent.relative_to(folder).as_posix()
            if group != "." and group != "hydra" and not group.startswith("hydra/"):
                options.setdefault(group, set()).add(f.stem)
    for group, registry in (("model", MODELS), ("dataset", DATASETS)):
        options.setdefault(group, set()).update(registry.plugins())
    groups = "".join(f"{g}: {', '.join(sorted(o))}\n" for g, o in sorted(options.items()))
    help_cfg = OmegaConf.create({"hydra": {"help": OmegaConf.load(config_dir() / "hydra" / "help" / "cnntrain.yaml")}})
    resolved: Any = OmegaConf.to_container(help_cfg, resolve=True)
    template = resolved["hydra"]["help"]["template"]
    return string.Template(template).safe_substitute(APP_CONFIG_GROUPS=groups)


def compose_fit(overrides: list[str], return_hydra_config: bool = False) -> Any:
    """The config `cnntrain fit OVERRIDES` would run with, composed but not run (no run directory)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="fit", overrides=overrides, return_hydra_config=return_hydra_config)
    except UserError:
        raise
    except Exception as e:  # composition and override errors, one line as `fit` reports them
        message = hydra_error_message(e)
        if message is None:
            raise
        raise UserError(message) from None


def hydra_error_message(e: BaseException) -> str | None:
    """One actionable line for the errors Hydra and OmegaConf raise while composing a config."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, MissingConfigException):
        return missing_option_message(e)
    if isinstance(e, OverrideParseException):
        override = getattr(e, "override", None)
        where = f" '{override}'" if override and override not in str(e) else ""
        return f"cannot parse the override{where}: {_first_line(e)}; write overrides as key=value or group=option"
    cause = e.__cause__ if isinstance(e, ConfigCompositionException) else e
    if isinstance(cause, OmegaConfBaseException):
        return _omegaconf_message(cause, e)
    if isinstance(e, ConfigCompositionException):
        text = " ".join(str(e).split())
        if "'hydra/sweeper/optuna' is validated against ConfigStore schema" in text:
            # The old plugin's schema of the same name shadows cnntrain's own Optuna sweeper.
            return (
                "hydra-optuna-sweeper (for optuna 2.x) is installed and clashes with cnntrain's own Optuna "
                "sweeper; pip uninstall hydra-optuna-sweeper && pip install 'cnntrain[optuna]' (optuna>=4)"
            )
        return text
    if isinstance(e, ValueError) and str(e).startswith("Only one of --run"):  # Hydra: `--multirun --cfg job`
        return str(e).strip()
    return None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def missing_option_message(e: BaseException) -> str:
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
        known = schema_keys(parent_key)
        hint = did_you_mean(leaf, known) or key_hint(full_key)  # lr=... -> optimizer.lr
        where = f" in '{parent_key}'" if parent_key else ""
        return f"unknown key '{full_key}'{where}{hint}; known keys: {', '.join(known)}"
    if isinstance(cause, ValidationError):
        return f"{full_key}: {msg}" if full_key else msg
    return f"{full_key}: {msg}" if full_key else " ".join(str(outer).split())
