"""Where a run's records go besides metrics.csv: the `logger` group's backends behind one small interface.

The run's records (engine.records) talk to `io.runlog.RunLog`, which writes metrics.csv and hands everything
else to the Trackers here: scalars, the epoch's metrics, images, hparams, the end summary, and close (with the
run's status). A backend is a subclass of Tracker that overrides what it records; adding one is a new class
and a line in `open_trackers`, not an edit of the records or the loop. A backend that fails mid-run is reported once and left out: the
records of a run never stop its training. Opening a backend (the tracking store) does fail the run, before
training, in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cnntrain.errors import UserError
from cnntrain.io.files import RunDir

log = logging.getLogger(__name__)

MLFLOW_HINT = "pip install 'cnntrain[mlflow]'"
MLFLOW_RECORD = "mlflow.json"  # in the run directory: which MLflow run a resume continues
STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}  # anything else (diverged, an error): FAILED


class Tracker:
    """A backend of the run's records. Every method does nothing unless a backend overrides it.

    Images are uint8 or [0, 1] float arrays/tensors laid out as `dataformats` says (CHW or HWC)."""

    name = "tracker"

    def scalar(self, tag: str, value: float, step: int) -> None: ...

    def epoch(self, metrics: dict[str, float], step: int, epoch: int) -> None: ...

    def image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None: ...

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None: ...

    def summary(self, summary: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self, status: str | None = None) -> None: ...

    def viewer(self, run_dir: Path) -> tuple[str, str] | None:
        """(name, the command that shows this run's records) for the final table, or None."""
        return None


class Trackers(Tracker):
    """Every configured backend, called in turn; one that raises is reported once and dropped."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a tracking store that fails must not stop training
                log.warning(
                    "logger %s failed (%s: %s); the run goes on without it (metrics.csv has every epoch)",
                    t.name,
                    type(e).__name__,
                    " ".join(str(e).split())[:200],
                )
                self.trackers.remove(t)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._each("scalar", tag, value, step)

    def epoch(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        self._each("epoch", metrics, step, epoch)

    def image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        self._each("image", tag, image, step, dataformats)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        self._each("hparams", params, metrics)

    def summary(self, summary: dict[str, Any]) -> None:
        self._each("summary", summary)

    def flush(self) -> None:
        self._each("flush")

    def close(self, status: str | None = None) -> None:
        self._each("close", status)

    def viewers(self, run_dir: Path) -> list[tuple[str, str]]:
        return [v for t in self.trackers if (v := t.viewer(run_dir)) is not None]


# --------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker(Tracker):
    """<run dir>/tensorboard: event files. On resume TensorBoard drops what an earlier process logged at or after
    the resumed step."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.log_dir = RunDir(run_dir).tensorboard
        self.purge_step = resume_step or None
        self._tb: Any = None

    @property
    def tb(self) -> Any:
        """The writer, made on first use: torch.utils.tensorboard imports tensorboard's plugins, which nothing
        before the first training step needs (tests/test_startup.py)."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        return self._tb

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.tb.add_scalar(tag, value, step)

    def epoch(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        for tag, value in metrics.items():
            self.tb.add_scalar(tag, value, step)
        self.tb.flush()

    def image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        self.tb.add_image(tag, image, step, dataformats=dataformats)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """An HParams entry in this run's own event file, so runs of a sweep line up in one table."""
        from torch.utils.tensorboard.summary import hparams

        exp, ssi, sei = hparams(params, metrics)
        writer = self.tb._get_file_writer()
        for summary in (exp, ssi, sei):
            writer.add_summary(summary)
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, 0)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self, status: str | None = None) -> None:
        if self._tb is not None:
            self._tb.close()

    def viewer(self, run_dir: Path) -> tuple[str, str] | None:
        return "tensorboard", f"tensorboard --logdir {run_dir}"


# --------------------------------------------------------------------------- MLflow


