"""Plumbing shared by the after-training commands: `key=value` arguments parsed into typed
dataclasses, help, and the console their tables go to.

The commands read their arguments the way `fit` reads Hydra overrides, so an unknown key or a
value of the wrong type gives the same kind of one-line error. String fields (paths, globs,
class names) keep the text exactly as typed: YAML would turn `inputs=007` into 7 and
`target=yes` into True.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cnntrain.errors import UserError, did_you_mean

T = TypeVar("T")

HELP_FLAGS = ("-h", "--help", "help")


@dataclass
class CheckpointArgs:
    """The keys of every command that runs a trained model (evaluate, predict, explain)."""

    ckpt: str = "???"  # a checkpoint file or a run directory
    out: str | None = None  # None: a new folder per call under <run dir>/<command>/
    device: str = "auto"
    overwrite: bool = False  # out= may be an earlier call's results folder, emptied first


def wants_help(args: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in args)


def _hints(schema: type) -> dict[str, Any]:
    from cnntrain.config import declared

    keys = declared(schema)
    return {k: v for k, v in typing.get_type_hints(schema).items() if k in keys}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_type(schema: type, dotted: str) -> Any:
    """The annotation of a (possibly nested) field, or None if the key does not exist."""
    node: Any = schema
    for part in dotted.split("."):
        if not _is_dataclass_type(node):
            return None
        node = _hints(node).get(part)
        if node is None:
            return None
    return node


def _is_str_field(tp: Any) -> bool:
    if tp is str:
        return True
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return str in typing.get_args(tp)
    return False


def _keys(schema: type, prefix: str = "") -> list[str]:
    from cnntrain.config import declared

    return [f"{prefix}{name}" for name in declared(schema)]


def parse_args(schema: type[T], args: list[str], command: str, base: dict[str, Any] | None = None) -> T:
    """`key=value` strings -> an instance of `schema` (merged onto `base`), or a one-line UserError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    from cnntrain.config import OPEN_GROUPS, open_part

    cfg = OmegaConf.structured(schema)
    open_nodes = [f.name for f in dataclasses.fields(schema) if f.name in OPEN_GROUPS]
    for name in open_nodes:
        OmegaConf.set_struct(cfg[name], False)  # a stored custom dataset's own keys (its arguments)
    try:
        if base:
            cfg = OmegaConf.merge(cfg, base)
        for arg in args:
            key, eq, value = arg.partition("=")
            key = key.strip()
            if not eq or not key:
                raise UserError(
                    f"cannot read argument '{arg}': write it as key=value (see `cnntrain {command} --help`)"
                )
            tp = _field_type(schema, key)
            parent = key.rpartition(".")[0]
            if tp is None and parent in open_nodes and _takes_own_keys(cfg, parent, base):
                tp = Any  # a custom dataset's own argument, checked by its loader: the value as YAML reads it
            if tp is None:
                parent, _, leaf = key.rpartition(".")
                parent_type = _field_type(schema, parent) if parent else schema
                known = _keys(parent_type, f"{parent}." if parent else "") if _is_dataclass_type(parent_type) else []
                raise UserError(
                    f"unknown key '{key}' for cnntrain {command}"
                    f"{did_you_mean(key, known)}; known keys: {', '.join(known)}"
                )
            if _is_str_field(tp) and value not in ("null", "None", "~"):
                OmegaConf.update(cfg, key, value, merge=True)
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        parsed = OmegaConf.to_object(cfg)
        for name in open_nodes:  # a custom dataset's own keys go to its `own`, as in fit
            setattr(parsed, name, open_part(cfg[name], type(getattr(parsed, name))))
        return typing.cast(T, parsed)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", "") or "?"
        raise UserError(f"cnntrain {command} needs {key}=...; see `cnntrain {command} --help`") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
        raise UserError(f"{key}: {msg}" if key else msg) from None


def _takes_own_keys(cfg: Any, group: str, base: dict[str, Any] | None) -> bool:
    """Keys of its own under `group`: before the checkpoint is read (base None) any, then only for a
    custom or plug-in dataset."""
    from cnntrain.config import takes_own_keys

    return base is None or takes_own_keys(group, str(cfg[group].name))


def print_help(text: str) -> None:
    sys.stdout.write(text.rstrip() + "\n")


def check_choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UserError(f"{key}={value} is not valid{did_you_mean(value, options)}; use one of: {', '.join(options)}")


def console() -> Any:
    """Rich console: colours on a terminal; plain and wide in pipes and logs, so tables do not wrap."""
    from rich.console import Console

    # markup=False: file and class names with [brackets] are printed as they are.
    if sys.stdout.isatty():
        return Console(highlight=False, markup=False)
    return Console(no_color=True, highlight=False, markup=False, force_terminal=False, width=160, soft_wrap=True)


def plain_warnings() -> None:
    """Warnings (e.g. from a dataset loader) as one `cnntrain: warning:` line, not a source excerpt, on the
    console and in the command's log file (cnntrain.io.logs)."""
    from cnntrain.io.logs import route_warnings

    route_warnings()


def start(argv: list[str], schema: type[T], command: str, help_text: str) -> T | None:
    """The common opening of a command: `--help` prints its help (and None comes back); otherwise warnings
    become one line each and the key=value arguments are parsed into `schema`."""
    if wants_help(argv):
        print_help(help_text)
        return None
    plain_warnings()
    return parse_args(schema, argv, command)


def images_and_model(args: Any) -> tuple[list[Path], str, Any]:
    """The common start of the commands that read image files (predict, explain): the images to read, in
    order; a note for the header of what was left out; and the trained model (engine.inference.Trained).
    Every check runs before the checkpoint is loaded: on_error=error fails on a non-image at once, naming
    it, and on_error=skip leaves it out here."""
    from cnntrain.commands.images import check_images, collect_images, ignored_note, skipped_note
    from cnntrain.engine.inference import load_trained

    check_choice("on_error", args.on_error, ("error", "skip"))
    if args.batch_size < 1:
        raise UserError(f"batch_size={args.batch_size} must be at least 1")
    found, ignored = collect_images(args.inputs)
    paths = check_images(found, on_error=args.on_error)
    trained = load_trained(args.ckpt, args.device)
    return paths, skipped_note(len(found), len(paths)) + ignored_note(ignored), trained


def check_threshold(threshold: float | None, trained: Any) -> None:
    """threshold= is a multi-label model's; a probability strictly between 0 and 1."""
    if threshold is None:
        return
    if trained.task.name != "multilabel":
        raise UserError(
            f"threshold={threshold} applies to multi-label models; {trained.checkpoint} predicts one class per image"
        )
    if not 0 < threshold < 1:
        raise UserError(f"threshold={threshold} must be between 0 and 1 (exclusive)")
