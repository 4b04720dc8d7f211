"""Your own network: any nn.Module class or factory, named by a dotted path (model=custom
model._target_=mynets.TinyNet) or by an installed plug-in's entry point (model=<its name>).

The callable gets the dataset's ``in_channels``, ``num_classes`` and ``image_size`` ((H, W)) when
its signature names them, and the model keys the user set (built-in ones such as model.width, and
keys of its own: +model.depth=3) as keyword arguments. model.dropout works even when the callable
does not take it: dropout is then applied to the input of the classifier layer (the `head`
attribute, else the last nn.Linear), in training only.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnntrain.config import ModelConfig
from cnntrain.errors import UserError
from cnntrain.models.surgery import find_head
from cnntrain.registry import MODELS, import_target

# What the dataset decides; passed only to a callable whose signature names them.
DATASET_ARGS = ("in_channels", "image_size", "num_classes")
# Model keys handled by cnntrain for every model, never passed to the callable.
CNNTRAIN_KEYS = ("name", "_target_", "weights", "freeze_backbone", "unfreeze_epoch", "backbone_lr_scale")


class InputDropout:
    """A forward pre-hook: dropout on a layer's input in training mode (model.dropout for a custom model)."""

    def __init__(self, p: float) -> None:
        self.p = float(p)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self.p > 0 and module.training and args and isinstance(args[0], torch.Tensor):
            return (F.dropout(args[0], self.p, True), *args[1:])
        return None


def _parameters(fn: Any) -> tuple[dict[str, inspect.Parameter], bool] | None:
    """The keyword-capable parameters of a class or function, and whether it takes **kwargs."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: pass nothing it did not ask for
    params = {n: p for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return params, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def user_kwargs(cfg: ModelConfig, own: dict[str, Any]) -> dict[str, Any]:
    """The model keys the user set for a custom model: built-in ones that differ from the schema's
    defaults (so the callable's own defaults hold otherwise), and the keys of its own."""
    defaults = ModelConfig()
    out = {
        key: getattr(cfg, key)
        for key in ("arch", "width", "hidden", "dropout", "pretrained")
        if getattr(cfg, key) != getattr(defaults, key)
    }
    out.update(own)
    return out


def instantiate(
    fn: Any,
    label: str,
    key: str,
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int,
    kwargs: dict[str, Any],
) -> nn.Module:
    """Call the user's class or factory with what its signature takes; refuse, in one line, what it does not."""
    if not callable(fn):
        raise UserError(f"{key}: {label} is a {type(fn).__name__}, not an nn.Module class or a function")
    found = _parameters(fn)
    params, var_kw = found if found is not None else ({}, True)
    given = {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes}
    call = {k: v for k, v in given.items() if k in params}
    dropout = None
    for k, v in kwargs.items():
        if k in params or var_kw:
            call[k] = v
        elif k == "dropout":
            dropout = v  # applied to the classifier's input below
        else:
            takes = [p for p in params if p not in DATASET_ARGS]
            raise UserError(
                f"model.{k}={v} is not an argument of {label} (it takes: "
                f"{', '.join(takes) or 'no keyword arguments'}); remove it or add it to the signature"
            )
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in call]
    if missing:
        raise UserError(
            f"{label} needs the argument{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
            f"set {' '.join(f'+model.{m}=...' for m in missing)} (or give it a default)"
        )
    model = fn(**call)
    if not isinstance(model, nn.Module):
        raise UserError(f"{key}: {label} returned a {type(model).__name__}, not a torch.nn.Module")
    if dropout:
        head = find_head(model)
        if head is None:
            raise UserError(
                f"model.dropout={dropout} does not apply to {label}: it takes no dropout argument and "
                "has no classifier layer (a `head` attribute or an nn.Linear) to put dropout before; "
                "remove it or add a dropout argument"
            )
        head.register_forward_pre_hook(InputDropout(dropout))
    return model


@MODELS.register("custom")
def custom(
    in_channels: int, image_size: tuple[int, int], num_classes: int, _target_: str | None = None, **kwargs: Any
) -> nn.Module:
    """model=custom: the nn.Module class or factory that model._target_ names, with the user's model keys."""
    fn = import_target(_target_, "model._target_")
    return instantiate(fn, str(_target_), "model._target_", in_channels, image_size, num_classes, kwargs)


def build_plugin(
    name: str, cfg: ModelConfig, own: dict[str, Any], in_channels: int, image_size: tuple[int, int], num_classes: int
) -> nn.Module:
    """model=<plug-in name>: the callable an installed package's entry point names, like a _target_."""
    fn, plugin = MODELS.load_plugin(name)
    return instantiate(fn, plugin.label, f"model={name}", in_channels, image_size, num_classes, user_kwargs(cfg, own))
