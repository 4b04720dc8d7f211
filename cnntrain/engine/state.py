"""The state of a run: what was built for it (`Run`) and where it stands (`Progress`).

How both go into and out of a checkpoint is `engine.checkpoint`'s (`save`, `restore`); `Progress` and `save`
are defined there, and `FitConfig` (what a Run is built from) in `cnntrain.config`: they are named here too,
where the loop imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cnntrain.config import FitConfig
from cnntrain.data.images import ImageData
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine import distributed
from cnntrain.engine.checkpoint import Progress, save
from cnntrain.engine.step import TrainStep
from cnntrain.io.console import Reporter
from cnntrain.io.files import RunDir

__all__ = ["FitConfig", "Progress", "Run", "load_best", "save"]


@dataclass
class Run:
    """Everything one `cnntrain fit` built, in one place; the loop reads it and advances `progress`."""

    cfg: FitConfig  # the typed config (config.typed), read-only; config.plain gives the record of it
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
    reporter: Reporter
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


def load_best(run: Run) -> Path:
    """Put the best checkpoint's weights (the validated ones) into the run's model for the test; its path."""
    path = RunDir(run.run_dir).best
    run.model.load_state_dict(ckpt.load_checkpoint(path)["model"])
    return path
