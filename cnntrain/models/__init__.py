"""Models: a config -> an nn.Module for the dataset's input shape and class count.

Builders register themselves in cnntrain.registry.MODELS (zoo.py: the CNNs and ResNets written here;
torchvision.py: any torchvision classifier; timm.py: any timm architecture (optional extra); custom.py: the user's own class or factory, by dotted
path or installed plug-in). build_model checks the result runs on the dataset's images, loads
weights and freezes what is asked.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from cnntrain.config import ModelConfig, own_keys
from cnntrain.errors import UserError
from cnntrain.models import custom, zoo
from cnntrain.models import timm as timm_models  # noqa: F401 - registers model=timm; timm itself loads on use
from cnntrain.models import torchvision as tv
from cnntrain.models.surgery import (
    backbone_parameters,
    count_parameters,
    find_head,
    freeze_norm_stats,
    head_module,
    head_parameters,
    load_weights,
    set_backbone_trainable,
)
from cnntrain.registry import MODELS

__all__ = [
    "backbone_parameters",
    "build_model",
    "count_parameters",
    "find_head",
    "freeze_norm_stats",
    "chosen_label",
    "head_module",
    "head_parameters",
    "model_label",
    "set_backbone_trainable",
]

log = logging.getLogger(__name__)

# Keys of `model` that configure the architecture itself: passed to the builder when its signature
# names them. Any other key (name, weights, freezing, backbone lr) is handled here, for every model.
ARCH_KEYS = ("arch", "width", "hidden", "dropout", "pretrained")


def builder_kwargs(cfg: ModelConfig, builder: Any, name: str) -> dict[str, Any]:
    """The architecture keys the user set, as keyword arguments; a set key the builder does not take is refused."""
    params = inspect.signature(builder).parameters
    defaults = ModelConfig()
    kwargs: dict[str, Any] = {}
    for key in ARCH_KEYS:
        value = getattr(cfg, key)
        if key in params:
            if value is not None:
                kwargs[key] = value
        elif value != getattr(defaults, key):
            takes = [k for k in ARCH_KEYS if k in params]
            raise UserError(
                f"model.{key}={value} does not apply to model {name} (it takes: {', '.join(takes)}); remove it"
            )
    return kwargs


def _try_forward(model: nn.Module, in_channels: int, size: tuple[int, int], batch: int) -> tuple[Any, Exception | None]:
    try:
        return model(torch.zeros(batch, in_channels, *size)), None
    except (RuntimeError, ValueError, AssertionError, IndexError) as err:
        return None, err


def _forward_ok(model: nn.Module, in_channels: int, size: int) -> bool:
    return _try_forward(model, in_channels, (size, size), 1)[1] is None


def _smallest_size(model: nn.Module, in_channels: int, limit: int = 512) -> int | None:
    """The smallest square input the model accepts (None if none up to limit); call under no_grad/eval."""
    hi = 1
    while not _forward_ok(model, in_channels, hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2  # fails (or 0); hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _forward_ok(model, in_channels, mid):
            hi = mid
        else:
            lo = mid
    return hi


def check_shapes(model: nn.Module, label: str, in_channels: int, image_size: tuple[int, int], num_classes: int) -> None:
    """Run a zero batch so a wrong input size fails now, with a UserError, not mid-training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out, err = _try_forward(model, in_channels, image_size, 2)
            if err is not None:
                minimum = _smallest_size(model, in_channels)
                h, w = image_size
                if minimum is not None and (h < minimum or w < minimum):
                    raise zoo.too_small(label, minimum, image_size) from None
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UserError(f"model {label} cannot run on {in_channels}x{h}x{w} images: {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model {label} gives outputs of shape {shape} for a batch of 2; expected (2, {num_classes})")


