"""Your own torch Dataset (dataset=custom dataset._target_=mydata.build, or an installed plug-in).

The callable returns a map-style ``torch.utils.data.Dataset`` of ``(image, label)`` pairs, or a dict of
them with key ``train`` and optionally ``val`` and ``test``. Images are PIL images, uint8 arrays or
uint8 tensors (HW, HWC or CHW); labels are class indices, or multi-hot vectors of 0/1, one per label (a
multi-label dataset: engine.tasks); class names come from a ``classes`` attribute when there is one. Keys of `dataset` that cnntrain does not declare are passed as keyword
arguments, and so are dataset.root, download and file when the signature names them.

The images are then cnntrain's as any other's: resident uint8 tensors, or streamed through DataLoader
workers above dataset.memory_limit_mb (:class:`~cnntrain.data.batches.DatasetImages`), with splits it
makes seeded, stratified and recorded (splits.csv in the run directory).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from cnntrain.config import DatasetConfig, own_keys
from cnntrain.data.batches import DatasetImages, Images
from cnntrain.data.decode import IMAGE_TYPES, as_hwc, to_uint8_chw
from cnntrain.data.imagefolder import split_recorded, stream_or_not
from cnntrain.data.images import ImageData, finish
from cnntrain.errors import UserError
from cnntrain.registry import DATASETS, import_target

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
# Keys of `dataset` that say where the data are: passed when the callable's signature names them.
SOURCE_KEYS = ("root", "download", "file")


def _call_kwargs(fn: Any, label: str, cfg: DatasetConfig) -> dict[str, Any]:
    try:
        sig = inspect.signature(fn)
        params = {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    except (TypeError, ValueError):
        params, var_kw = set(), True
    defaults = DatasetConfig()
    call: dict[str, Any] = {}
    for key in SOURCE_KEYS:
        value = getattr(cfg, key)
        if value == getattr(defaults, key):
            continue
        if key in params or var_kw:
            call[key] = value
        else:
            raise UserError(
                f"dataset.{key}={value} is not an argument of {label} (it takes: "
                f"{', '.join(sorted(params)) or 'no keyword arguments'}); remove it or add it"
            )
    for key, value in own_keys(cfg, DatasetConfig).items():
        if key in params or var_kw:
            call[key] = value
        else:
            raise UserError(
                f"dataset.{key}={value} is not an argument of {label} (it takes: "
                f"{', '.join(sorted(params)) or 'no keyword arguments'}); remove it or add it"
            )
    return call


def _parts(result: Any, label: str) -> dict[str, Any]:
    """The returned dataset(s) by split ("all" for one dataset to split), each checked to be map-style."""
    if isinstance(result, Mapping):
        unknown = [str(k) for k in result if k not in SPLITS]
        if unknown or "train" not in result:
            raise UserError(
                f"{label} returned a dict with keys {', '.join(map(str, result))}; give a dict with "
                "key train and optionally val and test (or one dataset, which cnntrain splits)"
            )
        parts = {k: result[k] for k in SPLITS if k in result and result[k] is not None}
    else:
        parts = {"all": result}
    for split, ds in parts.items():
        where = label if split == "all" else f"{label}['{split}']"
        if isinstance(ds, torch.utils.data.IterableDataset) or not (
            hasattr(ds, "__getitem__") and hasattr(ds, "__len__")
        ):
            raise UserError(
                f"{where} is a {type(ds).__name__}, not a map-style torch Dataset (one with "
                "__getitem__ and __len__) of (image, label) pairs"
            )
        if len(ds) == 0:
            raise UserError(f"{where} is empty")
    return parts


# An item's label: a class index, or a multi-hot target.
Label = int | tuple[float, ...]


def _label(value: Any, what: str) -> Label:
    """A class index, or a multi-hot target (a vector of 0/1 with more than one entry) as a tuple."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    vector = _multi_hot(value)
    if vector is not None:
        return vector
    raise UserError(
        f"{what}: the label is {value!r} ({type(value).__name__}); return the class index as an int, "
        "or for a multi-label dataset a vector of 0/1, one per label (class names go in a `classes` "
        "attribute of the dataset)"
    )


def _multi_hot(value: Any) -> tuple[float, ...] | None:
    """A 1-d tensor, array or list of 0/1 (ints, bools or floats) with more than one entry, else None."""
    if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
        a = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        if a.ndim == 1 and len(a) > 1 and a.dtype.kind in "biuf" and bool(np.isin(a, (0, 1)).all()):
            return tuple(float(v) for v in a)
    return None


