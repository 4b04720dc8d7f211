"""Optimizers and learning-rate schedules, registered in cnntrain.registry.OPTIMIZERS and SCHEDULERS."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from cnntrain.config import ModelConfig, OptimizerConfig, SchedulerConfig
from cnntrain.registry import OPTIMIZERS, SCHEDULERS


def param_groups(model: nn.Module, opt: OptimizerConfig, model_cfg: ModelConfig) -> list[dict[str, Any]]:
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


# torch wraps optimizer methods (construction, zero_grad, step, state_dict) in decorators that import
# torch._dynamo on their first call, only to tell a torch.compile trace to skip or break there: 1-2 s and about
# 150 MB that an eager run never uses. They are recognised by where their code lives, not by name (functools.wraps
# copies the name): torch._compile._disable_dynamo's `inner` and optim's `_use_grad_for_differentiable`.
_DYNAMO_WRAPPERS = {("_compile.py", "inner"), ("optimizer.py", "_use_grad")}


def _dynamo_wrapper(fn: Any) -> str | None:
    code = getattr(fn, "__code__", None)
    if code is None or not hasattr(fn, "__wrapped__"):
        return None
    key = (Path(code.co_filename).name, code.co_name)
    return key[1] if key in _DYNAMO_WRAPPERS else None


_O = TypeVar("_O", bound=torch.optim.Optimizer)


@functools.cache
def eager(cls: type[_O]) -> type[_O]:
    """A subclass of a torch optimizer whose methods skip the wrappers that import torch._dynamo; same math,
    same state_dict. A torch whose wrappers look different gets them back unchanged (correct, only slower to
    start; tests/test_startup.py says so)."""
    methods: dict[str, Any] = {}
    for name in ("__init__", "add_param_group", "zero_grad", "step", "state_dict", "load_state_dict"):
        fn = getattr(cls, name, None)
        wrapper = _dynamo_wrapper(fn)
        if wrapper is None or fn is None:
            continue
        raw = fn.__wrapped__
        if wrapper == "_use_grad":  # what it does besides the import: the step runs without autograd

            def step(self: Any, *args: Any, _raw: Any = raw, **kwargs: Any) -> Any:
                with torch.set_grad_enabled(self.defaults.get("differentiable", False)):
                    return _raw(self, *args, **kwargs)

            methods[name] = functools.wraps(raw)(step)
        else:
            methods[name] = raw
    return type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


@OPTIMIZERS.register("adam")
def adam(groups: list[dict[str, Any]], opt: OptimizerConfig) -> torch.optim.Optimizer:
    return eager(torch.optim.Adam)(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict[str, Any]], opt: OptimizerConfig) -> torch.optim.Optimizer:
    return eager(torch.optim.AdamW)(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict[str, Any]], opt: OptimizerConfig) -> torch.optim.Optimizer:
    return eager(torch.optim.SGD)(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)


def build_optimizer(model: nn.Module, opt: OptimizerConfig, model_cfg: ModelConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(opt.name)(param_groups(model, opt, model_cfg), opt)


# A schedule is a pure function of the optimizer step: the multiplier of each group's base lr.
LrFactor = Callable[[int], float]


def _warm(sched: SchedulerConfig, steps_per_epoch: int) -> LrFactor:
    """Linear warm-up from 0 over scheduler.warmup_epochs, then 1."""
    warmup = int(round(sched.warmup_epochs * steps_per_epoch))
    return lambda step: (step + 1) / warmup if step < warmup else 1.0


@SCHEDULERS.register("none")
def constant(sched: SchedulerConfig, base_lr: float, steps_per_epoch: int, epochs: int) -> LrFactor:
    return _warm(sched, steps_per_epoch)


@SCHEDULERS.register("cosine")
def cosine(sched: SchedulerConfig, base_lr: float, steps_per_epoch: int, epochs: int) -> LrFactor:
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(sched.warmup_epochs * steps_per_epoch))
    warm = _warm(sched, steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return warm(step)
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


@SCHEDULERS.register("onecycle")
def onecycle(sched: SchedulerConfig, base_lr: float, steps_per_epoch: int, epochs: int) -> LrFactor:
    # Its rise is its warm-up: config.validate refuses a scheduler.warmup_epochs beside it.
    total = max(1, steps_per_epoch * epochs)
    peak = (sched.max_lr or base_lr) / base_lr
    rise = max(1, int(sched.pct_start * total))

    def factor(step: int) -> float:
        # Linear rise from peak/25, then cosine down to peak/1e4 (the usual one-cycle shape).
        if step < rise:
            return peak * (0.04 + 0.96 * step / rise)
        t = min(1.0, (step - rise) / max(1, total - rise))
        return peak * (1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * t)))

    return factor


@SCHEDULERS.register("step")
def step_decay(sched: SchedulerConfig, base_lr: float, steps_per_epoch: int, epochs: int) -> LrFactor:
    warm = _warm(sched, steps_per_epoch)
    return lambda step: warm(step) * sched.gamma ** (step // (sched.step_epochs * steps_per_epoch))


def lr_factor(sched: SchedulerConfig, base_lr: float, steps_per_epoch: int, epochs: int) -> LrFactor:
    """The schedule that scheduler.name names, as a function of the optimizer step."""
    return SCHEDULERS.get(sched.name)(sched, base_lr, steps_per_epoch, epochs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched: SchedulerConfig, base_lr: float, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step; its state is just the step count, so resume is exact."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(sched, base_lr, steps_per_epoch, epochs))
