"""The training loop: one path from a built Run to a trained, tested model.

An epoch reads: steps, validation, checkpoints. A step reads: the batch, its preparation (augment,
normalise), the whole optimisation step (engine.step.TrainStep: forward, backward, optimizer, schedule,
weight average, metric sums), now and then a record. What the run writes and tells about itself (metrics.csv
and the loggers, summary.json, provenance, figures, the console's tables) goes through engine.records: the
loop says when, the records say what and where.

Data are uint8 tensors resident on the training device; metrics accumulate in device tensors and reach the
host only when the display refreshes, a checkpoint is written or an epoch ends, so there is no host-device
sync per step.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnntrain.engine import distributed
from cnntrain.engine.build import build_run, start_rows
from cnntrain.engine.evaluate import evaluate
from cnntrain.engine.inputs import epoch_batches, epoch_order
from cnntrain.engine.records import Records, open_records
from cnntrain.engine.signals import StopRequested
from cnntrain.engine.state import FitConfig, Progress, Run, load_best, save
from cnntrain.io.files import BEST, LAST


class Interrupted(Exception):
    """A stop was requested (signal); the loop saves what it has and leaves."""


@dataclass
class Session:
    """What one process's pass over the run keeps beside the Run: its records, its stop flag, its clock."""

    records: Records
    stop: StopRequested = field(default_factory=StopRequested)
    seconds_before: float = 0.0  # training time of the sessions before this one (a resumed run's)
    started: float = field(default_factory=time.perf_counter)  # when this session's training began

    def seconds(self) -> float:
        """Training time of this session so far."""
        return time.perf_counter() - self.started


def fit(cfg: FitConfig, run_dir: Path) -> float:
    """Train, validate each epoch, test the best checkpoint; return the monitored validation metric."""
    run = build_run(cfg, run_dir)
    if cfg.trainer.dry_run:
        return dry_run(run)
    return train(run)


def dry_run(run: Run) -> float:
    """One forward/backward on a real batch: proves the config builds and fits before a long run."""
    x_u8 = run.tensors["train_x"][: run.cfg.trainer.batch_size]
    x, target = run.step.prepare(x_u8, run.tensors["train_y"][: len(x_u8)], 0)
    _, loss = run.step.accumulate(x, target)  # in trainer.micro_batch chunks, as training would
    run.reporter.start("cnntrain fit --dry-run", start_rows(run))
    run.reporter.print(
        f"dry run ok: one batch of {len(x)} through forward and backward, loss {loss.item():.4f}; "
        "nothing was trained or written"
    )
    return float("nan")


def train(run: Run) -> float:
    """All epochs, then the test of the best checkpoint. Signals stop it with a resumable checkpoint."""
    t, p, d = run.cfg.trainer, run.progress, run.dist
    s = Session(open_records(run), seconds_before=p.train_seconds)
    s.stop.install()
    s.started = time.perf_counter()
    try:
        with s.records:  # however training ends, summary.json says how
            try:
                while p.epoch < t.epochs and _epoch(run, s):
                    pass
            except Interrupted:
                _save_interrupted(run, s)
            if d.main:  # rank 0 tests the best checkpoint alone
                _test(run, s)
            distributed.barrier(d)
            assert p.best_metric is not None  # every epoch is validated, and a run that gets here trained one
            return float(p.best_metric)
    finally:
        s.stop.restore()
        distributed.teardown(d)


def _epoch(run: Run, s: Session) -> bool:
    """One epoch: steps, validation, checkpoints, the metrics row. False when early stopping ends the run."""
    t, p, step, rec = run.cfg.trainer, run.progress, run.step, s.records
    epoch = p.epoch + 1
    if p.step_in_epoch == 0:  # a resumed epoch goes on from the sums and times its checkpoint holds
        p.sums, p.times = step.zero_sums(), {"data": 0.0, "compute": 0.0, "wall": 0.0}
    step.begin_epoch(epoch, p.sums)  # the step adds to the sums that the checkpoints save
    rec.epoch_begin(epoch)
    _steps(run, epoch, s)
    totals = step.totals()
    distributed.all_reduce_sum(run.dist, totals)  # every rank's images
    train_loss, train_acc, seen = step.means(totals)
    step.check_finite(train_loss, p.global_step)
    t_eval = time.perf_counter()
    val = _validate(run, s, epoch)
    eval_time, train_time = time.perf_counter() - t_eval, p.times["wall"]
    row = {
        "epoch": epoch,
        "step": p.global_step,
        "train_loss": train_loss,
        "val_loss": val["loss"],
        **step.task.row(train_acc, val),
        "lr": step.optimizer.param_groups[0]["lr"],
        "images_per_s": seen / max(train_time, 1e-9),
        "epoch_s": train_time + eval_time,
        "data_s": p.times["data"],
        "compute_s": p.times["compute"],
        "eval_s": eval_time,
    }
    # The row goes out before the checkpoint: if we die in between, resume redoes this epoch and the
    # row is rewritten, never lost.
    rec.epoch(row)
    p.epoch, p.step_in_epoch = epoch, 0
    monitor = step.task.monitor(t.monitor)  # val/acc, val/loss; a multi-label run's val/map
    improved = _track_best(p, val[monitor.key], monitor.maximize, t.early_stopping_min_delta)
    if improved:
        _save(run, s, BEST)
    _save(run, s, LAST)
    rec.epoch_end(row, improved)
    patience = t.early_stopping_patience
    if patience is not None and p.epochs_without_improvement >= patience and p.epoch < t.epochs:
        rec.early_stopped()
        return False
    return True


