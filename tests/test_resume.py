"""Exact resume after SIGKILL at awkward moments, and what a crash leaves readable.

Faults are injected by tests/faults.py, a wrapper around the real CLI (no hooks in cnntrain).
Every run is CPU, `trainer.deterministic=true`, so "the same" means bit for bit.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnntrain.engine.checkpoint import load_checkpoint
from tests.conftest import run_cli, run_dirs, summary, write_multilabel_digits
from tests.faults import REPO, csv_rows, flip_a_byte, run_faulty

# 1,000 digits in batches of 32: 32 steps per epoch (ends at 32, 64, 96); last.pt every 10 steps.
COMMON = [
    "experiment=smoke",
    "trainer.deterministic=true",
    "trainer.precision=32",
    "augment=digits",
    "model.dropout=0.2",
    "trainer.epochs=3",
    "trainer.checkpoint_every_n_steps=10",
    "trainer.log_every_n_steps=5",
]
CURVES = ("train/loss_step", "lr_step", "train/loss", "train/acc", "val/loss", "val/acc", "lr", "test/acc", "test/loss")


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
    assert steps[:8] == [5, 10, 15, 20, 25, 30, 35, 40]
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


# Issue 21's options: balanced loss weights, the class-balanced sampler, one fold of a 3-fold split.
BALANCED = [
    "trainer.class_weights=balanced",
    "dataset.sampler=balanced",
    "trainer.folds=3",
    "trainer.fold=1",
    "trainer.epochs=2",
]


@pytest.mark.slow
def test_resume_with_class_weights_the_balanced_sampler_and_a_fold_is_bitwise_exact(tmp_path):
    want_dir, got_dir = tmp_path / "reference", tmp_path / "killed"
    want_dir.mkdir()
    got_dir.mkdir()
    proc = run_cli(["fit", *COMMON, *BALANCED], want_dir, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    (reference_run,) = run_dirs(want_dir)
    proc = run_faulty(["kill-at-step=45"], ["fit", *COMMON, *BALANCED], got_dir)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (run_dir,) = run_dirs(got_dir)
    proc = run_cli(["fit", f"resume={run_dir}"], got_dir, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    for name in ("last.pt", "best.pt"):
        assert_same_weights(reference_run / "checkpoints" / name, run_dir / "checkpoints" / name)
    assert csv_rows(run_dir) == csv_rows(reference_run)
    got, want = summary(run_dir), summary(reference_run)
    for key in ("global_step", "test_acc", "test_balanced_acc", "class_weights", "sampler", "fold"):
        assert got[key] == want[key], key


# Issue 21's multi-label data: binary cross-entropy on a CSV of `a|b` labels, with mixup of the multi-hot targets,
# label smoothing and per-label positive weights. 1,500 digits: 1,200 training images, of which smoke's subset
# keeps 1,000 (32 steps per epoch, as above).
MULTILABEL = [
    "dataset=csv",
    "dataset.file=labels.csv",
    "augment.mixup_alpha=0.2",
    "trainer.label_smoothing=0.1",
    "trainer.class_weights=balanced",
    "trainer.epochs=2",
]


@pytest.mark.slow
def test_resume_of_a_multilabel_run_is_bitwise_exact(tmp_path):
    data = write_multilabel_digits(tmp_path / "data", 1500)
    args = ["fit", *COMMON, *MULTILABEL, f"dataset.root={data}"]
    want_dir, got_dir = tmp_path / "reference", tmp_path / "killed"
    want_dir.mkdir()
    got_dir.mkdir()
    proc = run_cli(args, want_dir, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    (reference_run,) = run_dirs(want_dir)
    proc = run_faulty(["kill-at-step=45"], args, got_dir)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (run_dir,) = run_dirs(got_dir)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["global_step"] == 40
    proc = run_cli(["fit", f"resume={run_dir}"], got_dir, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    for name in ("last.pt", "best.pt"):
        assert_same_weights(reference_run / "checkpoints" / name, run_dir / "checkpoints" / name)
    assert csv_rows(run_dir) == csv_rows(reference_run)
    got, want = summary(run_dir), summary(reference_run)
    assert got["task"] == "multilabel"
    for key in (
        "global_step",
        "best_val_map",
        "test_map",
        "test_micro_f1",
        "test_exact_match",
        "test_loss",
        "class_weights",
    ):
        assert got[key] == want[key], key
    got_curves, want_curves = curves(run_dir), curves(reference_run)
    for tag in ("train/exact_match", "val/map", "val/micro_f1", "test/map"):
        assert got_curves[tag] == want_curves[tag], tag


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("cnntrain: error: "), proc.stderr
    return lines[0]


@pytest.mark.slow
def test_a_corrupt_last_pt_leaves_last_prev_pt_and_resume_from_it_is_exact(reference, tmp_path):
    # Killed right after the 5th last.pt (step 40, in epoch 2); the one before it (step 32) is last.prev.pt.
    proc = run_faulty(["kill-after-save=5"], ["fit", *COMMON], tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (run_dir,) = run_dirs(tmp_path)
    last, previous = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.prev.pt"
    assert load_checkpoint(previous)["progress"]["global_step"] == 32
    flip_a_byte(last)

    # The message offers a command that works, and that command continues the run exactly.
    line = _error_line(run_cli(["fit", f"resume={run_dir}"], tmp_path, env={"PYTHONPATH": str(REPO)}))
    command = f"cnntrain fit resume={previous}"
    assert "is corrupt" in line and line.endswith(command), line
    proc = run_cli(command.split()[1:], tmp_path, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert run_dirs(tmp_path) == [run_dir]
    for name in ("last.pt", "best.pt"):
        assert_same_weights(reference / "checkpoints" / name, run_dir / "checkpoints" / name)
    assert csv_rows(run_dir) == csv_rows(reference)  # epoch 2 trained again from step 32, its row rewritten
    assert summary(run_dir)["test_acc"] == summary(reference)["test_acc"]
    # The damaged file was replaced, not kept: the checkpoint before the last one is whole again.
    assert load_checkpoint(previous)["progress"]["global_step"] == 90


@pytest.mark.slow
def test_resume_refuses_another_dataset_model_or_recipe_and_the_way_out_works(smoke_run, tmp_path):
    run_dir = _copy(smoke_run, tmp_path)
    before = {p.name: p.read_bytes() for p in [*(run_dir / ".hydra").glob("*.yaml"), run_dir / "metrics.csv"]}
    env = {"PYTHONPATH": str(REPO)}
    for change, key in (
        ("dataset=fashion_mnist", "dataset.name (mnist5k -> fashion_mnist)"),
        ("dataset.split_seed=3", "dataset.split_seed (0 -> 3)"),
        ("model=lenet5", "model.name (simple_cnn -> lenet5)"),
        ("trainer.batch_size=64", "trainer.batch_size (32 -> 64)"),
    ):
        line = _error_line(run_cli(["fit", f"resume={run_dir}", "trainer.epochs=5", change], tmp_path, env=env))
        assert f"resume cannot change {key}" in line, line
    # Nothing of the run changed, and no other run was started.
    assert {p.name: p.read_bytes() for p in [*(run_dir / ".hydra").glob("*.yaml"), run_dir / "metrics.csv"]} == before
    assert run_dirs(tmp_path) == [run_dir]

    # What may change does: more epochs, another thread count, display and checkpoint cadence.
    proc = run_cli(
        [
            "fit",
            f"resume={run_dir}",
            "trainer.epochs=4",
            "trainer.num_threads=1",
            "trainer.progress=none",
            "trainer.checkpoint_every_n_steps=7",
        ],
        tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert summary(run_dir)["epochs_done"] == 4

    # The way out the message names: a new run that starts from the run's last.pt.
    line = _error_line(run_cli(["fit", f"resume={run_dir}", "dataset.subset=300"], tmp_path, env=env))
    way_out = shlex.split(line.split("as a new run: ", 1)[1])
    assert way_out[:2] == ["cnntrain", "fit"] and f"model.weights={run_dir}/checkpoints/last.pt" in way_out
    proc = run_cli(
        [*(a for a in way_out[1:] if not a.startswith("trainer.epochs=")), "trainer.epochs=1"], tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    (new,) = [d for d in run_dirs(tmp_path) if d != run_dir]
    assert summary(new)["status"] == "completed"
    assert f"model.weights={run_dir}/checkpoints/last.pt: 10 tensors loaded" in (new / "fit.log").read_text()
    assert summary(run_dir)["epochs_done"] == 4  # the old run is untouched


def test_resume_may_change_only_the_identity_free_keys():
    from cnntrain.config import FitConfig
    from cnntrain.config.identity import RESUME_FREE, check_resume, flatten, identity_changes
    from cnntrain.errors import UserError

    recorded = OmegaConf.to_container(OmegaConf.structured(FitConfig))
    keys = flatten(recorded)
    assert keys.keys() >= RESUME_FREE  # every key on the list exists
    for key in keys:
        requested = OmegaConf.create(recorded)
        old = OmegaConf.select(requested, key)
        new = {
            bool: lambda v: not v,
            int: lambda v: v + 1,
            float: lambda v: v + 0.5,
            str: lambda v: v + "x",
            list: lambda v: [*v, 0.5],
        }.get(type(old), lambda v: "something")(old)
        OmegaConf.update(requested, key, new)
        changed = identity_changes(recorded, OmegaConf.to_container(requested))
        if key in RESUME_FREE:
            assert changed == [], key
        else:
            assert [k for k, _, _ in changed] == [key]
            with pytest.raises(UserError, match=f"resume cannot change {key} "):
                check_resume(recorded, OmegaConf.to_container(requested), "runs/x/1", "cnntrain fit ...")
    # 3 and 3.0 (YAML and the command line) are the same value; a key the old record lacks is not compared.
    assert identity_changes({"optimizer": {"lr": 3}}, {"optimizer": {"lr": 3.0, "eps": 1e-8}}) == []
