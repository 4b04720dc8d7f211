"""Checkpoints, in one place: what a checkpoint holds, and how it is written, found, read, checked and
compared with the run that resumes it.

What it holds: "model" (the weights; in best.pt the validated ones, the average when EMA is on), "meta"
(what inference needs: classes, channels, image size, normalisation, the model's source, the data
fingerprint; a multi-label model's task and threshold, read by engine.tasks.of_meta), "config" (the whole
resolved config) and "progress" (`Progress`). A trainer checkpoint (last.pt, last.prev.pt) adds
`TRAINER_KEYS` (optimizer, scheduler, scaler, progress, rng) and "ema": what continues a run bit for bit.
Where the files lie in a run directory is `io.files.RunDir`'s business.

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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cnntrain.config import plain
from cnntrain.config.compose import chosen_option
from cnntrain.config.identity import check_resume
from cnntrain.errors import UserError
from cnntrain.io.files import BEST, LAST, PREV, RunDir, read_json
from cnntrain.sweep.jobs import job_overrides, weights_command

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.optim.lr_scheduler import LRScheduler
    from torch.optim.swa_utils import AveragedModel

    from cnntrain.config import DatasetConfig, FitConfig, ModelConfig
    from cnntrain.data.images import ImageData
    from cnntrain.engine.distributed import Dist
    from cnntrain.engine.step import TrainStep

FORMAT_VERSION = 1
# What a trainer checkpoint (last.pt) must hold besides the model, to continue a run exactly.
TRAINER_KEYS = ("optimizer", "scheduler", "scaler", "progress", "rng")


# ----------------------------------------------------------------------------- what a checkpoint holds


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # steps done in the epoch under way
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    skipped_steps: int = 0  # steps passed over for a non-finite loss (trainer.on_nonfinite=skip)
    # Running sums of the epoch under way (tensors on the device, synced only when read).
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    # Wall time of training (epochs, validation, checkpoints) over every session of the run, up to the last
    # checkpoint; a resume adds its own. A checkpoint written before this field existed counts as 0.
    train_seconds: float = 0.0
    # The layout and compute chunk the run trains with and where they came from (engine.tuning): a resume
    # keeps them, so it trains exactly as the run started.
    tuning: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["sums"] = {k: v.detach().cpu() for k, v in self.sums.items()}
        d["times"] = dict(self.times)
        d["tuning"] = dict(self.tuning)
        return d

    @classmethod
    def from_dict(cls, p: dict[str, Any], device: torch.device) -> Progress:
        return cls(
            p["epoch"],
            p["step_in_epoch"],
            p["global_step"],
            p["best_metric"],
            p["best_epoch"],
            p.get("epochs_without_improvement", 0),
            p.get("skipped_steps", 0),
            {k: v.to(device) for k, v in p["sums"].items()},
            dict(p["times"]),
            float(p.get("train_seconds", 0.0)),
            dict(p.get("tuning", {})),
        )


class RunState(Protocol):
    """What a checkpoint is made from; `engine.state.Run` is one (named here by its parts, so that this
    module needs nothing above it)."""

    cfg: FitConfig
    run_dir: Path
    data: ImageData
    step: TrainStep
    ema: AveragedModel | None
    scheduler: LRScheduler
    dist: Dist
    progress: Progress
    keep_last: bool
    data_fingerprint: str

    @property
    def model(self) -> nn.Module: ...


def meta(m: ModelConfig, dataset: DatasetConfig, threshold: float, data: ImageData) -> dict[str, Any]:
    """What predict/evaluate/export need to use the model without the training data (a multi-label model's
    decision threshold, trainer.threshold, too). The model's own config (a custom model's _target_ and
    arguments included) is the checkpoint's "config"."""
    from cnntrain.models import model_source  # torch: not before it is needed

    return {
        "model": m.name,
        "arch": m.arch,
        "option": chosen_option("model"),
        **model_source(m),
        "classes": list(data.classes),
        "channels": data.channels,
        "image_size": list(data.image_size),
        "mean": list(data.mean),
        "std": list(data.std),
        "dataset": data.name,
        "flips_change_label": bool(dataset.flips_change_label),
        **({"task": "multilabel", "threshold": threshold} if data.multilabel else {}),
    }


