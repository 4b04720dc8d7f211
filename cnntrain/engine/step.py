"""One training step: augment -> normalise -> autocast forward -> loss -> backward -> clip -> optimizer step ->
schedule -> weight average -> the epoch's running sums.

fit, lr-find and the dry run all step through this class, so a change to how a batch is trained on
is made once. fit calls the whole step (`TrainStep.__call__`); lr-find and the layout probe (engine.tuning)
call its optimisation alone (`train`): they set the learning rate themselves and keep no averages or sums.

With micro_batch set, the forward and backward passes run over chunks of the batch whose gradients accumulate; everything else (augmentation, the loss's label smoothing and soft targets, the
optimizer, the schedule and the weight average) still happens once per optimisation batch, so the result
is the whole batch's up to the order of float sums.

The loss and the metric sums live here alone (`forward_loss`, `zero_sums`, `_tally`, `means`); what they
count is asked of the run's task (engine.tasks: cross-entropy and accuracy, or binary cross-entropy and exact
match), so a task with another loss or metric is a class in engine/tasks.py, not an edit of the loop.
A non-finite loss is the step's to catch too: it stops the run (`check_finite`, where the loss reaches the
host), or with trainer.on_nonfinite=skip the step passes over it, up to MAX_SKIPS_IN_A_ROW in a row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel

from cnntrain.engine import tasks
from cnntrain.engine.device import Precision
from cnntrain.engine.inputs import Normalise, augment_seed, to_unit
from cnntrain.errors import UserError
from cnntrain.models import freeze_norm_stats, set_backbone_trainable

if TYPE_CHECKING:
    from cnntrain.augment import BatchAugment

# trainer.on_nonfinite=skip passes over a few bad batches; this many in a row means the model is broken.
MAX_SKIPS_IN_A_ROW = 10


class TrainingDiverged(UserError):
    exit_code = 3


@dataclass
class TrainStep:
    model: nn.Module  # the parameters (what is saved)
    forward: nn.Module  # what is called: the model, maybe wrapped for DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    normalise: Normalise
    precision: Precision
    augment: BatchAugment | None = None
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    rank: int = 0
    class_weights: torch.Tensor | None = None  # trainer.class_weights, on the device; None: unweighted
    micro_batch: int | None = None  # chunk size of the forward/backward passes; None: the whole batch at once
    task: tasks.Task = tasks.SingleLabel()  # the loss and the training count (engine.tasks)
    # What fit's whole step (__call__) adds to the optimisation; `train` alone leaves them be.
    scheduler: LRScheduler | None = None  # stepped after each optimizer step
    ema: AveragedModel | None = None  # the weight average (trainer.ema_decay), updated after each optimizer step
    skip_nonfinite: bool = False  # trainer.on_nonfinite=skip
    unfreeze_epoch: int | None = None  # a frozen backbone's model.unfreeze_epoch: from it on, the backbone trains
    lr: float = 0.0  # optimizer.lr as configured: what the divergence messages name
    # Where fit stands, set by begin_epoch: the epoch under way and its running sums (the checkpoint's
    # Progress.sums, the same tensors), and the run of non-finite steps passed over.
    epoch: int = field(default=0, init=False)
    sums: dict[str, torch.Tensor] = field(default_factory=dict, init=False)
    _skips: int = field(default=0, init=False)  # length of the current run of skipped steps...
    _last_skip: int = field(default=0, init=False)  # ...and the global step after the last one skipped

    def __post_init__(self) -> None:
        self._gen = torch.Generator(device=self.normalise.mean.device)

    def begin_epoch(self, epoch: int, sums: dict[str, torch.Tensor]) -> None:
        """Before an epoch's steps: a frozen backbone joins at its epoch, the model trains (a frozen backbone
        keeps its BatchNorm statistics), and the steps add to `sums` (zero_sums, or a resumed epoch's)."""
        if epoch == self.unfreeze_epoch:
            set_backbone_trainable(self.model, True)
        self.model.train()
        freeze_norm_stats(self.model)
        self.epoch, self.sums = epoch, sums

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

    def loss(
        self, x_u8: torch.Tensor, y: torch.Tensor, global_step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(model input, logits, loss) of a uint8 batch."""
        x, target = self.prepare(x_u8, y, global_step)
        return (x, *self.forward_loss(x, target))

    def __call__(
        self, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor, global_step: int
    ) -> tuple[torch.Tensor, bool]:
        """fit's step on a prepared batch (y: its hard labels): the optimisation, the schedule, the weight
        average and the epoch's sums. (loss, whether the optimizer stepped): with skip_nonfinite a non-finite
        loss is passed over, which raises TrainingDiverged after MAX_SKIPS_IN_A_ROW in a row."""
        logits, loss, stepped = self.train(x, target, skip_nonfinite=self.skip_nonfinite)
        if not stepped:
            self._skip(global_step)
            return loss, False
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self._tally(logits, loss, y)
        return loss, True

    def train(
        self, x: torch.Tensor, target: torch.Tensor, skip_nonfinite: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimisation step on a prepared batch (forward, backward, clipping, the optimizer step; no
        schedule, average or sums): (logits, loss, whether the optimizer stepped).

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
        self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]  # unannotated in torch
        self.apply()

    def apply(self) -> None:
        """The optimizer step on the gradients in .grad (unscaled and clipped first when asked)."""
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def zero_sums(self) -> dict[str, torch.Tensor]:
        """The running sums of a new epoch, float64 on the device: they reach the host only when read."""
        device = self.normalise.mean.device
        return {k: torch.zeros((), device=device, dtype=torch.float64) for k in ("loss", "correct", "seen")}

    def _tally(self, logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor) -> None:
        sums = self.sums
        sums["loss"] += loss.detach() * len(y)
        sums["correct"] += self.task.correct(logits, y)
        sums["seen"] += len(y)

    def totals(self) -> torch.Tensor:
        """The sums in one device tensor: summed over ranks in one all-reduce, read in one sync."""
        return torch.stack([self.sums["loss"], self.sums["correct"], self.sums["seen"]])

    @staticmethod
    def means(totals: torch.Tensor) -> tuple[float, float, float]:
        """(mean loss, the share of images counted correct (accuracy, or exact match), images) of `totals`."""
        loss_total, correct, seen = totals.tolist()
        seen = max(1.0, seen)
        return loss_total / seen, correct / seen, seen

    def check_finite(self, value: float, global_step: int) -> float:
        """A loss that has reached the host: `value` if finite; else the run has diverged."""
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"training diverged: the loss became {value} in epoch {self.epoch} (by step {global_step}) with "
                f"optimizer.lr={self.lr:g}; lower optimizer.lr or set trainer.grad_clip. "
                "Nothing from the diverged state was saved."
            )
        return value

    def _skip(self, global_step: int) -> None:
        """trainer.on_nonfinite=skip: leave the weights alone, and give up after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self._skips = self._skips + 1 if self._last_skip == global_step else 1
        self._last_skip = global_step + 1
        if self._skips >= MAX_SKIPS_IN_A_ROW:
            raise TrainingDiverged(
                f"training diverged: {self._skips} steps in a row (up to step {self._last_skip}, epoch {self.epoch}) "
                f"gave a non-finite loss with optimizer.lr={self.lr:g}; trainer.on_nonfinite=skip passes over "
                "occasional bad batches, not a diverged model. Lower optimizer.lr or set trainer.grad_clip. "
                "Nothing from the diverged state was saved."
            )


def _no_sync_of(forward: nn.Module) -> Callable[[], Any] | None:
    """DDP's no_sync of what the step calls (through torch.compile's wrapper), or None without DDP."""
    module = getattr(forward, "_orig_mod", forward)
    return getattr(module, "no_sync", None)