def _targets(labels: list[Any], label: str) -> torch.Tensor:
    """The labels as class indices [N], or as multi-hot rows [N, labels] when the dataset gives vectors."""
    vectors = [v for v in labels if isinstance(v, tuple)]
    if not vectors:
        return torch.tensor(labels, dtype=torch.int64)
    if len(vectors) < len(labels) or len({len(v) for v in vectors}) > 1:
        sizes = sorted({len(v) for v in vectors})
        raise UserError(
            f"{label} gives multi-hot targets of {' and '.join(map(str, sizes))} labels"
            f"{' and class indices' if len(vectors) < len(labels) else ''}; every item of a multi-label "
            "dataset returns a 0/1 vector with one entry per label"
        )
    return torch.tensor(labels, dtype=torch.float32)


def _item(ds: Any, i: int, what: str) -> tuple[Any, Label]:
    item = ds[i]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise UserError(
            f"{what} is a {type(item).__name__}; items must be (image, label) pairs with images as {IMAGE_TYPES}"
        )
    return item[0], _label(item[1], what)


def _known_labels(ds: Any) -> list[Label] | None:
    """The labels from a `targets` or `labels` attribute, when it has one per item (saves reading images)."""
    for attr in ("targets", "labels"):
        values = getattr(ds, attr, None)
        if values is None:
            continue
        try:
            listed = values.tolist() if hasattr(values, "tolist") else list(values)
            labels = [_multi_hot(v) or int(v) for v in listed]
        except (TypeError, ValueError):
            return None
        if len(labels) == len(ds):
            return labels
    return None


class _Failures:
    def __init__(self, label: str, cfg: DatasetConfig) -> None:
        self.label, self.cfg = label, cfg
        self.items: list[str] = []

    def add(self, what: str, e: Exception) -> None:
        if isinstance(e, UserError):
            raise e
        if self.cfg.on_corrupt == "error":
            raise UserError(
                f"{what} raised {type(e).__name__}: {' '.join(str(e).split())} "
                "(fix it, or set dataset.on_corrupt=skip to leave such items out)"
            ) from None
        self.items.append(f"{what} ({type(e).__name__}: {' '.join(str(e).split())})")

    def warn(self) -> None:
        if self.items:
            listed = "; ".join(self.items[:5]) + (f"; and {len(self.items) - 5} more" if len(self.items) > 5 else "")
            warnings.warn(
                f"{self.label}: left out {len(self.items)} item(s) that could not be read: {listed}", stacklevel=3
            )


def _resident(
    pool: list[tuple[str, Any, int]], cfg: DatasetConfig, label: str, fails: _Failures
) -> tuple[Images, list[Label], list[int]]:
    """Read every item: (uint8 [N, C, H, W], labels, kept pool positions)."""
    images, labels, kept = [], [], []
    for k, (what, ds, i) in enumerate(pool):
        try:
            image, y = _item(ds, i, what)
            images.append(as_hwc(image, what))
        except Exception as e:  # the dataset's own read errors; UserErrors are raised again
            fails.add(what, e)
            continue
        labels.append(y)
        kept.append(k)
    fails.warn()
    if not images:
        raise UserError(f"no item of {label} could be read")
    channels = cfg.channels or (3 if any(a.shape[2] == 3 for a in images) else 1)
    if cfg.image_size is not None:
        size = (int(cfg.image_size), int(cfg.image_size))
    else:
        sizes = {a.shape[:2]: pool[kept[j]][0] for j, a in enumerate(images)}
        if len(sizes) > 1:
            (s1, w1), (s2, w2) = list(sizes.items())[:2]
            raise UserError(
                f"images of {label} differ in size ({s1[0]}x{s1[1]} {w1}, {s2[0]}x{s2[1]} {w2}, ...); "
                "set dataset.image_size=N to resize all of them to NxN"
            )
        size = next(iter(sizes))
    out = np.empty((len(images), channels, *size), dtype=np.uint8)
    for j, a in enumerate(images):
        out[j] = to_uint8_chw(a, channels, size, pool[kept[j]][0])
    return torch.from_numpy(out), labels, kept


