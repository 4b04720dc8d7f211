"""The floor for cnntrain's overhead: the same network stepping on in-memory tensors, nothing else.

Usage: python bare_loop.py --batch-size 256 --precision bf16 --channels-last [--images N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import fashion_train, report
from tutorial_loop import seed_cnn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=54000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--precision", choices=["32", "bf16"], default="bf16")
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    x_np, y_np = fashion_train(args.images)
    x = torch.from_numpy(x_np.copy()).unsqueeze(1).float().div_(255).sub_(0.286).div_(0.353)
    y = torch.from_numpy(y_np.astype("int64"))
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = seed_cnn().to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    bs, dtype = args.batch_size, torch.bfloat16 if args.precision == "bf16" else None

    def epoch(limit: int | None = None) -> int:
        perm = torch.randperm(len(x))
        seen = 0
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            xb = x[idx].contiguous(memory_format=fmt)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = model(xb)
            loss = F.cross_entropy(out.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            if limit and i // bs >= limit:
                break
        return seen

    epoch(limit=20)  # warm-up
    t = time.perf_counter()
    seen = epoch()
    dt = time.perf_counter() - t
    report(images_per_s=seen / dt, seconds=dt, images=seen)


if __name__ == "__main__":
    main()