def _steps(run: Run, epoch: int, s: Session) -> None:
    """The training steps of an epoch, from where it stands; raises Interrupted on a signal."""
    t, p, d, step, rec = run.cfg.trainer, run.progress, run.dist, run.step, s.records
    order = epoch_order(len(run.tensors["train_x"]), t.seed, epoch, run.device, run.sample_weights)
    batches = epoch_batches(
        run.tensors["train_x"],
        run.tensors["train_y"],
        order,
        t.batch_size,
        range(p.step_in_epoch, run.steps),
        run.device,
        d.rank,
        d.world,
    )
    # Wall time of the training steps, logging and display included: the honest images/s.
    t_epoch, wall_before = time.perf_counter(), p.times["wall"]
    for i in range(p.step_in_epoch, run.steps):
        # Ranks agree on stopping every few steps, so they all stop at the same one.
        if (i % 16 == 0 and distributed.any_rank(d, bool(s.stop), run.device)) if d.enabled else s.stop:
            p.times["wall"] = wall_before + time.perf_counter() - t_epoch
            rec.epoch_interrupted(epoch, f"at step {p.step_in_epoch}/{run.steps}")
            raise Interrupted
        t0 = time.perf_counter()
        x_u8, y = next(batches)  # resident: one gather; streamed: the DataLoader's next batch
        x, target = step.prepare(x_u8, y, p.global_step)
        t1 = time.perf_counter()
        loss, stepped = step(x, target, y, p.global_step)  # forward, backward, optimizer, schedule, EMA, sums
        p.step_in_epoch, p.global_step = i + 1, p.global_step + 1
        if not stepped:  # trainer.on_nonfinite=skip passed over a non-finite loss
            p.skipped_steps += 1
            rec.skipped(loss)
            continue
        p.times["data"] += t1 - t0
        p.times["compute"] += time.perf_counter() - t1
        if p.global_step % t.log_every_n_steps == 0:  # the loss comes to the host: checked, then logged
            rec.loss(step.check_finite(loss.item(), p.global_step))
        rec.step(x, len(y))  # the run's first batch; the display, now and then
        if t.checkpoint_every_n_steps and p.global_step % t.checkpoint_every_n_steps == 0 and i + 1 < run.steps:
            step.check_finite(step.sums["loss"].item(), p.global_step)
            p.times["wall"] = wall_before + time.perf_counter() - t_epoch
            rec.flush()  # a crash after this checkpoint must not lose the events before it
            _save(run, s, LAST)
    p.times["wall"] = wall_before + time.perf_counter() - t_epoch


def _validate(run: Run, s: Session, epoch: int) -> dict[str, Any]:
    """The epoch's validation, of the weight average when there is one."""
    t = run.cfg.trainer
    # Ranks cannot abandon a sharded validation one by one; a signal is seen at the next step.
    val = evaluate(
        run.ema.module if run.ema is not None else run.plain,
        run.tensors["val_x"],
        run.tensors["val_y"],
        run.step.normalise,
        t.eval_batch_size,
        run.step.precision,
        None if run.dist.enabled else s.stop,
        run.dist,
        run.step.task.threshold,
    )
    if s.stop and not run.dist.enabled:
        s.records.epoch_interrupted(epoch, "during validation")
        raise Interrupted
    run.step.check_finite(val["loss"], run.progress.global_step)  # weights broken though the train loss was not
    return val


def _track_best(p: Progress, metric: float, monitor_max: bool, margin: float) -> bool:
    """Update the best metric and the early-stopping count, which only an improvement by more than `margin`
    (trainer.early_stopping_min_delta) resets; whether this epoch is the new best."""
    improved = p.best_metric is None or (metric > p.best_metric if monitor_max else metric < p.best_metric)
    clearly = p.best_metric is None or (
        metric > p.best_metric + margin if monitor_max else metric < p.best_metric - margin
    )
    p.epochs_without_improvement = 0 if clearly else p.epochs_without_improvement + 1
    if improved:
        p.best_metric, p.best_epoch = metric, p.epoch
    return improved


def _save(run: Run, s: Session, name: str) -> None:
    """A checkpoint, holding the run's training time up to now (all sessions): a resume goes on from it."""
    run.progress.train_seconds = s.seconds_before + s.seconds()
    save(run, name)


def _save_interrupted(run: Run, s: Session) -> None:
    """A stopped run's checkpoint and records; then the process exits with the signal's code."""
    if run.progress.global_step > 0:
        run.step.check_finite(run.step.sums["loss"].item(), run.progress.global_step)
        _save(run, s, LAST)
    s.records.interrupted(s.stop.signum or signal.SIGTERM, s.seconds_before + s.seconds())
    raise SystemExit(s.stop.exit_code if s.stop else 128 + signal.SIGTERM)


def _test(run: Run, s: Session) -> None:
    """The test of the best checkpoint, and the records of the finished run."""
    elapsed = s.seconds()
    best = load_best(run)
    test = evaluate(
        run.plain,
        run.tensors["test_x"],
        run.tensors["test_y"],
        run.step.normalise,
        run.cfg.trainer.eval_batch_size,
        run.step.precision,
        s.stop,
        threshold=run.step.task.threshold,
    )
    if s.stop:  # training is complete and checkpointed; a resume runs only the test
        s.records.test_interrupted(s.stop.signum or signal.SIGTERM)
        raise SystemExit(s.stop.exit_code)
    s.records.finish(test, best, elapsed, s.seconds_before + elapsed)
