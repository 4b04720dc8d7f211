"""Where the run computes and in which number format: device, autocast precision, layout, threads."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from cnntrain.errors import UserError
from cnntrain.io.cpus import choose_threads

# Set by the user, these fix the thread count and cnntrain leaves it alone.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# torch's own thread count, read before any run sets it: the jobs of a sweep run in one process, and a later
# job must not take the count an earlier one chose (under load) for what torch would use.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def resolve_device(spec: str) -> torch.device:
    """Turn trainer.device (auto | cpu | cuda | cuda:N | mps) into a device that exists here."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(
                "trainer.device=mps but MPS (Apple GPU) is not available here; use trainer.device=auto or cpu"
            )
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UserError(
                f"trainer.device={spec} but no CUDA GPU is available (torch {torch.__version__} is {build}); "
                "use trainer.device=auto or cpu"
            )
        index = torch.cuda.current_device() if spec == "cuda" else _device_index(spec)
        if index >= torch.cuda.device_count():
            raise UserError(f"trainer.device={spec} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    raise UserError(f"trainer.device={spec} is not a device; use auto, cpu, cuda, cuda:N or mps")


def _device_index(spec: str) -> int:
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise UserError(f"trainer.device={spec} is not a device; use auto, cpu, cuda, cuda:N or mps") from None


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), so autocast pays."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@dataclass(frozen=True)
class Precision:
    label: str  # "32", "bf16" or "fp16": what actually runs
    dtype: torch.dtype | None  # autocast dtype; None means plain fp32
    use_scaler: bool  # fp16 needs loss scaling to keep small gradients


FP32 = Precision("32", None, False)
BF16 = Precision("bf16", torch.bfloat16, False)
FP16 = Precision("fp16", torch.float16, True)


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """Pick the autocast format for trainer.precision on this device."""
    if spec == "32":
        return FP32
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if spec == "auto":
            return BF16 if bf16_ok else FP16
        if spec == "bf16" and not bf16_ok:
            raise UserError(
                f"trainer.precision=bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or 32"
            )
        return BF16 if spec == "bf16" else FP16
    if device.type == "mps":
        if spec == "bf16":
            raise UserError("trainer.precision=bf16 is not supported on MPS; use fp16, 32 or auto")
        return FP16 if spec == "fp16" else FP32
    # CPU
    if spec == "fp16":
        raise UserError(
            "trainer.precision=fp16 needs a GPU; on a CPU use trainer.precision=bf16"
            + (" (this CPU runs it natively)" if cpu_has_fast_bf16() else "")
            + " or 32"
        )
    if spec == "bf16":
        return BF16
    return BF16 if cpu_has_fast_bf16() else FP32


def resolve_channels_last(spec: str, device: torch.device, precision: Precision) -> bool:
    """The layout when nothing is timed (engine.tuning) and for evaluate/predict: channels_last on CPUs in
    every precision (oneDNN's native layout) and on GPUs under autocast (tensor cores).

    On CPUs it was measured in fp32 too: on a 2-core Xeon, training 1.05-1.5x and evaluation 1.1-2.9x faster
    for each model of the zoo (the seed CNN 1.5x and 2.7x), and on a 2-core AVX2 EPYC the seed CNN trained
    1.27-1.45x faster."""
    spec = spec.lower()  # a command-line true/false arrives as a boolean
    if spec in ("true", "false"):
        return spec == "true"
    return device.type == "cpu" or (precision.dtype is not None and device.type == "cuda")


def configure_torch(
    device: torch.device, deterministic: bool, num_threads: int | None, seed: int, auto_threads: bool = True
) -> str:
    """Process-wide settings: threads, determinism, cuDNN autotuning, seeds. Returns why the thread count.

    trainer.num_threads=null on a CPU: the usable cores less those other processes keep busy (cnntrain.io.cpus),
    unless OMP_NUM_THREADS/MKL_NUM_THREADS say otherwise or auto_threads is off (CPU ranks of torchrun).
    """
    import random

    import numpy as np

    note = ""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
        note = "trainer.num_threads"
    elif auto_threads and device.type == "cpu" and not any(os.environ.get(v) for v in THREAD_ENV):
        choice = choose_threads(TORCH_DEFAULT_THREADS, deterministic)
        torch.set_num_threads(choice.threads)
        note = choice.reason
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be reproducible; must be set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return note


def describe(device: torch.device) -> str:
    """Human-readable name of the device, for the console and the provenance record."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        model = ""
        try:
            with open("/proc/cpuinfo") as f:
                model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        except OSError:
            pass
        n = torch.get_num_threads()
        return f"CPU {model} ({n} thread{'s' if n != 1 else ''})".replace("  ", " ")
    return device.type
