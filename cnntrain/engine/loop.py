"""The training loop: one path from a built Run to a trained, tested model.

An epoch reads: order, steps, validate, checkpoint, log. Data are uint8 tensors resident on the
training device; metrics accumulate in device tensors and reach the host only when the display
refreshes, a checkpoint is written or an epoch ends, so there is no host-device sync per step.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cnntrain.data import batches
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine import distributed
from cnntrain.engine.build import build_run, start_rows
from cnntrain.engine.device import describe
from cnntrain.engine.evaluate import evaluate
from cnntrain.engine.inputs import epoch_order
from cnntrain.engine.signals import StopRequested
from cnntrain.engine.state import Progress, Run, save
from cnntrain.engine.tasks import Monitor
from cnntrain.errors import UserError
from cnntrain.io import figures
from cnntrain.io.cpus import CollapseWatch
from cnntrain.io.files import BEST, LAST, write_json, write_splits
from cnntrain.io.provenance import provenance
from cnntrain.io.runlog import METRIC_COLUMNS, NullLog, RunLog
from cnntrain.io.trackers import open_trackers
from cnntrain.models import count_parameters, freeze_norm_stats, set_backbone_trainable
from cnntrain.sweep import jobs as sweep_jobs
from cnntrain.sweep import pruning

# trainer.on_nonfinite=skip passes over a few bad batches; this many in a row means the model is broken.
MAX_SKIPS_IN_A_ROW = 10


class TrainingDiverged(UserError):
    exit_code = 3


class Interrupted(Exception):
    """A stop was requested (signal); the loop saves what it has and leaves."""


@dataclass
class Session:
    """What one process's pass over the run keeps beside the Run: its log, its summary, its stop flag."""

    log: RunLog | NullLog
    summary: dict[str, Any]
    stop: StopRequested = field(default_factory=StopRequested)
    skips: int = 0  # trainer.on_nonfinite=skip: length of the current run of skipped steps...
    last_skip: int = 0  # ...and the step after the last one skipped
    watch: CollapseWatch | None = None  # CPU runs: says so once if other processes make the threads collapse
    seconds_before: float = 0.0  # training time of the sessions before this one (a resumed run's)
    started: float = field(default_factory=time.perf_counter)  # when this session's training began
    trial: pruning.TrialReport | None = None  # sweep.pruner: the Optuna trial this job reports its epochs to

    def seconds(self) -> float:
        """Training time of this session so far."""
        return time.perf_counter() - self.started


def fit(cfg: DictConfig, run_dir: Path) -> float:
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
    run.reporter.print(f"dry run ok: one batch of {len(x)} through forward and backward, loss {loss.item():.4f}; "
                       "nothing was trained or written")
    return float("nan")


def train(run: Run) -> float:
    """All epochs, then the test of the best checkpoint. Signals stop it with a resumable checkpoint."""
    t, p, d = run.cfg.trainer, run.progress, run.dist
    if p.epoch >= t.epochs and completed(run.run_dir):
        raise UserError(f"the run in {run.run_dir} already finished {p.epoch} epochs; "
                        f"pass trainer.epochs=N (N > {p.epoch}) with resume to train further")
    s = Session(_open_log(run), {"status": "running", "run_dir": str(run.run_dir), "epochs": t.epochs,
                                 **run.record, "tuning": dict(p.tuning)}, seconds_before=p.train_seconds)
    if run.device.type == "cpu":
        s.watch = CollapseWatch(torch.get_num_threads(), run.reporter.print)
    _record(run, s.summary)
    run.reporter.start("cnntrain fit", start_rows(run))
    s.trial = pruning.open_trial(run.cfg) if not d.enabled else None
    s.stop.install()
    s.started = time.perf_counter()
    try:
        try:
            while p.epoch < t.epochs and _epoch(run, s):
                pass
        except Interrupted:
            _save_interrupted(run, s)
        if not d.main:
            distributed.barrier(d)  # rank 0 tests the best checkpoint alone
            return float(p.best_metric)
        result = finish(run, s, s.seconds())
        distributed.barrier(d)
        return result
    except TrainingDiverged:
        s.summary["status"] = "diverged"
        _record(run, s.summary)
        raise
    except pruning.Pruned as e:
        s.summary.update(status=pruning.PRUNED, pruned_epoch=e.epoch)
        _record(run, s.summary)
        run.reporter.print(f"trial {run.cfg.sweep.trial} pruned by the study's {run.cfg.sweep.pruner} pruner after "
                           f"epoch {e.epoch}: {run.step.task.monitor(t.monitor).name} {e.value:.4f} falls behind "
                           "the other trials")
        raise
    finally:
        s.stop.restore()
        s.log.close(s.summary.get("status"))
        distributed.teardown(d)


