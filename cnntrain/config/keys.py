"""What a user most likely meant by a key or an option that does not exist: `lr=0.01` -> optimizer.lr,
`--lr 0.01` -> optimizer.lr=0.01. The hints of the one-line errors of `fit` (config.compose's messages for
Hydra's errors, cnntrain.cli.fit's flags) and `lr-find`.

It stays in the config layer, beside the schema it reads, because config.compose's own messages and the
commands (lr-find) use it, and neither may import cnntrain.cli.
"""

from __future__ import annotations

from cnntrain.config import FitConfig, declared
from cnntrain.errors import UserError


def schema_keys(group: str) -> list[str]:
    """The keys of a group of the schema (`optimizer`: lr, weight_decay, ...); [] for a group it lacks."""
    import dataclasses

    node = FitConfig
    for part in [p for p in group.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return []
        node = fields[part].default_factory  # type: ignore[assignment]
    return declared(node)


def all_keys() -> list[str]:
    """Every key an override can set: the top-level ones (name, resume, the groups) and group.field."""
    import dataclasses

    keys = ["experiment"]
    for f in dataclasses.fields(FitConfig):
        keys.append(f.name)
        if f.default_factory is not dataclasses.MISSING:  # a group: its fields
            keys += [f"{f.name}.{g}" for g in declared(f.default_factory)]  # type: ignore[arg-type]
    return keys


# Names other tools use for a few keys.
_ALIASES = {"learning_rate": "optimizer.lr", "bs": "trainer.batch_size", "max_epochs": "trainer.epochs"}


def closest_keys(key: str) -> list[str]:
    """The keys a user most likely meant by `key`: itself when it exists, else the keys of any group with this
    name (lr -> optimizer.lr, seed -> trainer.seed), else one close spelling; [] when nothing is close."""
    import difflib

    keys = all_keys()
    if key in keys:
        return [key]
    if key in _ALIASES:
        return [_ALIASES[key]]
    leaf = key.rpartition(".")[2]
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf
    leaves = {k.rpartition(".")[2]: k for k in keys if "." in k}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)
    return [leaves[close[0]]] if close else difflib.get_close_matches(key, keys, n=1, cutoff=0.6)


def key_hint(key: str) -> str:
    """' (did you mean 'optimizer.lr'?)' for a key written without its group (or misspelt), else ''."""
    found = [k for k in closest_keys(key) if k != key]
    return f" (did you mean {' or '.join(repr(k) for k in found)}?)" if found else ""


def option_error(arg: str, following: str | None, command: str = "fit") -> UserError:
    """`--lr 0.01` (or --lr=0.01): the override it most likely means, in one line, instead of argparse's usage."""
    name, eq, value = arg.partition("=")
    if not eq and following is not None and not following.startswith("-") and "=" not in following:
        value = following
    key = name.lstrip("-").replace("-", "_")
    found = closest_keys(key) if key else []
    shown = value if value else "VALUE"
    if found:
        write = " or ".join(f"{k}={shown}" for k in found)
        return UserError(
            f"cnntrain {command} takes no option '{name}': overrides are key=value; write {write} "
            f"(see `cnntrain {command} --help`)"
        )
    return UserError(
        f"cnntrain {command} takes no option '{name}': overrides are key=value, e.g. "
        f"trainer.epochs=3 (see `cnntrain {command} --help`)"
    )


def check_options(args: list[str], command: str = "fit") -> None:
    """Refuse, in one line, an option Hydra's own command line does not have (`--lr 0.01`), before argparse
    prints its usage; Hydra's flags (--multirun, --cfg job, -m, ... and their abbreviations) pass."""
    try:
        from hydra._internal.utils import get_args_parser
    except ImportError:  # another Hydra: leave the flags to its argparse
        return
    flags = [s for a in get_args_parser()._actions for s in a.option_strings]
    for i, arg in enumerate(args):
        if not arg.startswith("-") or arg == "-":
            continue
        name = arg.partition("=")[0]
        if name in flags or (name.startswith("--") and len(name) > 2 and any(f.startswith(name) for f in flags)):
            continue
        raise option_error(arg, args[i + 1] if i + 1 < len(args) else None, command)
