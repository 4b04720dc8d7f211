"""Ctrl-C and SIGTERM: finish the step, checkpoint, say how to resume, exit 130 / 143; a second
Ctrl-C exits at once. Real signals, sent to a real `cnntrain fit` process (from outside, or by
tests/faults.py at an exact point of validation or the test)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cnntrain.engine.checkpoint import load_checkpoint
from tests.conftest import run_cli, run_dirs, summary
from tests.faults import REPO, csv_rows, run_faulty, start_faulty

ENV = {"PYTHONPATH": str(REPO)}


def start(faults: list[str], args: list[str], cwd: Path, new_session: bool = False) -> subprocess.Popen:
    return start_faulty(["report-steps", *faults], args, cwd, new_session)


def wait_for_step(proc: subprocess.Popen, step: int, timeout: float = 120) -> list[str]:
    """Read stderr until the wrapper reports that training step `step` is done."""
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if line.strip() == f"fault: step {step}":
            return lines
        assert time.monotonic() < deadline, "training did not get there in time"
    raise AssertionError("the run ended before training started:\n" + "".join(lines))


def resume_finishes(run_dir: Path, cwd: Path, epochs: int, *overrides: str) -> None:
    proc = run_cli(["fit", f"resume={run_dir}", f"trainer.epochs={epochs}", *overrides], cwd, env=ENV)
    assert proc.returncode == 0, proc.stderr
    s = summary(run_dir)
    assert s["status"] == "completed" and s["epochs_done"] == epochs and s["test_acc"] is not None
    assert [int(r["epoch"]) for r in csv_rows(run_dir)] == list(range(1, epochs + 1))


# A long run (20 epochs) that the signal cuts short; every step is stretched by 0.2 s so that the
# signal lands in the middle of a step and "finishes the current step" can be checked.
LONG = ["fit", "experiment=smoke", "trainer.epochs=20", "trainer.precision=32"]


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_checkpoints_and_resume_completes(tmp_path, sig, code):
    proc = start(["slow-steps=0.2"], LONG, tmp_path)
    wait_for_step(proc, 40)  # epoch 2 (32 steps per epoch)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    steps = [int(ln.split()[-1]) for ln in err.splitlines() if ln.startswith("fault: step")]
    (run_dir,) = run_dirs(tmp_path)
    assert f"cnntrain fit resume={run_dir}" in out
    assert summary(run_dir)["status"] == "interrupted"
    progress = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]
    # The step under way when the signal came was finished and is in the checkpoint; no later one ran.
    assert progress["global_step"] == (steps[-1] if steps else 40) and progress["global_step"] <= 42
    assert progress["epoch"] == 1 and progress["step_in_epoch"] == progress["global_step"] - 32
    resume_finishes(run_dir, tmp_path, epochs=3)


@pytest.mark.slow
def test_second_sigint_exits_at_once(tmp_path):
    # Steps of 10 s: after the first Ctrl-C the run would finish its step for seconds; the second one ends it.
    proc = start(["slow-steps=10"], LONG, tmp_path)
    wait_for_step(proc, 1)
    time.sleep(1)  # well inside step 2
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert time.monotonic() - sent < 6, "the second Ctrl-C did not stop the run at once"
    assert "Traceback" not in err
    (run_dir,) = run_dirs(tmp_path)  # it had started training: its directory stays
    assert [ln for ln in err.splitlines() if ln.startswith("cnntrain: error:")] == [
        f"cnntrain: error: interrupted before the run's first checkpoint: there is nothing to resume (its log and "
        f"metrics so far are in {run_dir})"
    ]
    assert "checkpoint saved" not in out
    assert summary(run_dir)["status"] in ("running", "interrupted")


@pytest.mark.slow
def test_sigint_during_validation_stops_it_and_resume_completes(tmp_path):
    # A long validation (500 images one at a time); SIGINT at its 100th batch, in epoch 1.
    args = ["fit", "experiment=smoke", "trainer.epochs=2", "trainer.eval_batch_size=1"]
    proc = run_faulty(["signal-at-eval=INT:100"], args, tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted during validation" in proc.stdout and "resume=" in proc.stdout
    (run_dir,) = run_dirs(tmp_path)
    progress = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]
    assert (progress["epoch"], progress["step_in_epoch"]) == (0, 32)  # all of epoch 1 trained, not validated
    assert csv_rows(run_dir) == []
    resume_finishes(run_dir, tmp_path, 2, "trainer.eval_batch_size=500")


@pytest.mark.slow
def test_sigterm_during_the_test_exits_143_and_resume_runs_the_test(tmp_path):
    proc = run_faulty(["signal-at-test=TERM"], ["fit", "experiment=smoke", "trainer.epochs=1"], tmp_path)
    assert proc.returncode == 143, proc.stderr
    assert "during the test" in proc.stdout
    (run_dir,) = run_dirs(tmp_path)
    s = summary(run_dir)
    assert s["status"] == "interrupted" and "test_acc" not in s
    resume_finishes(run_dir, tmp_path, epochs=1)


def _image_folder(root: Path) -> None:
    import numpy as np
    from PIL import Image

    with np.load(REPO / "cnntrain" / "data" / "mnist5k.npz") as z:
        x, y = z["images"][::8][:600], z["labels"][::8][:600]
    for i in range(len(y)):
        split = ("train", "train", "train", "train", "val", "test")[i % 6]
        (root / split / str(y[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(root / split / str(y[i]) / f"{i}.png")


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_streaming_workers(tmp_path):
    # Images streamed by DataLoader worker processes; a terminal's Ctrl-C reaches them too. They leave
    # the decision to the main process, which stops as usual, and nothing prints a traceback.
    _image_folder(tmp_path / "images")
    args = [
        "fit",
        "dataset=imagefolder",
        f"dataset.root={tmp_path / 'images'}",
        "dataset.in_memory=false",
        "model=tiny_cnn",
        "trainer.epochs=20",
        "trainer.precision=32",
    ]
    proc = start(["slow-steps=0.2"], args, tmp_path, new_session=True)
    wait_for_step(proc, 3)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume=" in out
    (run_dir,) = run_dirs(tmp_path)
    assert 3 <= load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["global_step"] <= 5
    resume_finishes(run_dir, tmp_path, 1)


def test_handler_only_sets_a_flag_and_ignores_forked_workers():
    from cnntrain.engine.signals import StopRequested

    stop = StopRequested()
    stop.install()
    try:
        pid = os.fork()
        if pid == 0:  # a worker: the inherited handler must leave the stop decision to the main process
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(1 if stop else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop and stop.exit_code == 143
    finally:
        stop.restore()
