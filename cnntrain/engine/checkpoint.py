"""Checkpoints: written atomically, read back without running pickled code.

Everything stored is tensors or plain Python values, so the whole trainer state loads
with ``torch.load(weights_only=True)``; there is deliberately no unsafe fallback. Before
unpickling, the zip container's CRC-32 of every record is checked, because torch itself
reads a file with a damaged tensor without complaint.

torch is imported inside the functions: `cnntrain fit resume=<typo>` then fails in a
fraction of a second instead of after the torch import.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from cnntrain.errors import UserError
from cnntrain.io.files import LAST, PREV

FORMAT_VERSION = 1
# What a trainer checkpoint (last.pt) must hold besides the model, to continue a run exactly.
TRAINER_KEYS = ("optimizer", "scheduler", "scaler", "progress", "rng")


def save_checkpoint(path: Path, state: dict[str, Any], previous: Path | None = None) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old file or the new one, whole.

    With ``previous``, the file about to be replaced is first kept there, by the same protocol (a hard link,
    or a copy, renamed into place): a damaged newest checkpoint then still leaves the one before it.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions any other file of the user gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if previous is not None and path.is_file():
            _keep(path, Path(previous))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    # Temp files of writes that were killed (SIGKILL, power loss) before their rename.
    for name in (path.name, *([Path(previous).name] if previous is not None else [])):
        for stale in path.parent.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _keep(path: Path, previous: Path) -> None:
    """Make `previous` a whole copy of `path` (the checkpoint about to be replaced), atomically."""
    import shutil

    tmp = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)  # no copy: the two names share the file until path is replaced
    except OSError:  # a file system without hard links
        shutil.copyfile(path, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, previous)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely; any problem becomes a UserError naming the file and what is wrong."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    _check_container(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused global, damaged pickle...
        text = str(e)
        refused = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), None)
        if refused is not None:
            raise UserError(f"refusing to load {path}: it holds pickled objects that could run code when loaded "
                            f"({refused.rstrip('.')}); cnntrain checkpoints hold only tensors and plain values, "
                            "so this file was not written by cnntrain") from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: it is corrupt or not a cnntrain checkpoint "
                        f"({first[:160]})") from None
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise UserError(f"{path} is not a cnntrain checkpoint (no model state in it)")
    if state["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {state['format_version']}; this cnntrain reads format "
                        f"{FORMAT_VERSION}")
    if "optimizer" in state:
        missing = [k for k in TRAINER_KEYS if k not in state]
        if missing:
            raise UserError(f"{path} is an incomplete trainer checkpoint (no {', '.join(missing)}); "
                            "it cannot continue a run")
    return state


def _check_container(path: Path) -> None:
    """A torch checkpoint is a zip archive: refuse a cut-off one, and one whose bytes changed after writing."""
    try:
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()  # reads every record and compares its CRC-32
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        size = path.stat().st_size
        raise UserError(f"cannot read checkpoint {path} ({size:,} bytes): it is truncated or not a torch "
                        f"checkpoint ({' '.join(str(e).split())[:120]})") from None
    if damaged is not None:
        raise UserError(f"checkpoint {path} is corrupt: the checksum of its record '{damaged}' does not match "
                        "(the file changed after it was written)")
    if any(n.endswith("/constants.pkl") or "/code/__torch__/" in n for n in names):
        raise UserError(f"{path} is a TorchScript program (as `cnntrain export format=torchscript` writes), not a "
                        "checkpoint: it holds a traced graph for torch.jit.load, without the model config, class "
                        "names and input recipe that cnntrain needs, so it cannot be used here; use the run's "
                        "checkpoints/best.pt, or the model.state_dict.pt or model.safetensors of "
                        "`cnntrain export format=state_dict`")


def find_checkpoint(spec: str) -> Path:
    """A run directory (its checkpoints/last.pt) or a checkpoint file."""
    path = Path(spec).expanduser()
    if path.is_dir():
        candidate = path / "checkpoints" / LAST
        if not candidate.is_file():
            previous = path / "checkpoints" / PREV
            hint = f"; resume from the checkpoint before it: cnntrain fit resume={previous}" if previous.is_file() else ""
            raise UserError(f"no checkpoint in run directory {path} (looked for {candidate}){hint}")
        return candidate
    if not path.exists():
        raise UserError(f"checkpoint or run directory not found: {path}")
    return path


def capture_rng() -> dict[str, Any]:
    """Every global random stream, as tensors and plain values (weights_only-safe)."""
    import random

    import numpy as np
    import torch

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
