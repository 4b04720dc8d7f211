"""A 10:1 imbalanced three-class subset of Fashion-MNIST (dataset=custom dataset._target_=imbalanced.build):
T-shirt/top and pullover with `major` training images each, shirt (which looks like both) with major/ratio.
Validation and test are balanced, so the minority's recall is measured on as many images as the others'."""

from __future__ import annotations

import torch

from cnntrain.config import DatasetConfig
from cnntrain.data import load_dataset

ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = {0: "t-shirt", 2: "pullover", 6: "shirt"}
MINORITY = 6


class Split(torch.utils.data.Dataset):
    classes = list(CLASSES.values())

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def _pick(x: torch.Tensor, y: torch.Tensor, counts: dict[int, int]) -> Split:
    keep = torch.cat([(y == c).nonzero().flatten()[:n] for c, n in counts.items()]).sort().values
    lookup = {c: i for i, c in enumerate(CLASSES)}
    return Split(x[keep], torch.tensor([lookup[int(c)] for c in y[keep]]))


def build(major: int = 1000, ratio: int = 10, held: int = 300):
    data = load_dataset(DatasetConfig(name="fashion_mnist", root=ROOT, val_fraction=0.1))
    train = {c: major // ratio if c == MINORITY else major for c in CLASSES}
    return {
        "train": _pick(data.train_x, data.train_y, train),
        "val": _pick(data.val_x, data.val_y, dict.fromkeys(CLASSES, held // 2)),
        "test": _pick(data.test_x, data.test_y, dict.fromkeys(CLASSES, held)),
    }
