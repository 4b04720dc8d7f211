"""The state of a run: what was built for it, where it stands, and how both go into and out of a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cnntrain.config.compose import chosen_option
from cnntrain.config.identity import check_resume
from cnntrain.data.images import ImageData
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine import distributed
from cnntrain.engine.step import TrainStep
from cnntrain.errors import UserError
from cnntrain.io.files import BEST, LAST, PREV, read_json
from cnntrain.models import model_label, model_source
from cnntrain.sweep.jobs import job_overrides, weights_command


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
        return cls(p["epoch"], p["step_in_epoch"], p["global_step"], p["best_metric"], p["best_epoch"],
                   p.get("epochs_without_improvement", 0), p.get("skipped_steps", 0),
                   {k: v.to(device) for k, v in p["sums"].items()}, dict(p["times"]),
                   float(p.get("train_seconds", 0.0)), dict(p.get("tuning", {})))


@dataclass
class Run:
    """Everything one `cnntrain fit` built, in one place; the loop reads it and advances `progress`."""

    cfg: DictConfig
    run_dir: Path
    data: ImageData
    tensors: dict[str, torch.Tensor]  # the splits on the training device (or streamed StreamedImages)
    step: TrainStep
    plain: nn.Module  # what evaluation calls: the model (maybe compiled), never the DDP wrapper
    ema: AveragedModel | None  # the weight average (trainer.ema_decay): validation, best and test use it
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dist: distributed.Dist
    steps: int  # optimizer steps per epoch
    progress: Progress
    reporter: Any
    threads_note: str = ""  # why torch runs this many CPU threads (configure_torch), for the start table
    # Whether checkpoints/last.pt is this run's own latest state (fresh, or resumed from it), which the next
    # save keeps as last.prev.pt. Resumed from another file (last.prev.pt), last.pt is a state being
    # abandoned: it is replaced, not kept.
    keep_last: bool = True
    data_fingerprint: str = ""  # data.fingerprint(), computed once: provenance.json and every checkpoint hold it
    sample_weights: torch.Tensor | None = None  # dataset.sampler=balanced: each training image's draw weight
    record: dict[str, Any] = field(default_factory=dict)  # what summary.json records of how the run was built

    @property
    def model(self) -> nn.Module:
        return self.step.model

    @property
    def device(self) -> torch.device:
        return self.step.normalise.mean.device


def meta(cfg: DictConfig, data: ImageData) -> dict[str, Any]:
    """What predict/evaluate/export need to use the model without the training data. The model's own
    config (a custom model's _target_ and arguments included) is the checkpoint's "config"."""
    m = cfg.model
    return {"model": m.name, "arch": m.arch, "option": chosen_option("model"), **model_source(m),
            "classes": list(data.classes),
            "channels": data.channels, "image_size": list(data.image_size), "mean": list(data.mean),
            "std": list(data.std), "dataset": data.name,
            "flips_change_label": bool(cfg.dataset.flips_change_label),
            **({"task": "multilabel", "threshold": cfg.trainer.threshold} if data.multilabel else {})}


def save(run: Run, name: str) -> None:
    """Rank 0 writes; `best` holds the weights that were validated (the average when EMA is on)."""
    if not run.dist.main:
        return
    validated = run.ema.module if run.ema is not None else run.model
    state = {
        "model": (validated if name == BEST else run.model).state_dict(),
        "meta": {**meta(run.cfg, run.data), "data_fingerprint": run.data_fingerprint},
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        "progress": run.progress.to_dict(),
    }
    folder, previous = run.run_dir / "checkpoints", None
    if name == LAST:
        state.update(optimizer=run.step.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                     scaler=run.step.scaler.state_dict(), rng=ckpt.capture_rng())
        if run.ema is not None:
            state["ema"] = run.ema.state_dict()
        previous = folder / PREV if run.keep_last else None
        run.keep_last = True
    ckpt.save_checkpoint(folder / name, state, previous=previous)


def load_weights_checked(cfg: DictConfig, model: nn.Module, state: dict[str, Any], path: Path,
                         data: ImageData) -> None:
    """Load a checkpoint's weights into the configured model, naming the mismatch if they do not fit."""
    saved = state.get("meta", {})
    if (saved.get("model") not in (None, cfg.model.name) or saved.get("arch") not in (None, cfg.model.arch)
            or saved.get("target") not in (None, cfg.model._target_)):
        held = saved.get("target") or saved.get("model")
        raise UserError(f"checkpoint {path} holds a {held} model, but the config asks for {model_label(cfg.model)}")
    if saved.get("classes") is not None and len(saved["classes"]) != data.num_classes:
        raise UserError(f"checkpoint {path} was trained for {len(saved['classes'])} classes, "
                        f"the dataset has {data.num_classes}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"checkpoint {path} does not match the configured model ({detail})") from None


def restore(cfg: DictConfig, step: TrainStep, scheduler: Any, ema: AveragedModel | None, data: ImageData,
            device: torch.device) -> Progress:
    """Put a trainer checkpoint (cfg.resume) back into what was just built; return where it stood."""
    path = ckpt.find_checkpoint(cfg.resume)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    try:
        state = ckpt.load_checkpoint(path)
    except UserError as e:
        raise UserError(f"{e}; {_other_checkpoint(path, run_dir)}") from None
    if "optimizer" not in state:
        raise UserError(f"{path} holds model weights only; resume needs a trainer checkpoint ({LAST} or {PREV}); "
                        f"to start a new run from these weights: {weights_command(path, job_overrides(run_dir) or [])}")
    check_same_run(cfg, state, path, run_dir, data)
    load_weights_checked(cfg, step.model, state, path, data)
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
    ckpt.restore_rng(state["rng"])
    return progress


def _other_checkpoint(path: Path, run_dir: Path) -> str:
    """What a user can run instead when the checkpoint to resume from cannot be read."""
    previous = path.with_name(PREV)
    if path.name != PREV and previous.is_file():
        return f"resume from the checkpoint before it: cnntrain fit resume={previous}"
    best = run_dir / "checkpoints" / BEST
    if best.is_file():
        return f"to start a new run from the best weights: {weights_command(best, job_overrides(run_dir) or [])}"
    return "no other checkpoint of this run is left; start it again"


def check_same_run(cfg: DictConfig, state: dict[str, Any], path: Path, run_dir: Path, data: ImageData) -> None:
    """A resume continues the run it resumes: refuse a config or data that would make it another one
    (the CLI checks the config earlier, against .hydra/config.yaml; this is the checkpoint's own record)."""
    way_out = weights_command(path, job_overrides(run_dir) or [])
    if isinstance(state.get("config"), dict):
        check_resume(state["config"], OmegaConf.to_container(cfg, resolve=True), str(run_dir), way_out)
    recorded = state.get("meta", {}).get("data_fingerprint")
    if recorded is None:  # checkpoints written before the fingerprint went into them
        recorded = (read_json(run_dir / "provenance.json") or {}).get("data_fingerprint")
    now = data.fingerprint() if recorded else None
    if recorded and recorded != now:
        raise UserError(f"resume: the {data.name} data ({data.source}) are not the data the run in {run_dir} "
                        f"was trained on (data fingerprint {str(now)[:12]}, recorded "
                        f"{str(recorded)[:12]}), so it would mix two datasets; to train on from its weights as a "
                        f"new run: {way_out}")
