"""Name -> builder tables for every pluggable piece: datasets, models, optimizers, schedulers, augmentations.

Each builder registers itself where it is defined::

    @MODELS.register("simple_cnn")
    def simple_cnn(cfg, in_channels, image_size, num_classes): ...

so adding one touches one file. A config names a builder by its registry key (``model.name``,
``optimizer.name``, ...); an unknown name is one error line that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from cnntrain.errors import unknown_choice


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._builders[name] = builder
            return builder

        return add

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._builders[name]
        except KeyError:
            raise unknown_choice(self.kind, name, sorted(self._builders)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


DATASETS = Registry("dataset")  # (DatasetConfig) -> ImageData
MODELS = Registry("model")  # (ModelConfig, in_channels, image_size, num_classes) -> nn.Module
OPTIMIZERS = Registry("optimizer")  # (param_groups, OptimizerConfig) -> torch.optim.Optimizer
SCHEDULERS = Registry("scheduler")  # (SchedulerConfig, base_lr, steps_per_epoch, epochs) -> lr factor of the step
AUGMENTATIONS = Registry("augmentation")  # (AugmentConfig) -> a batch transform, or None when it is off
