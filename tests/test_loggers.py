"""The logger group: logger=mlflow records a fit in a real SQLite tracking store, read back here with MLflow's
own client; a resume continues the same MLflow run; a sweep's jobs are child runs of one parent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import needs, run_cli, run_dirs, summary

pytestmark = needs("mlflow", "mlflow")

SMALL = ["experiment=smoke", "dataset.subset=300", "trainer.progress=none"]


def _client(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _runs(db: Path, experiment: str) -> list:
    client = _client(db)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} in {db}"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_mlflow_records_a_fit_and_a_resume_continues_the_same_run(tmp_path):
    db = tmp_path / "store" / "mlflow.db"
    logger = ["logger=mlflow", f"logger.tracking_uri=sqlite:///{db}"]
    proc = run_cli(["fit", *SMALL, "trainer.epochs=1", *logger], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mlflow" not in proc.stderr.lower(), proc.stderr  # its database set-up goes to fit.log, not the terminal
    (run_dir,) = run_dirs(tmp_path)
    assert not (run_dir / "tensorboard").exists()  # logger=mlflow alone replaces the default
    (run,) = _runs(db, "smoke")  # the experiment is the config's name
    client = _client(db)
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    params = run.data.params
    assert params["optimizer.lr"] == "0.003" and params["trainer.epochs"] == "1" and params["name"] == "smoke"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1]
    assert run.data.metrics["test/acc"] == pytest.approx(summary(run_dir)["test_acc"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "figures", "summary.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {"checkpoints/best.pt"}

    proc = run_cli(["fit", f"resume={run_dir}", "trainer.epochs=2"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (again,) = _runs(db, "smoke")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [m.step for m in history] == [1, 2]
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        assert [m.value for m in history] == pytest.approx([float(r["val_acc"]) for r in csv.DictReader(f)])


@pytest.mark.slow
@needs("hydra_plugins.hydra_joblib_launcher", "joblib")
def test_a_sweep_is_a_parent_run_with_a_child_per_job(tmp_path):
    """Jobs side by side (joblib): they create the fresh SQLite store and the parent run at the same moment."""
    db = tmp_path / "mlflow.db"
    proc = run_cli(
        [
            "fit",
            "--multirun",
            "hydra/launcher=parallel",
            *SMALL,
            "trainer.epochs=1",
            "optimizer.lr=1e-3,3e-3",
            "logger=[tensorboard,mlflow]",
            f"logger.tracking_uri=sqlite:///{db}",
            "logger.experiment=sweeps",
            "logger.log_checkpoint=false",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = run_dirs(tmp_path)
    assert len(jobs) == 2 and all((j / "tensorboard").is_dir() for j in jobs)  # both loggers
    runs = _runs(db, "sweeps")
    parents = [r for r in runs if "cnntrain.sweep_dir" in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.params["optimizer.lr"] for r in children) == ["0.001", "0.003"]
    client = _client(db)
    for child in children:
        assert child.info.status == "FINISHED"
        assert "checkpoints" not in {a.path for a in client.list_artifacts(child.info.run_id)}  # switched off
