"""A loss that stops being finite: stop with a clear message (or skip the step with
trainer.on_nonfinite=skip), within a bounded number of steps, and never overwrite best/last
with the broken state."""

from __future__ import annotations

import re

import pytest
import torch

from cnntrain.engine.checkpoint import load_checkpoint
from tests.conftest import run_cli, run_dirs, summary
from tests.faults import REPO, csv_rows, run_faulty

# 32 steps per epoch; the loss reaches the host every 5 steps (trainer.log_every_n_steps).
SMOKE = ["fit", "experiment=smoke", "trainer.precision=32", "trainer.log_every_n_steps=5"]
BLOW_UP = ["optimizer=sgd", "optimizer.lr=1e4"]


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("cnntrain: error:")]
    return line


def diverged_at(line: str) -> int:
    return int(re.search(r"by step (\d+)", line).group(1))


def all_finite(path) -> bool:
    return all(torch.isfinite(v).all() for v in load_checkpoint(path)["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_a_real_divergence_stops_the_run_within_the_logging_interval(tmp_path):
    proc = run_cli([*SMOKE, *BLOW_UP], tmp_path, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 3, proc.stderr
    line = error_line(proc.stderr)
    assert "training diverged" in line and "optimizer.lr=10000" in line and "lower optimizer.lr" in line
    assert diverged_at(line) <= 5
    (run_dir,) = run_dirs(tmp_path)
    assert summary(run_dir)["status"] == "diverged"
    assert not (run_dir / "checkpoints").exists()  # nothing before the divergence was worth saving


@pytest.mark.slow
def test_divergence_keeps_the_checkpoints_from_before_it(tmp_path):
    # Epoch 1 ends at step 32 (best.pt, last.pt); last.pt again at 33 and 36; the loss is NaN from step 37,
    # so the checkpoint due at step 39 must be refused.
    proc = run_faulty(["nan-at-step=37"], [*SMOKE, "trainer.epochs=3", "trainer.checkpoint_every_n_steps=3"], tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert 37 <= diverged_at(error_line(proc.stderr)) <= 37 + 5
    (run_dir,) = run_dirs(tmp_path)
    assert summary(run_dir)["status"] == "diverged"
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    assert load_checkpoint(last)["progress"]["global_step"] == 36 and all_finite(last)
    assert load_checkpoint(best)["progress"]["epoch"] == 1 and all_finite(best)
    assert [r["epoch"] for r in csv_rows(run_dir)] == ["1"]


@pytest.mark.slow
def test_skip_mode_passes_over_bad_steps_and_finishes(tmp_path):
    proc = run_faulty(["nan-at-step=5,40"], [*SMOKE, "trainer.epochs=2", "trainer.on_nonfinite=skip"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("step skipped") == 2
    (run_dir,) = run_dirs(tmp_path)
    s = summary(run_dir)
    assert s["status"] == "completed" and s["skipped_steps"] == 2 and s["global_step"] == 64
    assert s["test_acc"] > 0.5
    assert all_finite(run_dir / "checkpoints" / "last.pt")


@pytest.mark.slow
def test_skip_mode_stops_when_every_step_is_bad(tmp_path):
    proc = run_cli([*SMOKE, *BLOW_UP, "trainer.on_nonfinite=skip"], tmp_path, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 3, proc.stderr
    line = error_line(proc.stderr)
    assert "training diverged" in line and "10 steps in a row" in line and "on_nonfinite=skip" in line
    assert proc.stdout.count("step skipped") == 9  # the tenth stops the run
    (run_dir,) = run_dirs(tmp_path)
    assert summary(run_dir)["status"] == "diverged"
    for path in (run_dir / "checkpoints").glob("*.pt"):
        assert all_finite(path), path
