"""Datasets: splits, idx parsing, image folders, subsets, registry errors."""

from __future__ import annotations

import gzip
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cnntrain.config import DatasetConfig
from cnntrain.data import builtin, load_dataset
from cnntrain.data.builtin import MNIST5K_FILE, read_idx
from cnntrain.data.images import stratified_split
from cnntrain.errors import UserError
from cnntrain.registry import DATASETS

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def rows(x: torch.Tensor, y: torch.Tensor) -> Counter:
    """Each (image, label) as hashable bytes, counted: equal Counters mean the same images."""
    table = np.concatenate([x.reshape(len(x), -1).numpy(), y.numpy().astype(np.uint8)[:, None]], axis=1)
    return Counter(map(bytes, table))


# --------------------------------------------------------------------------- embedded mnist5k


def test_mnist5k_default_split_is_stratified_partition():
    d = load_dataset(DatasetConfig())
    assert d.name == "mnist5k" and d.source == "embedded"
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (4000, 500, 500)
    assert d.classes == [str(i) for i in range(10)] and d.num_classes == 10
    assert d.channels == 1 and d.image_size == (28, 28)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert torch.bincount(d.train_y).tolist() == [400] * 10
    assert torch.bincount(d.val_y).tolist() == [50] * 10
    assert torch.bincount(d.test_y).tolist() == [50] * 10
    # The three splits are disjoint and together are exactly the shipped file.
    with np.load(MNIST5K_FILE) as z:
        full = rows(torch.from_numpy(z["images"][:, None]), torch.from_numpy(z["labels"]))
    parts = rows(d.train_x, d.train_y) + rows(d.val_x, d.val_y) + rows(d.test_x, d.test_y)
    assert parts == full
    # Normalisation statistics come from the train split, in [0, 1] units.
    x = d.train_x.double() / 255
    assert d.mean[0] == pytest.approx(x.mean().item(), abs=1e-9)
    assert d.std[0] == pytest.approx(x.std(unbiased=False).item(), abs=1e-9)
    assert 0.1 < d.mean[0] < 0.2 and 0.25 < d.std[0] < 0.4  # MNIST is mostly black


def test_split_is_reproducible_and_seeded():
    a, b = load_dataset(DatasetConfig()), load_dataset(DatasetConfig())
    assert a.fingerprint() == b.fingerprint()
    c = load_dataset(DatasetConfig(split_seed=1))
    assert c.fingerprint() != a.fingerprint()
    assert not torch.equal(c.val_x, a.val_x)
    d = load_dataset(DatasetConfig(val_fraction=0.2, test_fraction=0.3))
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (2500, 1000, 1500)


def test_fingerprint_sees_a_single_pixel():
    d = load_dataset(DatasetConfig())
    before = d.fingerprint()
    d.test_x[3, 0, 14, 14] ^= 1
    assert d.fingerprint() != before


def test_stratified_split_exact_sizes_with_uneven_classes():
    labels = np.array([0] * 7 + [1] * 23 + [2] * 70)
    test, val, rest = stratified_split(labels, [10, 20], seed=3)
    assert (len(test), len(val), len(rest)) == (10, 20, 70)
    assert sorted(np.concatenate([test, val, rest]).tolist()) == list(range(100))
    assert np.bincount(labels[val], minlength=3).tolist() == [1, 5, 14]  # 20 % of 7/23/70, rounded to total 20


def test_subset_keeps_n_stratified_training_images_only():
    full = load_dataset(DatasetConfig())
    d = load_dataset(DatasetConfig(subset=100))
    assert len(d.train_y) == 100
    assert torch.bincount(d.train_y).tolist() == [10] * 10
    assert torch.equal(d.val_x, full.val_x) and torch.equal(d.test_x, full.test_x)
    assert rows(d.train_x, d.train_y) - rows(full.train_x, full.train_y) == Counter()  # drawn from train
    assert load_dataset(DatasetConfig(subset=100)).fingerprint() == d.fingerprint()
    with pytest.warns(UserWarning, match="subset"):
        assert len(load_dataset(DatasetConfig(subset=10**6)).train_y) == 4000


