"""The augmentation pipeline: stages registered in cnntrain.registry.AUGMENTATIONS, applied in that order.

Each stage builder reads its keys of ``augment`` and returns a batch transform
``(x, y, gen) -> (x, y)``, or None when the config leaves it off. Order: flips -> affine warp ->
pad-and-crop -> policy (RandAugment / TrivialAugment) -> random erasing -> Mixup / CutMix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import fields
from functools import partial

import torch
from torch import Tensor

from cnntrain.augment import ops
from cnntrain.config import AugmentConfig
from cnntrain.registry import AUGMENTATIONS

Stage = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]


def _images_only(op: Callable[[Tensor, torch.Generator], Tensor]) -> Stage:
    def stage(x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        return op(x, gen), y

    return stage


@AUGMENTATIONS.register("hflip")
def hflip(cfg: AugmentConfig, num_classes: int) -> Stage | None:
    return _images_only(partial(ops.random_flip, p=cfg.hflip, dim=-1)) if cfg.hflip > 0 else None


@AUGMENTATIONS.register("vflip")
def vflip(cfg: AugmentConfig, num_classes: int) -> Stage | None:
    return _images_only(partial(ops.random_flip, p=cfg.vflip, dim=-2)) if cfg.vflip > 0 else None


@AUGMENTATIONS.register("affine")
def affine(cfg: AugmentConfig, num_classes: int) -> Stage | None:
    if cfg.rotate == 0 and cfg.scale_min == 1 and cfg.scale_max == 1 and cfg.translate == 0:
        return None
    return _images_only(
        partial(
            ops.random_affine,
            rotate=abs(cfg.rotate),
            scale_min=cfg.scale_min,
            scale_max=cfg.scale_max,
            translate=cfg.translate,
        )
    )


@AUGMENTATIONS.register("crop")
def crop(cfg: AugmentConfig, num_classes: int) -> Stage | None:
    return _images_only(partial(ops.random_crop, padding=cfg.crop_padding)) if cfg.crop_padding > 0 else None


@AUGMENTATIONS.register("policy")
def policy(cfg: AugmentConfig, num_classes: int) -> Stage | None:
    # config.validate checks the policy's name and RandAugment's ops and magnitude.
    if cfg.policy == "randaugment":
        return _images_only(partial(ops.random_policy, num_ops=cfg.policy_ops, magnitude=cfg.policy_magnitude))
    # policy_ops/policy_magnitude are RandAugment's; elsewhere a changed value would be silently ignored.
    defaults = {f.name: f.default for f in fields(AugmentConfig)}
    changed = [
        f"augment.{k}={getattr(cfg, k)}" for k in ("policy_ops", "policy_magnitude") if getattr(cfg, k) != defaults[k]
    ]
    if changed:
        warnings.warn(
            f"{' and '.join(changed)} only apply to augment.policy=randaugment, not '{cfg.policy}'; ignored",
            stacklevel=2,
        )
    if cfg.policy == "trivialaugment":
        return _images_only(partial(ops.random_policy, num_ops=1, magnitude=None))
    return None


@AUGMENTATIONS.register("erasing")
def erasing(cfg: AugmentConfig, num_classes: int) -> Stage | None:
    return _images_only(partial(ops.random_erasing, p=cfg.erasing)) if cfg.erasing > 0 else None


@AUGMENTATIONS.register("mix")
def mix(cfg: AugmentConfig, num_classes: int) -> Stage | None:
    """Mixup / CutMix: the targets come back as soft [B, num_classes] probabilities."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    return partial(ops.mix_batch, num_classes=num_classes, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha)


class BatchAugment:
    """The enabled stages in order; call with (x, y, gen) -> (x, target)."""

    def __init__(self, stages: list[tuple[str, Stage]]) -> None:
        self.stages = stages

    def __repr__(self) -> str:
        return f"BatchAugment({' -> '.join(name for name, _ in self.stages)})"

    def __call__(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        for _, stage in self.stages:
            x, y = stage(x, y, gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


def build_augment(cfg: AugmentConfig, num_classes: int) -> BatchAugment | None:
    """The training-time augmentation that ``cfg`` describes, or None when it enables nothing."""
    stages = [(name, stage) for name in AUGMENTATIONS if (stage := AUGMENTATIONS.get(name)(cfg, num_classes))]
    return BatchAugment(stages) if stages else None
