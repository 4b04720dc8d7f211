"""The training loop: one path from a composed config to a trained, tested model.

Data are uint8 tensors resident on the training device; each step gathers a batch by
index, converts and augments it there, and steps the model. Metrics accumulate in device
tensors and reach the host only when the display refreshes or an epoch ends, so there is
no host-device sync per step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cnntrain import batches, distributed, explain, figures
from cnntrain import checkpoint as ckpt
from cnntrain.augment import build_augment
from cnntrain.config import validate
from cnntrain.console import make_reporter
from cnntrain.datasets import ImageData, load_dataset
from cnntrain.device import (
    Precision,
    configure_torch,
    describe,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
)
from cnntrain.errors import UserError
from cnntrain.logs import NullLog, RunLog, write_json
from cnntrain.models import build_model, count_parameters, freeze_norm_stats, set_backbone_trainable
from cnntrain.optim import build_optimizer, build_scheduler
from cnntrain.provenance import provenance
from cnntrain.sweep import apply_launcher_resources


class TrainingDiverged(UserError):
    exit_code = 3


class StopRequested:
    """Set by SIGINT/SIGTERM; every loop checks it between steps. A second SIGINT exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked worker inherited the handler: the main process decides
            return
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        self._pid = os.getpid()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a launcher's worker): leave signals alone
                return

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # steps done in the epoch under way
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    skipped_steps: int = 0  # steps passed over for a non-finite loss (trainer.on_nonfinite=skip)
    # Running sums of the epoch under way (tensors on the device, synced only when read).
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)


def _order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The shuffle of an epoch is a pure function of (seed, epoch), so resume needs no generator state."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g, device=device)


