"""Where a run came from: code version, packages, hardware, seed and data."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# The optional libraries a run may use are recorded too (None when not installed): a timm model depends on its version.
PACKAGES = (
    "cnntrain",
    "torch",
    "torchvision",
    "hydra-core",
    "omegaconf",
    "numpy",
    "rich",
    "tensorboard",
    "safetensors",
    "timm",
    "mlflow",
)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """Commit and dirtiness of the repository cnntrain runs from (none for an installed wheel)."""
    source = Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], source)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], source)
    return {"commit": commit, "dirty": bool(status)}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(device_name: str, seed: int, data_fingerprint: str, argv: list[str]) -> dict[str, Any]:
    return {
        "command": argv,
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "torch_cuda": torch.version.cuda,
        # Asking loads libcudnn (about 50 MB of a CPU run's memory): only where a GPU can use it.
        "cudnn": torch.backends.cudnn.version()
        if torch.cuda.is_available() and torch.backends.cudnn.is_available()
        else None,
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "data_fingerprint": data_fingerprint,
    }