def test_accepts_omegaconf_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(DatasetConfig(subset=50))
    assert len(load_dataset(cfg).train_y) == 50


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError) as e:
        load_dataset(DatasetConfig(name="fashionmnist"))
    msg = str(e.value)
    assert "fashionmnist" in msg and "did you mean 'fashion_mnist'" in msg
    for name in DATASETS:
        assert name in msg


def test_every_registered_dataset_has_a_config_file():
    cfg_dir = Path(__file__).resolve().parent.parent / "configs" / "dataset"
    for name in DATASETS:
        text = (cfg_dir / f"{name}.yaml").read_text()
        assert text.startswith("# ") and f"\nname: {name}\n" in text


# --------------------------------------------------------------------------- idx files


def idx_bytes(a: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, a.ndim]) + np.array(a.shape, dtype=">u4").tobytes()
    return head + a.astype(np.uint8).tobytes()


def write_idx_set(d: Path, n_train: int = 50, n_test: int = 20, gz: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 5, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 5, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    d.mkdir(parents=True, exist_ok=True)
    for stem, a in arrays.items():
        if gz:
            (d / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(a)))
        else:
            (d / stem).write_bytes(idx_bytes(a))
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    d = load_dataset(DatasetConfig(name="mnist", root=str(tmp_path), val_fraction=0.2))
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (40, 10, 20)
    assert d.image_size == (5, 4) and d.channels == 1
    # The official test split is kept whole and in order.
    assert torch.equal(d.test_x[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert d.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # Validation is carved from train: together they are the training file.
    train = rows(
        torch.from_numpy(arrays["train-images-idx3-ubyte"][:, None]),
        torch.from_numpy(arrays["train-labels-idx1-ubyte"]),
    )
    assert rows(d.train_x, d.train_y) + rows(d.val_x, d.val_y) == train
    assert torch.bincount(d.val_y).tolist() == [1] * 10


def test_idx_found_in_torchvision_layout_and_cache(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "dl" / "FashionMNIST" / "raw", gz=True)
    d = load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path / "dl")))
    assert d.source == str(tmp_path / "dl" / "FashionMNIST" / "raw")
    assert d.classes[0] == "T-shirt/top"
    # root=null: $CNNTRAIN_DATA/<name>, also in torchvision's layout.
    monkeypatch.setenv("CNNTRAIN_DATA", str(tmp_path / "cache"))
    write_idx_set(tmp_path / "cache" / "kmnist" / "KMNIST" / "raw")
    d = load_dataset(DatasetConfig(name="kmnist"))
    assert d.source == str(tmp_path / "cache" / "kmnist" / "KMNIST" / "raw")
    assert d.classes == ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]


def test_idx_missing_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNTRAIN_DATA", str(tmp_path))
    with pytest.raises(UserError) as e:
        load_dataset(DatasetConfig(name="mnist"))
    msg = str(e.value)
    assert str(tmp_path / "mnist") in msg and "dataset.root=" in msg and "dataset.download=true" in msg


def test_idx_download_goes_through_torchvision_into_the_cache(tmp_path, monkeypatch):
    calls = []

    class FakeMNIST:  # stands in for torchvision's downloader: writes the raw files where torchvision would
        def __init__(self, root, train, download):
            calls.append((root, download))
            write_idx_set(Path(root) / "MNIST" / "raw", gz=True)

    monkeypatch.setattr(builtin, "tv_datasets", lambda: SimpleNamespace(MNIST=FakeMNIST))
    monkeypatch.setenv("CNNTRAIN_DATA", str(tmp_path))
    d = load_dataset(DatasetConfig(name="mnist", download=True))
    assert calls == [(str(tmp_path / "mnist"), True)]
    assert d.source == str(tmp_path / "mnist" / "MNIST" / "raw") and len(d.test_y) == 20
    load_dataset(DatasetConfig(name="mnist", download=True))
    assert len(calls) == 1  # already there: no second download


