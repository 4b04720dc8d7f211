"""Datasets: a config -> an ImageData of uint8 tensors with train/val/test splits.

Loaders register themselves in cnntrain.registry.DATASETS: the built-in sets in builtin.py, image
folders in imagefolder.py, images with a CSV of labels in csv_labels.py, the user's own torch
Dataset (dataset=custom, and installed plug-ins) in custom.py.
"""

from __future__ import annotations

import warnings

from cnntrain.config import DatasetConfig, check_dataset
from cnntrain.data import builtin, csv_labels, custom, imagefolder  # noqa: F401  (they fill the registry)
from cnntrain.data.images import ImageData
from cnntrain.registry import DATASETS


def load_dataset(cfg: DatasetConfig) -> ImageData:
    """Load the dataset that cfg.name names (a built-in loader or an installed plug-in), with its splits."""
    check_dataset(cfg)  # `cnntrain evaluate dataset.KEY=VALUE` comes here without a fit's validation
    if cfg.name not in DATASETS and DATASETS.plugin(cfg.name) is not None:
        return custom.load_plugin(cfg.name, cfg)
    loader = DATASETS.get(cfg.name)
    if cfg.file is not None and cfg.name not in ("csv", "custom"):
        warnings.warn(f"dataset.file={cfg.file} has no effect on dataset '{cfg.name}'; ignored", stacklevel=2)
    return loader(cfg)
