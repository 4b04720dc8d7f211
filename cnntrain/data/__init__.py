"""Datasets: a config -> an ImageData of uint8 tensors with train/val/test splits.

Loaders register themselves in cnntrain.registry.DATASETS: the built-in sets in builtin.py, image
folders in imagefolder.py.
"""

from __future__ import annotations

from cnntrain.config import DatasetConfig
from cnntrain.data import builtin, imagefolder  # noqa: F401  (they fill the registry)
from cnntrain.data.images import ImageData
from cnntrain.registry import DATASETS


def load_dataset(cfg: DatasetConfig) -> ImageData:
    """Load the dataset that cfg.name names, with its train/val/test splits."""
    return DATASETS.get(cfg.name)(cfg)