def test_idx_truncated_file(tmp_path):
    write_idx_set(tmp_path)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte: truncated"):
        load_dataset(DatasetConfig(name="mnist", root=str(tmp_path)))


def test_idx_truncated_gzip(tmp_path):
    write_idx_set(tmp_path, gz=True)
    f = tmp_path / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-30])
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte\.gz: truncated"):
        load_dataset(DatasetConfig(name="mnist", root=str(tmp_path)))


def test_idx_count_mismatch(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(49, dtype=np.uint8)))
    with pytest.raises(UserError, match=r"50 images but .*train-labels-idx1-ubyte has 49 labels"):
        load_dataset(DatasetConfig(name="mnist", root=str(tmp_path)))


def test_idx_bad_magic(tmp_path):
    f = tmp_path / "x-idx3-ubyte"
    f.write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))  # e.g. a gzip file without .gz
    with pytest.raises(UserError, match=r"x-idx3-ubyte: not an idx file \(bad magic number 0x1f8b0800\)"):
        read_idx(f)


def test_read_idx_other_dtypes(tmp_path):
    a = (np.arange(6) - 3).astype(">i2").reshape(2, 3)
    f = tmp_path / "a.idx"
    f.write_bytes(bytes([0, 0, 0x0B, 2]) + np.array([2, 3], dtype=">u4").tobytes() + a.tobytes())
    assert read_idx(f).tolist() == a.tolist()


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} missing (apt-get install dataset-fashion-mnist)")
def test_full_fashion_mnist():
    d = load_dataset(DatasetConfig(name="fashion_mnist", val_fraction=0.1))
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (54000, 6000, 10000)
    assert d.classes == [
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
    assert d.image_size == (28, 28) and d.channels == 1
    assert torch.bincount(d.test_y).tolist() == [1000] * 10
    assert torch.bincount(d.val_y).tolist() == [600] * 10
    assert d.mean[0] == pytest.approx(0.286, abs=0.002) and d.std[0] == pytest.approx(0.353, abs=0.002)


# --------------------------------------------------------------------------- torchvision-held sets


class FakeCIFAR10:
    classes = ["cat", "dog", "frog"]

    def __init__(self, root, train, download):
        if not (Path(root) / "cifar-10-batches-py").is_dir():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        n = 30 if train else 9
        self.data = np.random.default_rng(int(train)).integers(0, 256, (n, 4, 6, 3), dtype=np.uint8)
        self.targets = [i % 3 for i in range(n)]


def test_cifar_arrays_become_nchw(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "tv_datasets", lambda: SimpleNamespace(CIFAR10=FakeCIFAR10))
    with pytest.raises(UserError, match=r"CIFAR-10 not found in .*dataset\.download=true"):
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path)))
    (tmp_path / "cifar-10-batches-py").mkdir()
    d = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path)))
    assert d.classes == ["cat", "dog", "frog"] and d.channels == 3 and d.image_size == (4, 6)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (27, 3, 9)
    expected = torch.from_numpy(FakeCIFAR10(tmp_path, False, False).data).permute(0, 3, 1, 2)
    assert torch.equal(d.test_x, expected) and d.test_x.is_contiguous()


# --------------------------------------------------------------------------- image folders


def save(path: Path, array: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, format=fmt)


def gray(value: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.full((h, w), value, dtype=np.uint8)


def rgb(color: tuple[int, int, int], h: int = 8, w: int = 8) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (h, w, 3)).copy()


def folder_cfg(root: Path, **kw) -> DatasetConfig:
    return DatasetConfig(name="imagefolder", root=str(root), **kw)


