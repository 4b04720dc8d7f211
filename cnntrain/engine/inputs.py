"""From stored uint8 images to what the model sees, and the order and seeds of a run's batches.

Everything that turns pixels into model input lives here, so training, validation, lr-find, the dry
run and the after-training commands cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cnntrain.data.batches import StreamedImages


def to_unit(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (augmentation works on this scale)."""
    return x_u8.float().div_(255)


@dataclass(frozen=True)
class Normalise:
    """Per-channel normalisation with the training set's statistics, and the memory layout."""

    mean: torch.Tensor  # [1, C, 1, 1] on the device
    std: torch.Tensor
    channels_last: bool = False

    @classmethod
    def of(
        cls, mean: Sequence[float], std: Sequence[float], device: torch.device | str, channels_last: bool = False
    ) -> Normalise:
        shape = (1, len(mean), 1, 1)
        return cls(
            torch.tensor(tuple(mean), device=device).view(shape),
            torch.tensor(tuple(std), device=device).view(shape),
            channels_last,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """float [0, 1] batch (maybe augmented) -> model input."""
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def from_uint8(self, x_u8: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> model input: the one conversion every path without augmentation uses."""
        return self(to_unit(x_u8))

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> [0, 1] pixels, for pictures of what the model saw."""
        return x * self.std + self.mean


def epoch_order(
    n: int, seed: int, epoch: int, device: torch.device, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The shuffle of an epoch is a pure function of (seed, epoch), so resume needs no generator state.
    With per-image `weights` (dataset.sampler=balanced) n images are drawn with replacement instead."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch)
    if weights is not None:
        return torch.multinomial(weights.to(device), n, replacement=True, generator=g)
    return torch.randperm(n, generator=g, device=device)


def epoch_batches(
    x: torch.Tensor | StreamedImages,
    y: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    steps: range,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The uint8 batches of an epoch's `steps` (a resumed epoch's are the rest of them), taken in `order`;
    under torchrun each rank gets its share of the same global batch."""
    from cnntrain.data import batches  # here: predict and export use this module without the datasets

    chunks = [order[i * batch_size : (i + 1) * batch_size] for i in steps]
    if world > 1:
        chunks = [c[rank::world] for c in chunks]
    return batches.iterate(x, y, chunks, device)


def augment_seed(seed: int, global_step: int, rank: int = 0) -> int:
    """Augmentation is seeded by the position in the run, so it is reproducible from the position alone."""
    return seed * 1_000_003 + global_step + rank * 1_000_000_007
