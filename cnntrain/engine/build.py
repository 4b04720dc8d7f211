"""config -> Run: the device, the data, the model, the optimizer and everything else a run trains with.

The order matters for reproducibility: torch is seeded before the model is initialised, and a resumed
run restores its RNG state after everything that draws random numbers has been built.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cnntrain.augment import build_augment
from cnntrain.config import FitConfig
from cnntrain.config.compose import chosen_option
from cnntrain.data import load_dataset
from cnntrain.data.folds import take_fold
from cnntrain.data.images import ImageData
from cnntrain.engine import balance, distributed, tasks, tuning
from cnntrain.engine.checkpoint import Progress, find_checkpoint, restore
from cnntrain.engine.device import Precision, configure_torch, describe, resolve_device, resolve_precision
from cnntrain.engine.inputs import Normalise
from cnntrain.engine.state import Run
from cnntrain.engine.step import TrainStep
from cnntrain.errors import UserError
from cnntrain.io.console import make_reporter
from cnntrain.io.files import RunDir
from cnntrain.models import build_model, chosen_label, count_parameters, model_label, set_backbone_trainable
from cnntrain.optim import build_optimizer, build_scheduler

SPLITS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def build_run(cfg: FitConfig, run_dir: Path) -> Run:
    """Build everything `cfg` asks for, each builder from its own part of it; with cfg.resume, restore the run's
    checkpoint into it."""
    t = cfg.trainer
    dist = distributed.from_env()
    device = distributed.setup(dist, resolve_device(t.device), t.batch_size)
    run_dir = Path(distributed.broadcast_str(dist, str(run_dir)))  # rank 0's Hydra picked it
    precision = resolve_precision(str(t.precision), device)
    threads_note = configure_torch(device, t.deterministic, t.num_threads, t.seed, auto_threads=not dist.enabled)
    data = take_fold(load_dataset(cfg.dataset), t.folds, t.fold, cfg.dataset.split_seed)
    task = tasks.build_task(t, cfg.dataset, data.train_y, data.val_y)  # one class per image, or multi-hot labels
    counts = balance.class_counts(data.train_y, data.num_classes)
    class_weights = task.loss_weights(t.class_weights, counts, len(data.train_y), data.classes)
    note = (
        balance.imbalance_warning(counts, data.classes, t.class_weights, cfg.dataset.sampler)
        if task.name == tasks.SINGLE
        else None
    )
    if note is not None and dist.main:
        warnings.warn(note, stacklevel=2)
    if cfg.augment.hflip and cfg.dataset.flips_change_label and dist.main:
        # A warning, not a refusal: the flips of augment=standard on digits are a mistake, not a crash.
        warnings.warn(
            f"augment.hflip={cfg.augment.hflip:g} mirrors {cfg.dataset.name} images, whose config says a flip "
            "changes what they show (a mirrored digit is not that digit); set augment.hflip=0",
            stacklevel=2,
        )
    model = build_model(cfg.model, data.channels, data.image_size, data.num_classes)
    model = model.to(device)  # the layout is chosen below, once a resume's recorded choice is known
    optimizer = build_optimizer(model, cfg.optimizer, cfg.model)
    # Under torchrun a partial last batch could leave a rank with nothing, so it is dropped there.
    steps = len(data.train_x) // t.batch_size if dist.enabled else math.ceil(len(data.train_x) / t.batch_size)
    if steps == 0:
        raise UserError(f"trainer.batch_size={t.batch_size} is larger than the {len(data.train_x)} training images")
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.optimizer.lr, steps, t.epochs)
    step, ema = _train_step(cfg, model, optimizer, scheduler, data, task, class_weights, device, precision, dist)
    resumed = None if cfg.resume is None else find_checkpoint(cfg.resume)
    progress = Progress() if resumed is None else restore(resumed, cfg, step, scheduler, ema, data, device)
    shape = (data.channels, *data.image_size)
    choice = tuning.decide(
        t,
        cfg.model,
        resumed is not None,
        step,
        device,
        shape,
        data.num_classes,
        progress.tuning,
        dist.enabled,
        steps * max(1, t.epochs - progress.epoch),
    )
    # Weights and optimizer state keep their values in either layout, so a resume restores before this.
    tuning.apply(choice, step, [model] + ([ema.module] if ema is not None else []))
    progress.tuning = choice.record()
    last = RunDir(run_dir).last
    keep_last = resumed is None or (last.is_file() and resumed.resolve() == last.resolve())
    if (
        cfg.model.freeze_backbone
        and cfg.model.unfreeze_epoch is not None
        and progress.epoch + 1 >= cfg.model.unfreeze_epoch
    ):
        set_backbone_trainable(model, True)
    # Resident data: moved once; non_blocking lets the copies overlap on CUDA.
    tensors = {name: getattr(data, name).to(device, non_blocking=True) for name in SPLITS}
    plain = _forwards(step, t.compile, dist, device)
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        data=data,
        tensors=tensors,
        step=step,
        plain=plain,
        ema=ema,
        scheduler=scheduler,
        dist=dist,
        steps=steps,
        progress=progress,
        reporter=make_reporter(t.progress if dist.main else "none"),
        threads_note=threads_note,
        keep_last=keep_last,
        data_fingerprint=data.fingerprint(),
        sample_weights=balance.sample_weights(cfg.dataset.sampler, data.train_y, counts),
        record={**tasks.record(task, t.monitor), **_record(cfg, data, class_weights)},
    )


def _train_step(
    cfg: FitConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: ImageData,
    task: tasks.Task,
    class_weights: torch.Tensor | None,
    device: torch.device,
    precision: Precision,
    dist: distributed.Dist,
) -> tuple[TrainStep, AveragedModel | None]:
    """fit's whole optimisation step, and the weight average it updates (trainer.ema_decay)."""
    t = cfg.trainer
    ema = None
    if t.ema_decay is not None:
        average = get_ema_multi_avg_fn(t.ema_decay)  # type: ignore[no-untyped-call]  # unannotated in torch
        ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
    step = TrainStep(
        model=model,
        forward=model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=precision.use_scaler),
        normalise=Normalise.of(data.mean, data.std, device),
        precision=precision,
        augment=build_augment(cfg.augment, data.num_classes),
        label_smoothing=t.label_smoothing,
        grad_clip=t.grad_clip,
        seed=t.seed,
        rank=dist.rank,
        class_weights=None if class_weights is None else class_weights.to(device),
        task=task,
        scheduler=scheduler,
        ema=ema,
        skip_nonfinite=t.on_nonfinite == "skip",
        unfreeze_epoch=cfg.model.unfreeze_epoch if cfg.model.freeze_backbone else None,
        lr=cfg.optimizer.lr,
    )
    return step, ema


