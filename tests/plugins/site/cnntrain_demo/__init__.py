"""A tiny plug-in package for cnntrain: the model `demo_net` and the dataset `demo_digits`, registered
through the entry points in cnntrain_demo-0.1.dist-info/entry_points.txt."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn


class DemoNet(nn.Module):
    """A small conv net with a `head` attribute (the classifier that dropout and freezing use)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Stripes(torch.utils.data.Dataset):
    """Grayscale PIL images of horizontal, vertical or diagonal stripes, with noise."""

    classes = ["horizontal", "vertical", "diagonal"]

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.labels = [i % 3 for i in range(n)]
        self.targets = list(self.labels)
        self.images = []
        r, c = np.mgrid[0:16, 0:16]
        for label in self.labels:
            pattern = [(r // 2) % 2, (c // 2) % 2, ((r + c) // 2) % 2][label] * 160
            noise = rng.integers(0, 80, (16, 16))
            self.images.append(Image.fromarray((pattern + noise).astype(np.uint8), "L"))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def demo_digits(n: int = 150):
    """One dataset: cnntrain splits it into train/val/test by the fractions."""
    return Stripes(n, 0)