def test_imagefolder_train_val_layout_grayscale(tmp_path):
    for split, n in (("train", 10), ("val", 2)):
        for k, cls in enumerate(("ants", "bees")):
            for i in range(n):
                save(tmp_path / split / cls / f"{i}.png", gray(100 + 50 * k))
    (tmp_path / "train" / "ants" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="holding out 2 images of the train split"):
        d = load_dataset(folder_cfg(tmp_path))
    assert d.classes == ["ants", "bees"] and d.channels == 1 and d.image_size == (8, 8)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (18, 4, 2)
    # Labels follow the folders, pixels survive the PNG round trip.
    assert d.train_x[d.train_y == 0].unique().tolist() == [100]
    assert d.train_x[d.train_y == 1].unique().tolist() == [150]
    assert d.mean[0] == pytest.approx(125 / 255)


def test_imagefolder_without_test_folder_holds_out_a_real_test_split(tmp_path):
    # Every image distinct, so the splits can be compared image by image.
    for split, n in (("train", 20), ("val", 4)):
        for k, cls in enumerate(("a", "b", "c")):
            for i in range(n):
                save(tmp_path / split / cls / f"{i}.png", gray(8 * i + k + (100 if split == "val" else 0)))
    with pytest.warns(UserWarning, match="no .*test; holding out 6 images of the train split"):
        d = load_dataset(folder_cfg(tmp_path))
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (54, 12, 6)
    # Not the validation split (which picks the best epoch), and none of it trained on.
    keys = {name: {bytes(img.numpy()) for img in getattr(d, f"{name}_x")} for name in ("train", "val", "test")}
    assert not keys["test"] & keys["val"] and not keys["test"] & keys["train"]
    assert torch.bincount(d.test_y).tolist() == [2, 2, 2]  # stratified
    assert d.test_split is not None and "dataset.test_fraction=0.1" in d.test_split  # recorded (summary.json)
    with pytest.warns(UserWarning):
        again = load_dataset(folder_cfg(tmp_path))
    assert torch.equal(again.test_x, d.test_x)  # seeded: evaluate split=test sees the same images
    with pytest.warns(UserWarning):
        other = load_dataset(folder_cfg(tmp_path, split_seed=1))
    assert not torch.equal(other.test_x, d.test_x)
    # Only train/: validation and test are both held out from it, disjoint.
    import shutil

    shutil.rmtree(tmp_path / "val")
    with pytest.warns(UserWarning):
        d = load_dataset(folder_cfg(tmp_path))
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (48, 6, 6)
    keys = {name: {bytes(img.numpy()) for img in getattr(d, f"{name}_x")} for name in ("train", "val", "test")}
    assert not keys["test"] & keys["val"] and not keys["test"] & keys["train"] and not keys["val"] & keys["train"]


