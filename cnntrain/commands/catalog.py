"""`cnntrain list`: every option of every config group, described by the config file itself
(its first comment line), so the list can never drift from what `fit` accepts."""

from __future__ import annotations

from pathlib import Path

from cnntrain.errors import UserError, did_you_mean

HELP = """\
usage: cnntrain list [GROUP]

The options of each config group of `cnntrain fit` (pick one with GROUP=OPTION), with the
description at the top of its YAML file; the default option is marked. GROUP limits the
list to one group: dataset, model, augment, optimizer, scheduler, trainer, experiment.

examples:
  cnntrain list
  cnntrain list model
"""

# Plural and long spellings people type.
ALIASES = {"datasets": "dataset", "models": "model", "augmentation": "augment", "augmentations": "augment",
           "augments": "augment", "optimizers": "optimizer", "schedulers": "scheduler", "trainers": "trainer",
           "experiments": "experiment"}


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


def catalog(config_dir: Path) -> dict[str, list[tuple[str, str, bool]]]:
    """group -> [(option, description, is default)], groups in the order of fit.yaml's defaults."""
    defaults = _defaults(config_dir)
    groups = sorted(p for p in config_dir.iterdir() if p.is_dir() and p.name != "hydra" and any(p.glob("*.yaml")))
    order = {name: i for i, name in enumerate(defaults)}
    groups.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    return {g.name: [(f.stem, describe(f), defaults.get(g.name) == f.stem) for f in sorted(g.glob("*.yaml"))]
            for g in groups}


def main(argv: list[str]) -> None:
    from rich.table import Table

    from cnntrain.commands.args import console, print_help, wants_help
    from cnntrain.config.compose import config_dir

    if wants_help(argv):
        print_help(HELP)
        return
    if len(argv) > 1:
        raise UserError(f"cnntrain list takes at most one group name, got: {' '.join(argv)}")
    groups = catalog(config_dir())
    if argv:
        name = ALIASES.get(argv[0], argv[0])
        if name not in groups:
            raise UserError(f"unknown config group '{argv[0]}'{did_you_mean(name, groups)}; "
                            f"groups: {', '.join(groups)}")
        groups = {name: groups[name]}
    con = console()
    for group, options in groups.items():
        table = Table(title=f"{group}   (cnntrain fit {group}=OPTION)", title_justify="left", title_style="bold")
        table.add_column("option", style="cyan", no_wrap=True)
        table.add_column("description", overflow="fold")
        for option, text, is_default in options:
            table.add_row(option + (" (default)" if is_default else ""), text)
        con.print(table)