def mlflow_module() -> Any:
    # MLflow's own console handler would print its database set-up on the terminal; without it, its records go
    # where every library's go (the run's fit.log; warnings as one line on the console).
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    try:
        import mlflow
    except ImportError:
        raise UserError(f"logger=mlflow needs the mlflow package, which is not installed: {MLFLOW_HINT}") from None
    return mlflow


def tracking_uri(cfg: Any) -> str:
    """logger.tracking_uri, or by default the SQLite store runs/mlflow.db beside the runs (MLflow's own default
    kind of store; its file store is deprecated)."""
    if cfg.tracking_uri:
        return str(cfg.tracking_uri)
    return f"sqlite:///{Path('runs').resolve() / 'mlflow.db'}"


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """An HTTP tracking server that does not answer fails in seconds, not after MLflow's minutes of retries."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _creation_lock(db: Path | None) -> Iterator[None]:
    """One process at a time opens a SQLite store: the first creates its tables (alembic migrations), and the
    parallel jobs of a sweep doing that together collide ("table _alembic_tmp_... already exists")."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; parallel sweeps there start on a created store
        fcntl = None
    if db is None or fcntl is None or not db.parent.is_dir():
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _client(uri: str) -> Any:
    """An MlflowClient on `uri`, proven to answer (a SQLite store is created here); else one line."""
    mlflow_module()
    from mlflow.tracking import MlflowClient

    db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
    if db is not None:
        with contextlib.suppress(OSError):
            db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _fail_fast(), _creation_lock(db):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as e:  # MlflowException, requests' ConnectionError, SQLAlchemy's OperationalError
        raise UserError(
            f"logger.tracking_uri={uri}: the MLflow tracking store cannot be reached "
            f"({_first_line(e)}); start the server, fix the URI, or leave it unset for "
            "runs/mlflow.db"
        ) from None
    return client


def check_logger(cfg: Any) -> None:
    """Before anything is built: logger=mlflow has its package and its tracking store answers."""
    if cfg.logger.mlflow:
        _client(tracking_uri(cfg.logger))


