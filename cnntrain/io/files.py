"""Files of a run directory: names, atomic JSON records, and removing a run that never started.

Kept free of torch so that the CLI and sweep bookkeeping can use it before torch is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

# Checkpoint files under <run>/checkpoints/.
LAST = "last.pt"  # trainer state at the last epoch end (or step checkpoint): what resume reads
BEST = "best.pt"  # weights of the best epoch by trainer.monitor: what the test and inference use


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (the file is either the old one or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def status(run_dir: Path) -> str | None:
    """The run's status as its summary.json records it (running, completed, failed, ...)."""
    return (read_json(run_dir / "summary.json") or {}).get("status")


def discard_run_dir(run_dir: Path) -> None:
    """Remove the directory of a run that never trained (no summary.json, no checkpoint): a failed or
    dry start leaves nothing under runs/. A run with results is never touched."""
    if (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()  # the experiment's folder, if this was its only run
