"""Test-time augmentation (`evaluate tta=...`, `predict tta=...`): the model scores several views of each
image and their softmax outputs (a multi-label model's sigmoids) are averaged. The views are made on the device from the batch already
there, and all of a batch's views go through the model in one forward pass."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cnntrain.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from cnntrain.engine.inference import Trained

CROP_SHIFT = 2  # pixels: the crops are the image shifted this far towards each corner (reflect padding)
VIEWS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "flip": ("identity", "hflip"),
    "crops": ("identity", "crop-tl", "crop-tr", "crop-bl", "crop-br"),
    "flip+crops": ("identity", "hflip", "crop-tl", "crop-tr", "crop-bl", "crop-br"),
}
CHOICES = tuple(VIEWS)


def _view(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "identity":
        return x
    if name == "hflip":
        return x.flip(-1)
    s = CROP_SHIFT
    h, w = x.shape[-2:]
    padded = F.pad(x, (s, s, s, s), mode="reflect")
    top = 0 if name[-2] == "t" else 2 * s
    left = 0 if name[-1] == "l" else 2 * s
    return padded[..., top : top + h, left : left + w]


class AveragedViews(nn.Module):
    """Wraps a classifier: forward returns the log of the softmax averaged over the views, so argmax,
    softmax and cross-entropy downstream see the averaged prediction as they would a model's logits.
    A multi-label model's sigmoids are averaged instead, label by label, and come back as their logits."""

    def __init__(self, model: nn.Module, views: tuple[str, ...], multilabel: bool = False) -> None:
        super().__init__()
        self.model, self.views, self.multilabel = model, views, multilabel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        batch = torch.cat([_view(x, v) for v in self.views])
        if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1:
            batch = batch.contiguous(memory_format=torch.channels_last)
        logits = self.model(batch).float()
        if self.multilabel:
            p = logits.sigmoid().view(len(self.views), n, -1).mean(0)
            tiny = torch.finfo(torch.float32).tiny
            return p.clamp_min(tiny).log() - (1 - p).clamp_min(tiny).log()
        probs = logits.softmax(1).view(len(self.views), n, -1).mean(0)
        return probs.clamp_min(torch.finfo(torch.float32).tiny).log()


# Checkpoints written before dataset.flips_change_label was recorded: the built-in sets whose config says so.
FLIP_SENSITIVE_BUILTINS = frozenset({"mnist5k", "mnist", "kmnist", "svhn"})


def flips_change_label(meta: dict[str, Any], config: dict[str, Any]) -> bool:
    """What the training run's dataset config says (dataset.flips_change_label), from the checkpoint."""
    if "flips_change_label" in meta:
        return bool(meta["flips_change_label"])
    dataset = config.get("dataset") if isinstance(config, dict) else None
    if isinstance(dataset, dict) and "flips_change_label" in dataset:
        return bool(dataset["flips_change_label"])
    return meta.get("dataset") in FLIP_SENSITIVE_BUILTINS


def apply(trained: Trained, tta: str) -> tuple[str, ...]:
    """Wrap trained.model for `tta` (after it is prepared for its device); the views used. Flips are refused
    for a model whose dataset says a flip changes the label (digits: a mirrored 2 is not a 2)."""
    if tta not in VIEWS:
        raise UserError(
            f"tta={tta} is not a valid choice; use one of: {', '.join(CHOICES)}{did_you_mean(tta, CHOICES)}"
        )
    views = VIEWS[tta]
    if "hflip" in views and flips_change_label(trained.meta, trained.config):
        raise UserError(
            f"tta={tta} flips images, but the model's dataset ({trained.meta.get('dataset')}) says a flip "
            "changes the label (dataset.flips_change_label=true); use tta=crops or tta=none"
        )
    if len(views) > 1:
        trained.model = AveragedViews(trained.model, views, trained.task.name == "multilabel").eval()
    return views


def describe(tta: str, views: tuple[str, ...], multilabel: bool = False) -> str:
    if len(views) == 1:
        return "none"
    return f"{tta}: {'sigmoid' if multilabel else 'softmax'} averaged over {len(views)} views ({', '.join(views)})"