def test_imagefolder_uses_test_folder(tmp_path):
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            save(tmp_path / split / cls / "0.png", gray(7 if split == "test" else 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = load_dataset(folder_cfg(tmp_path))
    assert d.test_x.unique().tolist() == [7] and len(d.test_y) == 2


def test_imagefolder_single_folder_rgb_resized(tmp_path):
    colors = {"red": (255, 0, 0), "green": (0, 255, 0)}
    for cls, color in colors.items():
        for i in range(10):
            size = 8 + 4 * (i % 2)  # two sizes: needs resizing
            save(tmp_path / cls / f"{i}.png", rgb(color, size, size + 2))
        save(tmp_path / cls / "extra.jpg", rgb(color, 20, 20), "JPEG")
    d = load_dataset(folder_cfg(tmp_path, image_size=6, val_fraction=0.2, test_fraction=0.2))
    assert d.channels == 3 and d.image_size == (6, 6) and d.classes == ["green", "red"]
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (14, 4, 4)
    for x, y in ((d.train_x, d.train_y), (d.val_x, d.val_y), (d.test_x, d.test_y)):
        assert torch.bincount(y, minlength=2).tolist()[0] == torch.bincount(y, minlength=2).tolist()[1]
        red = x[y == 1].float().mean(dim=(0, 2, 3))
        assert red[0] > 240 and red[1] < 15 and red[2] < 15
    # Without image_size, mixed sizes are a user error that names the fix.
    with pytest.raises(UserError, match="dataset.image_size=N"):
        load_dataset(folder_cfg(tmp_path))


def test_imagefolder_channels_inferred_and_forced(tmp_path):
    save(tmp_path / "train" / "a" / "0.png", gray(40))
    save(tmp_path / "train" / "b" / "0.png", rgb((255, 0, 0)))
    save(tmp_path / "val" / "a" / "0.bmp", gray(40), "BMP")
    save(tmp_path / "val" / "b" / "0.webp", rgb((255, 0, 0)), "WEBP")
    save(tmp_path / "test" / "a" / "0.png", gray(40))
    save(tmp_path / "test" / "b" / "0.png", gray(40))
    d = load_dataset(folder_cfg(tmp_path))
    assert d.channels == 3  # one colour image makes the set RGB
    assert d.train_x[d.train_y == 0].unique().tolist() == [40]  # grey replicated to 3 channels
    d = load_dataset(folder_cfg(tmp_path, channels=1))
    assert d.channels == 1
    assert d.train_x[d.train_y == 1].float().mean().item() == pytest.approx(76, abs=1.5)  # luma of pure red
    # A palette image whose palette is all greys counts as grayscale; 16-bit greys are scaled, not clipped.
    (tmp_path / "train" / "b" / "0.png").unlink()
    Image.fromarray(gray(90)).convert("P").save(tmp_path / "train" / "b" / "0.png")
    Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16)).save(tmp_path / "val" / "b" / "1.png")
    (tmp_path / "val" / "b" / "0.webp").unlink()
    d = load_dataset(folder_cfg(tmp_path))
    assert d.channels == 1
    assert d.train_x[d.train_y == 1].unique().tolist() == [90]
    assert d.val_x[d.val_y == 1].unique().tolist() == [128]  # PIL would clip it to 255


def make_small_set(root: Path) -> None:
    for cls in ("x", "y"):
        for i in range(3):
            save(root / "train" / cls / f"{i}.png", gray(10 * i))
            save(root / "val" / cls / f"{i}.png", gray(10 * i))
            save(root / "test" / cls / f"{i}.png", gray(10 * i))


def test_imagefolder_corrupt_files(tmp_path):
    make_small_set(tmp_path)
    garbage = tmp_path / "train" / "x" / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    truncated = tmp_path / "train" / "y" / "truncated.png"
    save(truncated, np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:60])  # header intact, pixel data cut
    with pytest.warns(UserWarning, match="could not be decoded") as record:
        d = load_dataset(folder_cfg(tmp_path))
    msg = " ".join(str(w.message) for w in record)
    assert "garbage.png" in msg and "truncated.png" in msg
    assert len(d.train_y) == 6
    with pytest.raises(UserError, match=r"garbage\.png.*dataset\.on_corrupt=skip"):
        load_dataset(folder_cfg(tmp_path, on_corrupt="error"))
    garbage.unlink()
    with pytest.raises(UserError, match=r"truncated\.png"):
        load_dataset(folder_cfg(tmp_path, on_corrupt="error"))


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(UserError, match="needs dataset.root"):
        load_dataset(DatasetConfig(name="imagefolder"))
    with pytest.raises(UserError, match=f"{tmp_path / 'nope'} does not exist"):
        load_dataset(folder_cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"{tmp_path / 'empty'} has no class folders"):
        load_dataset(folder_cfg(tmp_path / "empty"))
    make_small_set(tmp_path / "s")
    (tmp_path / "s" / "train" / "z").mkdir()
    (tmp_path / "s" / "train" / "z" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=f"class folder {tmp_path / 's' / 'train' / 'z'} has no images"):
        load_dataset(folder_cfg(tmp_path / "s"))
    (tmp_path / "s" / "train" / "z" / "readme.txt").unlink()
    (tmp_path / "s" / "train" / "z").rmdir()
    save(tmp_path / "s" / "val" / "w" / "0.png", gray(0))
    with pytest.raises(UserError, match=f"{tmp_path / 's' / 'val'} has class folders .* lacks: w"):
        load_dataset(folder_cfg(tmp_path / "s"))
