"""Batched augmentation on the training device: ops.py holds the tensor ops, pipeline.py the stages."""

from cnntrain.augment.pipeline import BatchAugment, build_augment

__all__ = ["BatchAugment", "build_augment"]