def _save_interrupted(run: Run, s: Session) -> None:
    p = run.progress
    if p.global_step > 0:
        check_finite(p.sums["loss"].item(), p.epoch + 1, p.global_step, run.cfg)
        _save(run, s, LAST)
    s.summary["status"] = "interrupted"
    _record(run, s.summary)
    _partial_summary(run, s)
    run.reporter.print(f"stopped by signal {s.stop.signum or signal.SIGTERM}; checkpoint saved.{_resume_hint(run)}")
    raise SystemExit(s.stop.exit_code if s.stop else 128 + signal.SIGTERM)


def _partial_summary(run: Run, s: Session) -> None:
    """What an interrupted run got to, in the shape of the final table (no test: that needs the whole run)."""
    t, p = run.cfg.trainer, run.progress
    rows = [("epochs done", f"{p.epoch} of {t.epochs}" + (f", and {p.step_in_epoch} steps of the next"
                                                          if p.step_in_epoch else ""))]
    if p.best_metric is not None:
        rows.append((f"best {run.step.task.monitor(t.monitor).name}", f"{p.best_metric:.4f} (epoch {p.best_epoch})"))
    rows += [("time", f"{s.seconds_before + s.seconds():.1f}s"), ("run dir", str(run.run_dir))]
    run.reporter.final("interrupted", rows)


def _resume_hint(run: Run) -> str:
    """How to continue: this run's own command; in a sweep the CLI prints the sweep's (resume=auto) instead."""
    if sweep_jobs.in_sweep():
        return ""
    return f" Resume with:\n  cnntrain fit resume={run.run_dir}"


def _open_log(run: Run) -> RunLog | NullLog:
    if not run.dist.main:
        return NullLog()
    t, p, resumed = run.cfg.trainer, run.progress, run.cfg.resume is not None
    write_json(run.run_dir / "provenance.json",
               provenance(describe(run.device), t.seed, run.data_fingerprint, sys.argv))
    if run.data.items is not None:  # the splits this run trained, validated and tested on
        write_splits(run.run_dir / "splits.csv", run.data.items.column, run.data.split_rows())
    resume_step = p.global_step + 1 if resumed else None
    hydra = sweep_jobs.hydra_config() if sweep_jobs.in_sweep() else None
    sweep_dir = Path(hydra.sweep.dir).resolve() if hydra is not None else None
    trackers = open_trackers(run.cfg.logger, run.run_dir, run.cfg.name, flat(run.cfg), resumed, resume_step, sweep_dir)
    return RunLog(run.run_dir, resume_epoch=p.epoch if resumed else None, resume_step=resume_step, trackers=trackers,
                  columns=run.step.task.columns(METRIC_COLUMNS))


def _save(run: Run, s: Session, name: str) -> None:
    """A checkpoint, holding the run's training time up to now (all sessions): a resume goes on from it."""
    run.progress.train_seconds = s.seconds_before + s.seconds()
    save(run, name)


def _record(run: Run, summary: dict[str, Any]) -> None:
    if run.dist.main:
        write_json(run.run_dir / "summary.json", summary)


