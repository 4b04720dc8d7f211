"""k-fold cross-validation (trainer.folds): one fold's train/val split of a dataset's training and
validation images, stratified and seeded by dataset.split_seed, so every job of a fold sweep cuts the same
K parts and together they validate on each of those images exactly once. The test split is left as it is."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cnntrain.data.batches import StreamedImages
from cnntrain.data.images import ImageData, Items, channel_stats, strata, stratified_split, take
from cnntrain.errors import UserError


def fold_parts(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The K stratified parts (indices into labels), sizes differing by at most one."""
    n = len(labels)
    if n < folds:
        raise UserError(
            f"trainer.folds={folds} needs at least {folds} training and validation images; the dataset has {n}"
        )
    sizes = [n * (k + 1) // folds - n * k // folds for k in range(folds - 1)]
    return stratified_split(labels, sizes, [seed, 2])  # a seed stream of its own, beside the split's


def take_fold(data: ImageData, folds: int | None, fold: int | None, seed: int) -> ImageData:
    """`data` with train and val replaced by fold `fold` of `folds`; unchanged without trainer.folds."""
    if folds is None:
        return data
    if fold is None:  # validate() lets a lone run of a fold sweep through only with its fold set
        raise UserError(
            "trainer.folds=K runs as a sweep: `cnntrain fit trainer.folds=K` sets trainer.fold "
            "per job; to run one fold alone pass trainer.fold=k as well"
        )
    if isinstance(data.train_x, StreamedImages) or isinstance(data.val_x, StreamedImages):  # both, or neither
        raise UserError("trainer.folds needs the images in memory; set dataset.in_memory=true")
    pool_x = torch.cat([data.train_x, data.val_x])
    pool_y = torch.cat([data.train_y, data.val_y])
    parts = fold_parts(strata(pool_y), folds, seed)
    val_idx = parts[fold]
    train_idx = np.sort(np.concatenate([p for k, p in enumerate(parts) if k != fold]))
    (train_x, train_y), (val_x, val_y) = take(pool_x, pool_y, train_idx), take(pool_x, pool_y, val_idx)
    mean, std = channel_stats(train_x)
    return dataclasses.replace(
        data,
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        mean=mean,
        std=std,
        items=_fold_items(data, train_idx, val_idx),
    )


def _fold_items(data: ImageData, train_idx: np.ndarray, val_idx: np.ndarray) -> Items:
    """splits.csv of a fold: the source's own item names where it has them; otherwise the image's place among
    the dataset's training and validation images (the same in every fold), and test:i for the test split."""
    if data.items is not None:
        pool = np.concatenate([data.items.index["train"], data.items.index["val"]])
        index = {"train": pool[train_idx], "val": pool[val_idx], "test": data.items.index["test"]}
        return Items(data.items.column, data.items.names, index)
    n_pool, n_test = len(data.train_y) + len(data.val_y), len(data.test_y)
    names = [str(i) for i in range(n_pool)] + [f"test:{i}" for i in range(n_test)]
    return Items("item", names, {"train": train_idx, "val": val_idx, "test": np.arange(n_pool, n_pool + n_test)})
