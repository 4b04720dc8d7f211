"""Any timm architecture (model=timm model.arch=NAME), built for the dataset's channels, classes and size.

timm (the optional extra `cnntrain[timm]`) builds the model itself from in_chans and num_classes, so no
surgery is needed here: its `get_classifier` names the head, which the zoo's transfer options (freezing,
backbone learning rate, head left out of a weights file of another class count) act on.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cnntrain.errors import UserError, did_you_mean
from cnntrain.registry import MODELS

TIMM_HINT = "pip install 'cnntrain[timm]'"
# A few small-to-medium families per kind of network, for `cnntrain list model`: the full list is ~1,300.
SAMPLE_PATTERNS = (
    "resnet1*",
    "resnet50*",
    "mobilenetv3_*",
    "mobilenetv4_conv_small*",
    "efficientnet_b[0-2]",
    "convnext_atto*",
    "convnext_tiny",
    "regnety_00*",
    "vit_tiny_patch16*",
    "deit_tiny*",
)


def timm_module() -> Any:
    """timm, or a one-line error saying how to install it."""
    try:
        import timm
    except ImportError:
        raise UserError(f"model=timm needs the timm package, which is not installed: {TIMM_HINT}") from None
    return timm


def sample(per_pattern: int = 3) -> list[str]:
    """A filtered sample of timm's architectures (small ones first within each family)."""
    timm = timm_module()
    names: list[str] = []
    for pattern in SAMPLE_PATTERNS:
        names += [n for n in timm.list_models(pattern)[:per_pattern] if n not in names]
    return names


def _head_name(model: nn.Module) -> str | None:
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


@MODELS.register("timm")
def build_timm(
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int,
    arch: str | None = None,
    pretrained: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """timm.create_model(arch) with the dataset's input channels and class count; pretrained=true loads the
    published weights through timm (Hugging Face Hub, cached), with the first conv and head adapted by timm."""
    timm = timm_module()
    if not arch:
        raise UserError(
            "model=timm needs model.arch, the timm architecture (e.g. model.arch=resnet10t); "
            "`cnntrain list model` shows a sample, timm.list_models('*pattern*') all of them"
        )
    names = timm.list_models()
    if arch.split(".")[0] not in names:  # "resnet10t.c3_in1k" names a weight tag of resnet10t
        # did-you-mean over timm's whole list; the list itself (~1,300 names) is too long for one line
        raise UserError(
            f"unknown timm architecture (model.arch) '{arch}'{did_you_mean(arch, names)}; "
            f"`cnntrain list model` shows a sample, timm.list_models('*{arch[:4]}*') all "
            "that match a pattern"
        )
    label = f"timm {arch}"
    h, w = image_size
    try:
        model = timm.create_model(
            arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, drop_rate=dropout
        )
    except Exception as err:  # Hub errors (offline, no weights for the tag) and timm's own asserts
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if pretrained:
            raise UserError(
                f"model.pretrained=true: could not get the published weights of timm {arch} "
                f"({first[:200]}); download them once with internet access (Hugging Face cache), or "
                "pass a local file as model.weights"
            ) from None
        raise UserError(f"model {label} cannot be built for {in_channels}x{h}x{w} images: {first[:200]}") from None
    head = _head_name(model)
    if head is not None:
        model.head_name = head
    model.cnntrain_label = label
    return model
