"""torchrun with 2 CPU processes (gloo): sharded data, reduced metrics, rank 0 writes, resume works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import run_cli, run_dirs, summary


def torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "cnntrain",
        "fit",
        "trainer.progress=plain",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    assert run_cli(["fit", "experiment=smoke"], single).returncode == 0
    proc = torchrun(["experiment=smoke", "trainer.epochs=2"], multi)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = run_dirs(multi)  # only rank 0 kept a run directory
    assert "2 processes, global batch 32 (16 per rank)" in proc.stdout
    assert proc.stdout.count("epoch 1/2  train loss") == 1  # one rank reports
    proc = torchrun([f"resume={run_dir}", "trainer.epochs=3"], multi)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run_dirs(multi) == [run_dir]
    s, ref = summary(run_dir), summary(run_dirs(single)[0])
    assert s["status"] == "completed" and s["epochs_done"] == 3
    with open(run_dir / "metrics.csv") as f:
        assert len(f.read().strip().splitlines()) == 4  # header + 3 epochs, none repeated
    # Same global batch and steps as one process: the same accuracy within noise.
    assert abs(s["test_acc"] - ref["test_acc"]) < 0.08, (s["test_acc"], ref["test_acc"])
