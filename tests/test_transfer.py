"""Fine-tuning from a saved state_dict: a frozen backbone stays bit-for-bit the same (BatchNorm
statistics included) while the head learns, unfreeze_epoch lets it train later, and
backbone_lr_scale gives it its own learning rate. (Grayscale data on a 3-channel torchvision stem
is tested in test_models.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnntrain.config import ModelConfig, OptimizerConfig, SchedulerConfig
from cnntrain.models import backbone_parameters, build_model, freeze_norm_stats, head_parameters, set_backbone_trainable
from cnntrain.optim import build_optimizer, build_scheduler, param_groups
from tests.conftest import run_cli, run_dirs, summary
from tests.pretrain import TINY_BN, TINY_BN_OVERRIDES, pretrain

LR, SCALE = 3e-3, 0.1  # experiment=smoke's optimizer.lr, and the backbone's share of it


def _ckpt(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """Digits model saved as a state_dict, fine-tuned on 300 images: epoch 1 frozen, then resumed into epoch 2."""
    cwd = tmp_path_factory.mktemp("finetune")
    weights = cwd / "pretrained.pt"
    start = pretrain(weights, TINY_BN)
    args = [
        "fit",
        "experiment=smoke",
        *TINY_BN_OVERRIDES,
        f"model.weights={weights}",
        "model.freeze_backbone=true",
        "model.unfreeze_epoch=2",
        f"model.backbone_lr_scale={SCALE}",
        "optimizer=adamw",
        "dataset.subset=300",
        "trainer.epochs=1",
    ]
    proc = run_cli(args, cwd)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(cwd)
    epoch1 = _ckpt(run_dir)
    proc = run_cli(["fit", f"resume={run_dir}", "trainer.epochs=2"], cwd)
    assert proc.returncode == 0, proc.stderr
    assert summary(run_dir)["epochs_done"] == 2
    return start, epoch1, _ckpt(run_dir)


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.slow
def test_frozen_backbone_stays_exactly_as_loaded_while_the_head_learns(fine_tuned):
    start, epoch1, _ = fine_tuned
    model = epoch1["model"]
    assert model.keys() == start.keys()
    stats = {k for k in start if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert len(stats) == 9  # three BatchNorm layers in the backbone
    # Every backbone tensor, BatchNorm running statistics included, is the loaded one (weight decay was on too).
    assert _changed(start, model) == {"head.weight", "head.bias"}


@pytest.mark.slow
def test_unfreeze_epoch_trains_the_backbone_from_then_on(fine_tuned):
    start, epoch1, epoch2 = fine_tuned
    changed = _changed(epoch1["model"], epoch2["model"])
    backbone = {k for k in start if not k.startswith("head.")}
    assert backbone <= changed  # every conv, BatchNorm and dense tensor moved in epoch 2, statistics too


@pytest.mark.slow
def test_backbone_lr_scale_puts_the_backbone_in_its_own_group(fine_tuned):
    _, epoch1, _ = fine_tuned
    groups = epoch1["optimizer"]["param_groups"]
    by_lr: dict[float, int] = {}
    for g in groups:
        by_lr[round(g["lr"], 12)] = by_lr.get(round(g["lr"], 12), 0) + len(g["params"])
    n_params = len(epoch1["model"]) - 9  # minus the BatchNorm buffers
    assert by_lr == {round(LR, 12): 2, round(LR * SCALE, 12): n_params - 2}  # head: weight and bias


def test_backbone_lr_scale_groups_and_schedule_keep_the_ratio():
    model = build_model(ModelConfig(**TINY_BN), 1, (28, 28), 10)
    opt_cfg = OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.05)
    groups = param_groups(model, opt_cfg, ModelConfig(**TINY_BN, backbone_lr_scale=0.25))
    head = {id(p) for p in head_parameters(model)}
    for g in groups:
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) == 1  # a group is all head or all backbone
        assert g["lr"] == pytest.approx(0.01 if in_head == {True} else 0.0025)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # Without a scale there is no head/backbone split: one lr for everything.
    assert {g["lr"] for g in param_groups(model, opt_cfg, ModelConfig(**TINY_BN))} == {0.01}
    # The schedule multiplies every group alike, so the backbone stays at a quarter all along.
    opt = build_optimizer(model, opt_cfg, ModelConfig(**TINY_BN, backbone_lr_scale=0.25))
    sched = build_scheduler(opt, SchedulerConfig(name="onecycle"), 0.01, 10, 2)
    for _ in range(12):
        lrs = {round(g["lr"] / max(p["lr"] for p in opt.param_groups), 9) for g in opt.param_groups}
        assert lrs == {1.0, 0.25}
        opt.step()
        sched.step()


def test_frozen_backbone_norm_layers_stop_tracking_statistics():
    model = build_model(ModelConfig(**TINY_BN, freeze_backbone=True), 1, (28, 28), 10)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()
    assert freeze_norm_stats(model) == len(norms) == 3
    assert not any(m.training for m in norms) and model.head.training
    before = [m.running_mean.clone() for m in norms]
    model(torch.randn(8, 1, 28, 28) + 3)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))
    # Unfrozen (unfreeze_epoch), the next model.train() brings them back.
    set_backbone_trainable(model, True)
    model.train()
    assert freeze_norm_stats(model) == 0 and all(m.training for m in norms)
    # A model that was never frozen is left alone.
    plain = build_model(ModelConfig(**TINY_BN), 1, (28, 28), 10).train()
    assert freeze_norm_stats(plain) == 0
    assert all(p.requires_grad for p in backbone_parameters(plain))
