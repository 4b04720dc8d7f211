"""Models: shapes from the dataset, build-time size errors, weights loading, freezing, autocast."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from cnntrain.config import ModelConfig
from cnntrain.errors import UserError
from cnntrain.models import (
    backbone_parameters,
    build_model,
    count_parameters,
    head_parameters,
    set_backbone_trainable,
)
from cnntrain.registry import MODELS
from tests.conftest import needs

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"
# Every registered architecture; timm's only where its extra is installed.
EVERY_MODEL = [pytest.param(n, marks=needs("timm", "timm")) if n == "timm" else n for n in sorted(MODELS)]


def cfg_for(name: str, **kw) -> ModelConfig:
    if name == "torchvision":
        kw.setdefault("arch", "resnet18")
    if name == "timm":
        kw.setdefault("arch", "resnet10t")
    if name == "custom":  # the tests' own model module (tests/plugins/mynets.py)
        kw.setdefault("_target_", "tests.plugins.mynets.TinyNet")
    return ModelConfig(name=name, **kw)


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_simple_cnn_has_the_keras_seed_parameter_count():
    model = build_model(cfg_for("simple_cnn"), 1, (28, 28), 10)
    assert count_parameters(model) == 93_322
    # Frozen parameters still count.
    set_backbone_trainable(model, False)
    assert count_parameters(model) == 93_322


@pytest.mark.parametrize("name", EVERY_MODEL)
@pytest.mark.parametrize(("channels", "size", "classes"), [(1, 28, 10), (3, 32, 100)])
def test_every_model_fits_the_dataset_shape(name, channels, size, classes):
    model = build_model(cfg_for(name), channels, (size, size), classes)
    assert model.training, "build_model must hand back a model in train mode"
    assert eval_out(model, torch.rand(3, channels, size, size)).shape == (3, classes)


def test_every_model_has_a_yaml_config():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert set(MODELS) <= names
    for path in CONFIGS.glob("*.yaml"):
        text = path.read_text()
        assert text.startswith("# "), f"{path.name} needs a description comment first"
    assert "name: simple_cnn" in (CONFIGS / "tiny_cnn.yaml").read_text()


@pytest.mark.parametrize(("name", "size", "minimum"), [("simple_cnn", 8, 18), ("resnet9", 4, 8), ("lenet5", 11, 12)])
def test_too_small_images_fail_at_build_time_with_the_minimum(name, size, minimum):
    with pytest.raises(
        UserError, match=f"{name} needs images of at least {minimum}x{minimum} pixels; the dataset gives {size}x{size}"
    ):
        build_model(cfg_for(name), 1, (size, size), 10)
    build_model(cfg_for(name), 1, (minimum, minimum), 10)  # the stated minimum really works


def test_size_is_taken_from_the_dataset_not_hard_coded():
    a = build_model(cfg_for("simple_cnn"), 1, (28, 28), 10)
    b = build_model(cfg_for("simple_cnn"), 1, (40, 36), 10)
    assert count_parameters(a) != count_parameters(b)
    assert eval_out(b, torch.zeros(2, 1, 40, 36)).shape == (2, 10)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(UserError) as err:
        build_model(cfg_for("resnet21"), 1, (28, 28), 10)
    message = str(err.value)
    assert "unknown model 'resnet21'" in message
    assert all(name in message for name in MODELS)


def test_torchvision_architecture_used_as_model_name_points_to_arch():
    with pytest.raises(UserError, match="model=torchvision model.arch=resnet18"):
        build_model(cfg_for("resnet18"), 1, (28, 28), 10)


def test_torchvision_needs_a_known_arch():
    with pytest.raises(UserError, match="model.arch"):
        build_model(ModelConfig(name="torchvision"), 1, (28, 28), 10)
    with pytest.raises(UserError, match="did you mean 'resnet18'.*vgg11"):
        build_model(cfg_for("torchvision", arch="resnet1B"), 1, (28, 28), 10)


def test_torchvision_resnet18_adapts_to_grayscale_and_class_count():
    model = build_model(cfg_for("torchvision", arch="resnet18", dropout=0.2), 1, (32, 32), 7)
    assert model.conv1.in_channels == 1
    assert model.fc.out_features == 7
    assert {id(p) for p in head_parameters(model)} == {id(model.fc.weight), id(model.fc.bias)}
    assert eval_out(model, torch.rand(2, 1, 32, 32)).shape == (2, 7)


def test_pretrained_loads_published_weights_and_sums_rgb_kernels_for_grayscale(monkeypatch):
    import torchvision

    published = torchvision.models.resnet18()
    # Stand in for the download so the real pretrained path runs offline.
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", lambda self, *a, **k: published.state_dict())
    model = build_model(cfg_for("torchvision", arch="resnet18", pretrained=True), 1, (32, 32), 7)
    assert torch.allclose(model.conv1.weight, published.conv1.weight.sum(dim=1, keepdim=True), atol=1e-6)
    assert torch.equal(model.layer4[1].conv2.weight, published.layer4[1].conv2.weight)
    assert model.fc.out_features == 7
    gray = torch.rand(1, 1, 16, 16)
    # A gray image gives the same first-layer response as the same image in RGB did before.
    assert torch.allclose(model.conv1(gray), published.conv1(gray.expand(1, 3, 16, 16)), atol=1e-5)


def test_local_imagenet_style_weights_adapt_like_pretrained(tmp_path, caplog):
    import torchvision

    published = torchvision.models.resnet18()  # 3 channels, 1000 classes, as downloaded
    path = save_model(tmp_path, published)
    with caplog.at_level(logging.WARNING, logger="cnntrain.models.zoo"):
        model = build_model(cfg_for("torchvision", arch="resnet18", weights=str(path)), 1, (32, 32), 7)
    assert torch.allclose(model.conv1.weight, published.conv1.weight.sum(dim=1, keepdim=True), atol=1e-6)
    assert torch.equal(model.layer1[0].conv1.weight, published.layer1[0].conv1.weight)
    assert "fc.weight" in caplog.text and model.fc.out_features == 7


def save_model(tmp_path: Path, model: nn.Module, wrap: bool = False) -> Path:
    path = tmp_path / "weights.pt"
    state = model.state_dict()
    torch.save({"model": state, "epoch": 3} if wrap else state, path)
    return path


@pytest.mark.parametrize("wrap", [False, True], ids=["state_dict", "checkpoint"])
def test_weights_file_reproduces_the_saved_model(tmp_path, wrap):
    torch.manual_seed(1)
    src = build_model(cfg_for("simple_cnn_bn"), 1, (28, 28), 10)
    with torch.no_grad():  # non-default BN statistics must travel too
        src.features[0][1].running_mean.uniform_()
    path = save_model(tmp_path, src, wrap)
    torch.manual_seed(2)
    # Dropout does not change the keys, so it may differ between the runs.
    dst = build_model(cfg_for("simple_cnn_bn", weights=str(path), dropout=0.3), 1, (28, 28), 10)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(eval_out(src, x), eval_out(dst, x))


def test_weights_with_another_class_count_skip_the_head_only(tmp_path, caplog):
    src = build_model(cfg_for("resnet8"), 1, (28, 28), 10)
    path = save_model(tmp_path, src)
    with caplog.at_level(logging.WARNING, logger="cnntrain.models.zoo"):
        dst = build_model(cfg_for("resnet8", weights=str(path)), 1, (28, 28), 5)
    assert "head.weight" in caplog.text and "from scratch" in caplog.text
    for (key, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        if not key.startswith("head."):
            assert torch.equal(a, b), key
    assert dst.head.out_features == 5


def test_weights_from_another_backbone_are_refused(tmp_path):
    path = save_model(tmp_path, build_model(cfg_for("simple_cnn", width=16), 1, (28, 28), 10))
    with pytest.raises(UserError, match=rf"model.weights={path} does not match model simple_cnn"):
        build_model(cfg_for("simple_cnn", weights=str(path)), 1, (28, 28), 10)


def test_corrupt_or_missing_weights_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"this is not a torch file")
    with pytest.raises(UserError, match=f"model.weights={bad}: cannot read"):
        build_model(cfg_for("simple_cnn", weights=str(bad)), 1, (28, 28), 10)
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=f"model.weights={missing}: no such file"):
        build_model(cfg_for("simple_cnn", weights=str(missing)), 1, (28, 28), 10)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="holds no state_dict"):
        build_model(cfg_for("simple_cnn", weights=str(tmp_path / "list.pt")), 1, (28, 28), 10)


@pytest.mark.parametrize("name", ["simple_cnn", "resnet20", "torchvision"])
def test_freeze_backbone_leaves_only_the_head_trainable(name):
    model = build_model(cfg_for(name, freeze_backbone=True), 1, (32, 32), 10)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in head_parameters(model)}
    assert len(head_parameters(model)) + len(backbone_parameters(model)) == len(list(model.parameters()))
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", EVERY_MODEL)
def test_bf16_autocast_channels_last_training_step(name):
    torch.manual_seed(0)
    model = build_model(cfg_for(name, dropout=0.1), 3, (32, 32), 10).to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
