"""Image classification datasets, loaded whole into memory as uint8 tensors.

Every loader returns an :class:`ImageData` with fixed train/val/test splits; the
training loop batches these tensors itself. Splits are stratified by class and
seeded by ``dataset.split_seed`` alone, so runs with different training seeds are
compared on the same validation and test images.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnntrain.batches import FileImages
from cnntrain.config import DatasetConfig
from cnntrain.errors import UserError, unknown_choice

DATA_DIR = Path(__file__).parent / "data"
MNIST5K_FILE = DATA_DIR / "mnist5k.npz"

DIGITS = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# PIL modes that carry no colour; anything else (RGB, RGBA, P, CMYK, YCbCr, ...) counts as colour.
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


@dataclass
class ImageData:
    name: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        # Catch a loader bug here rather than as a shape error deep inside the loop.
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            assert x.dtype == torch.uint8 and x.dim() == 4 and x.is_contiguous(), f"{split}_x: {x.dtype} {tuple(x.shape)}"
            assert y.dtype == torch.int64 and y.shape == (x.shape[0],), f"{split}_y: {y.dtype} {tuple(y.shape)}"
            assert x.shape[1:] == self.train_x.shape[1:], f"{split}_x shape {tuple(x.shape)} differs from train_x"

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """sha256 over class names and every split, to tell whether a resumed run sees the same data."""
        h = hashlib.sha256(repr(self.classes).encode())
        for t in (self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y):
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.digest() if isinstance(t, FileImages) else t.contiguous().numpy().data)
        return h.hexdigest()

    def summary(self) -> str:
        c, (hh, ww) = self.channels, self.image_size
        return (
            f"{self.name}: {self.num_classes} classes, {c}x{hh}x{ww}, "
            f"train {len(self.train_y)} / val {len(self.val_y)} / test {len(self.test_y)} ({self.source})"
        )


# --------------------------------------------------------------------------- splits


def split_count(n: int, fraction: float) -> int:
    """Images a fraction of n amounts to: rounded half up, and at least one when n > 1."""
    k = int(np.floor(n * fraction + 0.5))
    return max(k, 1) if n > 1 else k


def _quotas(counts: np.ndarray, total: int, cap: np.ndarray) -> np.ndarray:
    """Per-class counts proportional to `counts` that sum exactly to `total` (largest remainder), each <= cap."""
    ideal = counts * (total / max(int(counts.sum()), 1))
    q = np.minimum(np.floor(ideal).astype(np.int64), cap)
    short = total - int(q.sum())
    order = np.argsort(-(ideal - q), kind="stable")
    while short > 0:
        for c in order:
            if short == 0:
                break
            if q[c] < cap[c]:
                q[c] += 1
                short -= 1
    return q


def stratified_split(labels: np.ndarray, sizes: Sequence[int], seed: Any) -> list[np.ndarray]:
    """Indices split into parts of exactly `sizes`, plus the rest, each stratified by label.

    Deterministic for a given seed; each part's indices are sorted.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if sum(sizes) > n:
        raise ValueError(f"cannot take {sum(sizes)} of {n} items")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    _, inverse = np.unique(labels[perm], return_inverse=True)
    members = perm[np.argsort(inverse, kind="stable")]  # grouped by class, shuffled within
    counts = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    taken = np.zeros_like(counts)
    parts = []
    for size in sizes:
        q = _quotas(counts, size, counts - taken)
        idx = [members[s + t : s + t + k] for s, t, k in zip(starts, taken, q, strict=True) if k]
        parts.append(np.sort(np.concatenate(idx)) if idx else np.zeros(0, dtype=np.int64))
        taken += q
    rest = [members[s + t : s + c] for s, t, c in zip(starts, taken, counts, strict=True) if c > t]
    parts.append(np.sort(np.concatenate(rest)) if rest else np.zeros(0, dtype=np.int64))
    return parts


