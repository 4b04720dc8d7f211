"""A typical tutorial loop: torchvision dataset + ToTensor + DataLoader, batch 32, fp32.

Usage: python tutorial_loop.py [--images N]   (times one pass over N training images after a warm-up)
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import FASHION, report
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms


def seed_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(576, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in FASHION.glob("*-ubyte.gz"):  # torchvision reads the unpacked files
            with gzip.open(f) as src, open(raw / f.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        data = datasets.FashionMNIST(root, train=True, download=False, transform=transforms.ToTensor())
        data = Subset(data, range(min(args.images, len(data))))
        loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
        torch.manual_seed(0)
        model = seed_cnn()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for i, (x, y) in enumerate(loader):  # warm-up
            step(x, y)
            if i == 20:
                break
        t = time.perf_counter()
        seen = 0
        for x, y in loader:
            step(x, y)
            seen += len(y)
        dt = time.perf_counter() - t
    report(images_per_s=seen / dt, seconds=dt, images=seen)


if __name__ == "__main__":
    main()
