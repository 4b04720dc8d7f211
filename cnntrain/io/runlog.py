"""What a run leaves behind for people and programs: metrics.csv, and through io.trackers TensorBoard events
and MLflow runs."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import torch

from cnntrain.io.files import RunDir
from cnntrain.io.trackers import TensorBoardTracker, Tracker, Trackers

METRIC_COLUMNS = [
    "epoch",
    "step",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "images_per_s",
    "epoch_s",
    "data_s",
    "compute_s",
    "eval_s",
]


class RunLog:
    """metrics.csv (per-epoch metrics, in the run directory) and the `logger` group's backends (io.trackers:
    TensorBoard, MLflow), behind the calls the run's records (engine.records) make.

    On resume the CSV keeps its rows up to the checkpoint's epoch and continues; TensorBoard is told to drop
    anything an earlier process logged at or after the resumed step, MLflow continues the same run.
    """

    def __init__(
        self,
        run_dir: Path,
        resume_epoch: int | None = None,
        resume_step: int | None = None,
        trackers: Tracker | None = None,
        columns: list[str] | None = None,
    ):
        self.run_dir = run_dir
        # A multi-label run has its own metrics where a single-label run has accuracy (engine.tasks).
        self.columns = list(columns or METRIC_COLUMNS)
        self.csv_path = RunDir(run_dir).metrics
        self.trackers = trackers if trackers is not None else TensorBoardTracker(run_dir, resume_step)
        if resume_epoch is None or not self.csv_path.exists():
            self._rewrite_csv([])
        else:
            with open(self.csv_path, newline="") as f:
                self._rewrite_csv([row for row in csv.DictReader(f) if int(row["epoch"]) <= resume_epoch])
        self._csv_file = open(self.csv_path, "a", newline="")  # noqa: SIM115 - lives as long as the run
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.columns)

    def _rewrite_csv(self, rows: list[dict[str, str]]) -> None:
        # Via a temporary file, so an interruption here cannot lose the rows already there.
        tmp = self.csv_path.with_name(".metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.trackers.scalar(tag, value, step)

    def epoch(self, row: dict[str, float | int], step: int) -> None:
        """One row per epoch to metrics.csv (flushed, so a crash keeps it) and the same to the loggers."""
        self._csv.writerow({k: row.get(k, "") for k in self.columns})
        self._csv_file.flush()
        os.fsync(self._csv_file.fileno())
        # train_loss -> train/loss, val_micro_f1 -> val/micro_f1: each column of a split's metric as a curve.
        metrics = {
            key.replace("_", "/", 1): row[key]
            for key in self.columns
            if key.startswith(("train_", "val_")) and row.get(key) is not None
        }
        metrics.update(
            {
                "lr": row["lr"],
                "throughput/images_per_s": row["images_per_s"],
                "time/data_s": row["data_s"],
                "time/compute_s": row["compute_s"],
            }
        )
        self.trackers.epoch(metrics, step, int(row["epoch"]))

    def images(self, tag: str, batch: torch.Tensor, step: int) -> None:
        """A grid of [B, C, H, W] images with values in [0, 1]."""
        from cnntrain.io.figures import image_grid

        grid = image_grid(batch.detach().float().clamp(0, 1).cpu(), nrow=min(8, len(batch)), padding=1)
        self.trackers.image(tag, grid, step)

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        """One image (the figures' writer interface: io.figures draws to every logger through it)."""
        self.trackers.image(tag, image, step, dataformats)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float | None]) -> None:
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
        metrics = {k: (v if v is not None and math.isfinite(v) else float("nan")) for k, v in metrics.items()}
        self.trackers.hparams(clean, metrics)

    def summary(self, summary: dict[str, Any]) -> None:
        """The end of a run: its summary.json record (test results, status)."""
        self.trackers.summary(summary)

    def viewers(self) -> list[tuple[str, str]]:
        """How to look at the run's records: (logger, command) rows for the final table."""
        if isinstance(self.trackers, Trackers):
            return self.trackers.viewers(self.run_dir)
        return [v for v in [self.trackers.viewer(self.run_dir)] if v is not None]

    def flush(self) -> None:
        """Put every event logged so far on disk: done before a checkpoint, so a crash after it loses none."""
        self.trackers.flush()

    def close(self, status: str | None = None) -> None:
        """status: summary.json's (completed, interrupted, diverged; None for a failure)."""
        self.trackers.close(status)
        if not self._csv_file.closed:
            self._csv_file.close()
