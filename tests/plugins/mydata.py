"""Dataset factories of the tests' own, used through dataset=custom dataset._target_=mydata.<name>.

Three coloured-blob classes on noise, small enough to learn in a few steps.
"""

from __future__ import annotations

import numpy as np
import torch


def _images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = (rng.random((n, size, size, 3)) * 60).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, :, :, c] += 180  # class c: channel c bright
    return x, y


class Blobs(torch.utils.data.Dataset):
    """HWC uint8 arrays (or CHW uint8 tensors) with int labels, and class names."""

    classes = ["red", "green", "blue"]

    def __init__(self, n: int, size: int = 12, seed: int = 0, tensors: bool = False) -> None:
        self.x, self.y = _images(n, size, seed)
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        image = self.x[i]
        if self.tensors:
            image = torch.from_numpy(image).permute(2, 0, 1)  # CHW uint8
        return image, int(self.y[i])


def build(root: str | None = None, n: int = 90, size: int = 12, splits: bool = True, tensors: bool = False):
    """dict of train/val datasets (test is carved... no: test is the val split) or, splits=false, one dataset."""
    if root is not None:
        assert root == "unused-root", root  # the tests pass a root to check it arrives
    if not splits:
        return Blobs(n, size, 0, tensors)
    return {
        "train": Blobs(n, size, 0, tensors),
        "val": Blobs(n // 3, size, 1, tensors),
        "test": Blobs(n // 3, size, 2, tensors),
    }


class FloatImages(torch.utils.data.Dataset):
    """A dataset with a ToTensor-style float image: the wrong type."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.rand(3, 8, 8), i % 2


def wrong_type():
    return FloatImages()


def not_a_dataset():
    return (i for i in range(3))  # a generator: no len, no indexing
