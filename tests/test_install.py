"""A plain wheel install works from an unrelated directory: configs and embedded data ship inside it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_wheel_installs_and_trains_from_an_unrelated_directory(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src],
                   check=True, capture_output=True)
    (wheel,) = dist.glob("cnntrain-*.whl")
    # The venv borrows torch & co. from this interpreter but gets its own cnntrain from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    python, cli = venv / "bin" / "python", venv / "bin" / "cnntrain"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True,
                   capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import cnntrain.config.compose as c; print(c.config_dir())"], cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's own configs, not the checkout's

    proc = subprocess.run([cli, "fit", "experiment=smoke", "trainer.epochs=1"], cwd=elsewhere,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((elsewhere / "runs" / "smoke").glob("*/checkpoints/best.pt"))
    proc = subprocess.run([cli, "fit", "--help"], cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert "simple_cnn" in proc.stdout and "smoke" in proc.stdout