def _forwards(step: TrainStep, compile: bool, dist: distributed.Dist, device: torch.device) -> nn.Module:
    """What the step trains through (compiled, DDP-wrapped under torchrun) and what evaluation calls (the model,
    compiled when asked, never the DDP wrapper)."""
    model = step.model
    plain = _compiled(model) if compile else model
    step.forward = plain
    if dist.enabled:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        step.forward = _compiled(ddp) if compile else ddp
    return plain


def _compiled(module: nn.Module) -> nn.Module:
    """torch.compile of a module, which is a module (OptimizedModule) though torch types it as any callable."""
    return cast(nn.Module, torch.compile(module))


def _record(cfg: FitConfig, data: ImageData, class_weights: torch.Tensor | None) -> dict[str, Any]:
    """summary.json's account of the options that change what a run trains on."""
    out: dict[str, Any] = {}
    if class_weights is not None:
        out["class_weights"] = {name: round(float(w), 6) for name, w in zip(data.classes, class_weights, strict=True)}
    if cfg.dataset.sampler != "shuffle":
        out["sampler"] = cfg.dataset.sampler
    if cfg.trainer.folds is not None:
        out["fold"] = {"fold": cfg.trainer.fold, "folds": cfg.trainer.folds, "val_images": len(data.val_y)}
    return out


