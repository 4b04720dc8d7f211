"""What a new user met when following only the README and `--help` (issue 24): each test types the
commands as the user did."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import cli_in_process


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _written_to(out: str) -> Path:
    """The folder the last line of a command's output names."""
    return Path(out.strip().splitlines()[-1].rpartition(" to ")[2])


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"d{i}.png")
    return folder


# --------------------------------------------------------------------------- item 1: a folder per call


def test_each_call_keeps_its_own_results(smoke_run, tmp_path, capsys):
    folder = _images(tmp_path / "digits", 3)
    code, out, err = cli_in_process(["evaluate", f"ckpt={smoke_run}", "tensorboard=false"], capsys)
    assert code == 0, err
    first = _written_to(out)
    code, out, err = cli_in_process(["evaluate", f"ckpt={smoke_run}", "tensorboard=false", "split=val"], capsys)
    assert code == 0, err
    second = _written_to(out)
    assert first != second and first.parent == second.parent == smoke_run / "evaluate"
    assert "-test-" in first.name and "-val-" in second.name
    assert (first / "metrics.json").is_file() and (second / "metrics.json").is_file()

    # predict on one file, then on the folder: both sets of predictions survive, in folders named for them.
    code, out, err = cli_in_process(["predict", f"ckpt={smoke_run}", f"inputs={folder / 'd0.png'}"], capsys)
    assert code == 0, err
    one = _written_to(out).parent
    code, out, err = cli_in_process(["predict", f"ckpt={smoke_run}", f"inputs={folder}"], capsys)
    assert code == 0, err
    every = _written_to(out).parent
    assert one.name.startswith("d0-") and every.name.startswith("digits-")
    assert len(_rows(one / "predictions.csv")) == 1 and len(_rows(every / "predictions.csv")) == 3

    # explain twice: no folder mixes the maps of two calls.
    made = []
    for inputs in (folder, folder / "d1.png"):
        code, out, err = cli_in_process(["explain", f"ckpt={smoke_run}", f"inputs={inputs}"], capsys)
        assert code == 0, err
        made.append(_written_to(out))
    assert made[0] != made[1]
    for where, n in zip(made, (3, 1), strict=True):
        assert len(list(where.glob("*_gradcam.png"))) == len(_rows(where / "explain.csv")) == n


