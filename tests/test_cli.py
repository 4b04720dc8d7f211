"""The command line as a user meets it: help, composed configs, and one-line errors for bad input."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


def test_top_level_help_lists_subcommands(tmp_path):
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0
    assert "fit" in proc.stdout and "usage: cnntrain" in proc.stdout


def test_unknown_subcommand_suggests_the_right_one(tmp_path):
    proc = run_cli(["fitt"], tmp_path)
    assert proc.returncode == 2
    assert "did you mean 'fit'" in proc.stderr


def test_fit_help_shows_config_groups_and_options(tmp_path):
    proc = run_cli(["fit", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for group in ("dataset", "model", "augment", "optimizer", "scheduler", "trainer", "experiment"):
        assert f"{group}:" in out
    assert "simple_cnn" in out and "cosine" in out and "adamw" in out and "smoke" in out


def test_cfg_job_prints_the_composed_config_with_overrides(tmp_path):
    proc = run_cli(["fit", "--cfg", "job", "optimizer=sgd", "trainer.epochs=7"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name: sgd" in proc.stdout and "epochs: 7" in proc.stdout and "nesterov: true" in proc.stdout
    assert not (tmp_path / "runs").exists()  # printing a config creates no run


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=resnt8"], "unknown model 'resnt8' (did you mean 'resnet8'?)"),
        (["optimizer=adan"], "unknown optimizer 'adan' (did you mean 'adam'?)"),
        (["trainer.epoch=3"], "did you mean 'epochs'"),
        (["trainer.epochs=abc"], "trainer.epochs"),
        (["optimizer.lr=fast"], "optimizer.lr"),
        (["trainer.batch_size=0"], "trainer.batch_size=0 must be at least 1"),
        (["trainer.epochs=0"], "trainer.epochs=0 must be at least 1"),
        (["optimizer.lr=-1"], "optimizer.lr=-1.0 must be > 0"),
        (["optimizer.lr=0"], "optimizer.lr=0.0 must be > 0"),
        (["dataset.val_fraction=1.5"], "dataset.val_fraction=1.5 must be between 0 and 1"),
        (["trainer.device=cuda"], "no CUDA GPU is available"),
        (["trainer.precision=fp16", "trainer.device=cpu"], "trainer.precision=fp16 needs a GPU"),
        (["trainer.precision=fp8"], "trainer.precision=fp8 is not a valid choice"),
    ],
)
def test_bad_input_gets_one_line_and_no_traceback(tmp_path, args, expected):
    proc = run_cli(["fit", *args], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cnntrain: error:")]
    assert len(errors) == 1, proc.stderr
    assert expected in errors[0]
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.rglob("*.yaml")), "a failed start left a run directory behind"
