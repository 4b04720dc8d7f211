"""Early stopping (trainer.early_stopping_patience) on a run that cannot improve (the stalled_run fixture)."""

from __future__ import annotations

import pytest

from tests.conftest import metrics_rows, summary


@pytest.mark.slow
def test_early_stopping_stops_at_the_first_epoch_without_improvement(stalled_run):
    run_dir, stdout, _ = stalled_run
    s = summary(run_dir)
    # Epoch 1 sets the best; epoch 2 does not beat it, and patience is 1: stop after epoch 2 of 3.
    assert s["status"] == "completed"
    assert (s["epochs"], s["epochs_done"], s["early_stopped_epoch"], s["best_epoch"]) == (3, 2, 2, 1)
    assert [int(r["epoch"]) for r in metrics_rows(run_dir)] == [1, 2]
    assert "early stopping: val/acc has not improved for 1 epochs" in stdout
    assert "epoch 3/3" not in stdout
    assert "test_acc" in s  # the best checkpoint was still tested
