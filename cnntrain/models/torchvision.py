"""Any torchvision classifier (model=torchvision model.arch=NAME), adapted to the dataset's channels and classes."""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import nn

from cnntrain.errors import UserError, unknown_choice
from cnntrain.models.surgery import rechannel
from cnntrain.models.zoo import Classifier, ConvClassifier
from cnntrain.registry import MODELS

log = logging.getLogger(__name__)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def torchvision_names() -> list[str]:
    """The classification architectures torchvision offers (no detection/segmentation/video)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


Pair = tuple[int, int]  # a conv's (height, width) sizes, as its constructor takes them


def _adapt_first_conv(model: nn.Module, in_channels: int, pretrained: bool) -> None:
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or name is None or conv.in_channels == in_channels:
        return
    # torch types a conv's sizes as tuple[int, ...], which its own constructor does not take
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        cast(Pair, conv.kernel_size),
        cast(Pair, conv.stride),
        cast("str | Pair", conv.padding),
        cast(Pair, conv.dilation),
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(rechannel(conv.weight, in_channels))
            if conv.bias is not None and new.bias is not None:
                new.bias.copy_(conv.bias)
    _set_submodule(model, name, new)


def _replace_head(model: nn.Module, label: str, num_classes: int, dropout: float) -> str:
    """Swap the last Linear (or, lacking one, the last Conv2d) for a fresh num_classes head."""
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        name, old = linear[-1]
        new: nn.Module = Classifier(old.in_features, num_classes, dropout, bias=old.bias is not None)
    else:
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise UserError(f"model {label}: cannot find a classifier layer to replace for {num_classes} classes")
        name, conv = convs[-1]
        new = ConvClassifier(conv, num_classes, dropout)
    _set_submodule(model, name, new)
    return name


@MODELS.register("torchvision")
def build_torchvision(
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int,
    arch: str | None = None,
    pretrained: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """Any torchvision classifier, named by model.arch, adapted to the dataset's channels and classes."""
    from torchvision.models import get_model

    names = torchvision_names()
    if not arch:
        raise UserError(
            "model.name=torchvision needs model.arch, the torchvision architecture (e.g. model.arch=resnet18)"
        )
    if arch not in names:
        raise unknown_choice("torchvision architecture (model.arch)", arch, names)
    label = f"torchvision {arch}"
    kwargs: dict[str, Any] = {}
    if arch in ("googlenet", "inception_v3"):
        if in_channels != 3:
            kwargs["transform_input"] = False  # it assumes RGB channels
        if not pretrained:
            kwargs["init_weights"] = True  # torchvision warns unless this is explicit
    h, w = image_size
    # These tie their shapes to one input size, which published weights fix at 224.
    if arch.startswith("vit_") and not pretrained and h == w:
        kwargs["image_size"] = h
    if arch.startswith("maxvit") and not pretrained:
        kwargs["input_size"] = (h, w)
    try:
        model = get_model(arch, weights="DEFAULT" if pretrained else None, **kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise UserError(
            f"model.pretrained=true: could not get the published weights of {arch} ({err}); "
            "download them once with internet access (torch hub cache), or pass a local file as model.weights"
        ) from None
    except (AssertionError, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"model {label} cannot be built for {h}x{w} images: {first}") from None
    if getattr(model, "aux_logits", False):
        # Auxiliary heads make forward return a tuple in train mode; the loop expects logits.
        # Dropped here because torchvision refuses aux_logits=False together with weights.
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    _adapt_first_conv(model, in_channels, pretrained)
    model.head_name = _replace_head(model, label, num_classes, dropout)
    model.cnntrain_label = label
    return model