def _take(x: torch.Tensor, y: torch.Tensor, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    if isinstance(x, FileImages):  # streamed folders select files, not pixels
        return x.subset(idx), y[i].contiguous()
    return x[i].contiguous(), y[i].contiguous()


def _three_way(x: torch.Tensor, y: torch.Tensor, cfg: DatasetConfig, what: str) -> tuple:
    """train/val/test from one pool of images, by dataset.val_fraction and dataset.test_fraction of the whole."""
    n = len(y)
    n_test, n_val = split_count(n, cfg.test_fraction), split_count(n, cfg.val_fraction)
    if min(n_test, n_val) < 1 or n_test + n_val >= n:
        raise UserError(f"{what} has only {n} images: too few to split into train/val/test; add images")
    test, val, train = stratified_split(y.numpy(), [n_test, n_val], cfg.split_seed)
    return _take(x, y, train), _take(x, y, val), _take(x, y, test)


def _carve_val(x: torch.Tensor, y: torch.Tensor, cfg: DatasetConfig, what: str) -> tuple:
    """train and val from a training set, val being dataset.val_fraction of it."""
    n = len(y)
    n_val = split_count(n, cfg.val_fraction)
    if not 1 <= n_val < n:
        raise UserError(f"{what} has only {n} training images: too few to hold out a validation split; add images")
    val, train = stratified_split(y.numpy(), [n_val], cfg.split_seed)
    return _take(x, y, train), _take(x, y, val)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units.

    Exact and memory-light: a 256-bin histogram per channel, moments summed in float64.
    """
    if isinstance(x, FileImages):  # streamed folders: estimate from an even sample of up to 2,048 images
        x = x[torch.linspace(0, len(x) - 1, min(len(x), 2048)).long()]
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).numpy().astype(np.float64)
        n = max(hist.sum(), 1.0)
        mean = (hist * values).sum() / n
        var = max((hist * values**2).sum() / n - mean**2, 0.0)
        means.append(float(mean / 255.0))
        stds.append(float(np.sqrt(var) / 255.0))
    return tuple(means), tuple(stds)


def _finish(name: str, classes: list[str], train: tuple, val: tuple, test: tuple, cfg: DatasetConfig,
            source: str) -> ImageData:
    """Apply dataset.subset to the train split, compute normalisation statistics, build the ImageData."""
    train_x, train_y = train
    subset = getattr(cfg, "subset", None)
    if subset is not None:
        if subset < 1:
            raise UserError(f"dataset.subset={subset} must be at least 1 (or null for all images)")
        if subset < len(train_y):
            # A seed stream of its own: the subset is drawn after the split and leaves val/test untouched.
            keep, _ = stratified_split(train_y.numpy(), [subset], [cfg.split_seed, 1])
            train_x, train_y = _take(train_x, train_y, keep)
        else:
            warnings.warn(f"dataset.subset={subset} is not below the {len(train_y)} training images; using all",
                          stacklevel=3)
    mean, std = channel_stats(train_x)
    return ImageData(name, list(classes), train_x, train_y, *val, *test, mean=mean, std=std, source=source)


def _warn_ignored(cfg: DatasetConfig, keys: Sequence[str]) -> None:
    for key in keys:
        value = getattr(cfg, key, None)
        if value is not None:
            warnings.warn(f"dataset.{key}={value} has no effect on dataset '{cfg.name}'; ignored", stacklevel=3)


def cache_dir(name: str) -> Path:
    """Default home of a downloadable dataset: $CNNTRAIN_DATA/<name>, else ~/.cache/cnntrain/<name>."""
    base = os.environ.get("CNNTRAIN_DATA")
    if not base:
        base = str(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "cnntrain")
    return Path(base).expanduser() / name


def _oneline(e: BaseException) -> str:
    """An exception's text on one line (torchvision's download errors span several)."""
    return " ".join(str(e).split())


def _tv_datasets() -> Any:
    """torchvision.datasets, imported only when needed (the import takes seconds)."""
    try:
        import torchvision.datasets
    except ImportError as e:
        raise UserError(f"this dataset needs torchvision ({e}); install it with: pip install torchvision") from None
    return torchvision.datasets


# --------------------------------------------------------------------------- embedded MNIST subset


def load_mnist5k(cfg: DatasetConfig) -> ImageData:
    _warn_ignored(cfg, ("root", "image_size", "channels"))
    with np.load(MNIST5K_FILE) as z:
        x = torch.from_numpy(z["images"][:, None].copy())
        y = torch.from_numpy(z["labels"].astype(np.int64))
    train, val, test = _three_way(x, y, cfg, "mnist5k")
    return _finish("mnist5k", DIGITS, train, val, test, cfg, source="embedded")


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
        raise UserError(f"{path}: corrupt gzip data ({_oneline(e)}); delete it and fetch it again") from None
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
        raise UserError(f"{path}: truncated idx file (header says {dims}, {expected} bytes of data, "
                        f"but only {found} follow); delete it and fetch it again")
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
        raise UserError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                        "the files do not belong together")
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
    tv = _tv_datasets()
    try:
        getattr(tv, spec.tv_class)(root=str(target), train=True, download=True)
    except (OSError, RuntimeError) as e:
        raise UserError(f"could not download {spec.title} into {target} ({_oneline(e)}); check the internet connection, "
                        "or fetch the idx files yourself and pass dataset.root=DIR") from None


def _idx_loader(spec: _IdxSpec) -> Callable[[DatasetConfig], ImageData]:
    def load(cfg: DatasetConfig) -> ImageData:
        _warn_ignored(cfg, ("image_size", "channels"))
        candidates = _idx_candidates(spec, cfg.root)
        files = next((f for d in candidates if (f := _idx_files_in(d))), None)
        if files is None and cfg.download:
            target = Path(cfg.root).expanduser() if cfg.root is not None else cache_dir(spec.name)
            _download_idx(spec, target)
            files = _idx_files_in(target / spec.tv_class / "raw") or _idx_files_in(target)
        if files is None:
            looked = ", ".join(str(d) for d in candidates)
            names = ", ".join(f"{s}[.gz]" for s in _IDX_STEMS.values())
            raise UserError(f"{spec.title} not found: looked for {names} in {looked}; "
                            f"pass dataset.root=DIR (a folder with those files) or dataset.download=true")
        train_x, train_y = _read_idx_pair(files["train_images"], files["train_labels"], len(spec.classes))
        test = _read_idx_pair(files["test_images"], files["test_labels"], len(spec.classes))
        if train_x.shape[1:] != test[0].shape[1:]:
            raise UserError(f"{files['train_images']} and {files['test_images']} hold images of different sizes")
        train, val = _carve_val(train_x, train_y, cfg, spec.name)
        return _finish(spec.name, spec.classes, train, val, test, cfg, source=str(files["train_images"].parent))

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
        raise UserError(f"{title} needs an extra package ({_oneline(e)}); install it with: pip install scipy") from None
    except RuntimeError as e:
        if cfg.download:
            raise UserError(f"{title} in {root} is incomplete or corrupt ({_oneline(e)}); delete that folder and retry") from None
        raise UserError(f"{title} not found in {root}; pass dataset.root=DIR (the folder torchvision downloaded it "
                        f"into) or dataset.download=true") from None
    except OSError as e:
        raise UserError(f"could not download {title} into {root} ({_oneline(e)}); check the internet connection, "
                        "or pass dataset.root=DIR with a copy torchvision downloaded") from None


def _cifar_loader(name: str, tv_class: str, title: str) -> Callable[[DatasetConfig], ImageData]:
    def load(cfg: DatasetConfig) -> ImageData:
        _warn_ignored(cfg, ("image_size", "channels"))
        cls = getattr(_tv_datasets(), tv_class)
        root = _tv_root(name, cfg)
        tr = _tv_open(title, lambda: cls(root=str(root), train=True, download=cfg.download), root, cfg)
        te = _tv_open(title, lambda: cls(root=str(root), train=False, download=False), root, cfg)

        def arrays(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
            # .data is uint8 NHWC; one permute+copy, no per-image Python.
            x = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
            return x, torch.from_numpy(np.asarray(ds.targets, dtype=np.int64))

        train, val = _carve_val(*arrays(tr), cfg, name)
        return _finish(name, list(tr.classes), train, val, arrays(te), cfg, source=str(root))

    load.__name__ = f"load_{name}"
    load.__doc__ = f"{title} through torchvision; validation carved from the official training split."
    return load


def load_svhn(cfg: DatasetConfig) -> ImageData:
    """SVHN cropped digits (train and test; 'extra' is not used) through torchvision."""
    _warn_ignored(cfg, ("image_size", "channels"))
    cls = _tv_datasets().SVHN
    root = _tv_root("svhn", cfg)
    tr = _tv_open("SVHN", lambda: cls(root=str(root), split="train", download=cfg.download), root, cfg)
    te = _tv_open("SVHN", lambda: cls(root=str(root), split="test", download=cfg.download), root, cfg)

    def arrays(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # torchvision already holds SVHN as NCHW, with label 10 mapped to digit 0.
        x = torch.from_numpy(np.ascontiguousarray(ds.data, dtype=np.uint8))
        return x, torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))

    train, val = _carve_val(*arrays(tr), cfg, "svhn")
    return _finish("svhn", DIGITS, train, val, arrays(te), cfg, source=str(root))


# --------------------------------------------------------------------------- image folders


def _class_folders(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(d: Path) -> list[Path]:
    return sorted(
        p for p in d.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _scan(d: Path, classes: list[str] | None, train_dir: Path | None) -> tuple[list[str], list[Path], list[int]]:
    """Files and labels of one split folder; `classes` (from train/) fixes the label order when given."""
    folders = _class_folders(d)
    if not folders:
        raise UserError(f"{d} has no class folders; put each class's images in its own subfolder, "
                        f"e.g. {d / 'cat' / '001.png'}")
    if classes is None:
        classes = [f.name for f in folders]
    else:
        extra = [f.name for f in folders if f.name not in classes]
        if extra:
            raise UserError(f"{d} has class folders that {train_dir} lacks: {', '.join(extra)}; "
                            f"every class needs training images")
    files, labels = [], []
    for f in folders:
        found = _image_files(f)
        if not found:
            raise UserError(f"class folder {f} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
        labels += [classes.index(f.name)] * len(found)
    return classes, files, labels


def _probe(path: Path) -> tuple[bool, tuple[int, int]] | str:
    """(is grayscale, (width, height)) from the file header, or the reason it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            gray = im.mode in _GRAY_MODES
            if im.mode == "P":  # a palette of greys is still a grayscale image
                pal = im.getpalette() or [0, 0, 1]
                gray = pal[0::3] == pal[1::3] == pal[2::3]
            return gray, im.size
    except Exception as e:  # any decoder failure means "not a usable image"
        return f"{type(e).__name__}: {_oneline(e)}"