def _epoch(run: Run, s: Session) -> bool:
    """One epoch: steps, validation, checkpoints, the metrics row. False when early stopping ends the run."""
    cfg, t, p, task = run.cfg, run.cfg.trainer, run.progress, run.step.task
    monitor = task.monitor(t.monitor)
    epoch = p.epoch + 1
    if cfg.model.freeze_backbone and cfg.model.unfreeze_epoch == epoch:
        set_backbone_trainable(run.model, True)
    if p.step_in_epoch == 0:
        p.sums = {k: torch.zeros((), device=run.device, dtype=torch.float64) for k in ("loss", "correct", "seen")}
        p.times = {"data": 0.0, "compute": 0.0, "wall": 0.0}
    run.reporter.epoch_begin(epoch, t.epochs, run.steps, p.step_in_epoch)
    _steps(run, epoch, s)
    train_time = p.times["wall"]
    totals = torch.stack([p.sums["loss"], p.sums["correct"], p.sums["seen"]])
    distributed.all_reduce_sum(run.dist, totals)
    loss_total, correct, seen = totals.tolist()
    seen = max(1.0, seen)
    train_loss, train_acc = loss_total / seen, correct / seen
    check_finite(train_loss, epoch, p.global_step, cfg)
    t_eval = time.perf_counter()
    # Ranks cannot abandon a sharded validation one by one; a signal is seen at the next step.
    val = evaluate(run.ema.module if run.ema is not None else run.plain, run.tensors["val_x"], run.tensors["val_y"],
                   run.step.normalise, t.eval_batch_size, run.step.precision, None if run.dist.enabled else s.stop,
                   run.dist, task.threshold)
    if s.stop and not run.dist.enabled:
        run.reporter.epoch_end(f"epoch {epoch}/{t.epochs} interrupted during validation")
        raise Interrupted
    check_finite(val["loss"], epoch, p.global_step, cfg)  # weights broken though the train loss was not
    eval_time = time.perf_counter() - t_eval
    row = {"epoch": epoch, "step": p.global_step, "train_loss": train_loss, "val_loss": val["loss"],
           **task.row(train_acc, val), "lr": run.step.optimizer.param_groups[0]["lr"],
           "images_per_s": seen / max(train_time, 1e-9), "epoch_s": train_time + eval_time,
           "data_s": p.times["data"], "compute_s": p.times["compute"], "eval_s": eval_time}
    # The row goes out before the checkpoint: if we die in between, resume redoes this epoch and the
    # row is rewritten, never lost.
    s.log.epoch(row, p.global_step)
    p.epoch, p.step_in_epoch = epoch, 0
    improved = _track_best(p, val, t, monitor)
    if improved:
        _save(run, s, BEST)
    _save(run, s, LAST)
    s.summary.update(status="running", epochs_done=epoch, best_epoch=p.best_epoch,
                     **{f"best_{monitor.name.replace('/', '_')}": p.best_metric})
    _record(run, s.summary)
    run.reporter.epoch_end(
        f"epoch {epoch}/{t.epochs}  {task.epoch_text(train_loss, train_acc, val)}{'  *' if improved else ''}  "
        f"{row['images_per_s']:,.0f} img/s  data {p.times['data'] / max(train_time, 1e-9):.0%}  "
        f"{row['epoch_s']:.1f}s"
    )
    if s.trial is not None:
        s.trial.epoch(epoch, val[monitor.key], last=epoch >= t.epochs)
    patience = t.early_stopping_patience
    if patience is not None and p.epochs_without_improvement >= patience and p.epoch < t.epochs:
        s.summary["early_stopped_epoch"] = epoch
        run.reporter.print(f"early stopping: {monitor.name} has not improved for {patience} epochs "
                           f"(best {p.best_metric:.4f} at epoch {p.best_epoch})")
        return False
    return True


def _track_best(p: Progress, val: dict[str, Any], t: DictConfig, monitor: Monitor) -> bool:
    """Update the best metric and the early-stopping count; whether this epoch is the new best."""
    monitor_max = monitor.maximize
    metric = val[monitor.key]
    improved = p.best_metric is None or (metric > p.best_metric if monitor_max else metric < p.best_metric)
    margin = t.early_stopping_min_delta
    clearly = p.best_metric is None or (metric > p.best_metric + margin if monitor_max
                                        else metric < p.best_metric - margin)
    p.epochs_without_improvement = 0 if clearly else p.epochs_without_improvement + 1
    if improved:
        p.best_metric, p.best_epoch = metric, p.epoch
    return improved


