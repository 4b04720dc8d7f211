"""What each key of the schema means, read from the schema itself: the comment above a field (and the one
after it on its line) is its description, so the text a user reads with `cnntrain fit --help GROUP` is the
text beside the default in cnntrain/config/__init__.py, written once. tests/test_configs.py checks that every
key has one.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any

from cnntrain.errors import UserError, did_you_mean


@dataclass(frozen=True)
class Key:
    name: str  # dotted, as typed on the command line
    type: str
    default: str
    description: str


@functools.cache
def _comments(schema: type) -> dict[str, str]:
    """{field: its comment} of one dataclass: the comment lines right above the field, then the comment
    after it on its own line."""
    source = inspect.getsource(inspect.getmodule(schema))  # type: ignore[arg-type]
    by_line: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == schema.__name__)
    found: dict[str, str] = {}
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        above: list[str] = []
        line = item.lineno - 1
        while line in by_line and line not in code_lines:  # a comment line of its own, directly above
            above.insert(0, by_line[line])
            line -= 1
        after = by_line.get(item.end_lineno or item.lineno)
        text = " ".join(above)
        if after:
            text = f"{text.rstrip('.')} ({after})" if text else after
        found[item.target.id] = " ".join(text.split())
    return found


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        parts = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        nullable = type(None) in typing.get_args(tp)
        return " | ".join(parts) + (" or null" if nullable else "")
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def keys(schema: type, prefix: str = "") -> list[Key]:
    """Every leaf key under `schema`, in the schema's order, with its type, default and description."""
    from cnntrain.config import declared

    hints = typing.get_type_hints(schema)
    comments = _comments(schema)
    out: list[Key] = []
    for f in dataclasses.fields(schema):
        if f.name not in declared(schema):
            continue
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(Key(f"{prefix}{f.name}", _type_name(tp), _default(f), comments.get(f.name, "")))
    return out


def groups() -> list[str]:
    """The config groups whose keys `cnntrain fit --help GROUP` lists."""
    from cnntrain.config import FitConfig

    hints = typing.get_type_hints(FitConfig)
    return [
        f.name
        for f in dataclasses.fields(FitConfig)
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])
    ]


def help_text(topics: list[str], width: int = 100) -> str:
    """`cnntrain fit --help GROUP|KEY ...`: each key with its type, default and description."""
    from cnntrain.config import FitConfig

    every = keys(FitConfig)
    names = [k.name for k in every]
    chosen: list[Key] = []
    for topic in topics:
        picked = [k for k in every if k.name == topic or k.name.startswith(f"{topic}.")]
        if not picked:
            raise UserError(
                f"no config key or group '{topic}'{did_you_mean(topic, [*groups(), *names])}; "
                f"groups: {', '.join(groups())}"
            )
        chosen += [k for k in picked if k not in chosen]
    lines = []
    for key in chosen:
        lines.append(f"  {key.name}: {key.type} = {key.default}")
        lines += textwrap.wrap(key.description, width=width, initial_indent="      ", subsequent_indent="      ")
    footer = (
        [f"\nthe options of the group, and what each sets: cnntrain list {topics[0]}"] if topics[0] in groups() else []
    )
    return "\n".join(
        [
            "set any of them with KEY=VALUE, e.g. cnntrain fit "
            f"{chosen[0].name}={chosen[0].default if chosen[0].default != '(required)' else '...'}",
            *lines,
            *footer,
        ]
    )
