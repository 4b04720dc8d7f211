"""One training step: augment -> normalise -> autocast forward -> loss -> backward -> optimizer step.

fit, lr-find and the dry run all step through this class, so a change to how a batch is trained on
is made once. With micro_batch set, the forward and backward passes run over chunks of the batch whose
gradients accumulate; everything else (augmentation, the loss's label smoothing and soft targets, the
optimizer, the schedule and the weight average) still happens once per optimisation batch, so the result
is the whole batch's up to the order of float sums.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnntrain.engine import tasks
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
    micro_batch: int | None = None  # chunk size of the forward/backward passes; None: the whole batch at once
    task: tasks.Task = tasks.SingleLabel()  # the loss (cross-entropy, or binary cross-entropy for multi-label)

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
        return logits, self.task.loss(logits.float(), target, self.class_weights, self.label_smoothing)

    def loss(self, x_u8: torch.Tensor, y: torch.Tensor, global_step: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(model input, logits, loss) of a uint8 batch."""
        x, target = self.prepare(x_u8, y, global_step)
        return (x, *self.forward_loss(x, target))

    def train(self, x: torch.Tensor, target: torch.Tensor, skip_nonfinite: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimisation step on a prepared batch: (logits, loss, whether the optimizer stepped).

        skip_nonfinite: a non-finite loss leaves the weights alone (and costs a host sync per step).
        """
        if self.micro_batch is None or self.micro_batch >= len(x):
            logits, loss = self.forward_loss(x, target)
            if skip_nonfinite and not torch.isfinite(loss):
                return logits, loss, False
            self.update(loss)
            return logits, loss, True
        logits, loss = self.accumulate(x, target)
        if skip_nonfinite and not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return logits, loss, False
        self.apply()
        return logits, loss, True

    def accumulate(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss) of the whole batch, with its gradient accumulated chunk by chunk in .grad.

        Each chunk's mean loss is weighted by its share of the batch's, so the gradients sum to the whole
        batch's mean-loss gradient whether or not micro_batch divides the batch.
        """
        n, size = len(x), self.micro_batch or len(x)
        self.optimizer.zero_grad(set_to_none=True)
        logits, total = [], torch.zeros((), device=x.device)
        no_sync = _no_sync_of(self.forward)
        for i, share in zip(range(0, n, size), self._shares(target, size), strict=True):
            xc, tc = x[i : i + size], target[i : i + size]
            # DDP all-reduces the gradients once, after the last chunk's backward.
            with no_sync() if no_sync is not None and i + size < n else nullcontext():
                out, loss = self.forward_loss(xc, tc)
                self.scaler.scale(loss * share).backward()
            logits.append(out.detach())
            total += loss.detach() * share
        return torch.cat(logits), total

    def _shares(self, target: torch.Tensor, size: int) -> list[Any]:
        """Each chunk's part of the batch's mean loss: its share of the images, or, with class weights on hard
        labels, its share of their weights (cross_entropy then divides by the sum of the targets' weights;
        with soft targets it divides by the number of images)."""
        n = len(target)
        if self.class_weights is None or target.is_floating_point():
            return [min(size, n - i) / n for i in range(0, n, size)]
        w = self.class_weights[target]  # stays on the device: no host sync
        return [w[i : i + size].sum() / w.sum() for i in range(0, n, size)]

    def update(self, loss: torch.Tensor) -> None:
        """Scaled backward (fp16), optional clipping of the true gradient norm, optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.apply()

    def apply(self) -> None:
        """The optimizer step on the gradients in .grad (unscaled and clipped first when asked)."""
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _no_sync_of(forward: nn.Module) -> Callable[[], Any] | None:
    """DDP's no_sync of what the step calls (through torch.compile's wrapper), or None without DDP."""
    module = getattr(forward, "_orig_mod", forward)
    return getattr(module, "no_sync", None)
