"""The package's shape: no module reaches into another's private names, and the engine stays short.

The layering itself (which subpackage may import which) is checked by import-linter in `make lint`.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cnntrain"


def _modules() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, ast.parse(path.read_text(), str(path))))
    return out


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:
        return False


def private_uses(name: str, tree: ast.Module) -> list[str]:
    """`from cnntrain.x import _y` and `x._y` on an imported cnntrain module, in one module."""
    found, module_aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnntrain"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and node.module != name:
                    found.append(f"{name}: from {node.module} import {alias.name}")
                if _is_module(f"{node.module}.{alias.name}"):
                    module_aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cnntrain") and alias.asname:
                    module_aliases.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{name}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    problems = [p for name, tree in _modules() for p in private_uses(name, tree)]
    assert problems == []


def test_the_check_sees_a_private_import():
    tree = ast.parse("from cnntrain.engine.inputs import _hidden\nfrom cnntrain.engine import inputs\ninputs._x\n")
    assert len(private_uses("cnntrain.cli", tree)) == 2


def test_no_function_in_the_engine_is_longer_than_about_80_lines():
    long = []
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 85:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert long == []


CONTRIBUTING = PACKAGE.parent / "CONTRIBUTING.md"


def contributing_references() -> tuple[list[str], list[str]]:
    """The paths (`cli/fit.py`, `tests/plugins/`) and dotted names (`engine.step.TrainStep`) that CONTRIBUTING's
    map of where each concept lives sends a reader to; `name.py`/`name.yaml` placeholders are not references."""
    import re

    text = CONTRIBUTING.read_text()
    quoted = re.findall(r"`([A-Za-z_][\w./]*)`", text)
    layout = re.search(r"```\n(.*?)```", text, re.S)
    listed = re.findall(r"^([\w.]+(?:/|\.py))\s", layout.group(1) if layout else "", re.M)
    paths = sorted(
        {q for q in quoted + listed if (q.endswith("/") or re.search(r"\.(py|yaml|toml|md)$", q)) and "name." not in q}
    )
    subpackages = "cli|commands|engine|data|augment|models|io|config|sweep|registry|optim"
    dotted = sorted(
        {
            q
            for q in quoted
            if re.fullmatch(rf"(?:{subpackages})\.\w+(?:\.\w+)*", q) and not re.search(r"\.(py|yaml|toml|md)$", q)
        }
    )
    return paths, dotted


def test_every_place_contributing_names_exists():
    """CONTRIBUTING's map is how a newcomer finds a concept in one guess: a moved file or renamed function
    must take the map with it."""
    import importlib

    paths, dotted = contributing_references()
    assert len(paths) > 20 and len(dotted) > 5  # the parser still finds the map
    root = PACKAGE.parent
    missing = [p for p in paths if not any((base / p).exists() for base in (root, PACKAGE))]
    for name in dotted:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            module = "cnntrain." + ".".join(parts[:cut])
            if _is_module(module):
                obj = importlib.import_module(module)
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(name)
                break
        else:
            missing.append(name)
    assert not missing, f"CONTRIBUTING.md names what does not exist: {missing}"


def test_the_run_directory_layout_is_spelt_out_in_one_module():
    """`checkpoints/` and its file names are `io.files.RunDir`'s: every other module asks it for a path, so the
    layout of a run directory changes in one place."""
    names = {"checkpoints", "last.pt", "last.prev.pt", "best.pt"}
    home = PACKAGE / "io" / "files.py"
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == home:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert found == []
