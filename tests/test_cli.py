"""The command line as a user meets it: help and composed configs (bad input: tests/test_bad_input.py)."""

from __future__ import annotations

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
