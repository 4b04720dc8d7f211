"""Small models with known weights for the training-aid and fine-tuning tests.

A model trained for a few dozen steps in the test process (a second or two) and saved as a plain
state_dict: a known starting point for `model.weights=<file>`, confident enough that label
smoothing visibly changes its loss, and with BatchNorm statistics that are not the defaults.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cnntrain.config import DatasetConfig, ModelConfig
from cnntrain.data import load_dataset
from cnntrain.data.images import ImageData
from cnntrain.engine.inputs import Normalise
from cnntrain.models import build_model

# What experiment=smoke trains (configs/model/tiny_cnn.yaml) and a BatchNorm model of the same size.
TINY = {"name": "simple_cnn", "width": 8, "hidden": 16}
TINY_BN = {"name": "simple_cnn_bn", "width": 8, "hidden": 16, "dropout": 0.0}
# The overrides that make `fit` build TINY_BN.
TINY_BN_OVERRIDES = ["model=simple_cnn_bn", "model.width=8", "model.hidden=16", "model.dropout=0"]


def inputs(data: ImageData, x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> what the model sees, as the training loop makes it."""
    return Normalise.of(data.mean, data.std, x.device).from_uint8(x)


def smoke_data() -> ImageData:
    """The data of experiment=smoke (embedded digits, 1,000 training images)."""
    return load_dataset(DatasetConfig(subset=1000))


def pretrain(path: Path, model_kw: dict, steps: int = 60, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train model_kw on the embedded digits for `steps` Adam steps, save its state_dict to path."""
    threads = torch.get_num_threads()
    # One thread: these models are tiny, and on a busy machine the thread pool's spinning costs 100x.
    torch.set_num_threads(1)
    try:
        return _pretrain(path, model_kw, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _pretrain(path: Path, model_kw: dict, steps: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    data = load_dataset(DatasetConfig())
    model = build_model(ModelConfig(**model_kw), data.channels, data.image_size, data.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(data.train_x), (64,), generator=g)
        loss = F.cross_entropy(model(inputs(data, data.train_x[idx])), data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, path)
    return state


def load_model(model_kw: dict, state: dict[str, torch.Tensor], data: ImageData) -> torch.nn.Module:
    model = build_model(ModelConfig(**model_kw), data.channels, data.image_size, data.num_classes)
    model.load_state_dict(state)
    return model.eval()
