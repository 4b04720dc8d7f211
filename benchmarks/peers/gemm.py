"""The machine's matrix-multiply rate: the compute limit that training throughput is measured against.

Usage: python gemm.py [--size 1024] [--threads N]   prints RESULT {"fp32": GFLOP/s, "bf16": GFLOP/s, ...}
Times torch.mm of two square matrices, best of several repeats, on the CPU (or the GPU with --device cuda).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import report


def rate(size: int, dtype: torch.dtype, device: str, seconds: float = 1.0) -> float:
    """GFLOP/s of size x size x size products: the best of repeats within about `seconds`."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: kernel choice, packing buffers
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def native_bf16(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=1.0, help="time spent on each precision")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Without native bf16 a CPU emulates it at well under 1 GFLOP/s: smaller matrices, or this takes minutes.
    bf16_size = args.size if native_bf16(args.device) else min(args.size, 384)
    report(
        fp32=rate(args.size, torch.float32, args.device, args.seconds),
        bf16=rate(bf16_size, torch.bfloat16, args.device, args.seconds),
        size=args.size,
        bf16_size=bf16_size,
        threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    main()
