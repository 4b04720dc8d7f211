"""Dropout (model.dropout): where it sits and when it acts."""

from __future__ import annotations

import pytest
import torch

from cnntrain.config import ModelConfig
from cnntrain.models import build_model, head_module


@pytest.mark.parametrize("name", ["simple_cnn", "simple_cnn_bn", "lenet5", "resnet8"])
def test_dropout_sits_in_the_head_and_only_acts_in_training(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, dropout=0.5), 1, (32, 32), 10)
    head = head_module(model)
    assert head.dropout == 0.5 and "dropout=0.5" in repr(head)
    x = torch.randn(6, 1, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))  # a fresh mask each call
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
    plain = build_model(ModelConfig(name=name, dropout=0.0), 1, (32, 32), 10)
    assert head_module(plain).dropout == 0.0 and "dropout" not in repr(head_module(plain))
    # The same state_dict keys with or without dropout: weights move between the two.
    assert plain.state_dict().keys() == model.state_dict().keys()
