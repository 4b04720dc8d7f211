"""Your own images: root/<class>/* or root/{train,val[,test]}/<class>/*, decoded into memory or streamed.

:func:`read_files` (probe, channels, size, resident or streamed) and :func:`assemble_splits` (given
splits, or ones carved from a pool) are shared with the CSV loader (csv_labels.py).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cnntrain.config import DatasetConfig
from cnntrain.data.batches import FileImages, Images
from cnntrain.data.decode import IMAGE_EXTENSIONS, decode_into, probe
from cnntrain.data.images import ImageData, Items, Split, carve_val, finish, hold_out, take, three_way, warn_ignored
from cnntrain.errors import UserError
from cnntrain.registry import DATASETS


def _is_image(path: str) -> bool:
    name = os.path.basename(path)
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _scan(d: Path, classes: list[str] | None, train_dir: Path | None) -> tuple[list[str], list[Path], list[int]]:
    """Files and labels of one split folder; `classes` (from train/) fixes the label order when given."""
    from torchvision.datasets.folder import find_classes, make_dataset

    try:
        found = [c for c in find_classes(str(d))[0] if not c.startswith(".")]  # .ipynb_checkpoints is no class
    except FileNotFoundError:
        found = []
    if not found:
        raise UserError(
            f"{d} has no class folders; put each class's images in its own subfolder, e.g. {d / 'cat' / '001.png'}"
        )
    if classes is None:
        classes = found
    elif extra := [c for c in found if c not in classes]:
        raise UserError(
            f"{d} has class folders that {train_dir} lacks: {', '.join(extra)}; every class needs training images"
        )
    samples = make_dataset(str(d), {c: classes.index(c) for c in found}, is_valid_file=_is_image, allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    if empty := [c for c in found if counts[classes.index(c)] == 0]:
        raise UserError(f"class folder {d / empty[0]} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, [Path(path) for path, _ in samples], [label for _, label in samples]


def corrupt(bad: list[tuple[Path, str]], cfg: DatasetConfig, what: str = "imagefolder") -> None:
    """Files that could not be decoded: the first one as an error (on_corrupt=error), else one counted warning."""
    if not bad:
        return
    if cfg.on_corrupt == "error":
        path, why = bad[0]
        raise UserError(f"cannot decode image {path} ({why}); fix or delete it, or set dataset.on_corrupt=skip")
    listed = "; ".join(f"{p} ({why})" for p, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    warnings.warn(f"{what}: skipped {len(bad)} file(s) that could not be decoded: {listed}", stacklevel=3)


def small_classes(classes: list[str], train_labels: np.ndarray, cfg: DatasetConfig, what: str) -> None:
    """A class with very few training images is most often a typo (a CSV label `circel`, a folder `dgo`):
    named, with the class it looks like, as one warning, or as an error below dataset.min_class_images."""
    import difflib

    counts = np.bincount(train_labels, minlength=len(classes))
    if cfg.min_class_images > 0:
        small = [i for i in range(len(classes)) if 0 < counts[i] < cfg.min_class_images]
    else:
        # Far below the typical class: a tenth of the median (a balanced set of a few images each is no typo).
        typical = float(np.median(counts[counts > 0])) if (counts > 0).any() else 0.0
        small = [i for i in range(len(classes)) if 0 < counts[i] < typical / 10]
    if not small:
        return

    def described(i: int) -> str:
        others = [c for c in classes if c != classes[i] and counts[classes.index(c)] > counts[i]]
        like = difflib.get_close_matches(classes[i], others, n=1, cutoff=0.7)
        text = f"{classes[i]} ({counts[i]} image{'s' if counts[i] != 1 else ''})"
        return f"{text} looks like {like[0]} ({counts[classes.index(like[0])]})" if like else text

    listed = ", ".join(described(i) for i in small[:10]) + (f" and {len(small) - 10} more" if len(small) > 10 else "")
    if cfg.min_class_images > 0:
        raise UserError(
            f"{what}: class {listed} has fewer than dataset.min_class_images={cfg.min_class_images} "
            "training images; fix the label, or lower dataset.min_class_images"
        )
    warnings.warn(
        f"{what}: {len(small)} class(es) with very few training images: {listed}; a misspelt label? "
        f"dataset.min_class_images={max(int(counts[i]) for i in small) + 1} makes this an error",
        stacklevel=3,
    )


def stream_or_not(cfg: DatasetConfig, nbytes: int) -> bool:
    """dataset.in_memory: true, false, or auto (stream above dataset.memory_limit_mb of decoded pixels)."""
    mode = str(cfg.in_memory).lower()
    return mode == "false" or (mode == "auto" and nbytes > cfg.memory_limit_mb * 2**20)


def read_files(files: list[Path], cfg: DatasetConfig, root: Path, what: str) -> tuple[Images, np.ndarray]:
    """Decode image files as dataset.image_size / channels / in_memory say: (uint8 images or streamed
    FileImages, the indices into `files` of the images kept). Undecodable files follow dataset.on_corrupt."""
    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while reading and decoding
        probes = list(pool.map(probe, files))
        bad = [(p, r) for p, r in zip(files, probes, strict=True) if isinstance(r, str)]
        headers = {i: r for i, r in enumerate(probes) if not isinstance(r, str)}  # (gray, size) of those that read
        ok = list(headers)
        if not ok:  # one error rather than a warning about every file first
            raise UserError(f"no image under {root} could be decoded ({len(bad)} files; e.g. {bad[0][0]}: {bad[0][1]})")
        if cfg.on_corrupt == "error":
            corrupt(bad, cfg, what)

        channels = cfg.channels or (1 if all(gray for gray, _ in headers.values()) else 3)
        if cfg.image_size is not None:
            w = h = int(cfg.image_size)
        else:
            sizes = {size: files[i] for i, (_, size) in headers.items()}
            if len(sizes) > 1:
                (s1, p1), (s2, p2) = list(sizes.items())[:2]
                raise UserError(
                    f"images under {root} differ in size ({s1[0]}x{s1[1]} {p1}, {s2[0]}x{s2[1]} {p2}, "
                    f"...); set dataset.image_size=N to resize all of them to NxN"
                )
            w, h = next(iter(sizes))

        nbytes = len(ok) * channels * h * w
        if stream_or_not(cfg, nbytes):
            logging.getLogger(__name__).info(
                "streaming %d images (%.0f MB decoded) through DataLoader workers", len(ok), nbytes / 2**20
            )
            corrupt(bad, cfg, what)
            return FileImages([files[i] for i in ok], channels, (h, w), cfg.on_corrupt), np.asarray(ok, np.int64)
        out = np.empty((len(ok), channels, h, w), dtype=np.uint8)
        fails = list(pool.map(lambda j: decode_into(out, j, files[ok[j]], channels), range(len(ok))))
    # The files the probe refused and those that failed to decode, counted in one warning.
    corrupt([*bad, *((files[ok[j]], why) for j, why in enumerate(fails) if why is not None)], cfg, what)
    good = np.array([j for j, why in enumerate(fails) if why is None], dtype=np.int64)
    if len(good) == 0:
        raise UserError(f"no image under {root} could be decoded")
    x = torch.from_numpy(out if len(good) == len(ok) else out[good])
    return x, np.asarray(ok, dtype=np.int64)[good]


def assemble_splits(
    x: Images,
    y: torch.Tensor,
    which: np.ndarray,
    present: list[str],
    cfg: DatasetConfig,
    what: str,
    missing: Callable[[str], str],
) -> tuple[Split, Split, Split, str | None]:
    """(train, val, test, how the test split was made) from images tagged by `which` (an index into `present`).

    present == ["all"]: one pool, split by the fractions (seeded, stratified). Otherwise train is given; a
    missing val or test split is held out of train (each with a warning that `missing(split)` words), never
    the validation split as the test split: that one picked the best epoch, so a score on it is no test.
    The last value describes a test split cnntrain held out (None when the source gave one).
    """

    def part(name: str) -> Split:
        return take(x, y, np.flatnonzero(which == present.index(name)))

    held_out = (
        f"dataset.test_fraction={cfg.test_fraction} of {{}}, stratified by class, "
        f"seeded by dataset.split_seed={cfg.split_seed} (no test split given)"
    )
    if present == ["all"]:
        return (*three_way(x, y, cfg, what), held_out.format(what))
    train, test_split = part("train"), None
    if "test" in present:
        warn_ignored(cfg, ("test_fraction",))  # the given test split decides
        test = part("test")
    if "val" in present:
        val = part("val")
    if "test" not in present:
        if "val" in present:
            train, test = hold_out(*train, cfg.test_fraction, [cfg.split_seed, 2], what, "test")
        else:
            train, val, test = three_way(*train, cfg, what)
        test_split = held_out.format(what)
        warnings.warn(
            f"{missing('test')}; holding out {len(test[1])} images of the train split "
            f"(dataset.test_fraction={cfg.test_fraction}) as the test split",
            stacklevel=3,
        )
    if "val" not in present:
        if "test" in present:
            train, val = carve_val(*train, cfg, what)
        warnings.warn(
            f"{missing('val')}; holding out dataset.val_fraction={cfg.val_fraction} "
            "of the training images for validation",
            stacklevel=3,
        )
    for split_name, (sx, _) in (("train", train), ("val", val), ("test", test)):
        if len(sx) == 0:
            raise UserError(f"the {split_name} split of {what} has no decodable images")
    return train, val, test, test_split


def split_recorded(
    x: Images,
    y: torch.Tensor,
    which: np.ndarray,
    present: list[str],
    cfg: DatasetConfig,
    what: str,
    missing: Callable[[str], str],
    names: list[str],
    column: str,
) -> tuple[Split, Split, Split, Items, str | None]:
    """assemble_splits, also saying which of `names` (one per image of x) each split holds."""
    ids = torch.arange(len(y))
    *parts, test_split = assemble_splits(ids, y, which, present, cfg, what, missing)
    index: dict[str, np.ndarray] = {}
    for split, (part, _) in zip(("train", "val", "test"), parts, strict=True):
        assert isinstance(part, torch.Tensor)  # the ids' splits: tensors, as the ids are
        index[split] = part.numpy()
    train, val, test = (take(x, y, index[split]) for split in ("train", "val", "test"))
    return train, val, test, Items(column, names, index), test_split


@DATASETS.register("imagefolder")
def load_imagefolder(cfg: DatasetConfig) -> ImageData:
    """The user's images: root/{train,val[,test]}/<class>/* or root/<class>/* (split by the fractions). The
    values were checked by config.check_dataset (data.load_dataset); what is checked here needs the files."""
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.root={root} does not exist or is not a folder")

    # Layout: split folders if train/ exists, otherwise one pool of class folders.
    splits: dict[str, tuple[list[Path], list[int]]] = {}
    if (root / "train").is_dir():
        classes, files, labels = _scan(root / "train", None, None)
        splits["train"] = (files, labels)
        for split in ("val", "test"):
            if (root / split).is_dir():
                _, files, labels = _scan(root / split, classes, root / "train")
                splits[split] = (files, labels)
    else:
        classes, files, labels = _scan(root, None, None)
        splits["all"] = (files, labels)

    order = list(splits)
    files = [p for s in order for p in splits[s][0]]
    all_labels = np.array([lab for s in order for lab in splits[s][1]], dtype=np.int64)
    which = np.concatenate([np.full(len(splits[s][0]), k) for k, s in enumerate(order)])
    x, kept = read_files(files, cfg, root, "imagefolder")
    y = torch.from_numpy(all_labels[kept])
    small_classes(classes, all_labels[kept][which[kept] == 0], cfg, f"imagefolder {root}")  # order[0]: train or all
    what = str(root) if order == ["all"] else str(root / "train")
    names = [files[i].relative_to(root).as_posix() for i in kept.tolist()]
    train, val, test, items, test_split = split_recorded(
        x, y, which[kept], order, cfg, what, lambda split: f"imagefolder: no {root / split}", names, "path"
    )
    return finish(
        "imagefolder", classes, train, val, test, cfg, source=str(root.resolve()), items=items, test_split=test_split
    )
