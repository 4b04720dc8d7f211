"""Models: a config -> an nn.Module for the dataset's input shape and class count.

Builders register themselves in cnntrain.registry.MODELS (zoo.py: the CNNs and ResNets written here;
torchvision.py: any torchvision classifier). build_model checks the result runs on the dataset's
images, loads weights and freezes what is asked.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from cnntrain.config import ModelConfig
from cnntrain.errors import UserError
from cnntrain.models import torchvision as tv
from cnntrain.models import zoo
from cnntrain.models.surgery import (
    backbone_parameters,
    count_parameters,
    freeze_norm_stats,
    head_module,
    head_parameters,
    load_weights,
    set_backbone_trainable,
)
from cnntrain.registry import MODELS

__all__ = ["backbone_parameters", "build_model", "count_parameters", "freeze_norm_stats", "head_module",
           "head_parameters", "set_backbone_trainable"]

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
            raise UserError(f"model.{key}={value} does not apply to model {name} (it takes: {', '.join(takes)}); "
                            f"remove it")
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




def build_model(cfg: ModelConfig, in_channels: int, image_size: tuple[int, int], num_classes: int) -> nn.Module:
    """Build cfg.name for the dataset's input, check it runs, load cfg.weights, freeze if asked."""
    image_size = (int(image_size[0]), int(image_size[1]))
    if cfg.name not in MODELS and cfg.name in tv.torchvision_names():
        raise UserError(f"unknown model '{cfg.name}'; torchvision architectures are used as "
                        f"model=torchvision model.arch={cfg.name}")
    builder = MODELS.get(cfg.name)
    model = builder(in_channels, image_size, num_classes, **builder_kwargs(cfg, builder, cfg.name))
    label = getattr(model, "cnntrain_label", cfg.name)
    check_shapes(model, label, in_channels, image_size, num_classes)
    if cfg.weights:
        load_weights(model, cfg.weights, label)
    if cfg.freeze_backbone:
        set_backbone_trainable(model, False)
    return model