def model_label(cfg: ModelConfig) -> str:
    """How a model config is named in messages and tables: resnet8, torchvision/resnet18, mynets.TinyNet."""
    if cfg.name == "custom" and cfg._target_:
        return str(cfg._target_)
    plugin = MODELS.plugin(cfg.name)
    if plugin is not None:
        return plugin.label
    return f"{cfg.name}{'/' + cfg.arch if cfg.arch else ''}"


def chosen_label(option: str | None, label: str) -> str:
    """The option the user chose, with the architecture it builds where the two differ:
    `tiny_cnn (simple_cnn)`, `resnet8`, `torchvision/resnet18`, `mynets.TinyNet`."""
    if not option or option == "custom" or label.split("/")[0] == option:
        return label
    return f"{option} ({label})"


def model_source(cfg: ModelConfig) -> dict[str, Any]:
    """Where a custom or plug-in model's code came from, for the checkpoint's record (empty for built-ins)."""
    import sys

    if cfg.name == "custom" and cfg._target_:
        target = str(cfg._target_).replace(":", ".")
        parts = target.split(".")
        for i in range(len(parts) - 1, 0, -1):
            module = sys.modules.get(".".join(parts[:i]))
            if module is not None:
                return {
                    "target": str(cfg._target_),
                    "module": module.__name__,
                    "module_file": getattr(module, "__file__", None),
                }
        return {"target": str(cfg._target_)}
    plugin = MODELS.plugin(cfg.name)
    if plugin is not None:
        return {"plugin": plugin.value, "package": plugin.package, "package_version": plugin.version}
    return {}


def _construct(cfg: ModelConfig, in_channels: int, image_size: tuple[int, int], num_classes: int) -> nn.Module:
    own = own_keys(cfg, ModelConfig)
    if cfg.name == "custom":
        return custom.custom(
            in_channels, image_size, num_classes, _target_=cfg._target_, **custom.user_kwargs(cfg, own)
        )
    if cfg.name not in MODELS and MODELS.plugin(cfg.name) is not None:
        return custom.build_plugin(cfg.name, cfg, own, in_channels, image_size, num_classes)
    if cfg.name not in MODELS and cfg.name in tv.torchvision_names():
        raise UserError(
            f"unknown model '{cfg.name}'; torchvision architectures are used as model=torchvision model.arch={cfg.name}"
        )
    builder = MODELS.get(cfg.name)
    if own:
        key, value = next(iter(own.items()))
        raise UserError(
            f"model.{key}={value} does not apply to model {cfg.name}, a built-in model (keys of your "
            f"own go with model=custom or an installed plug-in); remove it"
        )
    return builder(in_channels, image_size, num_classes, **builder_kwargs(cfg, builder, cfg.name))


def _check_head_options(cfg: ModelConfig, model: nn.Module, label: str) -> None:
    """Freezing and a separate backbone lr need a classifier layer; say so in one line when there is none."""
    if find_head(model) is not None:
        return
    for key, value, active in (
        ("freeze_backbone", "true", cfg.freeze_backbone),
        ("backbone_lr_scale", cfg.backbone_lr_scale, cfg.backbone_lr_scale != 1.0),
    ):
        if active:
            raise UserError(
                f"model.{key}={value} does not apply to model {label}: it has no classifier layer "
                "(a `head` attribute or an nn.Linear) to tell from the backbone; remove it or give "
                "the model a `head` attribute"
            )


def build_model(cfg: ModelConfig, in_channels: int, image_size: tuple[int, int], num_classes: int) -> nn.Module:
    """Build cfg.name for the dataset's input, check it runs, load cfg.weights, freeze if asked."""
    image_size = (int(image_size[0]), int(image_size[1]))
    model = _construct(cfg, in_channels, image_size, num_classes)
    label = getattr(model, "cnntrain_label", None) or model_label(cfg)
    check_shapes(model, label, in_channels, image_size, num_classes)
    _check_head_options(cfg, model, label)
    if cfg.weights:
        load_weights(model, cfg.weights, label)
    if cfg.freeze_backbone:
        set_backbone_trainable(model, False)
    return model
