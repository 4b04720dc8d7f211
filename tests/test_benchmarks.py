"""The benchmark suite runs (figures themselves are measured by `make bench`, never asserted in tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_benchmark_suite_runs_in_quick_mode(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run.py"),
            "--quick",
            "--only",
            "peers",
            "--only",
            "startup",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cnntrain fit experiment=fashion_fast" in proc.stdout and "tutorial loop" in proc.stdout
    assert "cnntrain --help" in proc.stdout and "x import torch" in proc.stdout and "torch._dynamo" in proc.stdout


@pytest.mark.slow
def test_the_limit_and_contention_sections_run_in_quick_mode(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run.py"),
            "--quick",
            "--only",
            "limit",
            "--only",
            "contention",
            "--out",
            str(tmp_path / "RESULTS.md"),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "% of limit" in proc.stdout and "| simple_cnn |" in proc.stdout and "| resnet8 |" in proc.stdout
    assert "| no load |" in proc.stdout and "| 1 busy process |" in proc.stdout
    assert not (tmp_path / "RESULTS.md").exists()  # --quick writes nothing


@pytest.mark.slow
def test_ab_compares_two_checkouts_round_by_round():
    """benchmarks/ab.py: the refactor check. A checkout against itself runs both sides, alternating."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "ab.py"),
            "--a",
            str(REPO),
            "--b",
            str(REPO),
            "--rounds",
            "2",
            "--",
            "experiment=smoke",
            "trainer.epochs=1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    order = [ln.split(":")[0] for ln in proc.stdout.splitlines() if ln.startswith("round ")]
    assert order == ["round 1 A", "round 1 B", "round 2 B", "round 2 A"]
    assert "B/A: images/s" in proc.stdout


def _suite():
    """benchmarks/run.py as a module."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return run


@pytest.mark.slow
def test_a_timed_fit_leaves_no_drawer_behind(tmp_path):
    """A background figure drawer outlives its fit: it would load the next timed fit and once wrote into ab.py's
    temporary folder while it was being removed (CI failed on it). Benchmark fits draw no figures unless asked."""
    suite = _suite()
    summary, _, _, _ = suite.cnntrain_fit(["experiment=smoke", "trainer.epochs=1"], tmp_path)
    figures = tmp_path / summary["run_dir"] / "figures"
    assert (figures / ".pending.npz").is_file()  # left for `cnntrain report RUN figures=true`
    assert not (figures / "draw.log").exists() and not list(figures.glob("*.png"))


def test_the_startup_section_waits_for_a_started_drawer_only(tmp_path):
    """Figures left pending by trainer.figures=off are drawn by nobody: waiting for them cost the quick suite its
    whole 300 s timeout. A started drawer (it logs to figures/draw.log) is waited for."""
    suite = _suite()
    figures = tmp_path / "runs" / "fit" / "figures"
    figures.mkdir(parents=True)
    (figures / ".pending.npz").write_bytes(b"")
    assert suite._figures_done(tmp_path, timeout=30) < 5
    (figures / "draw.log").write_bytes(b"")
    assert suite._figures_done(tmp_path, timeout=0.5) >= 0.5
