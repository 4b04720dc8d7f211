"""Gradient clipping (trainer.grad_clip), seen in how far a run moves the weights from a known start."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import read_checkpoint, run_cli, run_dirs, summary
from tests.pretrain import TINY, inputs, load_model, smoke_data


@pytest.mark.slow
def test_grad_clip_bounds_every_step(tiny_weights, tmp_path):
    """Plain SGD at lr 1 with trainer.grad_clip=c moves the weights by at most lr*c per step."""
    path, start = tiny_weights
    clip, lr = 0.01, 1.0
    data = smoke_data()
    model = load_model(TINY, start, data)
    loss = F.cross_entropy(model(inputs(data, data.train_x[:32])), data.train_y[:32])
    loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert grad_norm > 10 * clip  # so the clip is what limits the steps

    proc = run_cli(
        [
            "fit",
            "experiment=smoke",
            f"model.weights={path}",
            "optimizer=sgd",
            "optimizer.momentum=0",
            "optimizer.nesterov=false",
            "optimizer.weight_decay=0",
            f"optimizer.lr={lr}",
            f"trainer.grad_clip={clip}",
            "trainer.epochs=1",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(tmp_path)
    steps = summary(run_dir)["global_step"]
    end = read_checkpoint(run_dir)["model"]
    moved = torch.linalg.vector_norm(torch.stack([(end[k].float() - start[k].float()).norm() for k in start])).item()
    assert 0 < moved <= steps * lr * clip * (1 + 1e-4), (moved, steps)
    # Unclipped, a single step of lr 1 would have moved them by the gradient norm itself.
    assert moved < grad_norm
