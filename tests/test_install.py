"""A plain wheel install works from an unrelated directory: configs and embedded data ship inside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def borrow_the_test_interpreters_packages(python) -> None:
    """Let a new venv import torch & co. from wherever this interpreter finds them: the project's .venv, the
    user's own environment or a plain interpreter. (`--system-site-packages` would borrow the *base*
    interpreter's packages, which inside a venv are not the ones the tests run with.) addsitedir also reads
    their .pth files, so an editable cnntrain would be importable too, but only after the venv's own
    site-packages, where the wheel's copy is."""
    import site

    dirs = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs)
    (Path(purelib) / "zz_borrowed_from_the_tests.pth").write_text(lines)


@pytest.mark.slow
def test_wheel_installs_and_trains_from_an_unrelated_directory(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            "runs",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".ruff_cache",
            ".venv",
            ".env",
        ),
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("cnntrain-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python, cli = venv / "bin" / "python", venv / "bin" / "cnntrain"
    borrow_the_test_interpreters_packages(python)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [python, "-c", "import cnntrain.config.compose as c; print(c.config_dir())"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's own configs, not the checkout's

    proc = subprocess.run(
        [cli, "fit", "experiment=smoke", "trainer.epochs=1"], cwd=elsewhere, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((elsewhere / "runs" / "smoke").glob("*/checkpoints/best.pt"))
    proc = subprocess.run([cli, "fit", "--help"], cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert "simple_cnn" in proc.stdout and "smoke" in proc.stdout


@pytest.mark.slow
def test_suite_runs_without_the_optional_extras_and_says_what_is_skipped():
    """`make install` installs no extra: every test must still be collected, and an extra's tests are skipped
    with the extra that installs what they need (tests/without_extras.py hides the extras' modules)."""
    script = [sys.executable, str(REPO / "tests" / "without_extras.py"), "-p", "no:cacheprovider"]
    proc = subprocess.run([*script, "--collect-only", "-q"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]
    extras = (
        "slurm_preset or optuna_study or launcher_plugins or submitit or onnxruntime"
        " or optuna_smoke or (experiment and tune)"
    )
    # The repeated-defaults check reads the experiments' YAML only, so it runs without the extras.
    extras = f"({extras}) and not repeats_a_schema_default"
    proc = subprocess.run(
        [
            *script,
            "-q",
            "-rs",
            "tests/test_sweeps.py",
            "tests/test_after_training.py",
            "tests/test_configs.py",
            "-k",
            extras,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for extra in ("joblib", "slurm", "optuna", "onnx"):
        assert f"is not installed (pip install 'cnntrain[{extra}]')" in proc.stdout, proc.stdout[-3000:]
    assert "passed" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]  # all of them skipped


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`make ARGS` in the checkout, with no virtual environment active unless env names one."""
    import os

    base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "MAKEFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_targets_run_through_the_active_environment_or_the_project_venv(tmp_path):
    """The two commands stay two: every target uses one interpreter, the one install used."""
    proc = make("test", "VENV=" + str(tmp_path / "none"))  # nothing installed yet
    assert proc.returncode != 0
    assert "run 'make install' first" in proc.stdout + proc.stderr
    for target in ("fit", "test", "lint"):
        proc = make("-n", target, env={"VIRTUAL_ENV": str(tmp_path / "mine")})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(str(tmp_path / "mine" / "bin" / "python") + " -m "), proc.stdout
    proc = make("-n", "fit", "PYTHON=/opt/py/bin/python3", env={"VIRTUAL_ENV": str(tmp_path / "mine")})
    assert proc.stdout.startswith("/opt/py/bin/python3 -m cnntrain fit"), proc.stdout  # a named one wins


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_without_python3_venv_says_what_to_install(tmp_path):
    """Debian/Ubuntu ship venv's pip bootstrap as python3-venv: without it, one line, not a traceback, and no
    half-made .venv left behind for the next try to trip on."""
    fake = tmp_path / "python3"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  echo "The virtual environment was not created successfully because ensurepip is not available." >&2
  exit 1
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    venv = tmp_path / ".venv"
    proc = make("install", f"VENV={venv}", f"BASE_PYTHON={fake}")
    assert proc.returncode != 0
    assert "apt install python3-venv" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not venv.exists()