def test_out_refuses_a_folder_with_files_unless_overwrite(smoke_run, tmp_path, capsys):
    folder = _images(tmp_path / "digits", 2)
    out_dir = tmp_path / "maps"
    code, _, err = cli_in_process(["explain", f"ckpt={smoke_run}", f"inputs={folder}", f"out={out_dir}"], capsys)
    assert code == 0, err
    code, _, err = cli_in_process(
        ["explain", f"ckpt={smoke_run}", f"inputs={folder / 'd0.png'}", f"out={out_dir}"], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "overwrite=true" in err
    assert len(_rows(out_dir / "explain.csv")) == 2  # untouched
    code, _, err = cli_in_process(
        ["explain", f"ckpt={smoke_run}", f"inputs={folder / 'd0.png'}", f"out={out_dir}", "overwrite=true"], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in out_dir.glob("*_gradcam.png")) == ["d0_gradcam.png"]

    # overwrite=true never empties a folder that is not an earlier call's results.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = cli_in_process(
        ["predict", f"ckpt={smoke_run}", f"inputs={folder}", f"out={mine}", "overwrite=true"], capsys
    )
    assert code == 2 and "did not write" in err and (mine / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- item 2: logs hold the output


def test_command_logs_hold_what_was_printed(smoke_run, tmp_path, capsys):
    folder = _images(tmp_path / "digits", 2)
    for command, extra in (
        ("evaluate", ["tensorboard=false"]),
        ("predict", [f"inputs={folder}"]),
        ("explain", [f"inputs={folder}"]),
    ):
        out_dir = tmp_path / command
        code, out, err = cli_in_process([command, f"ckpt={smoke_run}", f"out={out_dir}", *extra], capsys)
        assert code == 0, err
        log = (out_dir / f"{command}.log").read_text()
        for line in out.strip().splitlines():
            assert line.rstrip() in log, (command, line)


# --------------------------------------------------------------------------- item 7: suggested commands work


def _suggested(err: str) -> list[str]:
    """The `cnntrain ...` command at the end of a one-line error, as arguments."""
    import shlex

    (line,) = err.strip().splitlines()
    return shlex.split(line[line.rindex("cnntrain fit ") :])[1:]


def test_every_command_an_error_suggests_works_as_printed(tmp_path, monkeypatch, capsys):
    from tests.faults import flip_a_byte

    monkeypatch.chdir(tmp_path)
    code, _, err = cli_in_process(["fit", "experiment=smoke", "trainer.epochs=2", "dataset.subset=300"], capsys)
    assert code == 0, err
    (run,) = (tmp_path / "runs" / "smoke").iterdir()
    tries = {
        "another model": ["fit", f"resume={run}", "model=simple_cnn"],
        "another subset": ["fit", f"resume={run}", "dataset.subset=200"],
        "weights only": ["fit", f"resume={run}/checkpoints/best.pt"],
        "a damaged last.pt": ["fit", f"resume={run}"],  # after the damage below
    }
    for what, args in tries.items():
        if what == "a damaged last.pt":
            flip_a_byte(run / "checkpoints" / "last.pt")
        code, _, err = cli_in_process([*args, "trainer.epochs=3"], capsys)
        assert code == 2 and "cnntrain fit " in err, (what, err)
        suggested = _suggested(err)
        code, _, err = cli_in_process(suggested, capsys)
        assert code == 0, (what, suggested, err)

    # A sweep with a failed job names the report of the whole sweep.
    code, _, err = cli_in_process(
        [
            "fit",
            "--multirun",
            "experiment=smoke",
            "trainer.epochs=1",
            "dataset.subset=200",
            "model.weights=missing.pt,null",
        ],
        capsys,
    )
    assert code == 2 and "`cnntrain report " in err, err
    report = err.split("`cnntrain report ", 1)[1].split("`", 1)[0]
    code, out, err = cli_in_process(["report", report], capsys)
    assert code == 0 and "1 completed, 1 failed" in out, err


# --------------------------------------------------------------------------- item 9: sweeps checked first


def test_a_sweep_is_checked_before_its_first_job_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli_in_process(
        ["fit", "--multirun", "experiment=smoke", "optimizer.lr=1e-3,-1", "trainer.batch_size=32,64"], capsys
    )
    assert code == 2 and "epoch" not in out, out
    assert err.strip() == (
        "cnntrain: error: optimizer.lr=-1.0 must be > 0, in 2 job(s): optimizer.lr=-1 "
        "trainer.batch_size=32, ...; nothing of the sweep (4 jobs) was trained"
    )
    assert not (tmp_path / "runs").exists()

    # A value list without --multirun: one line, and the command it suggests runs the sweep.
    code, _, err = cli_in_process(
        ["fit", "optimizer.lr=1e-3,3e-3", "experiment=smoke", "trainer.epochs=1", "dataset.subset=200"], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Ambiguous" not in err, err
    suggested = err[err.index("(cnntrain fit ") + 1 : err.index(");")]
    import shlex

    code, _, err = cli_in_process(shlex.split(suggested)[1:], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "runs" / "smoke" / "multirun").glob("*/*/summary.json"))) == 2


# --------------------------------------------------------------------------- item 8: a misspelt CSV label


def test_a_misspelt_label_and_broken_files_are_one_warning_each(tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "shapes"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for name in ("circle", "square", "triangle"):
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(data / f"{name}{i}.png")
            rows.append(f"{name}{i}.png,{name}")
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(data / "odd.png")
    rows.append("odd.png,circel")
    # Two broken files of two kinds: one no decoder recognises, one cut short (found only when decoded).
    (data / "notes.png").write_bytes(b"not an image")
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(png, "PNG")
    (data / "cut.png").write_bytes(png.getvalue()[:-30])
    rows += ["notes.png,circle", "cut.png,square"]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")

    args = ["fit", "dataset=csv", f"dataset.root={data}", "dataset.file=labels.csv", "trainer.dry_run=true"]
    code, _, err = cli_in_process(args, capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("cnntrain: warning:")]
    assert len([w for w in warned if "could not be decoded" in w]) == 1, warned
    assert any("skipped 2 file(s)" in w and "notes.png" in w and "cut.png" in w for w in warned), warned
    (label,) = [w for w in warned if "very few training images" in w]
    assert "circel (1 image) looks like circle (20)" in label and "dataset.min_class_images=2" in label

    code, _, err = cli_in_process([*args, "dataset.min_class_images=2"], capsys)
    assert code == 2 and "class circel (1 image) looks like circle (20)" in err


# --------------------------------------------------------------------------- item 3: a report that reads


def _fake_run(folder: Path, overrides: list[str], **record) -> None:
    import json

    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "summary.json").write_text(
        json.dumps({"status": "completed", "best_epoch": 3, "test_acc": 0.9, "train_seconds": 12.0, **record})
    )


