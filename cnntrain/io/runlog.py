"""What a run leaves behind for people and programs: TensorBoard events, metrics.csv, JSON records."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import torch

METRIC_COLUMNS = [
    "epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
    "images_per_s", "epoch_s", "data_s", "compute_s", "eval_s",
]


class RunLog:
    """TensorBoard writer plus a CSV of per-epoch metrics, both in the run directory.

    On resume the CSV keeps its rows up to the checkpoint's epoch and continues; TensorBoard
    is told to drop anything an earlier process logged at or after the resumed step.
    """

    def __init__(self, run_dir: Path, resume_epoch: int | None = None, resume_step: int | None = None):
        self.run_dir = run_dir
        self.csv_path = run_dir / "metrics.csv"
        self._purge_step = resume_step or None
        self._tb: Any = None
        if resume_epoch is None or not self.csv_path.exists():
            self._rewrite_csv([])
        else:
            with open(self.csv_path, newline="") as f:
                self._rewrite_csv([row for row in csv.DictReader(f) if int(row["epoch"]) <= resume_epoch])
        self._csv_file = open(self.csv_path, "a", newline="")  # noqa: SIM115 - lives as long as the run
        self._csv = csv.DictWriter(self._csv_file, fieldnames=METRIC_COLUMNS)

    @property
    def tb(self) -> Any:
        """The TensorBoard writer, made on first use: torch.utils.tensorboard imports tensorboard's plugins, which
        nothing before the first training step needs (tests/test_startup.py)."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=self._purge_step)
        return self._tb

    def _rewrite_csv(self, rows: list[dict[str, str]]) -> None:
        # Via a temporary file, so an interruption here cannot lose the rows already there.
        tmp = self.csv_path.with_name(".metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.tb.add_scalar(tag, value, step)

    def epoch(self, row: dict[str, float | int], step: int) -> None:
        """One row per epoch to metrics.csv (flushed, so a crash keeps it) and the same to TensorBoard."""
        self._csv.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})
        self._csv_file.flush()
        os.fsync(self._csv_file.fileno())
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            split, name = key.split("_")
            self.tb.add_scalar(f"{split}/{name}", row[key], step)
        self.tb.add_scalar("lr", row["lr"], step)
        self.tb.add_scalar("throughput/images_per_s", row["images_per_s"], step)
        self.tb.add_scalar("time/data_s", row["data_s"], step)
        self.tb.add_scalar("time/compute_s", row["compute_s"], step)
        self.tb.flush()

    def images(self, tag: str, batch: torch.Tensor, step: int) -> None:
        """A grid of [B, C, H, W] images with values in [0, 1]."""
        from cnntrain.io.figures import image_grid

        grid = image_grid(batch.detach().float().clamp(0, 1).cpu(), nrow=min(8, len(batch)), padding=1)
        self.tb.add_image(tag, grid, step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """An HParams entry in this run's own event file, so runs of a sweep line up in one table."""
        from torch.utils.tensorboard.summary import hparams

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
        metrics = {k: (v if v is not None and math.isfinite(v) else float("nan")) for k, v in metrics.items()}
        exp, ssi, sei = hparams(clean, metrics)
        writer = self.tb._get_file_writer()
        for summary in (exp, ssi, sei):
            writer.add_summary(summary)
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, 0)

    def flush(self) -> None:
        """Put every event logged so far on disk: done before a checkpoint, so a crash after it loses none."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if not self._csv_file.closed:
            self._csv_file.close()


class NullLog:
    """What ranks other than 0 get under torchrun: every logging call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
