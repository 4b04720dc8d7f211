"""cnntrain's Optuna sweeper on current Optuna: pruning (sweep.pruner) and one study shared by processes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, needs, run_cli

# Six learning rates, two of them far too small to learn anything in three epochs.
SIX_LRS = "optimizer.lr=choice(1e-6,2e-6,2e-3,3e-3,4e-3,5e-3)"
STUDY = [
    "--multirun",
    "experiment=optuna_smoke",
    "trainer.progress=none",
    "dataset.subset=400",
    "trainer.batch_size=32",
]


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def _trial(job: Path) -> int:
    overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
    return int(next(o for o in overrides if o.startswith("sweep.trial=")).split("=")[1])


@needs("optuna", "optuna")
def test_a_search_space_becomes_optuna_distributions():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from cnntrain.cli.optuna_sweeper import distribution

    parse = OverridesParser.create().parse_overrides
    (lr, bs, width, drop, n) = parse(
        [
            "a=tag(log, interval(1e-4, 1e-2))",
            "b=choice(16, 32)",
            "c=range(8, 33, 8)",
            "d=interval(0.0, 0.5)",
            "e=tag(int, interval(1, 4))",
        ]
    )
    assert distribution(lr) == FloatDistribution(1e-4, 1e-2, log=True)
    assert distribution(bs) == CategoricalDistribution([16, 32])
    assert distribution(width) == IntDistribution(8, 32, step=8)
    assert distribution(drop) == FloatDistribution(0.0, 0.5)
    assert distribution(n) == IntDistribution(1, 4)


@needs("optuna", "optuna")
@pytest.mark.slow
def test_the_median_pruner_stops_bad_learning_rates_early_and_report_counts_them(tmp_path):
    proc = run_cli(
        [
            "fit",
            *STUDY,
            "name=prune",
            "hydra/sweeper/sampler=grid",
            "hydra.sweeper.sampler.seed=0",
            "hydra.sweeper.n_trials=6",
            SIX_LRS,
            "trainer.epochs=3",
            "sweep.pruner=median",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sweep,) = (tmp_path / "runs" / "prune" / "multirun").iterdir()
    jobs = _jobs(sweep)
    assert len(jobs) == 6
    summaries = {_trial(j): json.loads((j / "summary.json").read_text()) for j in jobs}
    pruned = {n: s for n, s in summaries.items() if s["status"] == "pruned"}
    assert pruned, {n: s["status"] for n, s in summaries.items()}
    assert all(s["pruned_epoch"] < 3 for s in pruned.values())  # stopped before its last epoch
    assert all(s["status"] == "completed" for n, s in summaries.items() if n not in pruned)
    with sqlite3.connect(tmp_path / "runs" / "prune" / "optuna.db") as con:
        states = dict(con.execute("select number, state from trials").fetchall())
    assert {n for n, st in states.items() if st == "PRUNED"} == set(pruned)  # the study agrees
    assert "pruned" in proc.stdout  # the sweep's closing line counts them

    report = run_cli(["report", str(sweep)], tmp_path)
    assert report.returncode == 0, report.stderr
    assert f"{6 - len(pruned)} completed, {len(pruned)} pruned" in report.stdout
    assert "continue:" not in report.stdout  # a pruned trial is over, not unfinished


@needs("optuna", "optuna")
@pytest.mark.slow
def test_two_sweep_processes_share_one_sqlite_study(tmp_path):
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cnntrain",
                "fit",
                *STUDY,
                "trainer.epochs=1",
                "hydra.sweeper.n_trials=3",
                f"hydra.sweeper.sampler.seed={seed}",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**__import__("os").environ, **env},
        )
        for seed in (1, 2)
    ]  # each worker its own sampler seed, or both propose the same points
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, out + err
    with sqlite3.connect(tmp_path / "runs" / "optuna_smoke" / "optuna.db") as con:
        trials = con.execute("select trial_id, number, state from trials").fetchall()
        params = con.execute("select trial_id, param_name, param_value from trial_params").fetchall()
    assert sorted(n for _, n, _ in trials) == list(range(6))
    assert {st for _, _, st in trials} == {"COMPLETE"}
    points: dict[int, tuple] = {}
    for trial, name, value in sorted(params):
        points[trial] = (*points.get(trial, ()), (name, value))
    assert len(set(points.values())) == 6  # all distinct
    sweeps = list((tmp_path / "runs" / "optuna_smoke" / "multirun").iterdir())
    assert len(sweeps) == 2
    recorded = sorted(_trial(j) for s in sweeps for j in _jobs(s))
    assert recorded == list(range(6))  # every trial ran as exactly one job, in one of the two sweeps


@needs("optuna", "optuna")
def test_folds_are_not_an_optuna_search_dimension(tmp_path):
    proc = run_cli(["fit", "experiment=optuna_smoke", "trainer.folds=3"], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "trainer.folds runs its folds as the jobs of a plain sweep" in lines[0]
