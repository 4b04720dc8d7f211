"""A fit's records: what a run writes and tells about itself, behind the calls the loop makes.

Opening them writes provenance.json and splits.csv, starts metrics.csv and the `logger` group's backends
(io.runlog, io.trackers) and summary.json (status running), and prints the start table. As training goes:
the step's loss and learning rate every trainer.log_every_n_steps, the first batch's images, the display of
the epoch under way; each epoch's metrics row, its console line, summary.json and the Optuna trial's report
(sweep.pruner). At the end: the test in summary.json, the hparams and figures, the final table; or for an
interrupted run its own table and the command that resumes it. summary.json's status says how the run ended:
completed, interrupted, diverged or pruned. What a multi-label run records in place of accuracy (its
metrics.csv columns, epoch line, monitored metric and test record) is asked of the run's task (engine.tasks).

The loop keeps its records through `Records` alone, and says when; what is written where is decided here. A
second experiment tracker is a `Tracker` in io/trackers.py (and a line in `open_trackers`): neither this
interface nor the loop changes. `Records` itself does nothing, which is what ranks other than 0 get under
torchrun; rank 0 gets `RunRecords`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from cnntrain.config import FitConfig, plain
from cnntrain.engine.build import start_rows
from cnntrain.engine.device import describe
from cnntrain.engine.state import Run
from cnntrain.engine.step import TrainingDiverged
from cnntrain.errors import UserError
from cnntrain.io import figures
from cnntrain.io.cpus import CollapseWatch
from cnntrain.io.files import write_json, write_splits
from cnntrain.io.provenance import provenance
from cnntrain.io.runlog import METRIC_COLUMNS, RunLog
from cnntrain.io.trackers import open_trackers
from cnntrain.models import count_parameters
from cnntrain.sweep import jobs as sweep_jobs
from cnntrain.sweep import pruning


def open_records(run: Run) -> Records:
    """The records of the run about to train: RunRecords on rank 0, the null Records on the others. A run
    that already trained all its epochs and was tested is refused: there is nothing to add to it."""
    t, p = run.cfg.trainer, run.progress
    if p.epoch >= t.epochs and completed(run.run_dir):
        raise UserError(
            f"the run in {run.run_dir} already finished {p.epoch} epochs; "
            f"pass trainer.epochs=N (N > {p.epoch}) with resume to train further"
        )
    return RunRecords(run) if run.dist.main else Records()


class Records:
    """What the loop tells the run's records, one call per moment of the run (run.progress says where it
    stands). Every method does nothing here. Held as a context manager around training, the records close
    when it ends, saying how it ended."""

    def __enter__(self) -> Records:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Training ended; `error` is why, when it raised."""

    def epoch_begin(self, epoch: int) -> None:
        """An epoch's steps begin (a resumed epoch's where it stopped)."""

    def loss(self, value: float) -> None:
        """The step's loss, which reached the host (every trainer.log_every_n_steps)."""

    def step(self, x: torch.Tensor, images: int) -> None:
        """After each optimizer step, with the batch as the model saw it."""

    def skipped(self, loss: torch.Tensor) -> None:
        """trainer.on_nonfinite=skip passed over this step's non-finite loss."""

    def flush(self) -> None:
        """Everything recorded so far onto the disk: before a checkpoint, so a crash after it loses none of it."""

    def epoch_interrupted(self, epoch: int, where: str) -> None:
        """A signal stopped the epoch (`where`: at which step, or during validation)."""

    def epoch(self, row: dict[str, Any]) -> None:
        """The epoch's metrics (metrics.csv's columns), before its checkpoints."""

    def epoch_end(self, row: dict[str, Any], improved: bool) -> None:
        """The epoch is checkpointed (improved: it is the new best). Raises pruning.Pruned when the sweep's
        pruner stops the trial."""

    def early_stopped(self) -> None:
        """trainer.early_stopping_patience ends the run before its last epoch."""

    def interrupted(self, signum: int, seconds: float) -> None:
        """A signal stopped training, whose checkpoint is saved; `seconds`: the run's training time."""

    def test_interrupted(self, signum: int) -> None:
        """A signal stopped the test; training is complete and checkpointed."""

    def finish(self, test: dict[str, Any], checkpoint: Path, elapsed: float, seconds: float) -> None:
        """The test of the best checkpoint (at `checkpoint`); `elapsed`: this session's training time,
        `seconds` the run's (a resumed run's sessions together)."""