def _steps(run: Run, epoch: int, s: Session) -> None:
    """The training steps of an epoch, from where it stands; raises Interrupted on a signal."""
    cfg, t, p, d, step = run.cfg, run.cfg.trainer, run.progress, run.dist, run.step
    bs, steps, sums = t.batch_size, run.steps, p.sums
    order = epoch_order(len(run.tensors["train_x"]), t.seed, epoch, run.device, run.sample_weights)
    run.model.train()
    freeze_norm_stats(run.model)  # a frozen backbone keeps its BatchNorm statistics too
    last_refresh = time.monotonic()
    # Wall time of the training steps, logging and display included: the honest images/s.
    t_epoch, wall_before = time.perf_counter(), p.times["wall"]
    chunks = [order[i * bs : (i + 1) * bs] for i in range(p.step_in_epoch, steps)]
    if d.enabled:
        chunks = [c[d.rank :: d.world] for c in chunks]  # each rank its share of the same global batch
    batch_iter = batches.iterate(run.tensors["train_x"], run.tensors["train_y"], chunks, run.device)
    if s.watch is not None:
        s.watch.resume()
    for i in range(p.step_in_epoch, steps):
        # Ranks agree on stopping every few steps, so they all stop at the same one.
        if (i % 16 == 0 and distributed.any_rank(d, bool(s.stop), run.device)) if d.enabled else s.stop:
            p.times["wall"] = wall_before + time.perf_counter() - t_epoch
            run.reporter.epoch_end(f"epoch {epoch}/{t.epochs} interrupted at step {p.step_in_epoch}/{steps}")
            raise Interrupted
        t0 = time.perf_counter()
        x_u8, y = next(batch_iter)  # resident: one gather; streamed: the DataLoader's next batch
        x, target = step.prepare(x_u8, y, p.global_step)
        t1 = time.perf_counter()
        logits, loss, stepped = step.train(x, target, skip_nonfinite=t.on_nonfinite == "skip")
        if not stepped:
            _skip(run, s, loss, epoch)
            p.step_in_epoch, p.global_step = i + 1, p.global_step + 1
            continue
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        sums["loss"] += loss.detach() * len(y)
        sums["correct"] += step.task.correct(logits, y)
        sums["seen"] += len(y)
        p.step_in_epoch, p.global_step = i + 1, p.global_step + 1
        t2 = time.perf_counter()
        p.times["data"] += t1 - t0
        p.times["compute"] += t2 - t1
        if s.watch is not None:
            s.watch.step(len(y))
        if p.global_step % t.log_every_n_steps == 0:
            step_loss = loss.item()
            check_finite(step_loss, epoch, p.global_step, cfg)
            s.log.scalar("train/loss_step", step_loss, p.global_step)
            s.log.scalar("lr_step", step.optimizer.param_groups[0]["lr"], p.global_step)
        if epoch == 1 and i == 0:
            s.log.images("inputs/train_batch", step.normalise.undo(x[:32]), p.global_step)
        now = time.monotonic()
        if now - last_refresh >= run.reporter.refresh_s:
            last_refresh = now
            run.reporter.epoch_update(p.step_in_epoch, _running_stats(sums, p.times, step.task.train_key))
            check_finite(sums["loss"].item(), epoch, p.global_step, cfg)
        if t.checkpoint_every_n_steps and p.global_step % t.checkpoint_every_n_steps == 0 and i + 1 < steps:
            check_finite(sums["loss"].item(), epoch, p.global_step, cfg)
            p.times["wall"] = wall_before + time.perf_counter() - t_epoch
            s.log.flush()  # a crash after this checkpoint must not lose the events before it
            _save(run, s, LAST)
    p.times["wall"] = wall_before + time.perf_counter() - t_epoch


def _skip(run: Run, s: Session, loss: torch.Tensor, epoch: int) -> None:
    """trainer.on_nonfinite=skip: pass over this step, and give up after too many in a row."""
    p = run.progress
    run.step.optimizer.zero_grad(set_to_none=True)
    s.skips = s.skips + 1 if s.last_skip == p.global_step else 1
    s.last_skip = p.global_step + 1
    if s.skips >= MAX_SKIPS_IN_A_ROW:
        raise TrainingDiverged(
            f"training diverged: {s.skips} steps in a row (up to step {s.last_skip}, epoch {epoch}) gave a "
            f"non-finite loss with optimizer.lr={run.cfg.optimizer.lr:g}; trainer.on_nonfinite=skip passes over "
            "occasional bad batches, not a diverged model. Lower optimizer.lr or set trainer.grad_clip. "
            "Nothing from the diverged state was saved."
        )
    p.skipped_steps += 1
    run.reporter.print(f"step {p.global_step + 1}: the loss is {loss.item()}; step skipped "
                       "(trainer.on_nonfinite=skip)")


