"""FLOPs of one trained image: forward + backward of a batch, counted by torch.utils.flop_counter.

Usage: python benchmarks/flops.py --model simple_cnn [--channels 1 --size 28 --classes 10 --batch 256]
prints RESULT {"flops_per_image": ..., "forward": ..., "parameters": ...}. Counts the matrix multiplies and
convolutions (what the GEMM rate bounds); elementwise work and the optimizer step are not counted.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cnntrain.config import ModelConfig
from cnntrain.models import build_model, count_parameters


def flops_per_image(
    model: torch.nn.Module, shape: tuple[int, int, int], classes: int, batch: int
) -> tuple[float, float]:
    """(forward + backward, forward) FLOPs per image."""
    x = torch.randn(batch, *shape)
    y = torch.randint(0, classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        model(x)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch, forward / batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="simple_cnn")
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    model = build_model(ModelConfig(name=args.model), args.channels, (args.size, args.size), args.classes)
    total, forward = flops_per_image(model, (args.channels, args.size, args.size), args.classes, args.batch)
    print("RESULT " + json.dumps({"flops_per_image": total, "forward": forward, "parameters": count_parameters(model)}))


if __name__ == "__main__":
    main()
