"""Label smoothing (trainer.label_smoothing): in the training loss only, read from a run whose weights stay put
(the stalled_run fixture)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import metrics_rows
from tests.pretrain import TINY, inputs, load_model, smoke_data


@pytest.mark.slow
def test_label_smoothing_is_in_the_training_loss_only(stalled_run):
    """The logged training loss is the smoothed cross-entropy of the (unchanged) weights; validation stays plain."""
    run_dir, _, start = stalled_run
    data = smoke_data()
    model = load_model(TINY, start, data)
    with torch.no_grad():
        train_logits = model(inputs(data, data.train_x))
        val_logits = model(inputs(data, data.val_x))
    smoothed = F.cross_entropy(train_logits, data.train_y, label_smoothing=0.2).item()
    plain = F.cross_entropy(train_logits, data.train_y).item()
    first = metrics_rows(run_dir)[0]
    assert float(first["train_loss"]) == pytest.approx(smoothed, abs=1e-4)
    assert smoothed - plain > 0.1  # a difference anyone reading metrics.csv would see
    assert float(first["val_loss"]) == pytest.approx(F.cross_entropy(val_logits, data.val_y).item(), abs=1e-4)
