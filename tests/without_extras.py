"""Run pytest as on a machine with only `make install` (no optional extras), whatever is installed here.

    python tests/without_extras.py --collect-only -q      # what .ci/run does before installing the extras

The modules of the extras in pyproject.toml (onnx, optuna, joblib, slurm, timm, mlflow) become unimportable, exactly as
when they are missing: `import onnx` and `importlib.util.find_spec("hydra_plugins.x")` raise
ModuleNotFoundError. Every test must then still be collected, and a test of an extra is skipped, saying which
extra installs what it needs.
"""

from __future__ import annotations

import importlib.abc
import sys

# Top-level packages that only the optional extras install.
HIDDEN = ("hydra_plugins", "onnx", "onnxruntime", "onnxscript", "optuna", "submitit", "timm", "mlflow")


class HideExtras(importlib.abc.MetaPathFinder):
    def __init__(self, hidden: tuple[str, ...] = HIDDEN) -> None:
        self.hidden = hidden

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".", 1)[0] in self.hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def hide(hidden: tuple[str, ...] = HIDDEN) -> None:
    """Make `hidden` (default: every extra's modules) unimportable in this process."""
    for name in list(sys.modules):  # anything imported before us (a .pth file) goes too
        if name.split(".", 1)[0] in hidden:
            del sys.modules[name]
    sys.meta_path.insert(0, HideExtras(hidden))


if __name__ == "__main__":
    from pathlib import Path

    hide()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.conftest` and the checkout's cnntrain
    import pytest

    sys.exit(pytest.main(sys.argv[1:]))