def _to_input(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor], channels_last: bool) -> torch.Tensor:
    mean, std = norm
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    precision: Precision,
    channels_last: bool,
    stop: StopRequested | None = None,
    dist: distributed.Dist | None = None,
) -> dict[str, Any]:
    """Loss, accuracy and predictions on a resident split; None values if a stop was requested.

    Under torchrun (``dist``) each rank evaluates its share and the sums are reduced, so every rank
    gets the metrics of the whole split (predictions stay per rank).
    """
    if dist is not None and dist.enabled:
        x_all, y_all = batches.shard(x_all, dist.rank, dist.world), y_all[dist.rank :: dist.world]
    was_training = model.training
    model.eval()
    device = y_all.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    preds, confs = [], []
    for x_u8, y in batches.sequential(x_all, y_all, batch_size, device):
        if stop:
            model.train(was_training)
            return {"loss": None, "acc": None, "pred": None, "conf": None}
        x = _to_input(x_u8.float().div_(255), norm, channels_last)
        with torch.autocast(device.type, dtype=precision.dtype, enabled=precision.dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        preds.append(logits.argmax(1))
        confs.append(logits.float().softmax(1).amax(1))  # top-1 probability, stays on the device
    model.train(was_training)
    pred = torch.cat(preds)
    totals = torch.stack([loss_sum, (pred == y_all).sum().double(), torch.tensor(len(y_all), device=device).double()])
    if dist is not None:
        distributed.all_reduce_sum(dist, totals)
    loss_total, correct, n = totals.tolist()
    n = max(1.0, n)
    return {"loss": loss_total / n, "acc": correct / n, "pred": pred, "conf": torch.cat(confs)}


def _flat(cfg: DictConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def fit(cfg: DictConfig, run_dir: Path) -> float:
    """Train, validate each epoch, test the best checkpoint; return the monitored validation metric."""
    resuming = cfg.resume is not None
    try:
        run = _setup(cfg, run_dir)
    except UserError:
        if not resuming:
            _remove_failed_run_dir(run_dir)
        raise
    if cfg.trainer.dry_run:
        return _dry_run(run, run_dir)
    return _train(run)


def _remove_failed_run_dir(run_dir: Path) -> None:
    """A start that failed before training leaves nothing worth keeping under runs/."""
    if not (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            run_dir.parent.rmdir()  # the experiment folder, if this was its only run


@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    precision: Precision
    channels_last: bool
    data: ImageData
    model: nn.Module
    forward: nn.Module  # what training steps call: the model, maybe wrapped for DDP and/or compiled
    plain: nn.Module  # what evaluation calls: the model (maybe compiled), never the DDP wrapper
    ema: AveragedModel | None
    dist: distributed.Dist
    steps: int  # optimizer steps per epoch
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    augment: Any
    tensors: dict[str, torch.Tensor]
    norm: tuple[torch.Tensor, torch.Tensor]
    progress: Progress
    reporter: Any
    start_rows: list[tuple[str, str]]


def _setup(cfg: DictConfig, run_dir: Path) -> Run:
    validate(cfg)
    apply_launcher_resources(cfg)  # sweep jobs: threads that share the cores, one GPU each (cnntrain/sweep.py)
    t = cfg.trainer
    dist = distributed.from_env()
    device = distributed.setup(dist, resolve_device(t.device), t.batch_size)
    run_dir = Path(distributed.broadcast_str(dist, str(run_dir)))  # rank 0's Hydra picked it
    precision = resolve_precision(str(t.precision), device)
    configure_torch(device, t.deterministic, t.num_threads, t.seed)
    data = load_dataset(cfg.dataset)
    model = build_model(cfg.model, data.channels, data.image_size, data.num_classes)
    channels_last = resolve_channels_last(str(t.channels_last), device, precision)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.model)
    # Under torchrun a partial last batch could leave a rank with nothing, so it is dropped there.
    steps = len(data.train_x) // t.batch_size if dist.enabled else math.ceil(len(data.train_x) / t.batch_size)
    if steps == 0:
        raise UserError(f"trainer.batch_size={t.batch_size} is larger than the {len(data.train_x)} training images")
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.optimizer.lr, steps, t.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    augment = build_augment(cfg.augment, data.num_classes)
    ema = None
    if t.ema_decay is not None:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
    progress = Progress()
    if cfg.resume is not None:
        _restore(cfg, model, optimizer, scheduler, scaler, progress, data, device, ema)
    if cfg.model.freeze_backbone and cfg.model.unfreeze_epoch is not None and progress.epoch + 1 >= cfg.model.unfreeze_epoch:
        set_backbone_trainable(model, True)
    # Resident data: moved once; non_blocking lets the copies overlap on CUDA.
    tensors = {
        name: getattr(data, name).to(device, non_blocking=True)
        for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    }
    shape = (1, data.channels, 1, 1)
    norm = (torch.tensor(data.mean, device=device).view(shape), torch.tensor(data.std, device=device).view(shape))
    plain = torch.compile(model) if t.compile else model
    forward = plain
    if dist.enabled:
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        forward = torch.compile(forward) if t.compile else forward
    reporter = make_reporter(t.progress if dist.main else "none")
    n_params = count_parameters(model)
    h, w = data.image_size
    rows = [
        ("dataset", f"{data.name}: {len(data.train_x):,} train / {len(data.val_x):,} val / {len(data.test_x):,} test, "
                    f"{data.channels}x{h}x{w}, {data.num_classes} classes ({data.source})"),
        ("model", f"{cfg.model.name}{'/' + cfg.model.arch if cfg.model.arch else ''}: {n_params:,} parameters"),
        ("augment", cfg.augment.name),
        ("optimizer", f"{cfg.optimizer.name} lr {cfg.optimizer.lr:g} weight decay {cfg.optimizer.weight_decay:g}"),
        ("scheduler", cfg.scheduler.name),
        ("trainer", f"{t.epochs} epochs x {steps} steps of {t.batch_size}, seed {t.seed}"
                    f"{', deterministic' if t.deterministic else ''}"),
        ("device", f"{describe(device)}, precision {precision.label}{', channels_last' if channels_last else ''}"
                   f"{', compiled' if t.compile else ''}"),
        ("run dir", str(run_dir)),
    ]
    if dist.enabled:
        rows.insert(-1, ("distributed", f"{dist.world} processes, global batch {t.batch_size} "
                                        f"({t.batch_size // dist.world} per rank)"))
    if ema is not None:
        rows.insert(-1, ("ema", f"decay {t.ema_decay}: validation, best and test use the averaged weights"))
    if cfg.resume is not None:
        rows.append(("resume", f"from epoch {progress.epoch}, step {progress.global_step}"))
    return Run(cfg, run_dir, device, precision, channels_last, data, model, forward, plain, ema, dist, steps,
               optimizer, scheduler, scaler, augment, tensors, norm, progress, reporter, rows)


def _check_model_state(cfg: DictConfig, model: nn.Module, state: dict[str, Any], path: Path, data: ImageData) -> None:
    saved = state.get("meta", {})
    if saved.get("model") not in (None, cfg.model.name) or saved.get("arch") not in (None, cfg.model.arch):
        raise UserError(f"checkpoint {path} holds a {saved.get('model')} model, but the config asks for {cfg.model.name}")
    if saved.get("classes") is not None and len(saved["classes"]) != data.num_classes:
        raise UserError(f"checkpoint {path} was trained for {len(saved['classes'])} classes, "
                        f"the dataset has {data.num_classes}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"checkpoint {path} does not match the configured model ({detail})") from None


def _restore(cfg, model, optimizer, scheduler, scaler, progress: Progress, data: ImageData, device, ema) -> None:
    path = ckpt.find_checkpoint(cfg.resume)
    state = ckpt.load_checkpoint(path)
    if "optimizer" not in state:
        raise UserError(f"{path} holds model weights only; resume needs a last.pt trainer checkpoint")
    _check_model_state(cfg, model, state, path, data)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not match the configured optimizer ({e})") from None
    if ema is not None:
        if "ema" not in state:
            raise UserError(f"checkpoint {path} has no weight average; resume it with trainer.ema_decay=null")
        ema.load_state_dict(state["ema"])
    p = state["progress"]
    progress.epoch, progress.step_in_epoch, progress.global_step = p["epoch"], p["step_in_epoch"], p["global_step"]
    progress.best_metric, progress.best_epoch = p["best_metric"], p["best_epoch"]
    progress.epochs_without_improvement = p.get("epochs_without_improvement", 0)
    progress.skipped_steps = p.get("skipped_steps", 0)
    progress.sums = {k: v.to(device) for k, v in p["sums"].items()}
    progress.times = dict(p["times"])
    ckpt.restore_rng(state["rng"])


def _meta(run: Run) -> dict[str, Any]:
    """What predict/evaluate/export need to use the model without the training data."""
    d, m = run.data, run.cfg.model
    return {"model": m.name, "arch": m.arch, "classes": list(d.classes), "channels": d.channels,
            "image_size": list(d.image_size), "mean": list(d.mean), "std": list(d.std), "dataset": d.name}


def _save(run: Run, name: str) -> None:
    """Rank 0 writes; `best` holds the weights that were validated (the average when EMA is on)."""
    if not run.dist.main:
        return
    p = run.progress
    validated = run.ema.module if run.ema is not None else run.model
    state = {
        "model": (validated if name == ckpt.BEST else run.model).state_dict(),
        "meta": _meta(run),
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        "progress": {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step,
                     "best_metric": p.best_metric, "best_epoch": p.best_epoch,
                     "epochs_without_improvement": p.epochs_without_improvement, "skipped_steps": p.skipped_steps,
                     "sums": {k: v.detach().cpu() for k, v in p.sums.items()}, "times": dict(p.times)},
    }
    if name == ckpt.LAST:
        state.update(optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                     scaler=run.scaler.state_dict(), rng=ckpt.capture_rng())
        if run.ema is not None:
            state["ema"] = run.ema.state_dict()
    ckpt.save_checkpoint(run.run_dir / "checkpoints" / name, state)


def _dry_run(run: Run, run_dir: Path) -> float:
    """One forward/backward on a real batch: proves the config builds and fits before a long run."""
    x = run.tensors["train_x"][: run.cfg.trainer.batch_size].float().div_(255)
    y = run.tensors["train_y"][: len(x)]
    if run.augment is not None:
        g = torch.Generator(device=run.device)
        g.manual_seed(0)
        x, y = run.augment(x, y, g)
    with torch.autocast(run.device.type, dtype=run.precision.dtype, enabled=run.precision.dtype is not None):
        loss = F.cross_entropy(run.forward(_to_input(x, run.norm, run.channels_last)).float(), y)
    loss.backward()
    run.reporter.start("cnntrain fit --dry-run", run.start_rows)
    run.reporter.print(f"dry run ok: one batch of {len(x)} through forward and backward, loss {loss.item():.4f}; "
                       "nothing was trained or written")
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()  # the experiment folder, if the dry run was all it held
    return float("nan")


def _train(run: Run) -> float:
    cfg, t, p, d = run.cfg, run.cfg.trainer, run.progress, run.dist
    model, optimizer, scheduler, scaler = run.model, run.optimizer, run.scheduler, run.scaler
    device, dtype = run.device, run.precision.dtype
    x_train, y_train = run.tensors["train_x"], run.tensors["train_y"]
    n, bs, steps = len(x_train), t.batch_size, run.steps
    monitor_max = t.monitor == "val/acc"
    stop = StopRequested()
    reporter = run.reporter

    if p.epoch >= t.epochs and _completed(run.run_dir):
        raise UserError(f"the run in {run.run_dir} already finished {p.epoch} epochs; "
                        f"pass trainer.epochs=N (N > {p.epoch}) with resume to train further")

    def record(summary: dict[str, Any]) -> None:
        if d.main:
            write_json(run.run_dir / "summary.json", summary)

    if d.main:
        write_json(run.run_dir / "provenance.json",
                   provenance(describe(device), t.seed, run.data.fingerprint(), sys.argv))
        log: RunLog | NullLog = RunLog(run.run_dir, resume_epoch=p.epoch if cfg.resume else None,
                                       resume_step=p.global_step + 1 if cfg.resume else None)
    else:
        log = NullLog()
    summary: dict[str, Any] = {"status": "running", "run_dir": str(run.run_dir), "epochs": t.epochs}
    record(summary)
    reporter.start("cnntrain fit", run.start_rows)
    aug_gen = torch.Generator(device=device)
    stop.install()
    stopping = early_stop = False
    skip_run = last_skip = 0  # trainer.on_nonfinite=skip: length and end of the current run of skipped steps
    t_run = time.perf_counter()
    try:
        while p.epoch < t.epochs and not early_stop:
            epoch = p.epoch + 1
            if cfg.model.freeze_backbone and cfg.model.unfreeze_epoch == epoch:
                set_backbone_trainable(model, True)
            if p.step_in_epoch == 0:
                p.sums = {k: torch.zeros((), device=device, dtype=torch.float64) for k in ("loss", "correct", "seen")}
                p.times = {"data": 0.0, "compute": 0.0, "wall": 0.0}
            sums = p.sums
            order = _order(n, t.seed, epoch, device)
            reporter.epoch_begin(epoch, t.epochs, steps, p.step_in_epoch)
            model.train()
            freeze_norm_stats(model)  # a frozen backbone keeps its BatchNorm statistics too
            last_refresh = time.monotonic()
            # Wall time of the training steps, logging and display included: the honest images/s.
            t_epoch, wall_before = time.perf_counter(), p.times["wall"]
            chunks = [order[i * bs : (i + 1) * bs] for i in range(p.step_in_epoch, steps)]
            if d.enabled:
                chunks = [c[d.rank :: d.world] for c in chunks]  # each rank its share of the same global batch
            batch_iter = batches.iterate(x_train, y_train, chunks, device)
            for i in range(p.step_in_epoch, steps):
                # Ranks agree on stopping every few steps, so they all stop at the same one.
                if (i % 16 == 0 and distributed.any_rank(d, bool(stop), device)) if d.enabled else stop:
                    stopping = True
                    break
                t0 = time.perf_counter()
                x_u8, y = next(batch_iter)  # resident: one gather; streamed: the DataLoader's next batch
                x = x_u8.float().div_(255)
                target = y
                if run.augment is not None:
                    # Seeded by the step: augmentation is reproducible from the position alone.
                    aug_gen.manual_seed(t.seed * 1_000_003 + p.global_step + d.rank * 1_000_000_007)
                    x, target = run.augment(x, y, aug_gen)
                x = _to_input(x, run.norm, run.channels_last)
                t1 = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits = run.forward(x)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=t.label_smoothing)
                if t.on_nonfinite == "skip" and not torch.isfinite(loss):  # a sync per step, only in skip mode
                    optimizer.zero_grad(set_to_none=True)
                    skip_run = skip_run + 1 if last_skip == p.global_step else 1
                    last_skip = p.global_step + 1
                    _check_skips(skip_run, epoch, last_skip, cfg)
                    p.skipped_steps += 1
                    reporter.print(f"step {p.global_step + 1}: the loss is {loss.item()}; step skipped "
                                   "(trainer.on_nonfinite=skip)")
                    p.step_in_epoch, p.global_step = i + 1, p.global_step + 1
                    continue
                backward_and_step(loss, model, optimizer, scaler, t.grad_clip)
                scheduler.step()
                if run.ema is not None:
                    run.ema.update_parameters(model)
                sums["loss"] += loss.detach() * len(y)
                sums["correct"] += (logits.argmax(1) == y).sum()
                sums["seen"] += len(y)
                p.step_in_epoch, p.global_step = i + 1, p.global_step + 1
                t2 = time.perf_counter()
                p.times["data"] += t1 - t0
                p.times["compute"] += t2 - t1
                if p.global_step % t.log_every_n_steps == 0:
                    step_loss = loss.item()
                    _check_finite(step_loss, epoch, p.global_step, cfg)
                    log.scalar("train/loss_step", step_loss, p.global_step)
                    log.scalar("lr_step", optimizer.param_groups[0]["lr"], p.global_step)
                if epoch == 1 and i == 0:
                    log.images("inputs/train_batch", x[:32] * run.norm[1] + run.norm[0], p.global_step)
                now = time.monotonic()
                if now - last_refresh >= reporter.refresh_s:
                    last_refresh = now
                    reporter.epoch_update(p.step_in_epoch, _running_stats(sums, p.times))
                    _check_finite(sums["loss"].item(), epoch, p.global_step, cfg)
                if t.checkpoint_every_n_steps and p.global_step % t.checkpoint_every_n_steps == 0 and i + 1 < steps:
                    _check_finite(sums["loss"].item(), epoch, p.global_step, cfg)
                    p.times["wall"] = wall_before + time.perf_counter() - t_epoch
                    log.flush()  # a crash after this checkpoint must not lose the events before it
                    _save(run, ckpt.LAST)
            p.times["wall"] = wall_before + time.perf_counter() - t_epoch
            if stopping:
                reporter.epoch_end(f"epoch {epoch}/{t.epochs} interrupted at step {p.step_in_epoch}/{steps}")
                break
            train_time = p.times["wall"]
            totals = torch.stack([sums["loss"], sums["correct"], sums["seen"]])
            distributed.all_reduce_sum(d, totals)
            loss_total, correct, seen = totals.tolist()
            seen = max(1.0, seen)
            train_loss, train_acc = loss_total / seen, correct / seen
            _check_finite(train_loss, epoch, p.global_step, cfg)
            t_eval = time.perf_counter()
            # Ranks cannot abandon a sharded validation one by one; a signal is seen at the next step.
            val = evaluate(run.ema.module if run.ema is not None else run.plain, run.tensors["val_x"],
                           run.tensors["val_y"], run.norm, t.eval_batch_size, run.precision, run.channels_last,
                           None if d.enabled else stop, d)
            if stop and not d.enabled:
                stopping = True
                reporter.epoch_end(f"epoch {epoch}/{t.epochs} interrupted during validation")
                break
            _check_finite(val["loss"], epoch, p.global_step, cfg)  # weights broken though the train loss was not
            eval_time = time.perf_counter() - t_eval
            metric = val["acc"] if monitor_max else val["loss"]
            improved = p.best_metric is None or (metric > p.best_metric if monitor_max else metric < p.best_metric)
            margin = t.early_stopping_min_delta
            clearly = p.best_metric is None or (metric > p.best_metric + margin if monitor_max
                                                else metric < p.best_metric - margin)
            p.epochs_without_improvement = 0 if clearly else p.epochs_without_improvement + 1
            row = {"epoch": epoch, "step": p.global_step, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val["loss"], "val_acc": val["acc"], "lr": optimizer.param_groups[0]["lr"],
                   "images_per_s": seen / max(train_time, 1e-9), "epoch_s": train_time + eval_time,
                   "data_s": p.times["data"], "compute_s": p.times["compute"], "eval_s": eval_time}
            # The row goes out before the checkpoint: if we die in between, resume redoes this
            # epoch and the row is rewritten, never lost.
            log.epoch(row, p.global_step)
            p.epoch, p.step_in_epoch = epoch, 0
            if improved:
                p.best_metric, p.best_epoch = metric, epoch
                _save(run, ckpt.BEST)
            _save(run, ckpt.LAST)
            summary.update(status="running", epochs_done=epoch, best_epoch=p.best_epoch,
                           **{f"best_{t.monitor.replace('/', '_')}": p.best_metric})
            record(summary)
            reporter.epoch_end(
                f"epoch {epoch}/{t.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                f"val loss {val['loss']:.4f} acc {val['acc']:.4f}{'  *' if improved else ''}  "
                f"{row['images_per_s']:,.0f} img/s  data {p.times['data'] / max(train_time, 1e-9):.0%}  "
                f"{row['epoch_s']:.1f}s"
            )
            patience = t.early_stopping_patience
            if patience is not None and p.epochs_without_improvement >= patience and p.epoch < t.epochs:
                early_stop = True
                summary["early_stopped_epoch"] = epoch
                reporter.print(f"early stopping: {t.monitor} has not improved for {patience} epochs "
                               f"(best {p.best_metric:.4f} at epoch {p.best_epoch})")
        if stopping:
            if p.global_step > 0:
                _check_finite(p.sums["loss"].item(), p.epoch + 1, p.global_step, cfg)
                _save(run, ckpt.LAST)
            summary["status"] = "interrupted"
            record(summary)
            reporter.print(f"stopped by signal {stop.signum or signal.SIGTERM}; checkpoint saved. Resume with:\n"
                           f"  cnntrain fit resume={run.run_dir}")
            raise SystemExit(stop.exit_code if stop else 128 + signal.SIGTERM)
        if not d.main:
            distributed.barrier(d)  # rank 0 tests the best checkpoint alone
            return float(p.best_metric)
        result = _finish(run, log, summary, time.perf_counter() - t_run, stop)
        distributed.barrier(d)
        return result
    except TrainingDiverged:
        summary["status"] = "diverged"
        record(summary)
        raise
    finally:
        stop.restore()
        log.close()
        distributed.teardown(d)


def backward_and_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, grad_clip: float | None) -> None:
    """One optimizer step: scaled backward (fp16), optional clipping of the true gradient norm, step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def _running_stats(sums: dict[str, torch.Tensor], times: dict[str, float]) -> dict[str, float]:
    seen = max(1.0, sums["seen"].item())
    busy = max(1e-9, times["data"] + times["compute"])
    return {"loss": sums["loss"].item() / seen, "acc": sums["correct"].item() / seen,
            "img/s": seen / busy, "data": times["data"] / busy}


def _check_finite(value: float, epoch: int, step: int, cfg: DictConfig) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"training diverged: the loss became {value} in epoch {epoch} (by step {step}) with "
            f"optimizer.lr={cfg.optimizer.lr:g}; lower optimizer.lr or set trainer.grad_clip. "
            "Nothing from the diverged state was saved."
        )


# trainer.on_nonfinite=skip passes over a few bad batches; this many in a row means the model is broken.
MAX_SKIPS_IN_A_ROW = 10


def _check_skips(in_a_row: int, epoch: int, step: int, cfg: DictConfig) -> None:
    if in_a_row >= MAX_SKIPS_IN_A_ROW:
        raise TrainingDiverged(
            f"training diverged: {in_a_row} steps in a row (up to step {step}, epoch {epoch}) gave a non-finite "
            f"loss with optimizer.lr={cfg.optimizer.lr:g}; trainer.on_nonfinite=skip passes over occasional bad "
            "batches, not a diverged model. Lower optimizer.lr or set trainer.grad_clip. "
            "Nothing from the diverged state was saved."
        )


def _completed(run_dir: Path) -> bool:
    """Whether the run in run_dir got through its test (summary.json says so)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def _finish(run: Run, log: RunLog, summary: dict[str, Any], elapsed: float, stop: StopRequested | None = None) -> float:
    """Test the best checkpoint, record everything, print the final table."""
    t, p = run.cfg.trainer, run.progress
    best_path = run.run_dir / "checkpoints" / ckpt.BEST
    best = ckpt.load_checkpoint(best_path)
    run.model.load_state_dict(best["model"])
    test = evaluate(run.plain, run.tensors["test_x"], run.tensors["test_y"], run.norm, t.eval_batch_size,
                    run.precision, run.channels_last, stop)
    if stop:  # training is complete and checkpointed; a resume runs only the test
        summary["status"] = "interrupted"
        write_json(run.run_dir / "summary.json", summary)
        run.reporter.print(f"stopped by signal {stop.signum} during the test; resume with:\n"
                           f"  cnntrain fit resume={run.run_dir}")
        raise SystemExit(stop.exit_code)
    log.scalar("test/loss", test["loss"], p.global_step)
    log.scalar("test/acc", test["acc"], p.global_step)
    key = f"best_{t.monitor.replace('/', '_')}"
    summary.update(status="completed", epochs_done=p.epoch, best_epoch=p.best_epoch, **{key: p.best_metric},
                   test_loss=test["loss"], test_acc=test["acc"], train_seconds=round(elapsed, 2),
                   global_step=p.global_step, skipped_steps=p.skipped_steps, parameters=count_parameters(run.model),
                   checkpoint=str(best_path))
    write_json(run.run_dir / "summary.json", summary)
    log.hparams(_flat(run.cfg), {f"hparam/{key}": p.best_metric, "hparam/test_acc": test["acc"],
                                 "hparam/test_loss": test["loss"]})
    figures.fit_figures(run, log, test)  # run_dir/figures/*.png and the same in TensorBoard
    explain.fit_model_images(run, log)  # first-layer filters and feature maps, TensorBoard only
    run.reporter.final("done", [
        (f"best {t.monitor}", f"{p.best_metric:.4f} (epoch {p.best_epoch})"),
        ("test acc", f"{test['acc']:.4f}"),
        ("test loss", f"{test['loss']:.4f}"),
        ("time", f"{elapsed:.1f}s"),
        ("run dir", str(run.run_dir)),
        ("tensorboard", f"tensorboard --logdir {run.run_dir}"),
    ])
    return float(p.best_metric)