def save(run: RunState, name: str) -> None:
    """Rank 0 writes; `best` holds the weights that were validated (the average when EMA is on)."""
    if not run.dist.main:
        return
    validated = run.ema.module if run.ema is not None else run.model
    state = {
        "model": (validated if name == BEST else run.model).state_dict(),
        "meta": {
            **meta(run.cfg.model, run.cfg.dataset, run.cfg.trainer.threshold, run.data),
            "data_fingerprint": run.data_fingerprint,
        },
        "config": plain(run.cfg),
        "progress": run.progress.to_dict(),
    }
    files, previous = RunDir(run.run_dir), None
    if name == LAST:
        state.update(
            optimizer=run.step.optimizer.state_dict(),
            scheduler=run.scheduler.state_dict(),
            scaler=run.step.scaler.state_dict(),
            rng=capture_rng(),
        )
        if run.ema is not None:
            state["ema"] = run.ema.state_dict()
        previous = files.previous if run.keep_last else None
        run.keep_last = True
    save_checkpoint(files.checkpoint(name), state, previous=previous)


def capture_rng() -> dict[str, Any]:
    """Every global random stream, as tensors and plain values (weights_only-safe)."""
    import random

    import numpy as np
    import torch

    version, mt, gauss = random.getstate()
    # legacy=True is numpy's default, named because its stubs say otherwise; it gives the tuple (MT19937's state).
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)
    kind, keys, pos, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
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
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- written atomically


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