def _streamed(
    pool: list[tuple[str, Any, int]], parts: dict[str, Any], cfg: DatasetConfig, label: str, first: np.ndarray
) -> tuple[Images, list[Label], list[int]]:
    """Labels only (from `targets`/`labels`, else one pass); images are read by DataLoader workers."""
    channels = cfg.channels or first.shape[2]
    size = (int(cfg.image_size),) * 2 if cfg.image_size is not None else tuple(first.shape[:2])
    labels: list[Label] = []
    for ds in parts.values():
        known = _known_labels(ds)
        if known is None:
            log.info("%s: reading every item once for its label (a `targets` attribute would save this)", label)
            known = [_item(ds, i, f"{label}[{i}]")[1] for i in range(len(ds))]
        labels += known
    concat = next(iter(parts.values())) if len(parts) == 1 else torch.utils.data.ConcatDataset(list(parts.values()))
    x = DatasetImages(concat, range(len(pool)), channels, size, cfg.on_corrupt, label)
    return x, labels, list(range(len(pool)))


def load_from(fn: Any, label: str, key: str, cfg: DatasetConfig, name: str) -> ImageData:
    """Call the user's dataset function or class and turn what it returns into cnntrain's ImageData."""
    if not callable(fn):
        raise UserError(f"{key}: {label} is a {type(fn).__name__}, not a function or class")
    parts = _parts(fn(**_call_kwargs(fn, label, cfg)), label)
    pool = [
        (f"{label}[{i}]" if split == "all" else f"{label}['{split}'][{i}]", ds, i)
        for split, ds in parts.items()
        for i in range(len(ds))
    ]
    names = [f"{i}" if split == "all" else f"{split}:{i}" for split, ds in parts.items() for i in range(len(ds))]
    which_all = np.concatenate([np.full(len(ds), k) for k, ds in enumerate(parts.values())])
    first_what, first_ds, _ = pool[0]
    first = as_hwc(_item(first_ds, 0, first_what)[0], first_what)
    channels = cfg.channels or first.shape[2]
    h, w = (cfg.image_size, cfg.image_size) if cfg.image_size is not None else first.shape[:2]
    if stream_or_not(cfg, len(pool) * channels * h * w):
        x, labels, kept = _streamed(pool, parts, cfg, label, first)
    else:
        x, labels, kept = _resident(pool, cfg, label, _Failures(label, cfg))
    y = _targets(labels, label)
    classes = _class_names(parts, y, label) if y.dim() == 1 else _label_names(parts, y.shape[1], label)
    present = list(parts)
    train, val, test, items, test_split = split_recorded(
        x,
        y,
        which_all[kept],
        present,
        cfg,
        label,
        lambda split: f"{label} has no '{split}' dataset",
        [names[k] for k in kept],
        "item",
    )
    return finish(name, classes, train, val, test, cfg, source=label, items=items, test_split=test_split)


def _class_names(parts: dict[str, Any], y: torch.Tensor, label: str) -> list[str]:
    """The class names of class-index labels `y`: the dataset's `classes`, else the indices."""
    top = int(y.max()) + 1
    if int(y.min()) < 0:
        raise UserError(f"{label}: label {int(y.min())} is negative; labels are class indices 0, 1, ...")
    first = next(iter(parts.values()))
    names = getattr(first, "classes", None)
    if names is None:
        return [str(i) for i in range(top)]
    names = [str(c) for c in names]
    if top > len(names):
        raise UserError(f"{label}: label {top - 1} is beyond its {len(names)} classes ({', '.join(names[:10])}...)")
    return names


def _label_names(parts: dict[str, Any], k: int, label: str) -> list[str]:
    names = getattr(next(iter(parts.values())), "classes", None)
    if names is None:
        return [str(i) for i in range(k)]
    if len(names) != k:
        raise UserError(f"{label}: its multi-hot targets have {k} entries but its `classes` names {len(names)}")
    return [str(c) for c in names]


@DATASETS.register("custom")
def load_custom(cfg: DatasetConfig) -> ImageData:
    """dataset=custom: the callable that dataset._target_ names."""
    fn = import_target(cfg._target_, "dataset._target_")
    return load_from(fn, str(cfg._target_), "dataset._target_", cfg, "custom")


def load_plugin(name: str, cfg: DatasetConfig) -> ImageData:
    """dataset=<plug-in name>: the callable an installed package's entry point names."""
    fn, plugin = DATASETS.load_plugin(name)
    return load_from(fn, plugin.label, f"dataset={name}", cfg, name)
