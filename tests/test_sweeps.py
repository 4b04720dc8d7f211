"""Sweeps as a user meets them: named job directories, a report that keeps failures, resume=auto,
Optuna studies, parallel and submitit launchers."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import needs, run_cli, run_dirs, summary

SMOKE = ["experiment=smoke", "trainer.epochs=1", "trainer.progress=plain"]


def _sweep_dir(root: Path) -> Path:
    (sweep,) = (root / "runs").glob("*/multirun/*")
    return sweep


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted(
        (p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: int(p.name.split("_", 1)[0]),
    )


def _hparams(tb_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    data = plugin_data_pb2.HParamsPluginData.FromString(
        ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    return {k: v.number_value or v.string_value for k, v in data.session_start_info.hparams.items()}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- grid sweeps and report


@pytest.mark.slow
def test_grid_sweep_runs_every_combination_in_named_dirs_with_hparams(tmp_path):
    proc = run_cli(["fit", "--multirun", *SMOKE, "optimizer.lr=1e-3,3e-3", "model=tiny_cnn,lenet5"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep = _sweep_dir(tmp_path)
    jobs = _job_dirs(sweep)
    names = [p.name for p in jobs]
    assert len(names) == 4
    assert names[0] == "0_experiment=smoke,model=tiny_cnn,optimizer.lr=0.001,trainer.epochs=1"  # progress left out
    combos = set()
    for job in jobs:
        assert summary(job)["status"] == "completed"
        # One TensorBoard run per job, each with its own HParams entry: `tensorboard --logdir <sweep>` compares them.
        hp = _hparams(job / "tensorboard")
        assert f"optimizer.lr={hp['optimizer.lr']}" in job.name
        assert ("model=lenet5" in job.name) == (hp["model.name"] == "lenet5")  # tiny_cnn is a small simple_cnn
        combos.add((hp["model.name"], hp["optimizer.lr"]))
    assert combos == {(m, lr) for m in ("simple_cnn", "lenet5") for lr in (0.001, 0.003)}


@pytest.mark.slow
def test_failed_job_is_recorded_and_the_report_shows_it_with_the_rerun_command(tmp_path):
    # trainer.monitor=val/loss: a "/" in a value must not nest directories, and lower is better.
    # A bad value is refused before any job trains (tests/test_first_use.py); a missing weights file is
    # found by the job that reads it.
    proc = run_cli(
        [
            "fit",
            "--multirun",
            *SMOKE,
            "trainer.monitor=val/loss",
            "model.weights=missing.pt,null",
            "trainer.batch_size=32,64",
        ],
        tmp_path,
    )
    assert proc.returncode == 2  # the sweep reports its first failure...
    assert "model.weights=missing.pt: no such file" in proc.stderr
    assert "cnntrain report" in proc.stderr
    sweep = _sweep_dir(tmp_path)
    jobs = _job_dirs(sweep)  # ...after running every other job
    assert [summary(job)["status"] for job in jobs] == ["failed", "failed", "completed", "completed"]
    assert jobs[0].name == "0_experiment=smoke,trainer.batch_size=32,trainer.epochs=1,trainer.monitor=val-loss"
    assert "model.weights=missing.pt: no such file" in summary(jobs[0])["error"]

    proc = run_cli(["report", str(sweep)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "best val/loss" in out and "failed" in out and "missing.pt: no such file" in out
    assert (
        "re-run: cnntrain fit experiment=smoke trainer.epochs=1 trainer.progress=plain trainer.monitor=val/loss "
        "model.weights=missing.pt trainer.batch_size=32" in out
    )
    rows = _read_csv(sweep / "report.csv")
    assert [r["model.weights"] for r in rows][-1] == "missing.pt"  # failures last
    losses = [float(r["best"]) for r in rows[:2]]
    assert losses == sorted(losses)  # val/loss: lowest first
    assert rows[-1]["status"] == "failed" and rows[-1]["command"].startswith("cnntrain fit ")


def _fake_job(sweep: Path, name: str, overrides: list[str], **record) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    (job / "summary.json").write_text(json.dumps(record))
    return job


def test_report_shows_a_multilabel_sweep_s_test_map(tmp_path):
    """Multi-label runs have no test accuracy: their column is the test mAP, in the table and the CSV."""
    sweep = tmp_path / "sweep"
    for i, (lr, val, test) in enumerate([("0.1", 0.81, 0.79), ("0.01", 0.93, 0.92)]):
        _fake_job(sweep, f"{i}_lr={lr}", [f"lr={lr}"], status="completed", best_val_map=val, test_map=test)
    proc = run_cli(["report", str(sweep), f"csv={tmp_path / 'out.csv'}"], tmp_path, env={"COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    assert "test mAP" in proc.stdout and "test acc" not in proc.stdout
    assert re.search(r"0\.9300\s.*0\.9200", proc.stdout), proc.stdout  # the best run first, its test mAP beside it
    rows = _read_csv(tmp_path / "out.csv")
    assert [(r["monitor"], r["test_map"], r["test_acc"]) for r in rows] == [
        ("val/map", "0.92", ""),
        ("val/map", "0.79", ""),
    ]
    # A report over single- and multi-label runs says which figure each test cell is.
    _fake_job(sweep, "2_lr=1", ["lr=1"], status="completed", best_val_map=0.5, test_acc=0.88)
    proc = run_cli(["report", str(sweep)], tmp_path, env={"COLUMNS": "120"})
    assert "mAP 0.9200" in proc.stdout and "0.8800" in proc.stdout


def test_report_sorts_best_first_writes_csv_and_lists_unfinished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_job(
        sweep,
        "0_lr=0.1",
        ["lr=0.1", "seed=0"],
        status="completed",
        best_val_acc=0.80,
        test_acc=0.79,
        best_epoch=3,
        train_seconds=12.5,
    )
    _fake_job(
        sweep,
        "1_lr=0.01",
        ["lr=0.01", "seed=0"],
        status="completed",
        best_val_acc=0.95,
        test_acc=0.94,
        best_epoch=5,
        train_seconds=11.0,
    )
    job = _fake_job(sweep, "2_lr=1", ["lr=1", "seed=0"], status="interrupted", best_val_acc=0.5, best_epoch=1)
    (job / "checkpoints").mkdir()
    (job / "checkpoints" / "last.pt").write_bytes(b"")
    proc = run_cli(["report", str(sweep), f"csv={tmp_path / 'out.csv'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "common overrides: seed=0" in proc.stdout
    assert f"continue: cnntrain fit resume={job}" in proc.stdout
    rows = _read_csv(tmp_path / "out.csv")
    assert [r["lr"] for r in rows] == ["0.01", "0.1", "1"]
    assert rows[0]["best"] == "0.95" and rows[0]["test_acc"] == "0.94" and rows[0]["train_seconds"] == "11.00"

    proc = run_cli(["report", str(tmp_path / "nothing")], tmp_path)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    proc = run_cli(["report"], tmp_path)  # no DIR: an error, not the help with exit 0
    assert proc.returncode == 2 and proc.stderr.startswith("cnntrain: error: report needs a directory"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not proc.stdout


# ----------------------------------------------------------------------------- resume=auto


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "cnntrain", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _stop_after(proc: subprocess.Popen, *markers: str) -> str:
    """SIGTERM once every marker has appeared in the output, in order (the run saves last.pt and exits)."""
    seen, todo = [], list(markers)
    for line in proc.stdout:
        seen.append(line)
        if todo and todo[0] in line:
            todo.pop(0)
            if not todo:
                proc.send_signal(signal.SIGTERM)
                break
    seen.append(proc.stdout.read())
    proc.wait(timeout=120)
    return "".join(seen)


@pytest.mark.slow
def test_resume_auto_continues_the_newest_unfinished_run_or_starts_fresh(tmp_path):
    args = ["fit", "experiment=smoke", "trainer.epochs=3", "trainer.progress=plain", "resume=auto"]
    out = _stop_after(_start(args, tmp_path), "epoch 1/3")
    assert "no unfinished run" in out  # nothing to continue: a new run
    (run,) = run_dirs(tmp_path)
    assert summary(run)["status"] == "interrupted"

    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resume=auto: continuing {run.relative_to(tmp_path)}" in proc.stdout
    assert run_dirs(tmp_path) == [run]  # continued in place
    record = summary(run)
    assert record["status"] == "completed" and record["epochs_done"] == 3


@pytest.mark.slow
def test_resume_auto_finishes_an_interrupted_sweep_without_redoing_finished_jobs(tmp_path):
    args = [
        "fit",
        "--multirun",
        "experiment=smoke",
        "trainer.epochs=2",
        "trainer.progress=plain",
        "optimizer.lr=1e-3,3e-3",
    ]
    out = _stop_after(_start(args, tmp_path), "#1 :", "epoch 1/2")  # job 1 stopped in its first epochs
    sweep = _sweep_dir(tmp_path)
    done, stopped = _job_dirs(sweep)
    assert summary(done)["status"] == "completed", out
    assert summary(stopped)["status"] == "interrupted", out
    done_ckpt = (done / "checkpoints" / "last.pt").stat().st_mtime_ns

    proc = run_cli([*args, "resume=auto"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _sweep_dir(tmp_path) == sweep  # the same sweep directory, no second one
    assert _job_dirs(sweep) == [done, stopped]
    assert (done / "checkpoints" / "last.pt").stat().st_mtime_ns == done_ckpt  # not trained again
    assert "this job completed" in proc.stdout
    assert summary(stopped)["status"] == "completed" and summary(stopped)["epochs_done"] == 2


def _hydra_job(monkeypatch, tmp_path: Path, overrides: list[str], launcher: dict | None = None, num: int = 0):
    """Make this process look like job `num` of a sweep, for the helpers that read HydraConfig."""
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = OmegaConf.create({"hydra": OmegaConf.structured(HydraConf)})
    cfg.hydra.mode = RunMode.MULTIRUN
    cfg.hydra.launcher = launcher or {}
    cfg.hydra.job.num = num
    cfg.hydra.overrides.task = overrides
    cfg.hydra.sweep.dir = str(tmp_path / "multirun" / "new")
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # put back after the test
    HydraConfig.instance().set_config(cfg)


def _fit_cfg(**trainer):
    from cnntrain.config import FitConfig

    cfg = OmegaConf.structured(FitConfig)
    for k, v in trainer.items():
        cfg.trainer[k] = v
    return cfg


def test_resume_auto_in_a_sweep_job_skips_done_continues_unfinished_or_starts_fresh(tmp_path, monkeypatch):
    from cnntrain.sweep import jobs as sweep

    old = tmp_path / "multirun" / "old"
    _fake_job(old, "0_lr=0.1", ["lr=0.1", "resume=auto"], status="completed", best_val_acc=0.9)
    stopped = _fake_job(old, "1_lr=0.2", ["lr=0.2"], status="interrupted")
    (stopped / "checkpoints").mkdir()
    (stopped / "checkpoints" / "last.pt").write_bytes(b"")
    here = tmp_path / "multirun" / "new" / "0_x"

    _hydra_job(monkeypatch, tmp_path, ["lr=1e-1", "resume=auto", "trainer.progress=none"])
    cfg = _fit_cfg()
    cfg.resume = "auto"
    run_dir, resume, recorded = sweep.prepare_job(cfg, here)
    assert recorded == 0.9  # same overrides once resume and display keys are set aside
    assert summary(here)["status"] == "moved"  # the new job dir points at the work

    _hydra_job(monkeypatch, tmp_path, ["lr=0.2", "resume=auto"])
    cfg.resume = "auto"
    assert sweep.prepare_job(cfg, here) == (stopped, str(stopped), None)

    _hydra_job(monkeypatch, tmp_path, ["lr=0.3", "resume=auto"])
    cfg.resume = "auto"
    assert sweep.prepare_job(cfg, here) == (here, None, None)

    # A job requeued by SLURM/submitit runs again in its own directory, which holds its last.pt.
    _hydra_job(monkeypatch, tmp_path, ["lr=0.2"])
    cfg.resume = None
    assert sweep.prepare_job(cfg, stopped) == (stopped, str(stopped), None)


# ----------------------------------------------------------------------------- launchers


def test_parallel_jobs_share_the_cores_and_spread_over_gpus(tmp_path, monkeypatch):
    import torch

    from cnntrain.sweep import jobs as sweep

    monkeypatch.setattr(sweep, "cpu_count", lambda: 16)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    _hydra_job(monkeypatch, tmp_path, [], {"n_jobs": 4}, num=6)
    cfg = _fit_cfg()
    sweep.apply_launcher_resources(cfg)
    assert cfg.trainer.num_threads == 4 and cfg.trainer.device == "cuda:2"

    cfg = _fit_cfg(num_threads=3, device="cpu")  # what the user set is kept
    sweep.apply_launcher_resources(cfg)
    assert cfg.trainer.num_threads == 3 and cfg.trainer.device == "cpu"

    assert sweep.concurrent_jobs({"n_jobs": -1}) == 16 and sweep.concurrent_jobs({"n_jobs": -2}) == 15
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")  # a SLURM job: the CPUs it was given
    cfg = _fit_cfg()
    sweep.apply_launcher_resources(cfg)
    assert cfg.trainer.num_threads == 6


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(
            ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"],
            id="joblib",
            marks=needs("hydra_plugins.hydra_joblib_launcher", "joblib"),
        ),
        pytest.param(
            ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
            id="submitit-local",
            marks=needs("hydra_plugins.hydra_submitit_launcher", "slurm"),
        ),
    ],
)
def test_launcher_plugins_run_the_sweep(tmp_path, launcher):
    """joblib runs two jobs at once, each with its share of the cores; submitit_local runs them as SLURM would."""
    proc = run_cli(["fit", "--multirun", *SMOKE, *launcher, "optimizer.lr=1e-3,3e-3"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep = _sweep_dir(tmp_path)
    jobs = _job_dirs(sweep)
    assert len(jobs) == 2 and all(summary(j)["status"] == "completed" for j in jobs)
    if "hydra/launcher=parallel" in launcher:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = {json.loads((j / "provenance.json").read_text())["torch_threads"] for j in jobs}
        assert threads == {max(1, cores // 2)}
    else:
        assert (sweep / ".submitit").is_dir()


@needs("hydra_plugins.hydra_submitit_launcher", "slurm")
def test_slurm_preset_composes_with_its_knobs(tmp_path):
    proc = run_cli(
        [
            "fit",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=2",
            "--cfg",
            "hydra",
            "--package",
            "hydra.launcher",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    launcher = OmegaConf.create(proc.stdout)  # the hydra.launcher node alone
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.cpus_per_task) == ("gpu", 2, 8)
    assert launcher.max_num_timeout > 0  # pre-empted / timed-out jobs come back and resume


# ----------------------------------------------------------------------------- Optuna


def test_optuna_direction_follows_the_monitored_metric():
    from cnntrain.sweep.study import register_resolvers

    register_resolvers()
    cfg = OmegaConf.create({"acc": "${cnntrain_direction:val/acc}", "loss": "${cnntrain_direction:val/loss}"})
    assert (cfg.acc, cfg.loss) == ("maximize", "minimize")


@needs("optuna", "optuna")
@pytest.mark.slow
def test_optuna_study_optimises_the_objective_and_continues_from_its_storage_with_new_points(tmp_path):
    proc = run_cli(
        ["fit", "--multirun", "experiment=optuna_smoke", "hydra.sweeper.n_trials=2", "trainer.progress=none"], tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep = _sweep_dir(tmp_path)
    jobs = _job_dirs(sweep)
    assert len(jobs) == 2
    best = OmegaConf.load(sweep / "optimization_results.yaml").best_value
    assert best == max(summary(j)["best_val_acc"] for j in jobs)  # maximised val/acc, as fit returned it

    db = tmp_path / "runs" / "optuna_smoke" / "optuna.db"
    proc = run_cli(
        ["fit", "--multirun", "experiment=optuna_smoke", "hydra.sweeper.n_trials=1", "trainer.progress=none"], tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with sqlite3.connect(db) as con:  # the second run added its trial to the same stored study
        assert con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0] == 3
        assert con.execute("select direction from study_directions").fetchone()[0] == "MAXIMIZE"
        rows = con.execute("select trial_id, param_name, param_value from trial_params").fetchall()
    # ...and proposed a new point: a sampler seeded alike every time would propose the first trial again.
    trials: dict[int, dict[str, float]] = {}
    for trial, name, value in rows:
        trials.setdefault(trial, {})[name] = value
    points = [tuple(sorted(p.items())) for p in trials.values()]
    assert len(points) == 3 and len(set(points)) == 3, points


@needs("optuna", "optuna")
@pytest.mark.slow
def test_optuna_sweep_in_a_pipe_prints_plain_lines_and_logs_library_chatter(tmp_path):
    proc = run_cli(
        [
            "fit",
            "--multirun",
            "experiment=optuna_smoke",
            "hydra.sweeper.n_trials=1",
            "dataset.subset=200",
            "trainer.progress=plain",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "\x1b[" not in out  # no colour codes in a pipe
    assert "setup plugin" not in out and "A new study created" not in out  # SQLAlchemy/alembic and Optuna chatter
    assert "#0 : " in proc.stdout and "Best value" in proc.stdout  # Hydra's own lines about the sweep stay
    log = (_sweep_dir(tmp_path) / "multirun.log").read_text()  # the chatter is in the sweep's log
    assert "A new study created" in log and "#0 : " in log


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_prints_the_command_that_continues_the_whole_sweep(tmp_path):
    from tests.faults import run_faulty

    args = [
        "fit",
        "--multirun",
        "experiment=smoke",
        "trainer.epochs=1",
        "dataset.subset=200",
        "trainer.progress=plain",
        "optimizer.lr=1e-3,3e-3",
    ]
    proc = run_faulty(["signal-at-step=INT:10"], args, tmp_path)  # 7 steps a job: job 1, its 3rd step
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    command = shlex.join(["cnntrain", *args, "resume=auto"])
    assert proc.stdout.rstrip().endswith(command), proc.stdout
    assert "resume=/" not in proc.stdout and "resume=runs" not in proc.stdout  # not one job's own resume
    sweep = _sweep_dir(tmp_path)
    done, stopped = _job_dirs(sweep)
    assert summary(done)["status"] == "completed" and summary(stopped)["status"] == "interrupted"

    proc = run_cli(shlex.split(command)[1:], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _sweep_dir(tmp_path) == sweep and _job_dirs(sweep) == [done, stopped]
    assert summary(done)["status"] == summary(stopped)["status"] == "completed"


def test_a_missing_plugin_is_named_with_the_extra_that_installs_it():
    from cnntrain.config.compose import missing_option_message

    text = "In 'hydra/sweeper/optuna_study': Could not load 'hydra/sweeper/optuna'."
    assert missing_option_message(Exception(text)).endswith("pip install 'cnntrain[optuna]'")
