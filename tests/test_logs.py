"""Logs and the console: each command's log file under its documented name with the info and warnings of
the run, warnings on the console as one `cnntrain: warning: ...` line, and a closed standard output
(`cnntrain fit | head`) that stops the display but not the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, run_cli, run_dirs, summary

IMAGES_PER_CLASS = {"train": 30, "val": 6}  # and no test/: fit holds a test split out of train/


def _image_folder(root: Path) -> None:
    with np.load(REPO / "cnntrain" / "data" / "mnist5k.npz") as z:
        x, y = z["images"], z["labels"]
    for label in range(10):
        picks = np.flatnonzero(y == label)
        for split, n in IMAGES_PER_CLASS.items():
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            start = 0 if split == "train" else IMAGES_PER_CLASS["train"]
            for i in picks[start : start + n]:
                Image.fromarray(x[i]).save(folder / f"{i}.png")
    (root / "train" / "3" / "broken.png").write_bytes(b"not a png at all")


def _warnings(stderr: str) -> list[str]:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert all(ln.startswith("cnntrain: warning: ") for ln in lines), stderr  # no source paths, no excerpts
    return [ln.removeprefix("cnntrain: warning: ") for ln in lines]


@pytest.mark.slow
def test_fit_log_holds_the_runs_info_and_warnings_and_the_console_one_line_each(tmp_path):
    root = tmp_path / "images"
    _image_folder(root)
    args = [
        "fit",
        "dataset=imagefolder",
        f"dataset.root={root}",
        "model=tiny_cnn",
        "trainer.epochs=1",
        "trainer.progress=plain",
    ]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(tmp_path)
    # The log has the name the README gives it, and the run's record: its table, epochs, results.
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["fit.log"]
    log = (run_dir / "fit.log").read_text()
    for info in ("cnntrain fit", "epoch 1/1  train loss", "test acc", str(run_dir)):
        assert info in log, info
    # Every warning: one line on the console, and in the log.
    warned = _warnings(proc.stderr)
    assert any("skipped 1 file(s) that could not be decoded" in w and "broken.png" in w for w in warned), warned
    assert any(f"no {root / 'test'}; holding out 30 images of the train split" in w for w in warned), warned
    for w in warned:
        assert w in log, w

    # No test/ folder: the test figure is measured on held-out images, not on the validation split (item 10).
    assert "270 train / 60 val / 30 test" in proc.stdout
    assert "dataset.test_fraction=0.1" in summary(run_dir)["test_split"]

    # The other commands write their log beside what they write, the same way.
    proc = run_cli(["evaluate", f"ckpt={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (folder,) = (run_dir / "evaluate").glob("imagefolder-*-test-*")
    log = (folder / "evaluate.log").read_text()
    warned = _warnings(proc.stderr)
    assert any("broken.png" in w for w in warned) and all(w in log for w in warned)

    # The data a run was trained on are checked again when it resumes: changed images are another dataset.
    victim = next((root / "train" / "5").glob("*.png"))
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(victim)
    proc = run_cli(["fit", f"resume={run_dir}", "trainer.epochs=2"], tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cnntrain: error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"are not the data the run in {run_dir} was trained on" in lines[0]
    assert summary(run_dir)["epochs_done"] == 1


@pytest.mark.slow
def test_a_closed_stdout_stops_the_display_not_the_run(tmp_path):
    # `cnntrain fit ... | head -3`: the reader takes three lines and goes away.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("PYTHONUNBUFFERED", None)  # as a user's shell runs it: stdout block-buffered into the pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnntrain", "fit", "experiment=smoke", "trainer.epochs=2", "trainer.progress=plain"],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    head = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=600)
    assert head[0].strip() == "cnntrain fit"
    assert proc.returncode == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cnntrain: warning: the standard output was closed"), err
    (run_dir,) = run_dirs(tmp_path)
    s = summary(run_dir)
    assert s["status"] == "completed" and s["epochs_done"] == 2 and s["test_acc"] > 0
    log = (run_dir / "fit.log").read_text()
    assert "the standard output was closed" in log and "epoch 2/2  train loss" in log and "test acc" in log
