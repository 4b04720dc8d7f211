"""Test-time augmentation: `evaluate tta=...` and `predict tta=...` average the softmax over views."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cnntrain.engine.tta import VIEWS, AveragedViews, _view
from tests.conftest import cli_in_process, run_cli, run_dirs

FASHION = "/usr/share/datasets/fashion-mnist"


def test_views_are_flips_and_shifted_crops_of_the_same_size():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    assert torch.equal(_view(x, "hflip"), x.flip(-1))
    for name in VIEWS["flip+crops"]:
        assert _view(x, name).shape == x.shape
    # crop-br shows the image moved 2 pixels up-left: its top-left is the original's pixel (2, 2).
    assert _view(x, "crop-br")[0, 0, 0, 0] == x[0, 0, 2, 2]
    assert _view(x, "crop-tl")[0, 0, 2, 2] == x[0, 0, 0, 0]


def test_averaged_views_return_the_log_of_the_mean_softmax():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).eval()
    x = torch.randn(4, 1, 6, 6)
    out = AveragedViews(model, VIEWS["flip"])(x)
    want = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    assert out.shape == (4, 3)
    assert torch.allclose(out.exp(), want, atol=1e-6)
    assert torch.allclose(AveragedViews(model, VIEWS["none"])(x).exp(), model(x).softmax(1), atol=1e-6)


def test_tta_keeps_the_number_of_predictions_and_says_which_views(smoke_run, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, err = cli_in_process(
        ["evaluate", f"ckpt={smoke_run}", "tta=crops", f"out={out}", "tensorboard=false", "mistakes=0"], capsys
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tta_views"] == list(VIEWS["crops"]) and metrics["tta"].startswith("crops: softmax averaged over 5")
    with open(out / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == metrics["images"] == 500
    assert "test-time augmentation" in stdout

    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    code, stdout, err = cli_in_process(
        ["predict", f"ckpt={smoke_run}", f"inputs={folder}", "tta=crops", f"out={tmp_path / 'pred'}", "batch_size=3"],
        capsys,
    )
    assert code == 0, err
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and all(0.5 < sum(float(r[f"prob_{k}"]) for k in range(1, 6)) <= 1 + 1e-5 for r in rows)
    assert "softmax averaged over 5 views" in stdout


@pytest.mark.parametrize(
    "args,expect",
    [
        (["tta=flip"], "tta=flip flips images, but the model's dataset (mnist5k) says a flip changes the label"),
        (["tta=flip+crops"], "use tta=crops or tta=none"),
        (["tta=blur"], "tta=blur is not valid; use one of: none, flip, crops, flip+crops"),
    ],
)
def test_flips_on_digits_and_unknown_views_are_one_line(smoke_run, tmp_path, capsys, args, expect):
    for command in ("evaluate", "predict"):
        extra = [f"inputs={tmp_path}"] if command == "predict" else []
        if command == "predict":
            from PIL import Image

            Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "x.png")
        code, _, err = cli_in_process(
            [command, f"ckpt={smoke_run}", *extra, *args, f"out={tmp_path / command}"], capsys
        )
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expect in lines[0], err


def test_tta_on_a_model_exported_without_its_preprocessing_record_is_one_line(smoke_run, tmp_path, capsys):
    from safetensors.torch import save_file

    state = torch.load(smoke_run / "checkpoints" / "best.pt", weights_only=True)["model"]
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bare))  # weights only, no metadata
    code, _, err = cli_in_process(["evaluate", f"ckpt={bare}", "tta=crops"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "lacks the preprocessing record" in lines[0], err


@pytest.mark.slow
@pytest.mark.skipif(not Path(FASHION).is_dir(), reason=f"Fashion-MNIST is not in {FASHION}")
def test_flip_tta_on_fashion_is_within_noise_or_better(tmp_path):
    proc = run_cli(
        [
            "fit",
            "dataset=fashion_mnist",
            f"dataset.root={FASHION}",
            "dataset.subset=5000",
            "augment=fashion",
            "trainer.epochs=3",
            "trainer.precision=32",
            "trainer.progress=none",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(tmp_path)
    acc = {}
    for tta in ("none", "flip"):
        out = tmp_path / tta
        proc = run_cli(
            [
                "evaluate",
                f"ckpt={run_dir}",
                f"tta={tta}",
                f"out={out}",
                "tensorboard=false",
                "mistakes=0",
                "precision=32",
            ],
            tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        acc[tta] = json.loads((out / "metrics.json").read_text())["acc"]
    # Measured (CPU, fp32, seed 0): 0.7840 without, 0.7868 with flips over the 10,000 test images. Noise of a
    # 10k-image accuracy is about 0.4 points; flips must not cost more than that.
    assert acc["flip"] >= acc["none"] - 0.004, acc
