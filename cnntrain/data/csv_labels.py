"""Images plus a CSV of labels (dataset=csv dataset.root=DIR dataset.file=labels.csv).

Columns ``path,label`` and optionally ``split`` (train / val / test), in any order, named by the first
row. Paths are relative to dataset.root. Labels are class names (classes sorted by name) or integers
(class i is the i-th, so every integer from 0 to the largest needs images). Without a split column,
val and test are held out by the fractions, seeded and stratified. Images are read exactly as an
image folder's: dataset.image_size, channels, in_memory (streamed when large) and on_corrupt.

A row that names a missing file, an unknown split value or a path already listed, and a class without
training images, are one error line under dataset.on_corrupt=error, or one counted warning under skip
(the default): such rows are left out, an empty class stays a class (its output is never trained).

Multi-label: a label cell may hold several labels joined by `|` (`cat|outdoor`), and `-` for an image with
none of them. A CSV with either is multi-label (the targets are multi-hot rows; engine.tasks); an empty cell
is an error there too, since it cannot tell "no labels" from a forgotten one.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from cnntrain.config import DatasetConfig
from cnntrain.data.imagefolder import read_files, small_classes, split_recorded
from cnntrain.data.images import MULTI_SEPARATOR, NO_LABELS, ImageData, finish
from cnntrain.errors import UserError
from cnntrain.registry import DATASETS

COLUMNS = ("path", "label", "split")
SPLITS = ("train", "val", "test")
# Problems a row can have, in the words of the warning.
_PROBLEMS = {"missing": "missing file(s)", "duplicate": "duplicate path(s)", "split": "unknown split value(s)"}


class _Rows:
    """The rows of the CSV that name usable images, and what was wrong with the others."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.labels: list[str] = []
        self.splits: list[str] = []
        self.multi = False  # whether a label cell holds several labels (a|b) or none (-)
        self.problems: dict[str, list[str]] = {k: [] for k in _PROBLEMS}


def _csv_path(cfg: DatasetConfig, root: Path) -> Path:
    path = Path(str(cfg.file)).expanduser()  # set: config.check_dataset refuses dataset=csv without a file
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise UserError(
            f"dataset.file={cfg.file}: no such file {path}; give the CSV of labels, relative to dataset.root"
        )
    return path


def _is_multi(label: str) -> bool:
    return MULTI_SEPARATOR in label or label == NO_LABELS


def _read_rows(path: Path, root: Path, cfg: DatasetConfig) -> tuple[_Rows, bool]:
    """Parse and check every row; on_corrupt=error stops at the first bad one."""
    rows = _Rows()
    seen: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path} is empty; its first row names the columns path,label[,split]")
        names = [h.strip().lower() for h in header]
        missing = [c for c in ("path", "label") if c not in names]
        if missing:
            raise UserError(
                f"{path} has no {' and no '.join(repr(c) for c in missing)} column (its first row: "
                f"{', '.join(header)}); name the columns path,label[,split] in the first row"
            )
        col = {c: names.index(c) for c in COLUMNS if c in names}
        has_split = "split" in col
        lines = list(enumerate(reader, start=2))
    # Known before any row is checked, so an empty cell is described for the kind of CSV it is in.
    cells = [row[col["label"]].strip() for _, row in lines if col["label"] < len(row)]
    multi = rows.multi = any(_is_multi(cell) for cell in cells)
    if multi and not any(MULTI_SEPARATOR in cell for cell in cells):
        # Only `-` made it multi-label: that may be a class named `-` in a single-label CSV.
        warnings.warn(
            f"csv {path}: read as multi-label (each image scored per label, by binary cross-entropy), because "
            f"{cells.count(NO_LABELS)} row(s) have the label {NO_LABELS}, which means 'none of the labels'; "
            f"if {NO_LABELS} is a class of a single-label dataset, rename it",
            stacklevel=3,
        )
    for line, row in lines:
        if not any(cell.strip() for cell in row):
            continue  # blank line
        cells = [row[col[c]].strip() if col[c] < len(row) else "" for c in col]
        value = dict(zip(col, cells, strict=True))
        rel, label = value["path"], value["label"]
        where = f"{path.name} line {line}"
        if not label and multi:
            raise UserError(
                f"{where}: the label cell of {rel or 'the row'} is empty; in a multi-label CSV every "
                f"row names its labels (a{MULTI_SEPARATOR}b), or {NO_LABELS} for an image with none "
                "of them"
            )
        if not label:
            raise UserError(f"{where}: no label for {rel or 'the row'}; every row needs path and label")
        if multi:
            label = _labels_of(label, where)
        split = value.get("split", "").lower()
        key = os.path.normpath(rel) if rel else ""
        problem = None
        if has_split and split not in SPLITS:
            problem = ("split", f"{where}: split '{value.get('split', '')}' is not one of train, val, test")
        elif not rel or not (root / rel).is_file():
            problem = ("missing", f"{where}: {root / rel} does not exist")
        elif key in seen:
            problem = ("duplicate", f"{where}: {rel} is listed already (line {seen[key]})")
        if problem is not None:
            if cfg.on_corrupt == "error":
                raise UserError(f"{problem[1]}; fix the CSV, or set dataset.on_corrupt=skip to leave such rows out")
            rows.problems[problem[0]].append(problem[1])
            continue
        seen[key] = line
        rows.paths.append(rel)
        rows.labels.append(label)
        rows.splits.append(split if has_split else "all")
    return rows, has_split


