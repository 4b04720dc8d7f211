"""What every dataset loader returns: uint8 image tensors with fixed train/val/test splits.

Splits are stratified by class and seeded by ``dataset.split_seed`` alone, so runs with different
training seeds are compared on the same validation and test images.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cnntrain.config import DatasetConfig
from cnntrain.data.batches import Images, StreamedImages
from cnntrain.errors import UserError

# A CSV of labels (and splits.csv) writes an image's several labels joined by this, and none of them as NO_LABELS.
MULTI_SEPARATOR, NO_LABELS = "|", "-"


@dataclass
class Items:
    """Which source item each image of each split is (a CSV row's path, a dataset's item number), so a
    run records the splits it made: the loop writes them as splits.csv (column,label,split)."""

    column: str  # the header of the item column: "path" or "item"
    names: list[str]  # the source items
    index: dict[str, np.ndarray]  # split -> indices into names, in the order of the split's images


# A split: (images, labels).
Split = tuple[Images, torch.Tensor]


@dataclass
class ImageData:
    name: str
    classes: list[str]
    train_x: Images
    train_y: torch.Tensor
    val_x: Images
    val_y: torch.Tensor
    test_x: Images
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    # Where the test images came from when the source has no test split of its own and cnntrain held one
    # out (recorded in summary.json); None when the source provides it.
    test_split: str | None = None
    items: Items | None = None  # which source item each image is, for sources that have names (splits.csv)

    def __post_init__(self) -> None:
        # Catch a loader bug here rather than as a shape error deep inside the loop.
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            assert x.dtype == torch.uint8 and x.dim() == 4 and x.is_contiguous(), (
                f"{split}_x: {x.dtype} {tuple(x.shape)}"
            )
            # Class indices, or multi-hot rows of 0/1 (a multi-label dataset: engine.tasks).
            assert (y.dtype == torch.int64 and y.shape == (x.shape[0],)) or (
                y.dtype == torch.float32 and y.shape == (x.shape[0], len(self.classes))
            ), f"{split}_y: {y.dtype} {tuple(y.shape)}"
            assert x.shape[1:] == self.train_x.shape[1:], f"{split}_x shape {tuple(x.shape)} differs from train_x"

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        """Whether each image has a set of labels (multi-hot rows) rather than one class."""
        return self.train_y.dim() == 2

    def label_name(self, label: Any) -> str:
        """A class index's name; a multi-hot row's labels as a CSV of labels writes them (`a|b`, `-` for none)."""
        if isinstance(label, list):
            return MULTI_SEPARATOR.join(self.classes[i] for i, v in enumerate(label) if v > 0.5) or NO_LABELS
        return self.classes[label]

    def split_rows(self) -> list[tuple[str, str, str]]:
        """(item, class name, split) for every image of train, val and test; [] when not recorded."""
        if self.items is None:
            return []
        rows = []
        for split in ("train", "val", "test"):
            labels = getattr(self, f"{split}_y").tolist()
            for i, label in zip(self.items.index[split].tolist(), labels, strict=True):
                rows.append((self.items.names[i], self.label_name(label), split))
        return rows

    def fingerprint(self) -> str:
        """sha256 over class names and every split, to tell whether a resumed run sees the same data."""
        h = hashlib.sha256(repr(self.classes).encode())
        for t in (self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y):
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.digest() if isinstance(t, StreamedImages) else t.contiguous().numpy().data)
        return h.hexdigest()


# --------------------------------------------------------------------------- splits


def strata(y: torch.Tensor) -> np.ndarray:
    """What a split is stratified by: the class of each image, or the combination of its labels (multi-hot)."""
    if y.dim() == 1:
        return y.numpy()
    return np.unique(y.numpy() > 0.5, axis=0, return_inverse=True)[1].reshape(-1)


def split_count(n: int, fraction: float) -> int:
    """Images a fraction of n amounts to: rounded half up, and at least one when n > 1."""
    k = int(np.floor(n * fraction + 0.5))
    return max(k, 1) if n > 1 else k


def _quotas(counts: np.ndarray, total: int, cap: np.ndarray) -> np.ndarray:
    """Per-class counts proportional to `counts` that sum exactly to `total` (largest remainder), each <= cap."""
    ideal = counts * (total / max(int(counts.sum()), 1))
    q = np.minimum(np.floor(ideal).astype(np.int64), cap)
    short = total - int(q.sum())
    order = np.argsort(-(ideal - q), kind="stable")
    while short > 0:
        for c in order:
            if short == 0:
                break
            if q[c] < cap[c]:
                q[c] += 1
                short -= 1
    return q


def stratified_split(labels: np.ndarray, sizes: Sequence[int], seed: Any) -> list[np.ndarray]:
    """Indices split into parts of exactly `sizes`, plus the rest, each stratified by label.

    Deterministic for a given seed; each part's indices are sorted.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if sum(sizes) > n:
        raise ValueError(f"cannot take {sum(sizes)} of {n} items")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    _, inverse = np.unique(labels[perm], return_inverse=True)
    members = perm[np.argsort(inverse, kind="stable")]  # grouped by class, shuffled within
    counts = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    taken = np.zeros_like(counts)
    parts = []
    for size in sizes:
        q = _quotas(counts, size, counts - taken)
        idx = [members[s + t : s + t + k] for s, t, k in zip(starts, taken, q, strict=True) if k]
        parts.append(np.sort(np.concatenate(idx)) if idx else np.zeros(0, dtype=np.int64))
        taken += q
    rest = [members[s + t : s + c] for s, t, c in zip(starts, taken, counts, strict=True) if c > t]
    parts.append(np.sort(np.concatenate(rest)) if rest else np.zeros(0, dtype=np.int64))
    return parts


