"""The built-in datasets: the embedded MNIST digits, the MNIST family from idx files, and the sets
torchvision downloads (CIFAR-10/100, SVHN). Each registers itself in cnntrain.registry.DATASETS.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnntrain.config import DatasetConfig
from cnntrain.data.decode import oneline
from cnntrain.data.images import ImageData, carve_val, finish, three_way, warn_ignored
from cnntrain.errors import UserError
from cnntrain.io.files import user_cache_dir
from cnntrain.registry import DATASETS

DATA_DIR = Path(__file__).parent
MNIST5K_FILE = DATA_DIR / "mnist5k.npz"

DIGITS = [str(d) for d in range(10)]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]


def cache_dir(name: str) -> Path:
    """Default home of a downloadable dataset: $CNNTRAIN_DATA/<name>, else ~/.cache/cnntrain/<name>."""
    base = os.environ.get("CNNTRAIN_DATA")
    return (Path(base).expanduser() if base else user_cache_dir()) / name


def tv_datasets() -> Any:
    """torchvision.datasets, imported only when needed (the import takes seconds)."""
    try:
        import torchvision.datasets
    except ImportError as e:
        raise UserError(f"this dataset needs torchvision ({e}); install it with: pip install torchvision") from None
    return torchvision.datasets


# --------------------------------------------------------------------------- embedded MNIST subset


def load_mnist5k(cfg: DatasetConfig) -> ImageData:
    warn_ignored(cfg, ("root", "image_size", "channels"))
    with np.load(MNIST5K_FILE) as z:
        x = torch.from_numpy(z["images"][:, None].copy())
        y = torch.from_numpy(z["labels"].astype(np.int64))
    train, val, test = three_way(x, y, cfg, "mnist5k")
    return finish("mnist5k", DIGITS, train, val, test, cfg, source="embedded")


# --------------------------------------------------------------------------- idx files (MNIST family)

# idx type codes (third byte of the magic number) and their big-endian numpy dtypes.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _gunzip(raw: bytes, path: Path) -> bytes:
    # zlib directly is about twice as fast as gzip.decompress on the 26 MB Fashion-MNIST file.
    out = []
    try:
        while raw:
            d = zlib.decompressobj(wbits=31)
            out.append(d.decompress(raw))
            if not d.eof:
                raise UserError(f"{path}: truncated gzip file; delete it and fetch it again")
            raw = d.unused_data.lstrip(b"\0")  # further gzip members, or trailing padding
    except zlib.error as e:
        raise UserError(f"{path}: corrupt gzip data ({oneline(e)}); delete it and fetch it again") from None
    return b"".join(out)


def read_idx(path: Path | str) -> np.ndarray:
    """Parse one idx file (optionally gzipped): 2 zero bytes, a type code, the number of dims, dims, data."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if path.suffix == ".gz":
        raw = _gunzip(raw, path)
    if len(raw) < 4:
        raise UserError(f"{path}: truncated idx file ({len(raw)} bytes, not even a header)")
    if raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise UserError(f"{path}: not an idx file (bad magic number 0x{raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated idx file (header cut short)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims, dtype=np.int64))
    expected, found = count * dtype.itemsize, len(raw) - header
    if found < expected:
        raise UserError(
            f"{path}: truncated idx file (header says {dims}, {expected} bytes of data, "
            f"but only {found} follow); delete it and fetch it again"
        )
    if found > expected:
        raise UserError(f"{path}: corrupt idx file ({found - expected} bytes after the {dims} array)")
    return np.frombuffer(raw, dtype, count=count, offset=header).reshape(dims)


def _read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(f"{images_path}: expected uint8 images [N, H, W], found {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise UserError(f"{labels_path}: expected uint8 labels [N], found {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
            "the files do not belong together"
        )
    if len(labels) and int(labels.max()) >= num_classes:
        raise UserError(f"{labels_path}: label {int(labels.max())} is out of range for {num_classes} classes")
    # frombuffer arrays are read-only views of the file bytes; torch wants its own writable memory.
    x = torch.from_numpy(images[:, None].copy())
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _idx_files_in(d: Path) -> dict[str, Path] | None:
    """The four idx files in d (plain preferred over .gz: no need to decompress), or None."""
    found = {}
    for key, stem in _IDX_STEMS.items():
        for candidate in (d / stem, d / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


@dataclass(frozen=True)
class _IdxSpec:
    name: str
    title: str
    tv_class: str  # torchvision class name: downloader, and its folder in torchvision's layout
    classes: list[str]
    system_dirs: tuple[str, ...] = ()


def _idx_candidates(spec: _IdxSpec, root: str | None) -> list[Path]:
    if root is not None:
        r = Path(root).expanduser()
        return [r, r / spec.tv_class / "raw"]
    c = cache_dir(spec.name)
    return [Path(d) for d in spec.system_dirs] + [c, c / spec.tv_class / "raw"]


def _download_idx(spec: _IdxSpec, target: Path) -> None:
    tv = tv_datasets()
    try:
        getattr(tv, spec.tv_class)(root=str(target), train=True, download=True)
    except (OSError, RuntimeError) as e:
        raise UserError(
            f"could not download {spec.title} into {target} ({oneline(e)}); check the internet connection, "
            "or fetch the idx files yourself and pass dataset.root=DIR"
        ) from None


def _idx_loader(spec: _IdxSpec) -> Callable[[DatasetConfig], ImageData]:
    def load(cfg: DatasetConfig) -> ImageData:
        warn_ignored(cfg, ("image_size", "channels", "test_fraction"))
        candidates = _idx_candidates(spec, cfg.root)
        files = next((f for d in candidates if (f := _idx_files_in(d))), None)
        if files is None and cfg.download:
            target = Path(cfg.root).expanduser() if cfg.root is not None else cache_dir(spec.name)
            _download_idx(spec, target)
            files = _idx_files_in(target / spec.tv_class / "raw") or _idx_files_in(target)
        if files is None:
            looked = ", ".join(str(d) for d in candidates)
            names = ", ".join(f"{s}[.gz]" for s in _IDX_STEMS.values())
            raise UserError(
                f"{spec.title} not found: looked for {names} in {looked}; "
                f"pass dataset.root=DIR (a folder with those files) or dataset.download=true"
            )
        train_x, train_y = _read_idx_pair(files["train_images"], files["train_labels"], len(spec.classes))
        test = _read_idx_pair(files["test_images"], files["test_labels"], len(spec.classes))
        if train_x.shape[1:] != test[0].shape[1:]:
            raise UserError(f"{files['train_images']} and {files['test_images']} hold images of different sizes")
        train, val = carve_val(train_x, train_y, cfg, spec.name)
        return finish(spec.name, spec.classes, train, val, test, cfg, source=str(files["train_images"].parent))

    load.__name__ = f"load_{spec.name}"
    load.__doc__ = f"{spec.title} from idx files; validation carved from the official training split."
    return load


# --------------------------------------------------------------------------- torchvision-held sets


def _tv_root(name: str, cfg: DatasetConfig) -> Path:
    return Path(cfg.root).expanduser() if cfg.root is not None else cache_dir(name)


def _tv_open(title: str, make: Callable[[], Any], root: Path, cfg: DatasetConfig) -> Any:
    try:
        return make()
    except ImportError as e:  # svhn reads .mat files through scipy
        raise UserError(f"{title} needs an extra package ({oneline(e)}); install it with: pip install scipy") from None
    except RuntimeError as e:
        if cfg.download:
            raise UserError(
                f"{title} in {root} is incomplete or corrupt ({oneline(e)}); delete that folder and retry"
            ) from None
        raise UserError(
            f"{title} not found in {root}; pass dataset.root=DIR (the folder torchvision downloaded it "
            f"into) or dataset.download=true"
        ) from None
    except OSError as e:
        raise UserError(
            f"could not download {title} into {root} ({oneline(e)}); check the internet connection, "
            "or pass dataset.root=DIR with a copy torchvision downloaded"
        ) from None


def _cifar_loader(name: str, tv_class: str, title: str) -> Callable[[DatasetConfig], ImageData]:
    def load(cfg: DatasetConfig) -> ImageData:
        warn_ignored(cfg, ("image_size", "channels", "test_fraction"))
        cls = getattr(tv_datasets(), tv_class)
        root = _tv_root(name, cfg)
        tr = _tv_open(title, lambda: cls(root=str(root), train=True, download=cfg.download), root, cfg)
        te = _tv_open(title, lambda: cls(root=str(root), train=False, download=False), root, cfg)

        def arrays(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
            # .data is uint8 NHWC; one permute+copy, no per-image Python.
            x = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
            return x, torch.from_numpy(np.asarray(ds.targets, dtype=np.int64))

        train, val = carve_val(*arrays(tr), cfg, name)
        return finish(name, list(tr.classes), train, val, arrays(te), cfg, source=str(root))

    load.__name__ = f"load_{name}"
    load.__doc__ = f"{title} through torchvision; validation carved from the official training split."
    return load


def load_svhn(cfg: DatasetConfig) -> ImageData:
    """SVHN cropped digits (train and test; 'extra' is not used) through torchvision."""
    warn_ignored(cfg, ("image_size", "channels", "test_fraction"))
    cls = tv_datasets().SVHN
    root = _tv_root("svhn", cfg)
    tr = _tv_open("SVHN", lambda: cls(root=str(root), split="train", download=cfg.download), root, cfg)
    te = _tv_open("SVHN", lambda: cls(root=str(root), split="test", download=cfg.download), root, cfg)

    def arrays(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # torchvision already holds SVHN as NCHW, with label 10 mapped to digit 0.
        x = torch.from_numpy(np.ascontiguousarray(ds.data, dtype=np.uint8))
        return x, torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))

    train, val = carve_val(*arrays(tr), cfg, "svhn")
    return finish("svhn", DIGITS, train, val, arrays(te), cfg, source=str(root))


DATASETS.register("mnist5k")(load_mnist5k)
DATASETS.register("mnist")(_idx_loader(_IdxSpec("mnist", "MNIST", "MNIST", DIGITS)))
DATASETS.register("fashion_mnist")(
    _idx_loader(
        _IdxSpec(
            "fashion_mnist",
            "Fashion-MNIST",
            "FashionMNIST",
            FASHION_CLASSES,
            system_dirs=("/usr/share/datasets/fashion-mnist",),
        )  # Debian package dataset-fashion-mnist
    )
)
DATASETS.register("kmnist")(_idx_loader(_IdxSpec("kmnist", "Kuzushiji-MNIST", "KMNIST", KMNIST_CLASSES)))
DATASETS.register("cifar10")(_cifar_loader("cifar10", "CIFAR10", "CIFAR-10"))
DATASETS.register("cifar100")(_cifar_loader("cifar100", "CIFAR100", "CIFAR-100"))
DATASETS.register("svhn")(load_svhn)
