"""`cnntrain list`: every option of every config group, described by the config file itself
(its first comment line), so the list can never drift from what `fit` accepts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnntrain.errors import UserError, did_you_mean

HELP = """\
usage: cnntrain list [GROUP] [--config-dir DIR]

The options of each config group of `cnntrain fit` (pick one with GROUP=OPTION), with the
description at the top of its YAML file; the default option is marked. GROUP limits the
list to one group: dataset, model, augment, optimizer, scheduler, trainer, logger, experiment.

Options from your own config folder (./configs, or --config-dir DIR) are marked "yours";
those of installed plug-in packages (entry points cnntrain.models / cnntrain.datasets)
name their package.

examples:
  cnntrain list
  cnntrain list model
"""

# Plural and long spellings people type.
ALIASES = {
    "datasets": "dataset",
    "models": "model",
    "augmentation": "augment",
    "augmentations": "augment",
    "augments": "augment",
    "optimizers": "optimizer",
    "schedulers": "scheduler",
    "trainers": "trainer",
    "experiments": "experiment",
    "loggers": "logger",
}


def describe(path: Path) -> str:
    """The first comment line of a YAML file that is not a `# @package` directive."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text:
            continue
        if not text.startswith("#"):
            break  # the description, if any, heads the file
        text = text.lstrip("#").strip()
        if text and not text.startswith("@package"):
            return text
    return ""


def _defaults(config_dir: Path) -> dict[str, str | None]:
    """group -> default option, from the primary config's defaults list."""
    from omegaconf import OmegaConf

    out: dict[str, str | None] = {}
    for item in OmegaConf.to_container(OmegaConf.load(config_dir / "fit.yaml")).get("defaults", []):
        if isinstance(item, dict):
            for key, value in item.items():
                if " " not in key and "/" not in key:  # skip `override hydra/...` entries
                    out[key] = value
    return out


@dataclass
class Option:
    name: str
    description: str
    default: bool = False
    origin: str = ""  # "" built-in, "yours", "yours, replaces the built-in", "plug-in: <package> <version>"


def _group_dirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and p.name != "hydra" and any(p.glob("*.yaml"))]


def catalog(config_dir: Path, user_dir: Path | None = None, plugins: bool = False) -> dict[str, list[Option]]:
    """group -> its options, groups in the order of fit.yaml's defaults: the built-in ones, the user's
    (user_dir: marked, and replacing a built-in of the same name) and installed plug-ins' (plugins=True)."""
    defaults = _defaults(config_dir)
    found: dict[str, dict[str, Option]] = {}
    for g in _group_dirs(config_dir):
        found[g.name] = {
            f.stem: Option(f.stem, describe(f), defaults.get(g.name) == f.stem) for f in sorted(g.glob("*.yaml"))
        }
    if plugins:
        from cnntrain.registry import DATASETS, MODELS

        for group, registry in (("model", MODELS), ("dataset", DATASETS)):
            for name, plugin in registry.plugins().items():
                if name in found.get(group, {}):
                    continue  # a built-in of the same name wins
                found.setdefault(group, {})[name] = Option(
                    name, f"{plugin.value}", origin=f"plug-in: {plugin.package} {plugin.version}"
                )
    if user_dir is not None:
        for g in _group_dirs(user_dir):
            for f in sorted(g.glob("*.yaml")):
                replaces = f.stem in found.get(g.name, {}) and not found[g.name][f.stem].origin
                found.setdefault(g.name, {})[f.stem] = Option(
                    f.stem,
                    describe(f),
                    defaults.get(g.name) == f.stem,
                    "yours, replaces the built-in" if replaces else "yours",
                )
    order = {name: i for i, name in enumerate(defaults)}
    groups = sorted(found, key=lambda g: (order.get(g, len(order)), g))
    return {g: sorted(found[g].values(), key=lambda o: o.name) for g in groups}


def main(argv: list[str]) -> None:
    from rich.table import Table

    from cnntrain.commands.args import console, print_help, wants_help
    from cnntrain.config.compose import config_dir, take_config_dir_flags, user_config_dir

    if wants_help(argv):
        print_help(HELP)
        return
    argv = take_config_dir_flags(argv)
    if len(argv) > 1:
        raise UserError(f"cnntrain list takes at most one group name, got: {' '.join(argv)}")
    user = user_config_dir()
    groups = catalog(config_dir(), user, plugins=True)
    if argv:
        name = ALIASES.get(argv[0], argv[0])
        if name not in groups:
            raise UserError(
                f"unknown config group '{argv[0]}'{did_you_mean(name, groups)}; groups: {', '.join(groups)}"
            )
        groups = {name: groups[name]}
    con = console()
    if user is not None:
        con.print(f"your config folder: {user} (its options are marked 'yours')")
    for group, options in groups.items():
        table = Table(title=f"{group}   (cnntrain fit {group}=OPTION)", title_justify="left", title_style="bold")
        table.add_column("option", style="cyan", no_wrap=True)
        table.add_column("description", overflow="fold")
        if any(o.origin for o in options):
            table.add_column("from", overflow="fold")
        for o in options:
            cells = [o.name + (" (default)" if o.default else ""), o.description]
            if any(x.origin for x in options):
                cells.append(o.origin or "built-in")
            table.add_row(*cells)
        con.print(table)
        if group == "model" and len(groups) == 1:
            con.print(_timm_sample())


def _timm_sample() -> str:
    """A sample of model=timm's architectures, only for `cnntrain list model` (timm takes a second to import)."""
    from cnntrain.errors import UserError
    from cnntrain.models.timm import TIMM_HINT, sample

    try:
        names = sample()
    except UserError:
        return f"model=timm model.arch=NAME takes any timm architecture; timm is not installed: {TIMM_HINT}"
    return (
        f"model=timm model.arch=NAME, a sample of timm's architectures: {', '.join(names)}\n"
        "all of them: python -c \"import timm; print(timm.list_models('*resnet*'))\" (a pattern, or none)"
    )