class RunRecords(Records):
    """Rank 0's records: files in the run directory, the configured loggers and the console."""

    def __init__(self, run: Run) -> None:
        t, p = run.cfg.trainer, run.progress
        self.run = run
        self.task = run.step.task
        self.monitor = self.task.monitor(t.monitor)  # a multi-label run's val/acc is its val/map
        self.log = _open_log(run)
        self.summary: dict[str, Any] = {
            "status": "running",
            "run_dir": str(run.run_dir),
            "epochs": t.epochs,
            **run.record,
            "tuning": dict(p.tuning),
        }
        # CPU runs: says so once if other processes make the threads collapse.
        self.watch = CollapseWatch(torch.get_num_threads(), run.reporter.print) if run.device.type == "cpu" else None
        self.last_refresh = time.monotonic()
        self._write()
        run.reporter.start("cnntrain fit", start_rows(run))
        # sweep.pruner: the Optuna trial this job reports its epochs to
        self.trial = pruning.open_trial(run.cfg.sweep, run.cfg.trainer.epochs) if not run.dist.enabled else None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if isinstance(error, TrainingDiverged):
            self._status("diverged")
        elif isinstance(error, pruning.Pruned):
            self.summary.update(status=pruning.PRUNED, pruned_epoch=error.epoch)
            self._write()
            cfg = self.run.cfg
            self.run.reporter.print(
                f"trial {cfg.sweep.trial} pruned by the study's {cfg.sweep.pruner} pruner after "
                f"epoch {error.epoch}: {self.monitor.name} {error.value:.4f} falls behind "
                "the other trials"
            )
        self.log.close(self.summary.get("status"))

    def epoch_begin(self, epoch: int) -> None:
        run = self.run
        run.reporter.epoch_begin(epoch, run.cfg.trainer.epochs, run.steps, run.progress.step_in_epoch)
        if self.watch is not None:
            self.watch.resume()
        self.last_refresh = time.monotonic()

    def loss(self, value: float) -> None:
        step, p = self.run.step, self.run.progress
        self.log.scalar("train/loss_step", value, p.global_step)
        self.log.scalar("lr_step", step.optimizer.param_groups[0]["lr"], p.global_step)

    def step(self, x: torch.Tensor, images: int) -> None:
        run, p = self.run, self.run.progress
        if self.watch is not None:
            self.watch.step(images)
        if p.global_step == 1:  # the run's first batch
            self.log.images("inputs/train_batch", run.step.normalise.undo(x[:32]), p.global_step)
        now = time.monotonic()
        if now - self.last_refresh >= run.reporter.refresh_s:
            self.last_refresh = now
            loss, acc, seen = run.step.means(run.step.totals())
            busy = max(1e-9, p.times["data"] + p.times["compute"])
            run.reporter.epoch_update(
                p.step_in_epoch,
                {"loss": loss, self.task.train_key: acc, "img/s": seen / busy, "data": p.times["data"] / busy},
            )
            run.step.check_finite(loss, p.global_step)  # the loss reached the host for the display

    def skipped(self, loss: torch.Tensor) -> None:
        self.run.reporter.print(
            f"step {self.run.progress.global_step}: the loss is {loss.item()}; step skipped (trainer.on_nonfinite=skip)"
        )

    def flush(self) -> None:
        self.log.flush()

    def epoch_interrupted(self, epoch: int, where: str) -> None:
        self.run.reporter.epoch_end(f"epoch {epoch}/{self.run.cfg.trainer.epochs} interrupted {where}")

    def epoch(self, row: dict[str, Any]) -> None:
        self.log.epoch(row, self.run.progress.global_step)

    def epoch_end(self, row: dict[str, Any], improved: bool) -> None:
        run, t, p = self.run, self.run.cfg.trainer, self.run.progress
        self.summary.update(
            status="running",
            epochs_done=p.epoch,
            best_epoch=p.best_epoch,
            **{_best_key(self.monitor.name): p.best_metric},
        )
        self._write()
        train_time = p.times["wall"]
        run.reporter.epoch_end(
            f"epoch {p.epoch}/{t.epochs}  {self.task.epoch_text(row)}{'  *' if improved else ''}  "
            f"{row['images_per_s']:,.0f} img/s  data {p.times['data'] / max(train_time, 1e-9):.0%}  "
            f"{row['epoch_s']:.1f}s"
        )
        if self.trial is not None:
            self.trial.epoch(p.epoch, row[self.monitor.column], last=p.epoch >= t.epochs)

    def early_stopped(self) -> None:
        t, p = self.run.cfg.trainer, self.run.progress
        self.summary["early_stopped_epoch"] = p.epoch
        self.run.reporter.print(
            f"early stopping: {self.monitor.name} has not improved for {t.early_stopping_patience} "
            f"epochs (best {p.best_metric:.4f} at epoch {p.best_epoch})"
        )

    def interrupted(self, signum: int, seconds: float) -> None:
        """What the run got to, in the shape of the final table (no test: that needs the whole run)."""
        run, t, p = self.run, self.run.cfg.trainer, self.run.progress
        self._status("interrupted")
        rows = [
            (
                "epochs done",
                f"{p.epoch} of {t.epochs}" + (f", and {p.step_in_epoch} steps of the next" if p.step_in_epoch else ""),
            )
        ]
        if p.best_metric is not None:
            rows.append((f"best {self.monitor.name}", f"{p.best_metric:.4f} (epoch {p.best_epoch})"))
        rows += [("time", f"{seconds:.1f}s"), ("run dir", str(run.run_dir))]
        run.reporter.final("interrupted", rows)
        run.reporter.print(f"stopped by signal {signum}; checkpoint saved.{resume_hint(run.run_dir)}")

    def test_interrupted(self, signum: int) -> None:
        self._status("interrupted")
        self.run.reporter.print(f"stopped by signal {signum} during the test.{resume_hint(self.run.run_dir)}")

    def finish(self, test: dict[str, Any], checkpoint: Path, elapsed: float, seconds: float) -> None:
        """summary.json's status completed, the test's scalars and the hparams to the loggers, the figures,
        the final table."""
        run, t, p, log, summary = self.run, self.run.cfg.trainer, self.run.progress, self.log, self.summary
        tested = self.task.test_record(test, run.tensors["test_y"], run.data.num_classes)
        for tag, value in tested["scalars"].items():
            log.scalar(tag, value, p.global_step)
        key = _best_key(self.monitor.name)
        summary.update(
            status="completed",
            epochs_done=p.epoch,
            best_epoch=p.best_epoch,
            **{key: p.best_metric},
            **tested["summary"],
            train_seconds=round(seconds, 2),
            global_step=p.global_step,
            skipped_steps=p.skipped_steps,
            parameters=count_parameters(run.model),
            checkpoint=str(checkpoint),
        )
        resumed = run.cfg.resume is not None
        if resumed:
            summary["train_seconds_after_resume"] = round(elapsed, 2)
        if run.data.test_split is not None:  # held out by cnntrain: say how, so the figure can be trusted
            summary["test_split"] = run.data.test_split
        self._write()
        log.hparams(flat(run.cfg), {f"hparam/{key}": p.best_metric, **tested["hparams"]})
        # Filters and feature maps in TensorBoard; run_dir/figures/*.png, the same in TensorBoard.
        figures.model_images(run.model, run.tensors["test_x"][:1], run.step.normalise.from_uint8, log, p.global_step)
        # matplotlib's import and drawing would be most of a small run's wall time: by default a child process
        # draws them while this one prints its last lines and exits (trainer.figures). MLflow uploads the PNGs
        # with the summary, so there they are drawn first.
        how = "end" if t.figures == "background" and run.cfg.logger.mlflow and run.cfg.logger.log_figures else t.figures
        figures.hand_over(
            run.run_dir,
            p.global_step,
            run.cfg.name,
            list(run.data.classes),
            run.tensors["test_x"],
            run.tensors["test_y"],
            test,
            how,
            tensorboard=run.cfg.logger.tensorboard,
        )
        log.summary(summary)
        run.reporter.final(
            "done",
            [
                (f"best {self.monitor.name}", f"{p.best_metric:.4f} (epoch {p.best_epoch})"),
                *tested["rows"],
                ("time", f"{seconds:.1f}s" + (f" ({elapsed:.1f}s since the resume)" if resumed else "")),
                ("run dir", str(run.run_dir)),
                *log.viewers(),
            ],
        )

    def _status(self, status: str) -> None:
        self.summary["status"] = status
        self._write()

    def _write(self) -> None:
        write_json(self.run.run_dir / "summary.json", self.summary)