def test_the_report_of_a_users_runs_fits_120_columns(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs" / "default"
    _fake_run(
        runs / "2026-01-31_12-00-00_ab12",
        ["trainer.epochs=3", "dataset=imagefolder", "dataset.root=/home/someone/data/cats_and_dogs"],
        best_val_acc=0.81,
    )
    _fake_run(
        runs / "2026-01-31_12-10-00_cd34",
        ["trainer.epochs=5", "optimizer.lr=0.003", f"resume={runs}/2026-01-31_12-00-00_ab12"],
        best_val_acc=0.93,
    )
    _fake_run(
        runs / "2026-01-31_12-20-00_ef56",
        ["trainer.epochs=5", "trainer.progress=plain", "model=resnet8", "optimizer.lr=0.003"],
        best_val_acc=0.95,
    )
    monkeypatch.setenv("COLUMNS", "120")
    code, out, err = cli_in_process(["report", str(runs)], capsys)
    assert code == 0, err
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 120, out
    header = next(line for line in out.splitlines() if "best val/acc" in line)
    assert "resume" not in header and "progress" not in header and "lr" in header and "epochs" in header
    for name in ("2026-01-31_12-00-00_ab12", "2026-01-31_12-10-00_cd34", "2026-01-31_12-20-00_ef56"):
        assert name in out
    assert "(they are in the CSV): " in out and "dataset.root" in out.split("(they are in the CSV): ")[1]

    # Narrower than the table: one block per run, every name and value whole.
    monkeypatch.setenv("COLUMNS", "60")
    code, out, err = cli_in_process(["report", str(runs)], capsys)
    assert code == 0, err
    assert "…" not in out and "┃" not in out
    assert "2026-01-31_12-20-00_ef56\n" in out and "dataset.root=/home/someone/data/cats_and_dogs" in out


# --------------------------------------------------------------------------- item 4: the names chosen


def test_the_model_is_named_as_chosen(smoke_run, tmp_path, capsys):
    # experiment=smoke picks model=tiny_cnn, a small simple_cnn: both names, the chosen one first.
    assert "model      tiny_cnn (simple_cnn): " in (smoke_run / "fit.log").read_text()
    image = _images(tmp_path / "digits", 1) / "d0.png"
    for command, extra in (
        ("evaluate", ["tensorboard=false"]),
        ("predict", [f"inputs={image}"]),
        ("explain", [f"inputs={image}"]),
    ):
        code, out, err = cli_in_process([command, f"ckpt={smoke_run}", f"out={tmp_path / command}", *extra], capsys)
        assert code == 0, err
        assert "tiny_cnn (simple_cnn) trained on mnist5k" in out.splitlines()[0], (command, out)


# --------------------------------------------------------------------------- item 5: one reason for the threads


def test_every_job_of_a_sweep_under_load_says_why_its_thread_count(tmp_path, monkeypatch, capsys):
    import re

    import torch

    from cnntrain.engine import device
    from cnntrain.io import cpus

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    # Two cores, of which other processes keep 1.6 busy, and torch's own default of two threads.
    monkeypatch.setattr(cpus, "affinity", lambda: {0, 1})
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: None)
    monkeypatch.setattr(cpus, "others_busy", lambda since=None: 1.6)
    monkeypatch.setattr(device, "TORCH_DEFAULT_THREADS", 2, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code, out, err = cli_in_process(
            [
                "fit",
                "--multirun",
                "experiment=smoke",
                "trainer.epochs=1",
                "dataset.subset=100",
                "trainer.progress=plain",
                "optimizer.lr=1e-3,2e-3",
            ],
            capsys,
        )
    finally:
        torch.set_num_threads(before)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.strip().startswith("device")]
    assert len(lines) == 2, out
    for line in lines:
        count = int(re.search(r"\((\d+) threads?\)", line).group(1))
        assert f"threads: {count} of 2 usable cores: other processes keep 1.6 of 2 cores busy" in line, line


# --------------------------------------------------------------------------- item 6: per-key help


