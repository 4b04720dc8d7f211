"""The architectures written here: the seed's CNN and its relatives, LeNet-5, CIFAR-style ResNets.

Every builder takes ``(in_channels, image_size, num_classes)`` from the dataset plus the keys of
``model`` it understands (width, hidden, dropout), so no model hard-codes its input; its keyword
defaults are the architecture's own (model.width=null means that default). Each model names its
classifier head (``head_name``), the one layer that depends on the class count.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from cnntrain.errors import UserError
from cnntrain.registry import MODELS

Pair = tuple[int, int]  # a conv's (height, width) sizes, as its constructor takes them


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
        # torch types a conv's sizes as tuple[int, ...], which its own constructor does not take
        super().__init__(
            template.in_channels,
            out_channels,
            cast(Pair, template.kernel_size),
            cast(Pair, template.stride),
            cast("str | Pair", template.padding),
            cast(Pair, template.dilation),
            1,
            template.bias is not None,
            template.padding_mode,
        )
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return super().forward(x)


# --------------------------------------------------------------------------- helpers


def too_small(label: str, minimum: int, image_size: tuple[int, int]) -> UserError:
    h, w = image_size
    return UserError(
        f"model {label} needs images of at least {minimum}x{minimum} pixels; the dataset gives {h}x{w} "
        "(resize the images or pick a model that downsamples less)"
    )


# A flatten head needs the spatial size after the convolutions. Each op is
# ("conv", kernel, padding) or ("pool", size); None means the input is too small.
Ops = tuple[tuple[Any, ...], ...]


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
        raise too_small(label, _min_spatial(ops), image_size)
    return channels * h * w


# --------------------------------------------------------------------------- simple CNNs


class SimpleCNN(nn.Module):
    """The seed's Keras model: 3 unpadded 3x3 convs (w, 2w, 2w), two max-pools, dense, head."""

    head_name = "head"
    OPS: Ops = (("conv", 3, 0), ("pool", 2), ("conv", 3, 0), ("pool", 2), ("conv", 3, 0))

    def __init__(
        self, in_channels: int, image_size: tuple[int, int], num_classes: int, width: int, hidden: int, dropout: float
    ) -> None:
        super().__init__()
        flat = _flat_features("simple_cnn", 2 * width, image_size, self.OPS)
        # The first ReLU runs after its pool: max and ReLU commute, values and gradients are the same, and it
        # touches a quarter of the largest map. Parameter names are unchanged.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3),
            nn.ReLU(),
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU())
        self.head = Classifier(hidden, num_classes, dropout)
        # Keras defaults (Glorot-uniform kernels, zero biases), so training matches the seed.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
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

    def __init__(self, in_channels: int, num_classes: int, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, width),
            nn.MaxPool2d(2),
            _conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn(2 * width, 4 * width),
            nn.AdaptiveMaxPool2d(3),
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

    def __init__(
        self, in_channels: int, image_size: tuple[int, int], num_classes: int, width: int, dropout: float
    ) -> None:
        super().__init__()
        c1, c3 = width, 16 * width // 6
        flat = _flat_features("lenet5", c3, image_size, self.OPS)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c3, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
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

    def __init__(self, n: int, in_channels: int, num_classes: int, width: int, dropout: float) -> None:
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

    def __init__(self, in_channels: int, num_classes: int, width: int, dropout: float) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            Residual(2 * w),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w),
            nn.MaxPool2d(2),
            Residual(8 * w),
            # Global max-pool instead of the original fixed 4x4 pool: works for any size >= 8.
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = Classifier(8 * w, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- registry
# The keyword defaults below are each architecture's own; model.width=null etc. means "this default".


@MODELS.register("simple_cnn")
def simple_cnn(
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int,
    width: int = 32,
    hidden: int = 64,
    dropout: float = 0.0,
) -> nn.Module:
    return SimpleCNN(in_channels, image_size, num_classes, width, hidden, dropout)


@MODELS.register("simple_cnn_bn")
def simple_cnn_bn(
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int,
    width: int = 32,
    hidden: int = 64,
    dropout: float = 0.0,
) -> nn.Module:
    return SimpleCNNBN(in_channels, num_classes, width, hidden, dropout)


@MODELS.register("lenet5")
def lenet5(
    in_channels: int, image_size: tuple[int, int], num_classes: int, width: int = 6, dropout: float = 0.0
) -> nn.Module:
    return LeNet5(in_channels, image_size, num_classes, width, dropout)


@MODELS.register("resnet8")
def resnet8(
    in_channels: int, image_size: tuple[int, int], num_classes: int, width: int = 16, dropout: float = 0.0
) -> nn.Module:
    return CifarResNet(1, in_channels, num_classes, width, dropout)


@MODELS.register("resnet20")
def resnet20(
    in_channels: int, image_size: tuple[int, int], num_classes: int, width: int = 16, dropout: float = 0.0
) -> nn.Module:
    return CifarResNet(3, in_channels, num_classes, width, dropout)


@MODELS.register("resnet9")
def resnet9(
    in_channels: int, image_size: tuple[int, int], num_classes: int, width: int = 64, dropout: float = 0.0
) -> nn.Module:
    return ResNet9(in_channels, num_classes, width, dropout)
