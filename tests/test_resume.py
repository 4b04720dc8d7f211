"""Exact resume after SIGKILL at awkward moments, and what a crash leaves readable.

Faults are injected by tests/faults.py, a wrapper around the real CLI (no hooks in cnntrain).
Every run is CPU, `trainer.deterministic=true`, so "the same" means bit for bit.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnntrain.engine.checkpoint import load_checkpoint
from tests.conftest import run_cli, run_dirs, summary
from tests.faults import REPO, csv_rows, run_faulty

# 1,000 digits in batches of 32: 32 steps per epoch (ends at 32, 64, 96); last.pt every 10 steps.
COMMON = ["experiment=smoke", "trainer.deterministic=true", "trainer.precision=32", "augment=digits",
          "model.dropout=0.2", "trainer.epochs=3", "trainer.checkpoint_every_n_steps=10",
          "trainer.log_every_n_steps=5"]
CURVES = ("train/loss_step", "lr_step", "train/loss", "train/acc", "val/loss", "val/acc", "lr", "test/acc",
          "test/loss")


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve as TensorBoard shows it (EventAccumulator drops what a purge_step superseded)."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same training, never interrupted."""
    cwd = tmp_path_factory.mktemp("reference")
    proc = run_cli(["fit", *COMMON], cwd, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(cwd)
    return run_dir


@pytest.fixture(scope="module")
def killed_mid_epoch(tmp_path_factory) -> Path:
    """A run SIGKILLed at step 45 (epoch 2; last.pt is from step 40). Tests copy it before changing it."""
    cwd = tmp_path_factory.mktemp("killed")
    proc = run_faulty(["kill-at-step=45"], ["fit", *COMMON], cwd)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (run_dir,) = run_dirs(cwd)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / "smoke" / run_dir.name
    shutil.copytree(run_dir, target)
    return target


@pytest.mark.slow
def test_sigkill_leaves_the_run_directory_readable(killed_mid_epoch):
    run_dir = killed_mid_epoch
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert cfg.trainer.checkpoint_every_n_steps == 10
    assert [r["epoch"] for r in csv_rows(run_dir)] == ["1"]  # the finished epoch, flushed
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (last["progress"]["epoch"], last["progress"]["global_step"]) == (1, 40)
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["progress"]["epoch"] == 1
    # TensorBoard has everything up to the checkpoint (events are flushed before each one).
    steps = [s for s, _ in curves(run_dir)["train/loss_step"]]
    assert steps[: 8] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_resume_after_sigkills_is_bitwise_equal_to_an_uninterrupted_run(killed_mid_epoch, reference, tmp_path):
    run_dir = _copy(killed_mid_epoch, tmp_path)
    resume = ["fit", f"resume={run_dir}"]

    # Resumed from step 40; killed right after the epoch-end checkpoint of epoch 2 (last.pt at 50, 60, 64).
    proc = run_faulty(["kill-after-save=3"], resume, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["global_step"] == 64

    # Resumed at the start of epoch 3; killed while writing its epoch-end checkpoint (70, 80, 90, 96):
    # the metrics row and TensorBoard points of epoch 3 are out, last.pt is still the one of step 90.
    proc = run_faulty(["kill-before-rename=4"], resume, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["global_step"] == 90
    assert [r["epoch"] for r in csv_rows(run_dir)] == ["1", "2", "3"]
    assert list((run_dir / "checkpoints").glob(".last.pt.*.tmp")), "the killed write left its temp file"

    proc = run_cli(resume, tmp_path, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert run_dirs(tmp_path) == [run_dir]  # continued in its own directory
    assert not list((run_dir / "checkpoints").glob("*.tmp"))

    for name in ("last.pt", "best.pt"):
        assert_same_weights(reference / "checkpoints" / name, run_dir / "checkpoints" / name)
    assert csv_rows(run_dir) == csv_rows(reference)  # epoch 3's row rewritten, not duplicated
    got, want = summary(run_dir), summary(reference)
    for key in ("status", "epochs_done", "global_step", "best_epoch", "best_val_acc", "test_loss", "test_acc"):
        assert got[key] == want[key], key
    # TensorBoard: each curve continues at the right steps, no gap, no duplicate, the same values.
    got_curves, want_curves = curves(run_dir), curves(reference)
    for tag in CURVES:
        assert got_curves[tag] == want_curves[tag], tag
    assert [s for s, _ in got_curves["train/loss_step"]] == list(range(5, 96, 5))
