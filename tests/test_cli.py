"""The command line as a user meets it: help and composed configs (bad input: tests/test_bad_input.py).

In this process (the `cli_here` fixture: what the console script runs, without an interpreter of its own);
tests/test_startup.py checks that these commands do not import torch.
"""

from __future__ import annotations


def test_top_level_help_lists_subcommands(cli_here):
    proc = cli_here(["--help"])
    assert proc.returncode == 0
    assert "fit" in proc.stdout and "usage: cnntrain" in proc.stdout


def test_unknown_subcommand_suggests_the_right_one(cli_here):
    proc = cli_here(["fitt"])
    assert proc.returncode == 2
    assert "did you mean 'fit'" in proc.stderr


def test_fit_help_shows_config_groups_and_options(cli_here):
    proc = cli_here(["fit", "--help"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for group in ("dataset", "model", "augment", "optimizer", "scheduler", "trainer", "experiment"):
        assert f"{group}:" in out
    assert "simple_cnn" in out and "cosine" in out and "adamw" in out and "smoke" in out


def test_cfg_job_prints_the_composed_config_with_overrides(cli_here, tmp_path):
    proc = cli_here(["fit", "--cfg", "job", "optimizer=sgd", "trainer.epochs=7"])
    assert proc.returncode == 0, proc.stderr
    assert "name: sgd" in proc.stdout and "epochs: 7" in proc.stdout and "nesterov: true" in proc.stdout
    assert not (tmp_path / "runs").exists()  # printing a config creates no run
