"""Checkpoint files: atomic and permission-preserving writes, and reads that refuse anything damaged or
foreign (never running pickled code). The refusals as the CLI shows them are in test_bad_input.py."""

from __future__ import annotations

import os
import pickle
import signal
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from cnntrain.engine.checkpoint import load_checkpoint, save_checkpoint
from cnntrain.errors import UserError
from tests.conftest import REPO


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "meta": {"classes": ["a", "b"]}}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_checkpoint_gets_the_permissions_of_any_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "last.pt", _state(1.0))
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "last.pt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask


def test_round_trip_and_overwrite_leave_no_temp_files(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, _state(1.0))
    save_checkpoint(path, _state(2.0))
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((64, 64), 2.0))
    assert os.listdir(path.parent) == ["last.pt"]


KILLED_WRITE = """
import os, signal, sys, torch
from cnntrain.engine.checkpoint import save_checkpoint
path = sys.argv[1]
save_checkpoint(path, {"model": {"w": torch.ones(3)}})
os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # die between the temp file and the rename
save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
"""


def test_a_killed_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))  # the old one, whole
    (temp,) = tmp_path.glob(".last.pt.*.tmp")  # the new one never replaced it
    save_checkpoint(path, _state(3.0))  # the next write clears the leftover
    assert not temp.exists()


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1.0))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"cannot read checkpoint {path} .*truncated"):
        load_checkpoint(path)


def test_a_changed_byte_is_detected(tmp_path):
    # torch.load itself would return the damaged tensor without complaint; the zip CRC-32 catches it.
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1.0))
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the tensor's bytes
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=rf"checkpoint {path} is corrupt: the checksum of .*{info.filename}"):
        load_checkpoint(path)


class _RunsCode:
    """Unpickling this would create a marker file: what a booby-trapped checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch", "pickle"])
def test_loading_never_runs_pickled_code(tmp_path, container):
    path, marker = tmp_path / "last.pt", tmp_path / "pwned"
    payload = {"format_version": 1, "model": {}, "meta": _RunsCode(marker)}
    if container == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UserError, match=str(path)):
        load_checkpoint(path)
    assert not marker.exists()


def test_incomplete_trainer_checkpoint_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {**_state(1.0), "optimizer": {}, "scheduler": {}, "scaler": {}, "progress": {}})
    with pytest.raises(UserError, match=rf"{path} is an incomplete trainer checkpoint \(no rng\)"):
        load_checkpoint(path)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match=rf"{path} is not a cnntrain checkpoint"):
        load_checkpoint(path)


def test_progress_of_a_checkpoint_from_before_train_seconds_reads_as_zero():
    from cnntrain.engine.state import Progress

    saved = Progress(epoch=2, global_step=64, best_metric=0.9, best_epoch=2, train_seconds=12.5).to_dict()
    assert Progress.from_dict(saved, torch.device("cpu")).train_seconds == 12.5
    del saved["train_seconds"]  # a last.pt written by an earlier cnntrain
    old = Progress.from_dict(saved, torch.device("cpu"))
    assert (old.epoch, old.global_step, old.train_seconds) == (2, 64, 0.0)


def test_a_torchscript_file_is_refused_for_what_it_is(tmp_path):
    import warnings

    path = tmp_path / "model.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(path))
    with pytest.raises(UserError, match="is a TorchScript program .* model.state_dict.pt or model.safetensors"):
        load_checkpoint(path)


def test_the_run_of_a_run_folder_its_checkpoints_folder_or_a_checkpoint(tmp_path):
    from cnntrain.io.files import RunDir

    run = RunDir(tmp_path / "runs" / "default" / "2024-01-01" / "12-00-00")
    run.checkpoints.mkdir(parents=True)
    save_checkpoint(run.last, _state(1.0))
    assert run.last == run.path / "checkpoints" / "last.pt" and run.best.name == "best.pt"
    for given in (run.path, run.checkpoints, run.last, run.best):  # best.pt need not exist yet
        assert RunDir.of(given) == run
    elsewhere = tmp_path / "weights" / "model.pt"
    assert RunDir.of(elsewhere).path == elsewhere.parent  # a checkpoint outside a run: its own folder
    assert [r.path for r in RunDir.with_last(run.path.parent)] == [run.path]
