"""The training loop: one path from a composed config to a trained, tested model.

Data are uint8 tensors resident on the training device; each step gathers a batch by
index, converts and augments it there, and steps the model. Metrics accumulate in device
tensors and reach the host only when the display refreshes or an epoch ends, so there is
no host-device sync per step.
"""

from __future__ import annotations

import contextlib
import math
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

from cnntrain import checkpoint as ckpt
from cnntrain import explain, figures
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
from cnntrain.logs import RunLog, write_json
from cnntrain.models import build_model, count_parameters, set_backbone_trainable
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
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
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
) -> dict[str, Any]:
    """Loss, accuracy and predictions on a resident split; None values if a stop was requested."""
    was_training = model.training
    model.eval()
    device = x_all.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    preds, confs = [], []
    for start in range(0, len(x_all), batch_size):
        if stop:
            model.train(was_training)
            return {"loss": None, "acc": None, "pred": None, "conf": None}
        x = _to_input(x_all[start : start + batch_size].float().div_(255), norm, channels_last)
        y = y_all[start : start + batch_size]
        with torch.autocast(device.type, dtype=precision.dtype, enabled=precision.dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        preds.append(logits.argmax(1))
        confs.append(logits.float().softmax(1).amax(1))  # top-1 probability, stays on the device
    model.train(was_training)
    pred = torch.cat(preds)
    n = max(1, len(y_all))
    return {"loss": loss_sum.item() / n, "acc": (pred == y_all).sum().item() / n, "pred": pred,
            "conf": torch.cat(confs)}


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
    forward: nn.Module  # the model, possibly compiled
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
    device = resolve_device(t.device)
    precision = resolve_precision(str(t.precision), device)
    configure_torch(device, t.deterministic, t.num_threads, t.seed)
    data = load_dataset(cfg.dataset)
    model = build_model(cfg.model, data.channels, data.image_size, data.num_classes)
    channels_last = resolve_channels_last(str(t.channels_last), device, precision)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.model)
    steps = math.ceil(len(data.train_x) / t.batch_size)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.optimizer.lr, steps, t.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    augment = build_augment(cfg.augment, data.num_classes)
    progress = Progress()
    if cfg.resume is not None:
        _restore(cfg, model, optimizer, scheduler, scaler, progress, data, device)
    if cfg.model.freeze_backbone and cfg.model.unfreeze_epoch is not None and progress.epoch + 1 >= cfg.model.unfreeze_epoch:
        set_backbone_trainable(model, True)
    # Resident data: moved once; non_blocking lets the copies overlap on CUDA.
    tensors = {
        name: getattr(data, name).to(device, non_blocking=True)
        for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    }
    shape = (1, data.channels, 1, 1)
    norm = (torch.tensor(data.mean, device=device).view(shape), torch.tensor(data.std, device=device).view(shape))
    forward = torch.compile(model) if t.compile else model
    reporter = make_reporter(t.progress)
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
    if cfg.resume is not None:
        rows.append(("resume", f"from epoch {progress.epoch}, step {progress.global_step}"))
    return Run(cfg, run_dir, device, precision, channels_last, data, model, forward, optimizer, scheduler, scaler,
               augment, tensors, norm, progress, reporter, rows)


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


def _restore(cfg, model, optimizer, scheduler, scaler, progress: Progress, data: ImageData, device) -> None:
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
    p = state["progress"]
    progress.epoch, progress.step_in_epoch, progress.global_step = p["epoch"], p["step_in_epoch"], p["global_step"]
    progress.best_metric, progress.best_epoch = p["best_metric"], p["best_epoch"]
    progress.sums = {k: v.to(device) for k, v in p["sums"].items()}
    progress.times = dict(p["times"])
    ckpt.restore_rng(state["rng"])


def _meta(run: Run) -> dict[str, Any]:
    """What predict/evaluate/export need to use the model without the training data."""
    d, m = run.data, run.cfg.model
    return {"model": m.name, "arch": m.arch, "classes": list(d.classes), "channels": d.channels,
            "image_size": list(d.image_size), "mean": list(d.mean), "std": list(d.std), "dataset": d.name}


def _save(run: Run, name: str) -> None:
    p = run.progress
    state = {
        "model": run.model.state_dict(),
        "meta": _meta(run),
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        "progress": {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step,
                     "best_metric": p.best_metric, "best_epoch": p.best_epoch,
                     "sums": {k: v.detach().cpu() for k, v in p.sums.items()}, "times": dict(p.times)},
    }
    if name == ckpt.LAST:
        state.update(optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                     scaler=run.scaler.state_dict(), rng=ckpt.capture_rng())
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
    return float("nan")