def start_rows(run: Run) -> list[tuple[str, str]]:
    """The table printed when a run starts: what is about to be trained, on what, where."""
    cfg, data, model, dist, steps = run.cfg, run.data, run.model, run.dist, run.steps
    precision, channels_last = run.step.precision, run.step.normalise.channels_last
    t = cfg.trainer
    h, w = data.image_size
    rows = [
        (
            "dataset",
            f"{data.name}: {len(data.train_x):,} train / {len(data.val_x):,} val / {len(data.test_x):,} test, "
            f"{data.channels}x{h}x{w}, {data.num_classes} {'labels' if data.multilabel else 'classes'} "
            f"({data.source})",
        ),
        (
            "model",
            f"{chosen_label(chosen_option('model'), model_label(cfg.model))}: {count_parameters(model):,} parameters",
        ),
        ("augment", cfg.augment.name),
        ("optimizer", f"{cfg.optimizer.name} lr {cfg.optimizer.lr:g} weight decay {cfg.optimizer.weight_decay:g}"),
        ("scheduler", cfg.scheduler.name),
        (
            "trainer",
            f"{t.epochs} epochs x {steps} steps of {t.batch_size}, seed {t.seed}"
            f"{', deterministic' if t.deterministic else ''}",
        ),
        (
            "device",
            f"{describe(run.device)}, precision {precision.label}"
            f"{', channels_last' if channels_last else ''}{', compiled' if t.compile else ''}"
            f"{f'; threads: {run.threads_note}' if run.threads_note and run.device.type == 'cpu' else ''}",
        ),
        ("layout", layout_row(run.progress.tuning, channels_last, run.step.micro_batch)),
        ("run dir", str(run.run_dir)),
    ]
    if dist.enabled:
        rows.insert(
            -1,
            (
                "distributed",
                f"{dist.world} processes, global batch {t.batch_size} ({t.batch_size // dist.world} per rank)",
            ),
        )
    if run.record.get("class_weights") is not None or cfg.dataset.sampler != "shuffle":
        weights = run.record.get("class_weights")
        rows.insert(
            -1,
            (
                "classes",
                ", ".join(
                    filter(
                        None,
                        [
                            f"loss weights {', '.join(f'{w:.3g}' for w in weights.values())}" if weights else "",
                            f"{cfg.dataset.sampler} sampler" if cfg.dataset.sampler != "shuffle" else "",
                        ],
                    )
                ),
            ),
        )
    if (task_row := tasks.start_row(run.step.task, t.monitor)) is not None:
        rows.insert(-1, task_row)
    if t.folds is not None and t.fold is not None:  # validate: trainer.folds comes with a fold
        rows.insert(-1, ("fold", f"{t.fold + 1} of {t.folds}: validating on {len(data.val_y):,} images"))
    if t.ema_decay is not None:
        rows.insert(-1, ("ema", f"decay {t.ema_decay}: validation, best and test use the averaged weights"))
    if cfg.resume is not None:
        rows.append(("resume", resume_point(run.progress, steps)))
    return rows


def resume_point(p: Progress, steps: int) -> str:
    """Where a resumed run goes on, in the epoch and step a user saw when it stopped (progress.epoch counts
    the epochs done, so the one under way is the next)."""
    if p.step_in_epoch == 0:
        return f"at the start of epoch {p.epoch + 1} ({p.epoch} done, {p.global_step:,} steps)"
    return f"in epoch {p.epoch + 1}, after step {p.step_in_epoch} of {steps} ({p.global_step:,} steps in all)"


def layout_row(record: dict[str, Any], channels_last: bool, micro_batch: int | None) -> str:
    """The start table's line on the layout and compute chunk, and where they came from."""
    chunk = f"chunks of {micro_batch} (gradients accumulated)" if micro_batch else "whole batch"
    how = record.get("how")
    return f"{'channels_last' if channels_last else 'contiguous'}, {chunk}{f' ({how})' if how else ''}"