def _experiment_id(client: Any, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in whatever folder this ran from
        location = (Path(uri[len("sqlite:///") :]).parent / "mlflow-artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - a parallel job created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _sweep_parent(client: Any, experiment_id: str, sweep_dir: Path) -> str:
    """The parent run of a sweep: made by the first job to get here (an exclusive file in the sweep folder says
    which run it is), found by the others, and by a resumed sweep."""
    import time

    marker = sweep_dir / ".mlflow_parent_run"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        for _ in range(300):  # the creating job writes the id within a second or two
            run_id = marker.read_text().strip()
            if run_id:
                return run_id
            time.sleep(0.1)
        raise UserError(f"{marker} names no MLflow run; delete it to let the sweep make a new parent run") from None
    parent = client.create_run(experiment_id, run_name=sweep_dir.name, tags={"cnntrain.sweep_dir": str(sweep_dir)})
    # A container of the jobs, closed at once: no single job knows when the sweep ends.
    client.set_terminated(parent.info.run_id, "FINISHED")
    with os.fdopen(fd, "w") as f:
        f.write(parent.info.run_id)
    return parent.info.run_id


def _param_value(v: Any) -> str:
    return str(v)[:6000]  # MLflow's limit on a param's value


class MlflowTracker(Tracker):
    """An MLflow run per fit (a child of the sweep's parent run in a sweep), continued by a resume.

    Params: the flattened config. Metrics: each epoch's row at step=epoch, the per-step scalars at their
    global step, the test results at the end. Artifacts: summary.json, and (logger.log_figures /
    log_checkpoint) figures/*.png and checkpoints/best.pt when the run completes."""

    name = "mlflow"

    def __init__(
        self, cfg: Any, run_dir: Path, name: str, params: dict[str, Any], resumed: bool, sweep_dir: Path | None = None
    ) -> None:
        from mlflow.entities import Metric, Param

        self._metric, self._param = Metric, Param
        self.cfg, self.run_dir = cfg, run_dir
        self.uri = tracking_uri(cfg)
        self.client = _client(self.uri)
        self.pending: list[Any] = []
        record = run_dir / MLFLOW_RECORD
        previous = _read_json(record) if resumed else None
        if previous and previous.get("tracking_uri") == self.uri:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = _experiment_id(self.client, cfg.experiment or name, self.uri)
            tags = {"cnntrain.run_dir": str(run_dir)}
            if sweep_dir is not None:
                tags["mlflow.parentRunId"] = _sweep_parent(self.client, experiment, sweep_dir)
            run = self.client.create_run(experiment, run_name=run_dir.name, tags=tags)
            self.run_id = run.info.run_id
            record.write_text(
                json.dumps({"tracking_uri": self.uri, "experiment_id": experiment, "run_id": self.run_id}, indent=1)
                + "\n"
            )
        # A resume may change a few keys (trainer.epochs, resume): MLflow refuses to change a logged param,
        # so the values of the first session stand and only new keys are added.
        have = self.client.get_run(self.run_id).data.params
        new = [Param(k[:250], _param_value(v)) for k, v in params.items() if k[:250] not in have]
        for i in range(0, len(new), 100):  # MLflow's limit of params per batch
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def _add(self, key: str, value: float, step: int) -> None:
        import time

        if value is not None and math.isfinite(float(value)):
            self.pending.append(self._metric(key, float(value), int(time.time() * 1000), int(step)))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._add(tag, value, step)  # sent with the epoch's batch: one database write per epoch, not per step

    def epoch(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        for tag, value in metrics.items():
            self._add(tag, value, epoch)
        self.flush()

    def image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        pixels = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        if dataformats == "CHW":
            pixels = pixels.transpose(1, 2, 0)
        if pixels.dtype != np.uint8:
            pixels = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        self.client.log_image(self.run_id, pixels, artifact_file=f"images/{tag}_step{step}.png")

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if "test" not in key:  # the test results come with the summary, as test/loss and test/acc
                self._add(key.removeprefix("hparam/"), value, 0)
        self.flush()

    def summary(self, summary: dict[str, Any]) -> None:
        for key in ("test_loss", "test_acc", "test_map", "test_micro_f1", "test_exact_match"):  # the last: multi-label
            if isinstance(summary.get(key), (int, float)):
                self._add(f"test/{key.removeprefix('test_')}", summary[key], int(summary.get("epochs_done", 0)))
        self.flush()
        self.client.set_tag(self.run_id, "cnntrain.status", str(summary.get("status")))

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str | None = None) -> None:
        self.flush()
        if status == "completed":
            run = RunDir(self.run_dir)
            if run.summary.is_file():
                self.client.log_artifact(self.run_id, str(run.summary))
            if self.cfg.log_figures and run.figures.is_dir():
                self.client.log_artifacts(self.run_id, str(run.figures), artifact_path=run.figures.name)
            if self.cfg.log_checkpoint and run.best.is_file():
                self.client.log_artifact(self.run_id, str(run.best), artifact_path=run.checkpoints.name)
        self.client.set_terminated(self.run_id, STATUS.get(str(status), "FAILED"))

    def viewer(self, run_dir: Path) -> tuple[str, str] | None:
        return "mlflow", f"mlflow ui --backend-store-uri {self.uri}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("run_id") else None


def open_trackers(
    cfg: Any,
    run_dir: Path,
    name: str,
    params: dict[str, Any],
    resumed: bool,
    resume_step: int | None,
    sweep_dir: Path | None = None,
) -> Trackers:
    """The backends `cfg` (the logger node) turns on."""
    trackers: list[Tracker] = []
    if cfg.tensorboard:
        trackers.append(TensorBoardTracker(run_dir, resume_step))
    if cfg.mlflow:
        trackers.append(MlflowTracker(cfg, run_dir, name, params, resumed, sweep_dir))
    return Trackers(trackers)