def _running_stats(sums: dict[str, torch.Tensor], times: dict[str, float], key: str = "acc") -> dict[str, float]:
    seen = max(1.0, sums["seen"].item())
    busy = max(1e-9, times["data"] + times["compute"])
    return {"loss": sums["loss"].item() / seen, key: sums["correct"].item() / seen,
            "img/s": seen / busy, "data": times["data"] / busy}


def check_finite(value: float, epoch: int, step: int, cfg: DictConfig) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"training diverged: the loss became {value} in epoch {epoch} (by step {step}) with "
            f"optimizer.lr={cfg.optimizer.lr:g}; lower optimizer.lr or set trainer.grad_clip. "
            "Nothing from the diverged state was saved."
        )


def completed(run_dir: Path) -> bool:
    """Whether the run in run_dir got through its test (summary.json says so)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def finish(run: Run, s: Session, elapsed: float) -> float:
    """Test the best checkpoint, record everything, print the final table. `elapsed`: this session's
    training time; summary.json's train_seconds is the run's total, train_seconds_after_resume this
    session's part of it when the run was resumed."""
    t, p, log, summary, stop, task = run.cfg.trainer, run.progress, s.log, s.summary, s.stop, run.step.task
    best_path = run.run_dir / "checkpoints" / BEST
    run.model.load_state_dict(ckpt.load_checkpoint(best_path)["model"])
    test = evaluate(run.plain, run.tensors["test_x"], run.tensors["test_y"], run.step.normalise, t.eval_batch_size,
                    run.step.precision, stop, threshold=task.threshold)
    if stop:  # training is complete and checkpointed; a resume runs only the test
        summary["status"] = "interrupted"
        write_json(run.run_dir / "summary.json", summary)
        run.reporter.print(f"stopped by signal {stop.signum} during the test.{_resume_hint(run)}")
        raise SystemExit(stop.exit_code)
    tested = task.test_record(test, run.tensors["test_y"], run.data.num_classes)
    for tag, value in tested["scalars"].items():
        log.scalar(tag, value, p.global_step)
    monitor = task.monitor(t.monitor).name
    key = f"best_{monitor.replace('/', '_')}"
    summary.update(status="completed", epochs_done=p.epoch, best_epoch=p.best_epoch, **{key: p.best_metric},
                   **tested["summary"], train_seconds=round(s.seconds_before + elapsed, 2),
                   global_step=p.global_step, skipped_steps=p.skipped_steps, parameters=count_parameters(run.model),
                   checkpoint=str(best_path))
    resumed = run.cfg.resume is not None
    if resumed:
        summary["train_seconds_after_resume"] = round(elapsed, 2)
    if run.data.test_split is not None:  # held out by cnntrain: say how, so the figure can be trusted
        summary["test_split"] = run.data.test_split
    write_json(run.run_dir / "summary.json", summary)
    log.hparams(flat(run.cfg), {f"hparam/{key}": p.best_metric, **tested["hparams"]})
    if run.dist.main:  # filters and feature maps in TensorBoard; run_dir/figures/*.png, the same in TensorBoard
        figures.model_images(run.model, run.tensors["test_x"][:1], run.step.normalise.from_uint8, log,
                             p.global_step)
        # matplotlib's import and drawing would be most of a small run's wall time: by default a child process
        # draws them while this one prints its last lines and exits (trainer.figures). MLflow uploads the PNGs
        # with the summary, so there they are drawn first.
        how = "end" if t.figures == "background" and run.cfg.logger.mlflow and run.cfg.logger.log_figures else t.figures
        figures.hand_over(run.run_dir, p.global_step, run.cfg.name, list(run.data.classes), run.tensors["test_x"],
                          run.tensors["test_y"], test, how, tensorboard=run.cfg.logger.tensorboard)
    log.summary(summary)
    run.reporter.final("done", [
        (f"best {monitor}", f"{p.best_metric:.4f} (epoch {p.best_epoch})"),
        *tested["rows"],
        ("time", f"{s.seconds_before + elapsed:.1f}s" + (f" ({elapsed:.1f}s since the resume)" if resumed else "")),
        ("run dir", str(run.run_dir)),
        *log.viewers(),
    ])
    return float(p.best_metric)


def flat(cfg: DictConfig) -> dict[str, Any]:
    """Every config value under its dotted key (TensorBoard's HParams table)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out