def _to_channels(im: Any, channels: int) -> Any:
    from PIL import Image

    if im.mode.startswith("I"):
        # 16/32-bit grayscale: PIL's convert('L') would clip, so scale to 8 bits instead.
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return im.convert("L" if channels == 1 else "RGB")


def _decode_into(out: np.ndarray, i: int, path: Path, channels: int) -> str | None:
    """Decode, convert and resize one image into out[i]; the reason on failure, else None."""
    from PIL import Image

    _, c, h, w = out.shape
    try:
        with Image.open(path) as im:
            if im.size != (w, h):
                im.draft("L" if channels == 1 else "RGB", (w, h))  # JPEG: decode at reduced scale when shrinking
            im = _to_channels(im, channels)
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            a = np.asarray(im)
    except Exception as e:  # truncated data and the like only show when decoding
        return f"{type(e).__name__}: {_oneline(e)}"
    out[i] = a.reshape(h, w, c).transpose(2, 0, 1)
    return None


def _corrupt(bad: list[tuple[Path, str]], cfg: DatasetConfig) -> None:
    if not bad:
        return
    if cfg.on_corrupt == "error":
        path, why = bad[0]
        raise UserError(f"cannot decode image {path} ({why}); fix or delete it, or set dataset.on_corrupt=skip")
    listed = "; ".join(f"{p} ({why})" for p, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    warnings.warn(f"imagefolder: skipped {len(bad)} file(s) that could not be decoded: {listed}", stacklevel=3)


def load_imagefolder(cfg: DatasetConfig) -> ImageData:
    """The user's images: root/{train,val[,test]}/<class>/* or root/<class>/* (split by the fractions)."""
    if cfg.root is None:
        raise UserError("dataset=imagefolder needs dataset.root=DIR: a folder of class folders, "
                        "or one with train/ and val/ class folders")
    if cfg.on_corrupt not in ("skip", "error"):
        raise UserError(f"dataset.on_corrupt={cfg.on_corrupt} is not a valid choice; use one of: skip, error")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.root={root} does not exist or is not a folder")

    # Layout: split folders if train/ exists, otherwise one pool of class folders.
    splits: dict[str, tuple[list[Path], list[int]]] = {}
    if (root / "train").is_dir():
        classes, files, labels = _scan(root / "train", None, None)
        splits["train"] = (files, labels)
        for split in ("val", "test"):
            if (root / split).is_dir():
                _, files, labels = _scan(root / split, classes, root / "train")
                splits[split] = (files, labels)
    else:
        classes, files, labels = _scan(root, None, None)
        splits["all"] = (files, labels)

    order = list(splits)
    files = [p for s in order for p in splits[s][0]]
    labels = np.array([lab for s in order for lab in splits[s][1]], dtype=np.int64)
    which = np.concatenate([np.full(len(splits[s][0]), k) for k, s in enumerate(order)])

    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while reading and decoding
        probes = list(pool.map(_probe, files))
        bad = [(p, r) for p, r in zip(files, probes, strict=True) if isinstance(r, str)]
        ok = [i for i, r in enumerate(probes) if not isinstance(r, str)]
        if not ok:  # one error rather than a warning about every file first
            raise UserError(f"no image under {root} could be decoded ({len(bad)} files; e.g. {bad[0][0]}: "
                            f"{bad[0][1]})")
        _corrupt(bad, cfg)

        channels = cfg.channels or (1 if all(probes[i][0] for i in ok) else 3)
        if cfg.image_size is not None:
            w = h = int(cfg.image_size)
        else:
            sizes = {probes[i][1]: files[i] for i in ok}
            if len(sizes) > 1:
                (s1, p1), (s2, p2) = list(sizes.items())[:2]
                raise UserError(f"images under {root} differ in size ({s1[0]}x{s1[1]} {p1}, {s2[0]}x{s2[1]} {p2}, "
                                f"...); set dataset.image_size=N to resize all of them to NxN")
            w, h = next(iter(sizes))

        nbytes = len(ok) * channels * h * w
        mode = str(cfg.in_memory).lower()
        stream = mode == "false" or (mode == "auto" and nbytes > cfg.memory_limit_mb * 2**20)
        if stream:
            logging.getLogger(__name__).info("streaming %d images (%.0f MB decoded) through DataLoader workers",
                                             len(ok), nbytes / 2**20)
            x = FileImages([files[i] for i in ok], channels, (h, w), cfg.on_corrupt)
            good = np.arange(len(ok))
        else:
            out = np.empty((len(ok), channels, h, w), dtype=np.uint8)
            fails = list(pool.map(lambda j: _decode_into(out, j, files[ok[j]], channels), range(len(ok))))
    if not stream:
        bad = [(files[ok[j]], why) for j, why in enumerate(fails) if why is not None]
        _corrupt(bad, cfg)
        good = np.array([j for j, why in enumerate(fails) if why is None], dtype=np.int64)
        if len(good) == 0:
            raise UserError(f"no image under {root} could be decoded")
        x = torch.from_numpy(out if len(good) == len(ok) else out[good])
    kept = np.asarray(ok, dtype=np.int64)[good]
    y, which = torch.from_numpy(labels[kept]), which[kept]

    def part(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _take(x, y, np.flatnonzero(which == order.index(name)))

    if "all" in splits:
        train, val, test = _three_way(x, y, cfg, str(root))
    else:
        train = part("train")
        if "val" in splits:
            val = part("val")
        else:
            train, val = _carve_val(*train, cfg, str(root / "train"))
            warnings.warn(f"imagefolder: no {root / 'val'}; holding out dataset.val_fraction={cfg.val_fraction} "
                          "of train/ for validation", stacklevel=2)
        if "test" in splits:
            test = part("test")
        else:
            test = val
            warnings.warn(f"imagefolder: no {root / 'test'}; the test split is the validation split, "
                          "so test scores are not independent of model selection", stacklevel=2)
        for split_name, (sx, _) in (("train", train), ("val", val), ("test", test)):
            if len(sx) == 0:
                raise UserError(f"the {split_name} split under {root} has no decodable images")
    return _finish("imagefolder", classes, train, val, test, cfg, source=str(root.resolve()))


# --------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[[DatasetConfig], ImageData]] = {
    "mnist5k": load_mnist5k,
    "mnist": _idx_loader(_IdxSpec("mnist", "MNIST", "MNIST", DIGITS)),
    "fashion_mnist": _idx_loader(
        _IdxSpec("fashion_mnist", "Fashion-MNIST", "FashionMNIST", FASHION_CLASSES,
                 system_dirs=("/usr/share/datasets/fashion-mnist",))  # Debian package dataset-fashion-mnist
    ),
    "kmnist": _idx_loader(_IdxSpec("kmnist", "Kuzushiji-MNIST", "KMNIST", KMNIST_CLASSES)),
    "cifar10": _cifar_loader("cifar10", "CIFAR10", "CIFAR-10"),
    "cifar100": _cifar_loader("cifar100", "CIFAR100", "CIFAR-100"),
    "svhn": load_svhn,
    "imagefolder": load_imagefolder,
}


def load_dataset(cfg: DatasetConfig) -> ImageData:
    """Load the dataset that cfg.name names, with its train/val/test splits."""
    loader = DATASETS.get(cfg.name)
    if loader is None:
        raise unknown_choice("dataset", cfg.name, DATASETS)
    return loader(cfg)