def test_fit_help_of_a_group_lists_its_keys_with_what_they_mean(capsys):
    code, out, err = cli_in_process(["fit", "--help", "dataset"], capsys)
    assert code == 0 and not err, err
    lines = out.splitlines()
    at = lines.index("  dataset.subset: int or null = null")
    assert "training images" in lines[at + 1]
    assert "  trainer.epochs: int = 5" not in lines and "cnntrain list dataset" in out
    code, out, _ = cli_in_process(["fit", "--help", "trainer.epochs"], capsys)
    assert code == 0 and "  trainer.epochs: int = 5" in out.splitlines()
    code, _, err = cli_in_process(["fit", "--help", "datset"], capsys)
    assert code == 2 and "did you mean 'dataset'?" in err


# --------------------------------------------------------------------------- item 10: smaller things


def test_ctrl_c_before_training_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    from cnntrain.engine import loop

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "fit", interrupted)
    code, _, err = cli_in_process(["fit", "experiment=smoke"], capsys)
    assert code == 130
    assert err.strip() == (
        "cnntrain: error: interrupted before training started: nothing was saved, and there is nothing to resume"
    )
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.pt"))


def test_an_interrupted_run_summarises_and_its_resume_names_epoch_and_step(tmp_path, monkeypatch, capsys):
    import itertools
    import signal

    from cnntrain.engine.signals import StopRequested

    monkeypatch.chdir(tmp_path)
    checks = itertools.count()

    def ctrl_c_at_step_40(self):  # the loop asks between steps; the 41st asks after step 40 (8 of epoch 2)
        if next(checks) >= 40:
            self.signum = signal.SIGINT
        return self.signum is not None

    with monkeypatch.context() as patch:
        patch.setattr(StopRequested, "__bool__", ctrl_c_at_step_40)
        code, out, err = cli_in_process(["fit", "experiment=smoke", "trainer.progress=plain"], capsys)
    assert code == 130, err
    # The partial summary, like the final table, before the line that says how to go on.
    assert "interrupted" in out and "best val/acc" in out and "epochs done" in out
    (run,) = (tmp_path / "runs" / "smoke").iterdir()
    code, out, err = cli_in_process(["fit", f"resume={run}", "trainer.progress=plain"], capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.strip().startswith("resume"))
    steps = int(line.split(" of ")[1].split()[0])
    assert steps == 32 and "in epoch 2, after step " in line, line


def test_export_names_every_file_it_writes_with_the_same_permissions(smoke_run, tmp_path, capsys):
    out_dir = tmp_path / "exported"
    code, out, err = cli_in_process(["export", f"ckpt={smoke_run}", "format=state_dict", f"out={out_dir}"], capsys)
    assert code == 0, err
    first = out.splitlines()[0]
    assert str(out_dir / "model.state_dict.pt") in first and str(out_dir / "model.safetensors") in first
    modes = {p.name: p.stat().st_mode & 0o777 for p in out_dir.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_a_narrow_terminal_drops_progress_columns_instead_of_cutting_them():
    import io

    from rich.console import Console

    from cnntrain.io.console import RichReporter

    for width in (60, 80, 100):
        reporter = RichReporter()
        reporter.console = Console(width=width, file=io.StringIO(), force_terminal=True, color_system=None)
        reporter.epoch_begin(2, 10, 125)
        reporter.epoch_update(22, {"loss": 0.4321, "acc": 0.8765, "img/s": 2888.0, "data": 0.01})
        shown = io.StringIO()
        Console(width=width, file=shown, color_system=None).print(
            reporter._progress.make_tasks_table(reporter._progress.tasks)
        )
        reporter._progress.stop()
        text = shown.getvalue()
        assert "…" not in text and "22/125" in text and "epoch 2/10" in text, (width, text)


def test_flipping_images_that_flips_relabel_is_one_warning(tmp_path, monkeypatch, capsys):
    """augment=standard mirrors images left-right; on digits that makes a 2 that is no 2, so the run says so."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_in_process(["fit", "augment=standard", "trainer.dry_run=true"], capsys)
    assert code == 0, err
    (line,) = [w for w in err.splitlines() if "augment.hflip" in w]
    assert line.startswith("cnntrain: warning: augment.hflip=0.5 mirrors mnist5k images") and "hflip=0" in line
    code, _, err = cli_in_process(["fit", "augment=standard", "augment.hflip=0", "trainer.dry_run=true"], capsys)
    assert code == 0 and "augment.hflip" not in err, err