def _train(run: Run) -> float:
    cfg, t, p = run.cfg, run.cfg.trainer, run.progress
    model, optimizer, scheduler, scaler = run.model, run.optimizer, run.scheduler, run.scaler
    device, dtype = run.device, run.precision.dtype
    x_train, y_train = run.tensors["train_x"], run.tensors["train_y"]
    n, bs = len(x_train), t.batch_size
    steps = math.ceil(n / bs)
    monitor_max = t.monitor == "val/acc"
    stop = StopRequested()
    reporter = run.reporter

    if p.epoch >= t.epochs:
        raise UserError(f"the run in {run.run_dir} already finished {p.epoch} epochs; "
                        f"pass trainer.epochs=N (N > {p.epoch}) with resume to train further")

    write_json(run.run_dir / "provenance.json",
               provenance(describe(device), t.seed, run.data.fingerprint(), sys.argv))
    log = RunLog(run.run_dir, resume_epoch=p.epoch if cfg.resume else None,
                 resume_step=p.global_step + 1 if cfg.resume else None)
    summary: dict[str, Any] = {"status": "running", "run_dir": str(run.run_dir), "epochs": t.epochs}
    write_json(run.run_dir / "summary.json", summary)
    reporter.start("cnntrain fit", run.start_rows)
    aug_gen = torch.Generator(device=device)
    stop.install()
    t_run = time.perf_counter()
    try:
        while p.epoch < t.epochs:
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
            last_refresh = time.monotonic()
            # Wall time of the training steps, logging and display included: the honest images/s.
            t_epoch, wall_before = time.perf_counter(), p.times["wall"]
            for i in range(p.step_in_epoch, steps):
                if stop:
                    break
                t0 = time.perf_counter()
                idx = order[i * bs : (i + 1) * bs]
                x = x_train.index_select(0, idx).float().div_(255)
                y = y_train.index_select(0, idx)
                target = y
                if run.augment is not None:
                    # Seeded by the step: augmentation is reproducible from the position alone.
                    aug_gen.manual_seed(t.seed * 1_000_003 + p.global_step)
                    x, target = run.augment(x, y, aug_gen)
                x = _to_input(x, run.norm, run.channels_last)
                t1 = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits = run.forward(x)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=t.label_smoothing)
                if t.on_nonfinite == "skip" and not torch.isfinite(loss):  # a sync per step, only in skip mode
                    optimizer.zero_grad(set_to_none=True)
                    p.step_in_epoch, p.global_step = i + 1, p.global_step + 1
                    continue
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if t.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
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
                    _save(run, ckpt.LAST)
            p.times["wall"] = wall_before + time.perf_counter() - t_epoch
            if stop:
                reporter.epoch_end(f"epoch {epoch}/{t.epochs} interrupted at step {p.step_in_epoch}/{steps}")
                break
            train_time = p.times["wall"]
            seen = max(1.0, sums["seen"].item())
            train_loss, train_acc = sums["loss"].item() / seen, sums["correct"].item() / seen
            _check_finite(train_loss, epoch, p.global_step, cfg)
            t_eval = time.perf_counter()
            val = evaluate(run.forward, run.tensors["val_x"], run.tensors["val_y"], run.norm, t.eval_batch_size,
                           run.precision, run.channels_last, stop)
            if stop:
                reporter.epoch_end(f"epoch {epoch}/{t.epochs} interrupted during validation")
                break
            eval_time = time.perf_counter() - t_eval
            metric = val["acc"] if monitor_max else val["loss"]
            improved = p.best_metric is None or (metric > p.best_metric if monitor_max else metric < p.best_metric)
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
            write_json(run.run_dir / "summary.json", summary)
            reporter.epoch_end(
                f"epoch {epoch}/{t.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                f"val loss {val['loss']:.4f} acc {val['acc']:.4f}{'  *' if improved else ''}  "
                f"{row['images_per_s']:,.0f} img/s  data {p.times['data'] / max(train_time, 1e-9):.0%}  "
                f"{row['epoch_s']:.1f}s"
            )
        if stop:
            if p.global_step > 0:
                _save(run, ckpt.LAST)
            summary["status"] = "interrupted"
            write_json(run.run_dir / "summary.json", summary)
            reporter.print(f"stopped by signal {stop.signum}; checkpoint saved. Resume with:\n"
                           f"  cnntrain fit resume={run.run_dir}")
            raise SystemExit(stop.exit_code)
        return _finish(run, log, summary, time.perf_counter() - t_run)
    except TrainingDiverged:
        summary["status"] = "diverged"
        write_json(run.run_dir / "summary.json", summary)
        raise
    finally:
        stop.restore()
        log.close()


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
            "Checkpoints from before the divergence were kept."
        )


def _finish(run: Run, log: RunLog, summary: dict[str, Any], elapsed: float) -> float:
    """Test the best checkpoint, record everything, print the final table."""
    t, p = run.cfg.trainer, run.progress
    best_path = run.run_dir / "checkpoints" / ckpt.BEST
    best = ckpt.load_checkpoint(best_path)
    run.model.load_state_dict(best["model"])
    test = evaluate(run.forward, run.tensors["test_x"], run.tensors["test_y"], run.norm, t.eval_batch_size,
                    run.precision, run.channels_last)
    log.scalar("test/loss", test["loss"], p.global_step)
    log.scalar("test/acc", test["acc"], p.global_step)
    key = f"best_{t.monitor.replace('/', '_')}"
    summary.update(status="completed", epochs_done=p.epoch, best_epoch=p.best_epoch, **{key: p.best_metric},
                   test_loss=test["loss"], test_acc=test["acc"], train_seconds=round(elapsed, 2),
                   global_step=p.global_step, parameters=count_parameters(run.model),
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
