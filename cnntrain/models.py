"""Model registry: small CNNs written here, CIFAR-style ResNets, and any torchvision classifier.

Every builder takes ``(cfg, in_channels, image_size, num_classes)`` from the dataset, so no
model hard-codes its input. Each model names its classifier head (``model.head_name``), the
one layer that depends on the class count; everything else is the backbone, which can be
frozen or trained at a lower learning rate when fine-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnntrain.config import ModelConfig
from cnntrain.errors import UserError, unknown_choice

log = logging.getLogger(__name__)

Builder = Callable[[ModelConfig, int, tuple[int, int], int], nn.Module]


class Classifier(nn.Linear):
    """A linear head that applies dropout to its input first.

    Dropout lives inside the layer (not in a Sequential) so the state_dict keys are
    ``<head>.weight`` / ``<head>.bias`` with or without dropout, and weights move freely
    between runs that differ only in model.dropout.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", dropout={self.dropout}" if self.dropout > 0 else "")


class ConvClassifier(nn.Conv2d):
    """The same for networks whose head is a convolution (torchvision's SqueezeNet)."""

    def __init__(self, template: nn.Conv2d, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__(
            template.in_channels, out_channels, template.kernel_size, template.stride, template.padding,
            template.dilation, 1, template.bias is not None, template.padding_mode,
        )
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return super().forward(x)


# --------------------------------------------------------------------------- helpers


def _width(cfg: ModelConfig, default: int) -> int:
    width = cfg.width if cfg.width is not None else default
    if width < 1:
        raise UserError(f"model.width={width} must be at least 1 (or null for the default, {default})")
    return int(width)


def _hidden(cfg: ModelConfig) -> int:
    if cfg.hidden < 1:
        raise UserError(f"model.hidden={cfg.hidden} must be at least 1")
    return int(cfg.hidden)


def _too_small(label: str, minimum: int, image_size: tuple[int, int]) -> UserError:
    h, w = image_size
    return UserError(
        f"model {label} needs images of at least {minimum}x{minimum} pixels; the dataset gives {h}x{w} "
        "(resize the images or pick a model that downsamples less)"
    )


# A flatten head needs the spatial size after the convolutions. Each op is
# ("conv", kernel, padding) or ("pool", size); None means the input is too small.
Ops = tuple[tuple, ...]


def _spatial(size: int, ops: Ops) -> int | None:
    for op in ops:
        size = size + 2 * op[2] - op[1] + 1 if op[0] == "conv" else size // op[1]
        if size < 1:
            return None
    return size


def _min_spatial(ops: Ops) -> int:
    return next(s for s in range(1, 4097) if _spatial(s, ops) is not None)


def _flat_features(label: str, channels: int, image_size: tuple[int, int], ops: Ops) -> int:
    h, w = (_spatial(s, ops) for s in image_size)
    if h is None or w is None:
        raise _too_small(label, _min_spatial(ops), image_size)
    return channels * h * w


# --------------------------------------------------------------------------- simple CNNs


class SimpleCNN(nn.Module):
    """The seed's Keras model: 3 unpadded 3x3 convs (w, 2w, 2w), two max-pools, dense, head."""

    head_name = "head"
    OPS: Ops = (("conv", 3, 0), ("pool", 2), ("conv", 3, 0), ("pool", 2), ("conv", 3, 0))

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int,
                 width: int = 32, hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        flat = _flat_features("simple_cnn", 2 * width, image_size, self.OPS)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3), nn.ReLU(),
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU())
        self.head = Classifier(hidden, num_classes, dropout)
        # Keras defaults (Glorot-uniform kernels, zero biases), so training matches the seed.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.features(x)))


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class SimpleCNNBN(nn.Module):
    """Three padded 3x3 conv+BN+ReLU stages (w, 2w, 4w), max-pooled to 3x3, dense, dropout head.

    The last pool is adaptive, so any input of at least 4x4 gives the same flatten size.
    """

    head_name = "head"

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, hidden: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, width), nn.MaxPool2d(2),
            _conv_bn(width, 2 * width), nn.MaxPool2d(2),
            _conv_bn(2 * width, 4 * width), nn.AdaptiveMaxPool2d(3),
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 9, hidden), nn.ReLU())
        self.head = Classifier(hidden, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.features(x)))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling instead of tanh and subsampling.

    The first conv pads by 2, so a 28x28 image plays the part of the original 32x32 input;
    C5 is a dense layer over the flattened 16-channel map, sized from the image.
    """

    head_name = "head"
    OPS: Ops = (("conv", 5, 2), ("pool", 2), ("conv", 5, 0), ("pool", 2))

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int,
                 width: int = 6, dropout: float = 0.0) -> None:
        super().__init__()
        c1, c3 = width, 16 * width // 6
        flat = _flat_features("lenet5", c3, image_size, self.OPS)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c3, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.head = Classifier(84, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.features(x)))


# --------------------------------------------------------------------------- ResNets


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by striding and zero-pad the new channels (no parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = c_out - c_in, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = PadShortcut(c_in, c_out, stride) if (stride > 1 or c_in != c_out) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Out-of-place add and ReLU: safe on channels_last views and under autocast.
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, section 4.2), option-A shortcuts."""

    head_name = "head"

    def __init__(self, n: int, in_channels: int, num_classes: int, width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        layers: list[nn.Module] = [_conv_bn(in_channels, width)]
        c_in = width
        for stage, c_out in enumerate(widths):
            for i in range(n):
                layers.append(BasicBlock(c_in, c_out, 2 if (stage > 0 and i == 0) else 1))
                c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = Classifier(c_in, num_classes, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Residual(nn.Module):
    """x + two conv-BN-ReLU layers, as in ResNet-9."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """The fast-CIFAR-10 "ResNet-9": prep w, layer1 2w + residual, layer2 4w, layer3 8w + residual."""

    head_name = "head"

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w),
            _conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w),
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
            # Global max-pool instead of the original fixed 4x4 pool: works for any size >= 8.
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = Classifier(8 * w, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- torchvision


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def torchvision_names() -> list[str]:
    """The classification architectures torchvision offers (no detection/segmentation/video)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _adapt_first_conv(model: nn.Module, in_channels: int, pretrained: bool) -> None:
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, conv.bias is not None, conv.padding_mode,
    )
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(_rechannel(conv.weight, in_channels))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    _set_submodule(model, name, new)


def _rechannel(kernel: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-conv kernel for another input channel count.

    Averages over the old input channels and rescales, so an image whose channels are all
    equal gives the same response as before (for one channel: the sum of the RGB kernels).
    """
    mean = kernel.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (kernel.shape[1] / in_channels)


def _first_conv_key(model: nn.Module) -> str | None:
    name = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    return None if name is None else f"{name}.weight"


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
        name, old = convs[-1]
        new = ConvClassifier(old, num_classes, dropout)
    _set_submodule(model, name, new)
    return name


def build_torchvision(cfg: ModelConfig, in_channels: int, image_size: tuple[int, int], num_classes: int) -> nn.Module:
    """Any torchvision classifier, named by model.arch, adapted to the dataset's channels and classes."""
    from torchvision.models import get_model

    arch = cfg.arch
    names = torchvision_names()
    if not arch:
        raise UserError("model.name=torchvision needs model.arch, the torchvision architecture (e.g. model.arch=resnet18)")
    if arch not in names:
        raise unknown_choice("torchvision architecture (model.arch)", arch, names)
    label = f"torchvision {arch}"
    if cfg.width is not None:
        log.warning("model.width is ignored for torchvision models (%s)", arch)
    kwargs: dict[str, Any] = {}
    if arch in ("googlenet", "inception_v3"):
        if in_channels != 3:
            kwargs["transform_input"] = False  # it assumes RGB channels
        if not cfg.pretrained:
            kwargs["init_weights"] = True  # torchvision warns unless this is explicit
    h, w = image_size
    # These tie their shapes to one input size, which published weights fix at 224.
    if arch.startswith("vit_") and not cfg.pretrained and h == w:
        kwargs["image_size"] = h
    if arch.startswith("maxvit") and not cfg.pretrained:
        kwargs["input_size"] = (h, w)
    try:
        model = get_model(arch, weights="DEFAULT" if cfg.pretrained else None, **kwargs)
    except (OSError, RuntimeError) as err:
        if not cfg.pretrained:
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
    _adapt_first_conv(model, in_channels, cfg.pretrained)
    model.head_name = _replace_head(model, label, num_classes, cfg.dropout)
    model.cnntrain_label = label
    return model


# --------------------------------------------------------------------------- registry


MODELS: dict[str, Builder] = {
    "simple_cnn": lambda cfg, c, size, k: SimpleCNN(c, size, k, _width(cfg, 32), _hidden(cfg), cfg.dropout),
    "simple_cnn_bn": lambda cfg, c, size, k: SimpleCNNBN(c, k, _width(cfg, 32), _hidden(cfg), cfg.dropout),
    "lenet5": lambda cfg, c, size, k: LeNet5(c, size, k, _width(cfg, 6), cfg.dropout),
    "resnet8": lambda cfg, c, size, k: CifarResNet(1, c, k, _width(cfg, 16), cfg.dropout),
    "resnet20": lambda cfg, c, size, k: CifarResNet(3, c, k, _width(cfg, 16), cfg.dropout),
    "resnet9": lambda cfg, c, size, k: ResNet9(c, k, _width(cfg, 64), cfg.dropout),
    "torchvision": build_torchvision,
}


def _label(model: nn.Module, cfg: ModelConfig) -> str:
    return getattr(model, "cnntrain_label", cfg.name)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


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
                    raise _too_small(label, minimum, image_size) from None
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UserError(f"model {label} cannot run on {in_channels}x{h}x{w} images: {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model {label} gives outputs of shape {shape} for a batch of 2; expected (2, {num_classes})")


def head_module(model: nn.Module) -> nn.Module:
    """The classifier layer: the module named by model.head_name, else `head`, else the last Linear."""
    model = _unwrap(model)
    name = getattr(model, "head_name", None)
    if name:
        return model.get_submodule(name)
    if isinstance(getattr(model, "head", None), nn.Module):
        return model.head
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no recognisable classifier head")
    return linear[-1]


def _head_prefix(model: nn.Module) -> str:
    model = _unwrap(model)
    head = head_module(model)
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
    model = _unwrap(model)
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
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"model.weights={path}: no such file")
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
        return key.startswith(prefix)

    conv = _first_conv_key(_unwrap(model))
    if conv in state and conv in target:
        have, want = state[conv].shape, target[conv].shape
        if have[1] != want[1] and have[:1] + have[2:] == want[:1] + want[2:]:
            # e.g. ImageNet RGB weights for grayscale data, as with model.pretrained.
            log.info("model.weights=%s: %s adapted from %d to %d input channels", path, conv, have[1], want[1])
            state[conv] = _rechannel(state[conv].float(), want[1]).to(state[conv].dtype)

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
    fresh = [k for k in target if is_head(k) and k not in load]
    if fresh:
        log.warning(
            "model.weights=%s: head tensors %s do not fit this model (another class count?); "
            "the head starts from scratch", path, _examples(skipped or fresh),
        )
    return skipped


# --------------------------------------------------------------------------- entry point


def build_model(cfg: ModelConfig, in_channels: int, image_size: tuple[int, int], num_classes: int) -> nn.Module:
    """Build cfg.name for the dataset's input, check it runs, load cfg.weights, freeze if asked."""
    image_size = (int(image_size[0]), int(image_size[1]))
    builder = MODELS.get(cfg.name)
    if builder is None:
        if cfg.name in torchvision_names():
            raise UserError(
                f"unknown model '{cfg.name}'; torchvision architectures are used as "
                f"model=torchvision model.arch={cfg.name}"
            )
        raise unknown_choice("model", cfg.name, MODELS)
    if cfg.pretrained and cfg.name != "torchvision":
        log.warning("model.pretrained only applies to model=torchvision; use model.weights=<file> for %s", cfg.name)
    model = builder(cfg, in_channels, image_size, num_classes)
    label = _label(model, cfg)
    check_shapes(model, label, in_channels, image_size, num_classes)
    if cfg.weights:
        load_weights(model, cfg.weights, label)
    if cfg.freeze_backbone:
        set_backbone_trainable(model, False)
    return model
