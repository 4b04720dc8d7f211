"""Learning-rate schedules: the multiplier each one gives at known steps, worked out by hand from its
definition, and the learning rate the optimizer actually sees when the loop steps the scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from cnntrain.config import FitConfig, SchedulerConfig, validate
from cnntrain.errors import UserError
from cnntrain.optim import build_scheduler, lr_factor

# 10 optimizer steps per epoch throughout.
STEPS = 10


def curve(sched: SchedulerConfig, epochs: int, base_lr: float = 0.01) -> list[float]:
    factor = lr_factor(sched, base_lr, STEPS, epochs)
    return [factor(step) for step in range(STEPS * epochs + 1)]


def test_constant_with_warm_up_rises_linearly_then_holds():
    c = curve(SchedulerConfig(name="none", warmup_epochs=1.0), epochs=3)
    assert c[0] == pytest.approx(0.1) and c[4] == pytest.approx(0.5) and c[9] == pytest.approx(1.0)
    assert set(c[9:]) == {1.0}
    assert set(curve(SchedulerConfig(name="none"), epochs=2)) == {1.0}


def test_cosine_warms_up_then_halves_at_the_middle_and_ends_at_min_lr_ratio():
    # 30 steps, 4 of warm-up: the cosine runs over the other 26, so step 17 is its middle.
    c = curve(SchedulerConfig(name="cosine", warmup_epochs=0.4, min_lr_ratio=0.1), epochs=3)
    assert c[0] == pytest.approx(0.25) and c[3] == pytest.approx(1.0)
    assert c[4] == pytest.approx(1.0)
    assert c[17] == pytest.approx(0.1 + 0.9 * 0.5)
    assert c[30] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(c[4:], c[5:], strict=False))  # never rises after the warm-up


def test_onecycle_rises_from_a_25th_of_the_peak_then_anneals_to_near_zero():
    # 40 steps, pct_start 0.25: 10 steps up to max_lr (3x optimizer.lr here), 30 down, middle of the descent at 25.
    c = curve(SchedulerConfig(name="onecycle", max_lr=0.03), epochs=4, base_lr=0.01)
    assert c[0] == pytest.approx(3 * 0.04)
    assert c[5] == pytest.approx(3 * (0.04 + 0.96 * 0.5))
    assert c[10] == pytest.approx(3.0) and max(c) == pytest.approx(3.0)
    assert c[25] == pytest.approx(3 * (1e-4 + (1 - 1e-4) * 0.5))
    assert c[40] == pytest.approx(3e-4)
    assert curve(SchedulerConfig(name="onecycle"), epochs=4)[10] == pytest.approx(1.0)  # peak = optimizer.lr


def test_step_multiplies_by_gamma_every_step_epochs():
    c = curve(SchedulerConfig(name="step", step_epochs=2, gamma=0.1, warmup_epochs=0.5), epochs=5)
    assert c[0] == pytest.approx(0.2) and c[4] == pytest.approx(1.0)
    assert c[19] == pytest.approx(1.0) and c[20] == pytest.approx(0.1)
    assert c[39] == pytest.approx(0.1) and c[40] == pytest.approx(0.01)


def test_onecycle_refuses_a_warm_up_of_its_own():
    with pytest.raises(UserError, match="scheduler.pct_start"):  # config.validate's check, before anything is built
        validate(FitConfig(scheduler=SchedulerConfig(name="onecycle", warmup_epochs=1.0)))


def test_the_optimizer_sees_the_curve_one_value_per_step():
    """The loop steps the scheduler once per optimizer step: after k steps the lr is base_lr * factor(k)."""
    sched_cfg = SchedulerConfig(name="cosine", min_lr_ratio=0.0)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    sched = build_scheduler(opt, sched_cfg, 0.5, STEPS, 2)
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(STEPS * 2):
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * k / 20)) for k in range(21)]
    assert seen == pytest.approx(expected)