# ----------------------------------------------------------------------------- found and read safely


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
            raise UserError(
                f"refusing to load {path}: it holds pickled objects that could run code when loaded "
                f"({refused.rstrip('.')}); cnntrain checkpoints hold only tensors and plain values, "
                "so this file was not written by cnntrain"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise UserError(
            f"cannot read checkpoint {path}: it is corrupt or not a cnntrain checkpoint ({first[:160]})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise UserError(f"{path} is not a cnntrain checkpoint (no model state in it)")
    if state["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"{path} has checkpoint format {state['format_version']}; this cnntrain reads format {FORMAT_VERSION}"
        )
    if "optimizer" in state:
        missing = [k for k in TRAINER_KEYS if k not in state]
        if missing:
            raise UserError(
                f"{path} is an incomplete trainer checkpoint (no {', '.join(missing)}); it cannot continue a run"
            )
    return state


def _check_container(path: Path) -> None:
    """A torch checkpoint is a zip archive: refuse a cut-off one, and one whose bytes changed after writing."""
    try:
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()  # reads every record and compares its CRC-32
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        size = path.stat().st_size
        raise UserError(
            f"cannot read checkpoint {path} ({size:,} bytes): it is truncated or not a torch "
            f"checkpoint ({' '.join(str(e).split())[:120]})"
        ) from None
    if damaged is not None:
        raise UserError(
            f"checkpoint {path} is corrupt: the checksum of its record '{damaged}' does not match "
            "(the file changed after it was written)"
        )
    if any(n.endswith("/constants.pkl") or "/code/__torch__/" in n for n in names):
        raise UserError(
            f"{path} is a TorchScript program (as `cnntrain export format=torchscript` writes), not a "
            "checkpoint: it holds a traced graph for torch.jit.load, without the model config, class "
            "names and input recipe that cnntrain needs, so it cannot be used here; use the run's "
            "checkpoints/best.pt, or the model.state_dict.pt or model.safetensors of "
            "`cnntrain export format=state_dict`"
        )


def find_checkpoint(spec: str) -> Path:
    """A run directory (its checkpoints/last.pt) or a checkpoint file."""
    path = Path(spec).expanduser()
    if path.is_dir():
        run = RunDir(path)
        candidate = run.last
        if not candidate.is_file():
            previous = run.previous
            hint = (
                f"; resume from the checkpoint before it: cnntrain fit resume={previous}" if previous.is_file() else ""
            )
            raise UserError(f"no checkpoint in run directory {path} (looked for {candidate}){hint}")
        return candidate
    if not path.exists():
        raise UserError(f"checkpoint or run directory not found: {path}")
    return path


def resolve_checkpoint(spec: str) -> Path:
    """A checkpoint file, a run directory (-> checkpoints/best.pt, else last.pt) or its checkpoints/ folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for folder in (RunDir(path).checkpoints, path):
            for name in (BEST, LAST):
                if (folder / name).is_file():
                    return folder / name
        raise UserError(
            f"no checkpoint in {path} (looked for checkpoints/{BEST} and checkpoints/{LAST}); "
            "ckpt= takes a run directory of cnntrain fit or a .pt checkpoint"
        )
    if not path.exists():
        raise UserError(f"checkpoint or run directory not found: {path}")
    return path


# ----------------------------------------------------------------------------- checked and compared on resume


def load_weights_checked(
    cfg: ModelConfig, model: nn.Module, state: dict[str, Any], path: Path, data: ImageData
) -> None:
    """Load a checkpoint's weights into the configured model, naming the mismatch if they do not fit."""
    from cnntrain.models import model_label

    saved = state.get("meta", {})
    if (
        saved.get("model") not in (None, cfg.name)
        or saved.get("arch") not in (None, cfg.arch)
        or saved.get("target") not in (None, cfg._target_)
    ):
        held = saved.get("target") or saved.get("model")
        raise UserError(f"checkpoint {path} holds a {held} model, but the config asks for {model_label(cfg)}")
    if saved.get("classes") is not None and len(saved["classes"]) != data.num_classes:
        raise UserError(
            f"checkpoint {path} was trained for {len(saved['classes'])} classes, the dataset has {data.num_classes}"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"checkpoint {path} does not match the configured model ({detail})") from None


def restore(
    path: Path,
    cfg: FitConfig,
    step: TrainStep,
    scheduler: LRScheduler,
    ema: AveragedModel | None,
    data: ImageData,
    device: torch.device,
) -> Progress:
    """Put the trainer checkpoint at `path` (cfg.resume's, find_checkpoint) back into what was just built, after
    checking that it is this run's; return where it stood."""
    run_dir = RunDir.of(path).path
    try:
        state = load_checkpoint(path)
    except UserError as e:
        raise UserError(f"{e}; {_other_checkpoint(path, run_dir)}") from None
    if "optimizer" not in state:
        raise UserError(
            f"{path} holds model weights only; resume needs a trainer checkpoint ({LAST} or {PREV}); "
            f"to start a new run from these weights: {weights_command(path, job_overrides(run_dir) or [])}"
        )
    check_same_run(cfg, state, path, run_dir, data)
    load_weights_checked(cfg.model, step.model, state, path, data)
    try:
        step.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step.scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not match the configured optimizer ({e})") from None
    if ema is not None:
        if "ema" not in state:
            raise UserError(f"checkpoint {path} has no weight average; resume it with trainer.ema_decay=null")
        ema.load_state_dict(state["ema"])
    progress = Progress.from_dict(state["progress"], device)
    restore_rng(state["rng"])
    return progress


def _other_checkpoint(path: Path, run_dir: Path) -> str:
    """What a user can run instead when the checkpoint to resume from cannot be read."""
    previous = path.with_name(PREV)
    if path.name != PREV and previous.is_file():
        return f"resume from the checkpoint before it: cnntrain fit resume={previous}"
    best = RunDir(run_dir).best
    if best.is_file():
        return f"to start a new run from the best weights: {weights_command(best, job_overrides(run_dir) or [])}"
    return "no other checkpoint of this run is left; start it again"


def check_same_run(cfg: FitConfig, state: dict[str, Any], path: Path, run_dir: Path, data: ImageData) -> None:
    """A resume continues the run it resumes: refuse a config or data that would make it another one
    (the CLI checks the config earlier, against .hydra/config.yaml; this is the checkpoint's own record)."""
    way_out = weights_command(path, job_overrides(run_dir) or [])
    if isinstance(state.get("config"), dict):
        check_resume(state["config"], plain(cfg), str(run_dir), way_out)
    recorded = state.get("meta", {}).get("data_fingerprint")
    if recorded is None:  # checkpoints written before the fingerprint went into them
        recorded = (read_json(RunDir(run_dir).provenance) or {}).get("data_fingerprint")
    now = data.fingerprint() if recorded else None
    if recorded and recorded != now:
        raise UserError(
            f"resume: the {data.name} data ({data.source}) are not the data the run in {run_dir} "
            f"was trained on (data fingerprint {str(now)[:12]}, recorded "
            f"{str(recorded)[:12]}), so it would mix two datasets; to train on from its weights as a "
            f"new run: {way_out}"
        )
