"""The optimizers as a user would notice them: which parameters get weight decay."""

from __future__ import annotations

import pytest
import torch

from cnntrain.config import ModelConfig, OptimizerConfig
from cnntrain.models import build_model
from cnntrain.optim import build_optimizer
from tests.pretrain import TINY_BN


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("decay_all", [False, True])
def test_weight_decay_spares_biases_and_norm_layers_unless_asked(optimizer, decay_all):
    """With a zero gradient, one step shrinks exactly the tensors that get weight decay."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_BN), 1, (28, 28), 10)
    cfg = OptimizerConfig(name=optimizer, lr=0.1, weight_decay=0.5, momentum=0.0, decay_norm_and_bias=decay_all)
    opt = build_optimizer(model, cfg, ModelConfig(**TINY_BN))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.0)  # no zeros (biases start at 0), so any decay shows
            p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    shrunk = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    matrices = {n for n, p in model.named_parameters() if p.ndim > 1}  # conv kernels, dense weights
    assert {"features.0.0.weight", "hidden.1.weight", "head.weight"} <= matrices
    if decay_all:
        assert shrunk == set(before)
    else:
        assert shrunk == matrices  # no bias, no BatchNorm weight or bias moved
        assert "features.0.1.weight" in before and "head.bias" in before
    for n in shrunk:  # decoupled (AdamW) or L2 (SGD): both scale by 1 - lr * weight_decay here
        p = dict(model.named_parameters())[n]
        torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5))
