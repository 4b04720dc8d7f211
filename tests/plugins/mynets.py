"""Models of the tests' own, used through model=custom model._target_=mynets.<name>."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """One 3x3 conv of `width` channels, global average pooling, and a linear classifier (the last nn.Linear)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 8, depth: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def tiny_factory(in_channels: int, image_size: tuple[int, int], num_classes: int, **kwargs) -> nn.Module:
    """A factory function that takes everything: records what it was given."""
    model = TinyNet(in_channels, num_classes, **kwargs)
    model.given = {"in_channels": in_channels, "image_size": tuple(image_size), "num_classes": num_classes, **kwargs}
    return model


class WrongOutputs(nn.Module):
    """Always 3 outputs, whatever the dataset's class count."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class NoHead(nn.Module):
    """Classifies with a 1x1 convolution: no nn.Linear and no `head` attribute."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


NOT_CALLABLE = 42
