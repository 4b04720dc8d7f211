"""One training step: augment -> normalise -> autocast forward -> loss -> backward -> optimizer step.

fit, lr-find and the dry run all step through this class, so a change to how a batch is trained on
is made once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnntrain.engine.device import Precision
from cnntrain.engine.inputs import Normalise, augment_seed, to_unit


@dataclass
class TrainStep:
    model: nn.Module  # the parameters (what is saved)
    forward: nn.Module  # what is called: the model, maybe wrapped for DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    normalise: Normalise
    precision: Precision
    augment: Any = None  # cnntrain.augment.BatchAugment or None
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    rank: int = 0
    class_weights: torch.Tensor | None = None  # trainer.class_weights, on the device; None: unweighted

    def __post_init__(self) -> None:
        self._gen = torch.Generator(device=self.normalise.mean.device)

    def prepare(self, x_u8: torch.Tensor, y: torch.Tensor, global_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input, target) of a uint8 batch; augmentation is seeded by the step."""
        x, target = to_unit(x_u8), y
        if self.augment is not None:
            self._gen.manual_seed(augment_seed(self.seed, global_step, self.rank))
            x, target = self.augment(x, y, self._gen)
        return self.normalise(x), target

    def forward_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss): the forward pass under autocast; the loss in fp32."""
        dtype = self.precision.dtype
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.forward(x)
        return logits, F.cross_entropy(logits.float(), target, weight=self.class_weights,
                                       label_smoothing=self.label_smoothing)

    def loss(self, x_u8: torch.Tensor, y: torch.Tensor, global_step: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(model input, logits, loss) of a uint8 batch."""
        x, target = self.prepare(x_u8, y, global_step)
        return (x, *self.forward_loss(x, target))

    def update(self, loss: torch.Tensor) -> None:
        """Scaled backward (fp16), optional clipping of the true gradient norm, optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