def _warn_skipped(rows: _Rows, path: Path) -> None:
    counts = {k: len(v) for k, v in rows.problems.items() if v}
    if not counts:
        return
    total = sum(counts.values())
    what = ", ".join(f"{n} {_PROBLEMS[k]}" for k, n in counts.items())
    examples = "; ".join(v[0] for v in rows.problems.values() if v)
    warnings.warn(f"csv {path}: left out {total} row(s): {what} (e.g. {examples})", stacklevel=3)


def _labels_of(cell: str, where: str) -> str:
    """A multi-label cell, checked and written the one way: its labels joined by `|` (`-`: none)."""
    if cell == NO_LABELS:
        return cell
    parts = [p.strip() for p in cell.split(MULTI_SEPARATOR)]
    if not all(parts) or NO_LABELS in parts:
        raise UserError(
            f"{where}: the labels '{cell}' have an empty one (or {NO_LABELS} beside labels); join an "
            f"image's labels by one {MULTI_SEPARATOR} (a{MULTI_SEPARATOR}b), or write {NO_LABELS} alone "
            "for an image with none"
        )
    return MULTI_SEPARATOR.join(dict.fromkeys(parts))  # a label given twice is one


def _multi_hot(labels: list[str], path: Path) -> tuple[list[str], np.ndarray]:
    """Label names and each row's multi-hot row [rows, labels]: integers are indices, anything else a name."""
    rows = [[] if cell == NO_LABELS else cell.split(MULTI_SEPARATOR) for cell in labels]
    names = [name for row in rows for name in row]
    if not names:
        raise UserError(
            f"{path}: every row has {NO_LABELS} (none of the labels); a multi-label CSV needs images with labels"
        )
    classes, flat = _classes(names, path)
    y = np.zeros((len(rows), len(classes)), dtype=np.float32)
    where = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
    y[where, flat] = 1.0
    return classes, y


def positives(labels: np.ndarray) -> np.ndarray:
    """Class indices, or for multi-hot rows the label index of every positive: what per-class counts count."""
    return labels if labels.ndim == 1 else np.nonzero(labels > 0.5)[1]


def _classes(labels: list[str], path: Path) -> tuple[list[str], np.ndarray]:
    """Class names and each row's class index: integers are indices, anything else is a name."""
    if all(label.lstrip("-").isdigit() for label in labels):
        ints = np.array([int(label) for label in labels], dtype=np.int64)
        if ints.min() < 0:
            raise UserError(f"{path}: label {int(ints.min())} is negative; integer labels are class indices 0, 1, ...")
        return [str(i) for i in range(int(ints.max()) + 1)], ints
    classes = sorted(set(labels))
    lookup = {name: i for i, name in enumerate(classes)}
    return classes, np.array([lookup[label] for label in labels], dtype=np.int64)


def _check_classes(classes: list[str], train_labels: np.ndarray, cfg: DatasetConfig, path: Path) -> None:
    counts = np.bincount(train_labels, minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if not empty:
        return
    listed = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
    if cfg.on_corrupt == "error":
        raise UserError(
            f"{path}: class {listed} has no training images; every class from 0 to the largest "
            "integer label (or every name) needs some, or set dataset.on_corrupt=skip"
        )
    warnings.warn(
        f"csv {path}: {len(empty)} class(es) without training images: {listed}; the model keeps an "
        "output for each, never trained",
        stacklevel=3,
    )


@DATASETS.register("csv")
def load_csv(cfg: DatasetConfig) -> ImageData:
    """Images under dataset.root, labelled by the CSV dataset.file (path,label[,split]). The values were
    checked by config.check_dataset (data.load_dataset); what is checked here needs the files."""
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.root={root} does not exist or is not a folder")
    path = _csv_path(cfg, root)
    rows, has_split = _read_rows(path, root, cfg)
    _warn_skipped(rows, path)
    if not rows.paths:
        raise UserError(f"{path} lists no usable image (rows are path,label[,split], paths relative to {root})")
    classes, labels = _multi_hot(rows.labels, path) if rows.multi else _classes(rows.labels, path)
    if len(classes) < 2 and not rows.multi:
        raise UserError(f"{path} has a single class ({classes[0]}); a classifier needs at least two")
    present = [s for s in SPLITS if s in rows.splits] if has_split else ["all"]
    if has_split and "train" not in present:
        raise UserError(f"{path} has no rows with split train; the training images are those")
    which = np.array([present.index(s) for s in rows.splits], dtype=np.int64)
    x, kept = read_files([root / p for p in rows.paths], cfg, root, "csv")
    labels, which = labels[kept], which[kept]
    train_labels = positives(labels[which == 0] if has_split else labels)  # present[0] is train
    _check_classes(classes, train_labels, cfg, path)
    small_classes(classes, train_labels, cfg, f"csv {path}")
    names = [rows.paths[i] for i in kept.tolist()]
    train, val, test, items, test_split = split_recorded(
        x,
        torch.from_numpy(labels),
        which,
        present,
        cfg,
        f"{path.name} (train rows)" if has_split else str(path),
        lambda split: f"csv: {path.name} has no {split} rows",
        names,
        "path",
    )
    return finish("csv", classes, train, val, test, cfg, source=str(path.resolve()), items=items, test_split=test_split)
