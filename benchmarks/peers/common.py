"""Shared by the peer scripts: the seed CNN and Fashion-MNIST as numpy arrays, no cnntrain imports."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

FASHION = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_train(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    y = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    return (x[:limit], y[:limit]) if limit else (x, y)


def report(**values: float | str) -> None:
    """The one line run.py reads back."""
    print("RESULT " + json.dumps(values), flush=True)
