"""The weight average (trainer.ema_decay): checkpointed, validated and tested, and carried on by a resume."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import read_checkpoint, run_cli, run_dirs, summary


@pytest.mark.slow
def test_ema_is_checkpointed_tested_and_resumed(tmp_path):
    common = ["experiment=smoke", "trainer.ema_decay=0.9", "trainer.progress=plain"]
    proc = run_cli(["fit", *common, "trainer.epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "validation, best and test use the averaged weights" in proc.stdout
    (run_dir,) = run_dirs(tmp_path)
    steps = summary(run_dir)["global_step"]
    assert int(read_checkpoint(run_dir)["ema"]["n_averaged"]) == steps

    proc = run_cli(["fit", f"resume={run_dir}", "trainer.epochs=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert run_dirs(tmp_path) == [run_dir]
    last, best, s = read_checkpoint(run_dir), read_checkpoint(run_dir, "best.pt"), summary(run_dir)
    assert s["best_epoch"] == 2 and s["global_step"] == 2 * steps
    # The average carried on from the first run's instead of starting again at the resume.
    assert int(last["ema"]["n_averaged"]) == 2 * steps
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert averaged.keys() == best["model"].keys() == last["model"].keys()
    # best.pt holds the averaged weights (what was validated and tested), not the raw ones of last.pt.
    assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in averaged)