def take(x: Images, y: torch.Tensor, idx: np.ndarray) -> Split:
    i = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    if isinstance(x, StreamedImages):  # streamed data select files (items), not pixels
        return x.subset(idx), y[i].contiguous()
    return x[i].contiguous(), y[i].contiguous()


def three_way(x: Images, y: torch.Tensor, cfg: DatasetConfig, what: str) -> tuple[Split, Split, Split]:
    """train/val/test from one pool of images, by dataset.val_fraction and dataset.test_fraction of the whole."""
    n = len(y)
    n_test, n_val = split_count(n, cfg.test_fraction), split_count(n, cfg.val_fraction)
    if min(n_test, n_val) < 1 or n_test + n_val >= n:
        raise UserError(f"{what} has only {n} images: too few to split into train/val/test; add images")
    test, val, train = stratified_split(strata(y), [n_test, n_val], cfg.split_seed)
    return take(x, y, train), take(x, y, val), take(x, y, test)


def carve_val(x: Images, y: torch.Tensor, cfg: DatasetConfig, what: str) -> tuple[Split, Split]:
    """train and val from a training set, val being dataset.val_fraction of it."""
    return hold_out(x, y, cfg.val_fraction, cfg.split_seed, what, "validation")


def hold_out(x: Images, y: torch.Tensor, fraction: float, seed: Any, what: str, split: str) -> tuple[Split, Split]:
    """(rest, held out): `fraction` of a training set held out, stratified by class and seeded."""
    n = len(y)
    k = split_count(n, fraction)
    if not 1 <= k < n:
        raise UserError(f"{what} has only {n} training images: too few to hold out a {split} split; add images")
    held, rest = stratified_split(strata(y), [k], seed)
    return take(x, y, rest), take(x, y, held)


def channel_stats(x: Images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units.

    Exact and memory-light: a 256-bin histogram per channel, moments summed in float64.
    """
    if isinstance(x, StreamedImages):  # streamed data: estimate from an even sample of up to 2,048 images
        x = x[torch.linspace(0, len(x) - 1, min(len(x), 2048)).long()]
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).numpy().astype(np.float64)
        n = max(hist.sum(), 1.0)
        mean = (hist * values).sum() / n
        var = max((hist * values**2).sum() / n - mean**2, 0.0)
        means.append(float(mean / 255.0))
        stds.append(float(np.sqrt(var) / 255.0))
    return tuple(means), tuple(stds)


def finish(
    name: str,
    classes: list[str],
    train: Split,
    val: Split,
    test: Split,
    cfg: DatasetConfig,
    source: str,
    test_split: str | None = None,
    items: Items | None = None,
) -> ImageData:
    """Apply dataset.subset to the train split, compute normalisation statistics, build the ImageData."""
    train_x, train_y = train
    subset = getattr(cfg, "subset", None)
    if subset is not None:  # at least 1: config.check_dataset (data.load_dataset)
        if subset < len(train_y):
            # A seed stream of its own: the subset is drawn after the split and leaves val/test untouched.
            keep, _ = stratified_split(strata(train_y), [subset], [cfg.split_seed, 1])
            train_x, train_y = take(train_x, train_y, keep)
            if items is not None:
                items.index["train"] = items.index["train"][keep]
        else:
            warnings.warn(
                f"dataset.subset={subset} is not below the {len(train_y)} training images; using all", stacklevel=3
            )
    mean, std = channel_stats(train_x)
    return ImageData(
        name,
        list(classes),
        train_x,
        train_y,
        *val,
        *test,
        mean=mean,
        std=std,
        source=source,
        test_split=test_split,
        items=items,
    )


def warn_ignored(cfg: DatasetConfig, keys: Sequence[str]) -> None:
    """Warn about each key the user changed from its default that this dataset does not use."""
    defaults = DatasetConfig()
    for key in keys:
        value = getattr(cfg, key, None)
        if value != getattr(defaults, key):
            warnings.warn(f"dataset.{key}={value} has no effect on dataset '{cfg.name}'; ignored", stacklevel=3)
