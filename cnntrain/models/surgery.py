"""Working on a built model: its classifier head, freezing the backbone, loading weights, counting parameters."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from cnntrain.errors import UserError

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def find_head(model: nn.Module) -> nn.Module | None:
    """The classifier layer: the module named by model.head_name, else a `head` attribute, else the last
    nn.Linear; None when the model has none of them."""
    model = unwrap(model)
    name = getattr(model, "head_name", None)
    if name:
        return model.get_submodule(name)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return head
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


def head_module(model: nn.Module) -> nn.Module:
    """The classifier layer (see find_head); a model without one is an error here."""
    head = find_head(model)
    if head is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no recognisable classifier head")
    return head


def _head_prefix(model: nn.Module) -> str | None:
    model = unwrap(model)
    head = find_head(model)
    if head is None:
        return None
    return next(n for n, m in model.named_modules() if m is head) + "."


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classifier head (trained from scratch when fine-tuning)."""
    return list(head_module(model).parameters())


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All parameters except the head's."""
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) the backbone; the head always stays trainable."""
    for p in backbone_parameters(model):
        p.requires_grad_(trainable)
    for p in head_parameters(model):
        p.requires_grad_(True)


def freeze_norm_stats(model: nn.Module) -> int:
    """Put the norm layers of a frozen backbone in eval mode; returns how many. Call after model.train().

    A frozen BatchNorm in train mode still normalises with batch statistics and updates its running
    mean and variance, so the "frozen" backbone would drift towards the new data. A norm layer counts
    as frozen when its own parameters are (or, without affine parameters, when the whole backbone is).
    """
    model = unwrap(model)
    head = {id(m) for m in head_module(model).modules()}
    backbone_frozen: bool | None = None
    count = 0
    for m in model.modules():
        if not isinstance(m, nn.modules.batchnorm._NormBase) or id(m) in head:
            continue
        params = list(m.parameters(recurse=False))
        if params:
            frozen = not any(p.requires_grad for p in params)
        else:
            if backbone_frozen is None:
                backbone_frozen = not any(p.requires_grad for p in backbone_parameters(model))
            frozen = backbone_frozen
        if frozen:
            m.eval()
            count += 1
    return count


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, trainable and frozen."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- weights


def _strip_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    # Files saved from a torch.compile or DataParallel wrapper carry a prefix on every key.
    for prefix in ("_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in model_keys):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"model.weights={path}: no such file")
    if file.suffix == ".safetensors":  # what the Hugging Face Hub (timm's weights among them) publishes
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except Exception as err:  # SafetensorError: truncated, bad header
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"model.weights={path}: cannot read it as a safetensors file ({first})") from None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors all mean "unreadable"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"model.weights={path}: cannot read it as a torch state_dict ({first})") from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):  # a cnntrain (or similar) checkpoint
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"model.weights={path}: holds no state_dict (a dict of tensors, or a checkpoint with 'model')")
    return {str(k): v for k, v in obj.items()}


def _examples(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load_weights(model: nn.Module, path: str, label: str) -> list[str]:
    """Load a local state_dict; head tensors that do not fit are skipped. Returns the skipped keys."""
    target = model.state_dict()
    state = _strip_prefix(_read_state_dict(path), set(target))
    prefix = _head_prefix(model)

    def is_head(key: str) -> bool:
        return prefix is not None and key.startswith(prefix)

    conv = first_conv_key(unwrap(model))
    if conv in state and conv in target:
        have, want = state[conv].shape, target[conv].shape
        if have[1] != want[1] and have[:1] + have[2:] == want[:1] + want[2:]:
            # e.g. ImageNet RGB weights for grayscale data, as with model.pretrained.
            log.info("model.weights=%s: %s adapted from %d to %d input channels", path, conv, have[1], want[1])
            state[conv] = rechannel(state[conv].float(), want[1]).to(state[conv].dtype)

    skipped, problems, load = [], [], {}
    for key, value in state.items():
        fits = key in target and tuple(target[key].shape) == tuple(value.shape)
        if fits:
            load[key] = value
        elif is_head(key):
            skipped.append(key)
        elif key in target:
            problems.append(f"{key} {list(value.shape)} vs {list(target[key].shape)}")
        else:
            problems.append(f"unexpected {key}")
    missing = [k for k in target if k not in state and not is_head(k) and not k.endswith("num_batches_tracked")]
    problems += [f"missing {k}" for k in missing]
    if problems:
        raise UserError(
            f"model.weights={path} does not match model {label} ({len(problems)} backbone tensors differ: "
            f"{_examples(problems)}); was it saved from another architecture or channel count?"
        )
    model.load_state_dict(load, strict=False)
    log.info("model.weights=%s: %d tensors loaded into %s", path, len(load), label)
    fresh = [k for k in target if is_head(k) and k not in load]
    if fresh:
        log.warning(
            "model.weights=%s: head tensors %s do not fit this model (another class count?); "
            "the head starts from scratch",
            path,
            _examples(skipped or fresh),
        )
    return skipped


def rechannel(kernel: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-conv kernel for another input channel count.

    Averages over the old input channels and rescales, so an image whose channels are all
    equal gives the same response as before (for one channel: the sum of the RGB kernels).
    """
    mean = kernel.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (kernel.shape[1] / in_channels)


def first_conv_key(model: nn.Module) -> str | None:
    name = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    return None if name is None else f"{name}.weight"
