"""Where a step's uint8 batch comes from: resident tensors, or image files streamed by a DataLoader.

Datasets that fit in memory are uint8 tensors on the training device and a batch is one
``index_select``. Image folders too large for that are :class:`FileImages`: a list of files
(a user's torch Dataset: :class:`DatasetImages`, its items) that a DataLoader decodes in worker processes (PIL releases the GIL while decoding), pins and
hands over, prefetching while the device computes. Both paths yield the same uint8
``[B, C, H, W]`` batches in the same order, so augmentation and the rest of the loop do not
know the difference.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class StreamedImages:
    """Images that behave, for the loop, like a uint8 tensor [N, C, H, W] read on demand.

    Subclasses say how to read some of them (:meth:`read`), select some lazily (:meth:`subset`) and
    fingerprint them (:meth:`digest`): FileImages (image files, CSV rows) and DatasetImages (the
    items of a user's torch Dataset).
    """

    dtype = torch.uint8
    device = torch.device("cpu")  # where read() puts the pixels

    def __init__(self, n: int, channels: int, size: tuple[int, int], on_corrupt: str = "skip"):
        self._n = n
        self.channels, self.size, self.on_corrupt = channels, size, on_corrupt
        self._loader: torch.utils.data.DataLoader[torch.Tensor] | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.channels, *self.size))

    def __len__(self) -> int:
        return self._n

    def dim(self) -> int:
        return 4

    def is_contiguous(self) -> bool:
        return True

    def contiguous(self) -> StreamedImages:
        return self

    def to(self, *args: object, **kwargs: object) -> StreamedImages:
        return self  # stays where it is; batches move to the device as they are read

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes get what to read, never the DataLoader that started them.
        return {k: v for k, v in self.__dict__.items() if k not in ("_loader", "_sampler")} | {"_loader": None}

    def read(self, idx: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def subset(self, idx: np.ndarray | torch.Tensor | slice) -> StreamedImages:
        raise NotImplementedError

    def digest(self) -> bytes:
        raise NotImplementedError

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        return self.read(idx.tolist())

    def __getitem__(self, key: int | slice | torch.Tensor) -> torch.Tensor:
        if isinstance(key, int):
            return self.read([key])[0]
        if isinstance(key, slice):
            return self.read(range(*key.indices(len(self))))
        return self.read(torch.as_tensor(key).reshape(-1).tolist())

    def loader(self) -> torch.utils.data.DataLoader[torch.Tensor]:
        """One DataLoader per image set, its workers kept alive across epochs."""
        if self._loader is None:
            workers = min(8, max(1, (os.cpu_count() or 2) - 1))
            self._sampler = _Chunks()
            self._loader = torch.utils.data.DataLoader(
                _Decode(self),
                batch_sampler=self._sampler,
                collate_fn=_first,
                num_workers=workers,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=True,
                prefetch_factor=4,
            )
        return self._loader


# What a split's images are: a uint8 tensor [N, C, H, W], or streamed images that the loop reads like one.
Images = torch.Tensor | StreamedImages


def _select(items: list[_T], idx: np.ndarray | torch.Tensor | slice) -> list[_T]:
    return items[idx] if isinstance(idx, slice) else [items[int(i)] for i in np.asarray(idx).reshape(-1)]


class FileImages(StreamedImages):
    """Image files on disk, decoded as the image-folder loader decodes them."""

    def __init__(self, paths: Sequence[Path], channels: int, size: tuple[int, int], on_corrupt: str = "skip"):
        self.paths = [Path(p) for p in paths]
        super().__init__(len(self.paths), channels, size, on_corrupt)

    def subset(self, idx: np.ndarray | torch.Tensor | slice) -> FileImages:
        """A lazy selection (no decoding), for splitting and sharding."""
        return FileImages(_select(self.paths, idx), self.channels, self.size, self.on_corrupt)

    def read(self, idx: Sequence[int]) -> torch.Tensor:
        """Decode these images into one uint8 tensor (a corrupt one becomes black, with a warning)."""
        from cnntrain.data.decode import decode_into

        out = np.zeros((len(idx), self.channels, *self.size), dtype=np.uint8)
        for j, i in enumerate(idx):
            why = decode_into(out, j, self.paths[int(i)], self.channels)
            if why is not None:
                if self.on_corrupt == "error":
                    from cnntrain.errors import UserError

                    raise UserError(f"cannot decode {self.paths[int(i)]}: {why} (dataset.on_corrupt=error)")
                log.warning("cannot decode %s (%s); using a black image", self.paths[int(i)], why)
        return torch.from_numpy(out)

    def digest(self) -> bytes:
        """Names, sizes and modification times: a fingerprint without reading every file."""
        h = hashlib.sha256()
        for p in self.paths:
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.digest()


class DatasetImages(StreamedImages):
    """The images of a user's map-style torch Dataset, read item by item (dataset=custom, plug-ins)."""

    def __init__(
        self,
        dataset: Any,
        indices: Sequence[int],
        channels: int,
        size: tuple[int, int],
        on_corrupt: str = "skip",
        label: str = "dataset",
    ):
        self.dataset, self.indices, self.label = dataset, [int(i) for i in indices], label
        super().__init__(len(self.indices), channels, size, on_corrupt)

    def subset(self, idx: np.ndarray | torch.Tensor | slice) -> DatasetImages:
        return DatasetImages(
            self.dataset, _select(self.indices, idx), self.channels, self.size, self.on_corrupt, self.label
        )

    def read(self, idx: Sequence[int]) -> torch.Tensor:
        """These items' images as one uint8 tensor, converted and resized as resident ones are."""
        from cnntrain.data.decode import to_uint8_chw

        out = np.zeros((len(idx), self.channels, *self.size), dtype=np.uint8)
        for j, i in enumerate(idx):
            item = self.indices[int(i)]
            try:
                image = self.dataset[item][0]
            except Exception as e:  # a file the dataset could not read, and the like
                if self.on_corrupt == "error":
                    from cnntrain.errors import UserError

                    raise UserError(
                        f"{self.label}[{item}] raised {type(e).__name__}: {e} (dataset.on_corrupt=error)"
                    ) from None
                log.warning("%s[%d] raised %s: %s; using a black image", self.label, item, type(e).__name__, e)
                continue
            out[j] = to_uint8_chw(image, self.channels, self.size, f"{self.label}[{item}]")
        return torch.from_numpy(out)

    def digest(self) -> bytes:
        """The dataset's type, length and item indices (reading every image would defeat streaming)."""
        h = hashlib.sha256(
            f"{type(self.dataset).__module__}.{type(self.dataset).__qualname__}:{len(self.dataset)}".encode()
        )
        h.update(np.asarray(self.indices, dtype=np.int64).tobytes())
        return h.digest()


class _Chunks:
    """A batch sampler whose batches are set before each pass (the epoch's order from the loop)."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class _Decode(torch.utils.data.Dataset[torch.Tensor]):
    """Runs in the workers: one batch of indices -> (uint8 images, indices)."""

    def __init__(self, images: StreamedImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: list[int]) -> torch.Tensor:
        return self.images.read(idx)

    def __getitems__(self, idx: list[int]) -> list[torch.Tensor]:
        return [self.images.read(idx)]


def _first(items: list[torch.Tensor]) -> torch.Tensor:
    return items[0]


def iterate(
    x: Images, y: torch.Tensor, chunks: Sequence[torch.Tensor], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images and labels on ``device``, one batch per index chunk, in order."""
    if not isinstance(x, StreamedImages):
        for idx in chunks:
            yield x.index_select(0, idx), y.index_select(0, idx)
        return
    loader = x.loader()
    assert isinstance(loader.batch_sampler, _Chunks)  # the loader's own (StreamedImages.loader)
    loader.batch_sampler.chunks = [c.tolist() for c in chunks]
    for idx, batch in zip(chunks, loader, strict=True):
        yield batch.to(device, non_blocking=True), y.index_select(0, idx.to(y.device))


def sequential(
    x: Images, y: torch.Tensor, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole split in order (evaluation)."""
    if not isinstance(x, StreamedImages):
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    chunks = [torch.arange(s, min(s + batch_size, len(x))) for s in range(0, len(x), batch_size)]
    yield from iterate(x, y, chunks, device)


def shard(x: Images, rank: int, world: int) -> Images:
    """Every world-th image from rank on (torchrun evaluation)."""
    return x.subset(slice(rank, None, world)) if isinstance(x, StreamedImages) else x[rank::world]
