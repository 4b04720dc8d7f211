"""`make gpu-check` (benchmarks/gpu_check.py): passes without a GPU, and its checks run (on the CPU, small)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check runs for real")
def test_without_a_gpu_it_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU here" in proc.stdout


@pytest.mark.slow
def test_the_checks_run_on_the_cpu_and_a_failure_fails_the_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu"], capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| deterministic resume after SIGKILL | ok |" in proc.stdout
    assert "| evaluate, predict, export | ok |" in proc.stdout
    assert "0 FAILED" in proc.stdout


def test_a_failed_check_fails_the_command(monkeypatch, capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))

    def broken(self, *args):
        raise gpu_check.CheckFailed("exit 1: cnntrain fit trainer.precision=fp16\nRuntimeError: CUDA error")

    for name in ("fit_precision", "channels_last_compile", "resume_after_kill", "after_training", "ddp", "throughput"):
        monkeypatch.setattr(gpu_check.Checks, name, lambda self, *args: "")
    monkeypatch.setattr(gpu_check.Checks, "resume_after_kill", broken)
    assert gpu_check.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "| deterministic resume after SIGKILL | FAILED |" in out and "1 FAILED" in out and "CUDA error" in out
