"""Optimizer and learning-rate schedule factories."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from cnntrain.config import ModelConfig, OptimizerConfig, SchedulerConfig


def param_groups(model: nn.Module, opt: OptimizerConfig, model_cfg: ModelConfig) -> list[dict]:
    """Split parameters by (backbone|head) x (decay|no decay).

    Biases and norm-layer weights (1-D tensors) get no weight decay unless asked: decaying them
    only fights the normalisation. The backbone may get a smaller learning rate for fine-tuning.
    """
    head_ids: set[int] = set()
    if model_cfg.backbone_lr_scale != 1.0:
        from cnntrain.models import head_parameters

        head_ids = {id(p) for p in head_parameters(model)}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        decay = opt.decay_norm_and_bias or p.ndim > 1
        groups.setdefault((id(p) in head_ids or not head_ids, decay), []).append(p)
    result = []
    for (is_head, decay), params in sorted(groups.items(), reverse=True):
        lr = opt.lr if is_head else opt.lr * model_cfg.backbone_lr_scale
        result.append({"params": params, "lr": lr, "weight_decay": opt.weight_decay if decay else 0.0})
    return result


def build_optimizer(model: nn.Module, opt: OptimizerConfig, model_cfg: ModelConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, opt, model_cfg)
    if opt.name == "adam":
        return torch.optim.Adam(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)


def lr_factor(sched: SchedulerConfig, base_lr: float, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """The schedule as a pure function of the optimizer step: multiplier of each group's base lr."""
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(sched.warmup_epochs * steps_per_epoch))

    def warm(step: int) -> float:
        return (step + 1) / warmup if step < warmup else 1.0

    if sched.name == "cosine":
        def factor(step: int) -> float:
            if step < warmup:
                return warm(step)
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    elif sched.name == "onecycle":
        peak = (sched.max_lr or base_lr) / base_lr
        rise = max(1, int(sched.pct_start * total))

        def factor(step: int) -> float:
            # Linear rise from peak/25, then cosine down to peak/1e4 (the usual one-cycle shape).
            if step < rise:
                return peak * (0.04 + 0.96 * step / rise)
            t = min(1.0, (step - rise) / max(1, total - rise))
            return peak * (1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * t)))
    elif sched.name == "step":
        def factor(step: int) -> float:
            return warm(step) * sched.gamma ** (step // (sched.step_epochs * steps_per_epoch))
    else:
        def factor(step: int) -> float:
            return warm(step)
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched: SchedulerConfig, base_lr: float, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step; its state is just the step count, so resume is exact."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(sched, base_lr, steps_per_epoch, epochs))
