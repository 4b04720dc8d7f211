"""torch.distributed under torchrun: one process per device, data sharded by rank, rank 0 writes.

`torchrun --nproc-per-node=N -m cnntrain fit ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
everything here is a no-op and the run is a plain single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cnntrain.errors import UserError
from cnntrain.io.cpus import usable_cores


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    env = os.environ
    return Dist(
        int(env.get("RANK", 0)),
        int(env.get("WORLD_SIZE", 1)),
        int(env.get("LOCAL_RANK", 0)),
        int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))),
    )


def setup(d: Dist, device: torch.device, batch_size: int) -> torch.device:
    """Join the process group; return this rank's device (its own GPU when there are GPUs)."""
    if not d.enabled:
        return device
    if batch_size % d.world:
        raise UserError(
            f"trainer.batch_size={batch_size} must be divisible by the {d.world} processes "
            "(it is the global batch, split evenly across ranks)"
        )
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    elif os.environ.get("OMP_NUM_THREADS") is None:
        # CPU ranks on one machine share its cores instead of each taking all of them.
        torch.set_num_threads(max(1, usable_cores() // d.local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def broadcast_str(d: Dist, value: str) -> str:
    """Rank 0's value on every rank (the run directory, which only rank 0's Hydra chose)."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(d: Dist, *tensors: torch.Tensor) -> None:
    if d.enabled:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_gather_rows(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of t, rank after rank, on every rank (ranks may hold one row more or fewer)."""
    if not d.enabled:
        return t
    size = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(d.world)]
    dist.all_gather(sizes, size)
    top = max(int(s) for s in sizes)
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])


def any_rank(d: Dist, flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