def _open_log(run: Run) -> RunLog:
    """provenance.json and splits.csv, then metrics.csv and the loggers (a resume continues them)."""
    t, p, resumed = run.cfg.trainer, run.progress, run.cfg.resume is not None
    write_json(
        run.run_dir / "provenance.json", provenance(describe(run.device), t.seed, run.data_fingerprint, sys.argv)
    )
    if run.data.items is not None:  # the splits this run trained, validated and tested on
        write_splits(run.run_dir / "splits.csv", run.data.items.column, run.data.split_rows())
    resume_step = p.global_step + 1 if resumed else None
    hydra = sweep_jobs.hydra_config() if sweep_jobs.in_sweep() else None
    sweep_dir = Path(hydra.sweep.dir).resolve() if hydra is not None else None
    trackers = open_trackers(run.cfg.logger, run.run_dir, run.cfg.name, flat(run.cfg), resumed, resume_step, sweep_dir)
    return RunLog(
        run.run_dir,
        resume_epoch=p.epoch if resumed else None,
        resume_step=resume_step,
        trackers=trackers,
        columns=run.step.task.columns(METRIC_COLUMNS),
    )


def _best_key(monitor: str) -> str:
    """summary.json's key of the best monitored metric: best_val_acc, best_val_loss, best_val_map."""
    return f"best_{monitor.replace('/', '_')}"


def resume_hint(run_dir: Path) -> str:
    """How to continue: this run's own command; in a sweep the CLI prints the sweep's (resume=auto) instead."""
    if sweep_jobs.in_sweep():
        return ""
    return f" Resume with:\n  cnntrain fit resume={run_dir}"


def completed(run_dir: Path) -> bool:
    """Whether the run in run_dir got through its test (summary.json says so)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def flat(cfg: FitConfig) -> dict[str, Any]:
    """Every config value under its dotted key (TensorBoard's HParams table), as composed (config.plain)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(plain(cfg), "")
    return out
