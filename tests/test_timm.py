"""model=timm (the `cnntrain[timm]` extra): small timm architectures trained on the embedded digits, then
evaluated, used for predictions and exported; fine-tuning from a local weights file with a frozen backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import cli_in_process, needs, run_cli, run_dirs, summary

pytestmark = needs("timm", "timm")

# Small and quick at 28x28 on a CPU: a ResNet with a deep-narrow stem and a MobileNet.
ARCHS = ("resnet10t", "mobilenetv3_small_050")
FIT = ["dataset.subset=300", "trainer.epochs=1", "trainer.progress=none", "trainer.eval_batch_size=500"]


def _digit(path: Path) -> Path:
    from cnntrain.config import DatasetConfig
    from cnntrain.data import load_dataset

    Image.fromarray(load_dataset(DatasetConfig(name="mnist5k")).test_x[0, 0].numpy()).save(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_a_timm_model_trains_and_serves_like_the_built_ins(arch, tmp_path, capsys):
    proc = run_cli(["fit", "model=timm", f"model.arch={arch}", *FIT], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = run_dirs(tmp_path)
    done = summary(run)
    assert done["status"] == "completed" and done["epochs_done"] == 1
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["config"]["model"]["arch"] == arch

    code, _, err = cli_in_process(["evaluate", f"ckpt={run}", f"out={tmp_path / 'eval'}"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["acc"] == pytest.approx(done["test_acc"])
    image = _digit(tmp_path / "digit.png")
    code, _, err = cli_in_process(["predict", f"ckpt={run}", f"inputs={image}", f"out={tmp_path / 'pred'}"], capsys)
    assert code == 0, err
    assert len((tmp_path / "pred" / "predictions.csv").read_text().splitlines()) == 2
    code, out, err = cli_in_process(["export", f"ckpt={run}", f"out={tmp_path / 'export'}"], capsys)
    assert code == 0, err
    assert "outputs match the eager model" in out
    code, _, err = cli_in_process(
        ["predict", f"ckpt={tmp_path / 'export' / 'model.pt2'}", f"inputs={image}", f"out={tmp_path / 'pred2'}"], capsys
    )
    assert code == 0, err
    top = [(tmp_path / d / "predictions.csv").read_text().splitlines()[1].split(",")[1] for d in ("pred", "pred2")]
    assert top[0] == top[1]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_fine_tuning_from_a_local_file_keeps_the_frozen_backbone(suffix, tmp_path):
    """model.weights=<file> (the offline stand-in for pretrained=true): the backbone loads from the file and,
    frozen, ends the run unchanged, BatchNorm statistics included; the head of another class count is new."""
    import timm

    source = timm.create_model("resnet10t", in_chans=1, num_classes=5)  # "pretrained" on 5 classes
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)  # not what a fresh model starts from
    state = source.state_dict()
    weights = tmp_path / f"resnet10t{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    else:
        torch.save(state, weights)
    proc = run_cli(
        ["fit", "model=timm", "model.arch=resnet10t", f"model.weights={weights}", "model.freeze_backbone=true", *FIT],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = run_dirs(tmp_path)
    trained = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    head = {k for k in trained if k.startswith("fc.")}  # timm's get_classifier() of a ResNet
    assert head == {"fc.weight", "fc.bias"} and trained["fc.weight"].shape == (10, 512)
    for key, value in state.items():
        if key not in head:
            assert torch.equal(trained[key], value), key


def test_the_head_is_the_one_timm_names(tmp_path):
    from cnntrain.config import ModelConfig
    from cnntrain.models import build_model, head_module

    model = build_model(ModelConfig(name="timm", arch="mobilenetv3_small_050"), 1, (32, 32), 7)
    assert head_module(model) is model.get_classifier()
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)


def test_the_backbone_learning_rate_scale_spares_timms_head():
    from cnntrain.config import ModelConfig, OptimizerConfig
    from cnntrain.models import build_model
    from cnntrain.optim import param_groups

    cfg = ModelConfig(name="timm", arch="resnet10t", backbone_lr_scale=0.1)
    model = build_model(cfg, 1, (28, 28), 10)
    head = {id(p) for p in model.get_classifier().parameters()}
    for group in param_groups(model, OptimizerConfig(lr=1e-3), cfg):
        is_head = all(id(p) in head for p in group["params"])
        assert group["lr"] == pytest.approx(1e-3 if is_head else 1e-4)
        assert is_head or not any(id(p) in head for p in group["params"])


def test_list_model_shows_a_sample_of_timm(capsys):
    code, out, err = cli_in_process(["list", "model"], capsys)
    assert code == 0, err
    text = " ".join(out.split())
    assert "model=timm model.arch=NAME" in text and "resnet10t" in text and "timm.list_models(" in text


def test_rgb_weights_are_adapted_to_grayscale(tmp_path):
    """A 3-channel file (what published ImageNet weights are) into a 1-channel model: the stem is averaged."""
    import timm

    from cnntrain.config import ModelConfig
    from cnntrain.models import build_model

    torch.save(timm.create_model("resnet10t", num_classes=1000).state_dict(), tmp_path / "rgb.pth")
    model = build_model(ModelConfig(name="timm", arch="resnet10t", weights=str(tmp_path / "rgb.pth")), 1, (28, 28), 10)
    assert model.conv1[0].weight.shape[1] == 1
    assert np.isfinite(model.eval()(torch.zeros(1, 1, 28, 28)).detach().numpy()).all()
