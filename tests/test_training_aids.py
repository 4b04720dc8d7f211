"""Regularisation and training aids, as a user would notice them: weight decay groups, dropout,
gradient clipping, label smoothing, early stopping, and the weight average (EMA) in checkpoints."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from cnntrain.config import ModelConfig, OptimizerConfig
from cnntrain.models import build_model, head_module
from cnntrain.optim import build_optimizer
from tests.conftest import run_cli, run_dirs, summary
from tests.pretrain import TINY, TINY_BN, inputs, load_model, pretrain, smoke_data


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _ckpt(run_dir, name="last.pt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


# --------------------------------------------------------------------------- weight decay


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


# --------------------------------------------------------------------------- dropout


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


# --------------------------------------------------------------------------- runs that start from known weights


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """The smoke model after a little training, as a state_dict file: a known, confident start."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    return path, pretrain(path, TINY)


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

    proc = run_cli(["fit", "experiment=smoke", f"model.weights={path}", "optimizer=sgd", "optimizer.momentum=0",
                    "optimizer.nesterov=false", "optimizer.weight_decay=0", f"optimizer.lr={lr}",
                    f"trainer.grad_clip={clip}", "trainer.epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(tmp_path)
    steps = summary(run_dir)["global_step"]
    end = _ckpt(run_dir)["model"]
    moved = torch.linalg.vector_norm(torch.stack([(end[k].float() - start[k].float()).norm() for k in start])).item()
    assert 0 < moved <= steps * lr * clip * (1 + 1e-4), (moved, steps)
    # Unclipped, a single step of lr 1 would have moved them by the gradient norm itself.
    assert moved < grad_norm


# --------------------------------------------------------------------------- a run that cannot improve


@pytest.fixture(scope="module")
def stalled_run(tiny_weights, tmp_path_factory):
    """lr 1e-9: the weights stay put, so validation accuracy never improves; label smoothing 0.2, fp32."""
    path, start = tiny_weights
    cwd = tmp_path_factory.mktemp("stalled")
    proc = run_cli(["fit", "experiment=smoke", f"model.weights={path}", "optimizer.lr=1e-9",
                    "trainer.label_smoothing=0.2", "trainer.precision=32", "trainer.epochs=3",
                    "trainer.early_stopping_patience=1", "trainer.progress=plain"], cwd)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(cwd)
    return run_dir, proc.stdout, start


@pytest.mark.slow
def test_early_stopping_stops_at_the_first_epoch_without_improvement(stalled_run):
    run_dir, stdout, _ = stalled_run
    s = summary(run_dir)
    # Epoch 1 sets the best; epoch 2 does not beat it, and patience is 1: stop after epoch 2 of 3.
    assert s["status"] == "completed"
    assert (s["epochs"], s["epochs_done"], s["early_stopped_epoch"], s["best_epoch"]) == (3, 2, 2, 1)
    assert [int(r["epoch"]) for r in _rows(run_dir)] == [1, 2]
    assert "early stopping: val/acc has not improved for 1 epochs" in stdout
    assert "epoch 3/3" not in stdout
    assert "test_acc" in s  # the best checkpoint was still tested


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
    first = _rows(run_dir)[0]
    assert float(first["train_loss"]) == pytest.approx(smoothed, abs=1e-4)
    assert smoothed - plain > 0.1  # a difference anyone reading metrics.csv would see
    assert float(first["val_loss"]) == pytest.approx(F.cross_entropy(val_logits, data.val_y).item(), abs=1e-4)


# --------------------------------------------------------------------------- weight average (EMA)


@pytest.mark.slow
def test_ema_is_checkpointed_tested_and_resumed(tmp_path):
    common = ["experiment=smoke", "trainer.ema_decay=0.9", "trainer.progress=plain"]
    proc = run_cli(["fit", *common, "trainer.epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "validation, best and test use the averaged weights" in proc.stdout
    (run_dir,) = run_dirs(tmp_path)
    steps = summary(run_dir)["global_step"]
    assert int(_ckpt(run_dir)["ema"]["n_averaged"]) == steps

    proc = run_cli(["fit", f"resume={run_dir}", "trainer.epochs=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert run_dirs(tmp_path) == [run_dir]
    last, best, s = _ckpt(run_dir), _ckpt(run_dir, "best.pt"), summary(run_dir)
    assert s["best_epoch"] == 2 and s["global_step"] == 2 * steps
    # The average carried on from the first run's instead of starting again at the resume.
    assert int(last["ema"]["n_averaged"]) == 2 * steps
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert averaged.keys() == best["model"].keys() == last["model"].keys()
    # best.pt holds the averaged weights (what was validated and tested), not the raw ones of last.pt.
    assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in averaged)
