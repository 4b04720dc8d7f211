"""Files of a run directory: where each lives (`RunDir`), atomic JSON records, removing a run that never
started, and the folders the commands write their results into.

`RunDir` is the one place that spells out the layout of a run directory; everything else asks it for a path.
Kept free of torch so that the CLI and sweep bookkeeping can use it before torch is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnntrain.errors import UserError, os_reason, path_error

CHECKPOINTS = "checkpoints"  # the run's folder of checkpoints, <run>/checkpoints/
# Checkpoint files under <run>/checkpoints/ (engine.checkpoint says what each holds).
LAST = "last.pt"  # trainer state at the last epoch end (or step checkpoint): what resume reads
PREV = "last.prev.pt"  # the last.pt before it: a damaged last.pt still leaves a resumable checkpoint
BEST = "best.pt"  # weights of the best epoch by trainer.monitor: what the test and inference use


@dataclass(frozen=True)
class RunDir:
    """A run directory (runs/<name>/<date>/<time>, or a sweep's job folder) and where each of its files lives."""

    path: Path

    @classmethod
    def of(cls, path: Path | str) -> RunDir:
        """The run that `path` belongs to: a run directory, its checkpoints/ folder or a file in either.
        A checkpoint file outside any run belongs to its own folder."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        return cls(folder.parent if folder.name == CHECKPOINTS else folder)

    @classmethod
    def with_last(cls, base: Path) -> list[RunDir]:
        """The run directories directly under `base` that hold a trainer checkpoint (last.pt)."""
        return [cls(p.parent.parent) for p in base.glob(f"*/{CHECKPOINTS}/{LAST}")]

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, name: str) -> Path:
        """<run>/checkpoints/<name>: LAST, PREV or BEST."""
        return self.checkpoints / name

    @property
    def last(self) -> Path:
        return self.checkpoint(LAST)

    @property
    def previous(self) -> Path:
        return self.checkpoint(PREV)

    @property
    def best(self) -> Path:
        return self.checkpoint(BEST)

    @property
    def summary(self) -> Path:
        """summary.json: the run's status and results, rewritten as it goes."""
        return self.path / "summary.json"

    @property
    def metrics(self) -> Path:
        """metrics.csv: a row per epoch."""
        return self.path / "metrics.csv"

    @property
    def provenance(self) -> Path:
        """provenance.json: versions, machine, data fingerprint."""
        return self.path / "provenance.json"

    @property
    def splits(self) -> Path:
        """splits.csv: which image went to which split."""
        return self.path / "splits.csv"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def hydra(self) -> Path:
        """.hydra/: the config Hydra composed for the run and the overrides it was given."""
        return self.path / ".hydra"

    @property
    def overrides(self) -> Path:
        return self.hydra / "overrides.yaml"

    @property
    def config(self) -> Path:
        return self.hydra / "config.yaml"


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (the file is either the old one or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_splits(path: Path, column: str, rows: list[tuple[str, str, str]]) -> None:
    """splits.csv: which image went to which split (column is "path" for files: the CSV then is a valid
    dataset=csv labels file that reproduces the splits; "item" for a dataset's items)."""
    import csv

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([column, "label", "split"])
        w.writerows(rows)
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
    return (read_json(RunDir(run_dir).summary) or {}).get("status")


def discard_run_dir(run_dir: Path) -> None:
    """Remove the directory of a run that never trained (no summary.json, no checkpoint): a failed or
    dry start leaves nothing under runs/. A run with results is never touched."""
    run = RunDir(run_dir)
    if run.summary.exists() or run.checkpoints.exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()  # the experiment's folder, if this was its only run


def output_dir(path: Path, key: str = "out", given: bool = True, create: bool = True) -> Path:
    """The folder a command writes into, created with its parents. A file in the way, a missing permission or
    a read-only disk is a one-line UserError that names the path and the key that set it (`given`), or, for
    a default folder, the key that moves it elsewhere. create=False only checks that it could be created
    (a command that works for minutes checks before it starts)."""
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        else:
            _check_creatable(path)
    except OSError as e:
        if given:
            raise path_error(e, key, path, "cannot create the folder") from None
        raise UserError(
            f"cannot create the folder {e.filename or path} for the results: {os_reason(e)}; "
            f"pass {key}=DIR to write elsewhere"
        ) from None
    return path


def _check_creatable(path: Path) -> None:
    """Raise the OSError that path.mkdir(parents=True, exist_ok=True) would raise, without creating anything."""
    import errno

    probe = path
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(probe))
        probe = probe.parent
    if not probe.is_dir():
        code = errno.EEXIST if probe == path else errno.ENOTDIR
        raise OSError(code, os.strerror(code), str(probe))
    if probe != path and not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(probe))


# The commands that score or explain a trained run write one folder per call under <run>/<command>/, so a
# later call never replaces or mixes into an earlier one's results; their log marks a folder as theirs.
RESULT_COMMANDS = ("evaluate", "predict", "explain")


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a user's text (a folder, a glob, a dataset root)."""
    import re

    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return cleaned[:limit].rstrip("._-") or "input"


def call_dir(parent: Path, label: str) -> Path:
    """A new, empty folder parent/<label>-<date>_<time> for one call (-2, -3 ... when two calls share a
    second). Created here, atomically, so that two calls running at once cannot share it."""
    import time

    output_dir(parent, "out", given=False)
    base = f"{label}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    for k in range(1, 1000):
        path = parent / (base if k == 1 else f"{base}-{k}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(
                f"cannot create the folder {path} for the results: {os_reason(e)}; pass out=DIR to write elsewhere"
            ) from None
        return path
    raise UserError(f"too many result folders named {base} in {parent}; pass out=DIR")


def given_output_dir(path: Path, overwrite: bool) -> Path:
    """out=DIR of a results command: created if missing; a folder that already holds files is refused, so
    nothing a user produced is replaced silently. overwrite=true empties it first, but only when it is an
    earlier call's results folder (it holds that call's log), never a folder of anything else."""
    output_dir(path, "out")
    entries = sorted(path.iterdir())
    if not entries:
        return path
    if not overwrite:
        raise UserError(
            f"out={path} already holds {len(entries)} file(s) or folder(s); name a new folder, or add "
            "overwrite=true to replace an earlier call's results there"
        )
    if not any((path / f"{command}.log").is_file() for command in RESULT_COMMANDS):
        raise UserError(
            f"out={path} holds files that evaluate, predict or explain did not write (it has no "
            "evaluate.log, predict.log or explain.log); overwrite=true only replaces their results: "
            "name a new folder"
        )
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return path


def user_cache_dir() -> Path:
    """cnntrain's folder in the user's cache ($XDG_CACHE_HOME/cnntrain, else ~/.cache/cnntrain): downloaded
    datasets (unless $CNNTRAIN_DATA) and the layout/chunk probe's verdicts."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "cnntrain"
