"""Shared helpers: run the real `cnntrain` CLI in a subprocess, in a temporary directory."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# The longest files first. `make test` gives each file to one worker (pytest-xdist, --dist loadscope), so a
# long file that happened to start last would run alone for minutes after the others finished.
LONGEST_FIRST = (
    "test_bad_input.py",
    "test_benchmarks.py",
    "test_gpu_check.py",
    "test_plugins.py",
    "test_first_use.py",
    "test_optuna.py",
    "test_tuning.py",
    "test_imbalance.py",
    "test_fashion_accuracy.py",
    "test_sweeps.py",
    "test_resume.py",
    "test_signals.py",
    "test_folds.py",
    "test_timm.py",
    "test_startup.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """The suite's own cache folder ($XDG_CACHE_HOME, inherited by xdist's workers and every CLI subprocess):
    cnntrain's layout/chunk probe keeps its verdicts there, so a test neither reads a verdict that the user's
    own runs left nor leaves one behind in ~/.cache."""
    if os.environ.get("CNNTRAIN_TEST_CACHE"):
        return  # an xdist worker: the controller made it
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="cnntrain-test-cache-")
    os.environ["CNNTRAIN_TEST_CACHE"] = os.environ["XDG_CACHE_HOME"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it. find_spec("a.b") imports "a" and raises
    when "a" itself is missing (hydra_plugins.x without any Hydra plugin), so that counts as not installed."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def needs(module: str, extra: str) -> pytest.MarkDecorator:
    """Skip a test of an optional extra when it is not installed, saying which extra installs it."""
    return pytest.mark.skipif(
        not installed(module), reason=f"{module} is not installed (pip install 'cnntrain[{extra}]')"
    )


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None):
    """`python -m cnntrain ARGS` in cwd; returns the CompletedProcess (text mode)."""
    # PYTHONPATH: the checkout's own code, whatever an editable install elsewhere points at.
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "cnntrain", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def cli_in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`cnntrain ARGS` in this process (where the test's monkeypatching reaches): (exit code, stdout, stderr)."""
    from cnntrain import cli

    code = 0
    try:
        cli.main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def cli_here(tmp_path, capsys, monkeypatch):
    """`cnntrain ARGS` in this process with tmp_path as the current folder, answered like run_cli (returncode,
    stdout, stderr): for tests of help, composed configs and dry runs, which need no interpreter of their own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None

    def run(args: list[str]) -> subprocess.CompletedProcess:
        code, out, err = cli_in_process(args, capsys)
        return subprocess.CompletedProcess(["cnntrain", *args], code, out, err)

    yield run
    if threads is not None:  # a dry run sets torch's thread count for the process; later tests get it back
        sys.modules["torch"].set_num_threads(threads)


def run_dirs(root: Path) -> list[Path]:
    """Run directories (those holding .hydra/) under root/runs, oldest first."""
    return sorted((p.parent for p in (root / "runs").rglob(".hydra")), key=lambda p: p.stat().st_mtime)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv of a run, a dict per epoch."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_checkpoint(run_dir: Path, name: str = "last.pt") -> dict:
    import torch

    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


def wait_for_figures(run_dir: Path, timeout: float = 120) -> None:
    """A completed fit draws its figures in a child process it does not wait for (trainer.figures=background):
    wait until that child has finished (it removes figures/.pending.npz last)."""
    import time

    from cnntrain.io.figures import figures_pending

    deadline = time.monotonic() + timeout
    while figures_pending(run_dir):
        if time.monotonic() > deadline:
            log = run_dir / "figures" / "draw.log"
            pytest.fail(
                f"figures of {run_dir} not drawn in {timeout:.0f} s: "
                f"{log.read_text() if log.is_file() else 'no draw.log'}"
            )
        time.sleep(0.1)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One real `cnntrain fit experiment=smoke` run shared by the tests that only read its outputs."""
    cwd = tmp_path_factory.mktemp("smoke")
    proc = run_cli(["fit", "experiment=smoke"], cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = run_dirs(cwd)
    wait_for_figures(run_dir)  # every test that reads it sees the whole run
    return run_dir


@pytest.fixture(scope="session")
def one_epoch_smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One `cnntrain fit experiment=smoke trainer.epochs=1` through a pipe (as CI and logs see it), shared by the
    tests that only read what it printed and wrote: (the process, its folder)."""
    cwd = tmp_path_factory.mktemp("one_epoch")
    return run_cli(["fit", "experiment=smoke", "trainer.epochs=1"], cwd), cwd


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """The smoke model after a little training, as a state_dict file: a known, confident start."""
    from tests.pretrain import TINY, pretrain

    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    return path, pretrain(path, TINY)


@pytest.fixture(scope="session")
def stalled_run(tiny_weights, tmp_path_factory):
    """lr 1e-9: the weights stay put, so validation accuracy never improves; label smoothing 0.2, fp32.
    Read by the early-stopping and label-smoothing tests."""
    path, start = tiny_weights
    cwd = tmp_path_factory.mktemp("stalled")
    proc = run_cli(
        [
            "fit",
            "experiment=smoke",
            f"model.weights={path}",
            "optimizer.lr=1e-9",
            "trainer.label_smoothing=0.2",
            "trainer.precision=32",
            "trainer.epochs=3",
            "trainer.early_stopping_patience=1",
            "trainer.progress=plain",
        ],
        cwd,
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(cwd)
    return run_dir, proc.stdout, start


def write_multilabel_digits(folder: Path, n: int = 5000) -> Path:
    """A multi-label CSV set from the embedded digits: labels `even` and `greater_than_4`, so 0, 2 and 4 are
    `even`, 5, 7 and 9 `greater_than_4`, 6 and 8 both (`even|greater_than_4`) and 1 and 3 neither (`-`): n digits
    spread evenly over the 5,000 (the file is sorted by digit, so every digit is in). Writes folder/img/<i>.png and
    folder/labels.csv; returns folder."""
    import numpy as np
    from PIL import Image

    data = np.load(REPO / "cnntrain" / "data" / "mnist5k.npz")
    pick = np.linspace(0, len(data["labels"]) - 1, n).round().astype(int)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    for i in pick.tolist():
        digit = int(data["labels"][i])
        labels = [name for name, on in (("even", digit % 2 == 0), ("greater_than_4", digit > 4)) if on]
        Image.fromarray(data["images"][i]).save(folder / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{'|'.join(labels) or '-'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder
