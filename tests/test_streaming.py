"""Image folders too big for memory stream through DataLoader workers and train exactly like resident data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnntrain.data.batches import FileImages, iterate, sequential
from tests.conftest import REPO, run_cli, run_dirs, summary


def _folder(root, per_split=(400, 100, 100)):
    data = np.load(REPO / "cnntrain" / "data" / "mnist5k.npz")
    x, y = data["images"], data["labels"]
    perm = np.random.RandomState(0).permutation(len(y))
    start = 0
    for split, n in zip(("train", "val", "test"), per_split, strict=True):
        for i in perm[start : start + n]:
            d = root / split / str(y[i])
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(d / f"{i}.png")
        start += n
    return x, y, perm


def test_file_images_batches_equal_the_decoded_pixels(tmp_path):
    x, _, perm = _folder(tmp_path, (40, 0, 0))
    paths = sorted((tmp_path / "train").rglob("*.png"))
    images = FileImages(paths, 1, (28, 28))
    expected = torch.from_numpy(np.stack([x[int(p.stem)] for p in paths])).unsqueeze(1)
    labels = torch.arange(len(paths))
    chunks = [torch.tensor([5, 1, 30]), torch.tensor([0, 39])]
    got = list(iterate(images, labels, chunks, torch.device("cpu")))
    assert [b[1].tolist() for b in got] == [[5, 1, 30], [0, 39]]
    assert torch.equal(got[0][0], expected[[5, 1, 30]]) and torch.equal(got[1][0], expected[[0, 39]])
    assert torch.equal(torch.cat([b for b, _ in sequential(images, labels, 16, torch.device("cpu"))]), expected)


@pytest.mark.slow
def test_streamed_folder_trains_bit_for_bit_like_the_resident_one(tmp_path):
    _folder(tmp_path / "imgs")
    common = [
        "dataset=imagefolder",
        f"dataset.root={tmp_path / 'imgs'}",
        "model=tiny_cnn",
        "trainer.epochs=2",
        "trainer.deterministic=true",
        "augment=digits",
        "trainer.batch_size=64",
    ]
    results = {}
    for mode in ("true", "false"):
        cwd = tmp_path / mode
        cwd.mkdir()
        proc = run_cli(["fit", *common, f"dataset.in_memory={mode}"], cwd)
        assert proc.returncode == 0, proc.stderr
        (run_dir,) = run_dirs(cwd)
        results[mode] = (summary(run_dir), torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True))
    (s_mem, c_mem), (s_str, c_str) = results["true"], results["false"]
    assert s_mem["test_acc"] == s_str["test_acc"] and s_mem["best_val_acc"] == s_str["best_val_acc"]
    assert all(torch.equal(c_mem["model"][k], c_str["model"][k]) for k in c_mem["model"])
