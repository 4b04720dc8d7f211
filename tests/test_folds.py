"""k-fold cross-validation: trainer.folds=K runs the folds as the jobs of one sweep."""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from cnntrain.data.folds import fold_parts
from tests.conftest import run_cli, summary


def test_fold_parts_are_stratified_disjoint_and_cover_everything():
    labels = np.repeat(np.arange(4), [30, 30, 20, 7])
    parts = fold_parts(labels, 5, 0)
    assert len(parts) == 5
    joined = np.sort(np.concatenate(parts))
    assert np.array_equal(joined, np.arange(len(labels)))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for p in parts:  # each class spread over the folds
        assert abs(int((labels[p] == 0).sum()) - 6) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, fold_parts(labels, 5, 0), strict=True))


def _val_items(job: Path) -> list[str]:
    with open(job / "splits.csv", newline="") as f:
        return [r["item"] for r in csv.DictReader(f) if r["split"] == "val"]


@pytest.mark.slow
def test_three_folds_validate_on_every_image_once_and_report_the_mean(tmp_path):
    args = ["fit", "experiment=smoke", "trainer.epochs=1", "trainer.folds=3", "trainer.progress=none"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    (sweep,) = (tmp_path / "runs" / "smoke" / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").is_file())
    assert [summary(j)["fold"]["fold"] for j in jobs] == [0, 1, 2]
    vals = [_val_items(j) for j in jobs]
    with open(jobs[0] / "splits.csv", newline="") as f:
        pool = [r["item"] for r in csv.DictReader(f) if r["split"] in ("train", "val")]
    assert sorted(v for fold in vals for v in fold) == sorted(pool)  # disjoint, and together all of them
    assert len(pool) == 1500 and all(len(v) == 500 for v in vals)  # smoke: 1,000 train + 500 val

    report = run_cli(["report", str(sweep)], tmp_path)
    assert report.returncode == 0, report.stderr
    accs = [summary(j)["test_acc"] for j in jobs]
    m = re.search(r"test acc\s+([0-9.]+) ± ([0-9.]+)", report.stdout)
    assert m, report.stdout
    assert float(m.group(1)) == pytest.approx(statistics.fmean(accs), abs=5e-5)
    assert float(m.group(2)) == pytest.approx(statistics.stdev(accs), abs=5e-5)

    # resume=auto finds the sweep, sees every fold done and trains nothing again.
    again = run_cli([*args, "resume=auto"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"continuing the sweep in {sweep.relative_to(tmp_path)}" in again.stdout or str(sweep) in again.stdout
    assert len(list((tmp_path / "runs" / "smoke" / "multirun").iterdir())) == 1
