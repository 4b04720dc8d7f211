"""`cnntrain lr-find`: the learning-rate range test.

Builds exactly what `cnntrain fit` would build from the same overrides (data, model, optimizer,
augmentation, precision: `engine.build.build_run`), then takes one optimizer step per training batch while
the learning rate grows exponentially from lr_min to lr_max. The loss first barely moves, then
falls, then blows up; a good learning rate sits where it falls fastest. Nothing is trained for
keeps: the model is thrown away and no run directory is made, only a plot and a CSV.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnntrain.commands.args import parse_args, print_help, wants_help
from cnntrain.errors import UserError
from cnntrain.io.files import output_dir

HELP = """\
usage: cnntrain lr-find [fit overrides ...] [key=value ...]

Learning-rate range test: starting from the configured model, take one training step per batch
while the learning rate grows exponentially from lr_min to lr_max, and record the (smoothed)
loss. Stops early once the loss explodes. Writes lr_find.png (loss against learning rate, the
suggestion marked), lr_find.csv and lr_find.json, and prints the suggested optimizer.lr.

Any `cnntrain fit` override chooses what is tested (model=..., dataset=..., optimizer=...,
trainer.batch_size=..., experiment=...); the scheduler is ignored. Keys of lr-find itself:
  lr_min=1e-7       first learning rate
  lr_max=10         last learning rate (reached only if the loss has not exploded by then)
  steps=100         number of steps (training batches) from lr_min to lr_max
  smoothing=0.8     weight of the past in the loss's moving average (0: raw losses)
  diverge=4         stop when the smoothed loss exceeds this many times its lowest value
  suggest=steepest  steepest (where the smoothed loss falls fastest) | min10 (lowest loss / 10)
  out=DIR           where to write (default: runs/lr_find/<date>_<time>_<tag>)

With a backbone_lr_scale or several parameter groups, every group keeps its ratio to optimizer.lr.

examples:
  cnntrain lr-find model=resnet8 dataset=fashion_mnist
  cnntrain lr-find experiment=fashion_fast steps=200 lr_max=1
  cnntrain lr-find optimizer=sgd trainer.batch_size=128 out=lr_sgd
"""

SUGGEST = ("steepest", "min10")


@dataclass
class LrFindArgs:
    lr_min: float = 1e-7
    lr_max: float = 10.0
    steps: int = 100
    smoothing: float = 0.8
    diverge: float = 4.0
    suggest: str = "steepest"
    out: str | None = None


@dataclass
class Result:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]  # running average (what the stopping rule sees)
    curve: list[float]  # zero-phase smoothing (what the suggestion and the plot use)
    suggestion: float
    steepest: float | None
    min10: float
    stopped_early: bool


def main(argv: list[str]) -> None:
    if wants_help(argv):
        print_help(HELP)
        return
    from cnntrain.config.compose import take_config_dir_flags

    ours, overrides = _split(take_config_dir_flags(argv))
    args = parse_args(LrFindArgs, ours, "lr-find")
    _check(args)
    cfg = compose_fit_config(overrides)
    out = Path(args.out).expanduser() if args.out else _default_out()
    output_dir(out, "out", given=bool(args.out), create=False)  # before the minutes of work, not after
    run(cfg, args, out, overrides)


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """lr-find's own keys (see LrFindArgs) apart from the fit overrides that go to Hydra."""
    import dataclasses

    from cnntrain.config import FitConfig
    from cnntrain.config.keys import key_hint, option_error
    from cnntrain.errors import did_you_mean

    own = {f.name for f in dataclasses.fields(LrFindArgs)}
    fit_top = {f.name for f in dataclasses.fields(FitConfig)}
    ours, rest = [], []
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            raise option_error(arg, argv[i + 1] if i + 1 < len(argv) else None, "lr-find")
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in own:
            ours.append(arg)
        elif "." in key or "/" in key or key in fit_top or key == "experiment":
            rest.append(arg)
        else:
            hint = did_you_mean(key, sorted(own | fit_top)) or key_hint(key)
            raise UserError(
                f"unknown key '{key}' for cnntrain lr-find{hint}; "
                f"its keys are {', '.join(sorted(own))}, plus any fit override (group=option, a.b=value)"
            )
    return ours, rest


def _check(a: LrFindArgs) -> None:
    checks = [
        (a.lr_min > 0, "lr_min", a.lr_min, "must be > 0"),
        (a.lr_max > a.lr_min, "lr_max", a.lr_max, f"must be above lr_min={a.lr_min:g}"),
        (a.steps >= 10, "steps", a.steps, "must be at least 10"),
        (0 <= a.smoothing < 1, "smoothing", a.smoothing, "must be in [0, 1)"),
        (a.diverge > 1, "diverge", a.diverge, "must be > 1"),
        (a.suggest in SUGGEST, "suggest", a.suggest, f"must be one of: {', '.join(SUGGEST)}"),
    ]
    for ok, key, value, what in checks:
        if not ok:
            raise UserError(f"{key}={value} {what}")


def compose_fit_config(overrides: list[str]) -> Any:
    """The config `cnntrain fit OVERRIDES` would run with (composed, not run: no run directory)."""
    from omegaconf import OmegaConf

    from cnntrain.config.compose import compose_fit

    cfg = compose_fit(overrides)
    if cfg.resume is not None:
        raise UserError(
            "lr-find starts from the configured model and trains nothing for keeps; "
            "drop resume=... (to start from trained weights use model.weights=<file>)"
        )
    cfg.trainer.ema_decay = None  # nothing is validated, so no average is needed
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _default_out() -> Path:
    import secrets

    return Path("runs") / "lr_find" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(2)}"


def lr_at(step: int, steps: int, lr_min: float, lr_max: float) -> float:
    """Exponential sweep: lr_min at step 0, lr_max at step steps-1."""
    return lr_min * (lr_max / lr_min) ** (step / max(1, steps - 1))


def centred(losses: list[float], smoothing: float) -> list[float]:
    """Zero-phase smoothing: a bias-corrected moving average run forwards, then backwards over the result.

    The running average the stopping rule uses lags behind the raw losses (by about 1/(1-smoothing)
    steps, most of a decade of lr), which would put the steepest point too far right.
    """

    def ema(values: list[float]) -> list[float]:
        out, avg = [], 0.0
        for i, v in enumerate(values):
            avg = smoothing * avg + (1 - smoothing) * v
            out.append(avg / (1 - smoothing ** (i + 1)))
        return out

    # Losses above the starting level belong to the blow-up; capped, they cannot leak backwards.
    cap = max(ema(losses[: max(1, len(losses) // 10)]))
    return ema(ema([min(v, cap) for v in losses])[::-1])[::-1]


def suggest(lrs: list[float], curve: list[float]) -> tuple[float | None, float]:
    """(steepest, min10) of a smoothed loss curve: the lr where it falls fastest per decade of lr,
    and the lr of its lowest point divided by 10. steepest is None when the curve is too short."""
    import numpy as np

    lr, loss = np.asarray(lrs, dtype=float), np.asarray(curve, dtype=float)
    best = int(np.nanargmin(loss))
    min10 = float(lr[best] / 10)
    if best < 4:
        return None, min10
    slope = np.gradient(loss[: best + 1], np.log10(lr[: best + 1]))
    return float(lr[int(np.argmin(slope))]), min10


def run(cfg: Any, args: LrFindArgs, out: Path, overrides: list[str] | None = None) -> Result:
    """The range test itself; writes out/lr_find.{csv,png,json} and prints the suggestion."""

    from cnntrain.config import typed, validate
    from cnntrain.engine.build import build_run, start_rows
    from cnntrain.io.logs import log_to
    from cnntrain.models import freeze_norm_stats, model_label

    validate(cfg)
    built = build_run(typed(cfg), out)
    if built.dist.enabled:
        raise UserError("lr-find runs in one process; start it without torchrun")
    step, t = built.step, cfg.trainer
    optimizer = step.optimizer
    # Each parameter group keeps its ratio to optimizer.lr (backbone_lr_scale); the schedule is not used.
    ratios = [g.get("initial_lr", g["lr"]) / cfg.optimizer.lr for g in optimizer.param_groups]
    bs = t.batch_size
    rows = [r for r in start_rows(built) if r[0] in ("dataset", "model", "augment", "optimizer", "device")]
    rows += [
        (
            "sweep",
            f"lr {args.lr_min:g} -> {args.lr_max:g} over {args.steps} steps of {bs} "
            f"(stops when the loss passes {args.diverge:g}x its lowest)",
        ),
        ("out", str(out)),
    ]
    reporter = built.reporter
    reporter.start("cnntrain lr-find", rows)

    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best = 0.0, math.inf
    stopped_early = False
    built.model.train()
    freeze_norm_stats(built.model)
    report_every = max(1, args.steps // 10)
    for i_step, (x_u8, y) in enumerate(training_batches(built, bs, t.seed, args.steps)):
        lr = lr_at(i_step, args.steps, args.lr_min, args.lr_max)
        for g, ratio in zip(optimizer.param_groups, ratios, strict=True):
            g["lr"] = lr * ratio
        x, target = step.prepare(x_u8, y, i_step)
        _, loss, stepped = step.train(x, target, skip_nonfinite=True)
        value = loss.item()  # one sync per step: the stopping rule needs it
        if not stepped:
            stopped_early = True
            break
        avg = args.smoothing * avg + (1 - args.smoothing) * value
        smooth = avg / (1 - args.smoothing ** (i_step + 1))  # bias-corrected: no pull towards 0 at the start
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        best = min(best, smooth)
        if (i_step + 1) % report_every == 0:
            reporter.print(f"step {i_step + 1}/{args.steps}  lr {lr:.2e}  loss {value:.4f}  smoothed {smooth:.4f}")
        if i_step > 0 and smooth > args.diverge * best:
            stopped_early = True
            break
    if len(lrs) < 5:
        raise UserError(
            f"the loss exploded within {len(lrs)} steps, already at lr {lrs[-1] if lrs else args.lr_min:.2g}; "
            f"lower lr_min (now {args.lr_min:g})"
        )
    curve = centred(losses, args.smoothing)
    steepest, min10 = suggest(lrs, curve)
    chosen = steepest if args.suggest == "steepest" and steepest is not None else min10
    how = (
        "steepest descent of the smoothed loss"
        if chosen == steepest and args.suggest == "steepest"
        else "lowest smoothed loss / 10"
    )
    result = Result(lrs, losses, smoothed, curve, chosen, steepest, min10, stopped_early)
    output_dir(out, "out")
    log_to(out / "lr_find.log")  # what was logged so far (the table, the steps, warnings), and what follows
    _write_csv(out / "lr_find.csv", result)
    _write_json(out / "lr_find.json", result, how, cfg, overrides or [])
    _plot(out / "lr_find.png", result, how, model_label(typed(cfg).model), built.data.name, cfg.optimizer.name, bs)
    keep = [o for o in (overrides or []) if not o.startswith(("optimizer.lr=", "trainer.progress="))]
    command = " ".join(["cnntrain fit", *keep, f"optimizer.lr={chosen:.2g}"])
    reporter.final(
        "lr-find done",
        [
            ("suggested", f"optimizer.lr={chosen:.2g} ({how})"),
            ("steepest", "n/a (curve too short)" if steepest is None else f"{steepest:.2g}"),
            ("min / 10", f"{min10:.2g}"),
            ("steps", f"{len(lrs)} of {args.steps}{', stopped: the loss exploded' if stopped_early else ''}"),
            ("plot", str(out / "lr_find.png")),
            ("csv", str(out / "lr_find.csv")),
            ("train with", command),
        ],
    )
    return result


def training_batches(built: Any, batch_size: int, seed: int, steps: int) -> Iterator[tuple[Any, Any]]:
    """`steps` training batches (uint8 images, labels) in fit's order, epoch 1, 2, ... as fit's batch iterator
    reads them; full batches only: a short last batch would show up as a loss blip."""
    from cnntrain.data import batches
    from cnntrain.engine.inputs import epoch_order

    x, y = built.tensors["train_x"], built.tensors["train_y"]
    per_epoch = max(1, len(x) // batch_size)
    epoch, left = 0, steps
    while left > 0:
        epoch += 1
        order = epoch_order(len(x), seed, epoch, built.device, built.sample_weights)
        chunks = [order[i * batch_size : (i + 1) * batch_size] for i in range(min(per_epoch, left))]
        left -= len(chunks)
        yield from batches.iterate(x, y, chunks, built.device)


def _write_csv(path: Path, r: Result) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss", "running_avg_loss", "smoothed_loss"])
        for i, row in enumerate(zip(r.lrs, r.losses, r.smoothed, r.curve, strict=True)):
            w.writerow([i + 1, f"{row[0]:.6g}", *(f"{v:.6f}" for v in row[1:])])


def _write_json(path: Path, r: Result, how: str, cfg: Any, overrides: list[str]) -> None:
    from cnntrain.io.files import write_json

    write_json(
        path,
        {
            "suggested_lr": r.suggestion,
            "method": how,
            "steepest_lr": r.steepest,
            "min10_lr": r.min10,
            "lowest_smoothed_loss": min(r.curve),
            "steps_done": len(r.lrs),
            "lr_range": [r.lrs[0], r.lrs[-1]],
            "stopped_early": r.stopped_early,
            "overrides": overrides,
            "model": cfg.model.name,
            "optimizer": cfg.optimizer.name,
        },
    )


def _plot(path: Path, r: Result, how: str, model: str, dataset: str, optimizer: str, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(r.lrs, r.losses, color="0.75", lw=0.8, label="loss per batch")
    ax.plot(r.lrs, r.curve, color="C0", lw=2, label="smoothed loss")
    ax.set_xscale("log")
    # The exploding tail would squash the interesting part: show the batches up to the lowest point
    # of the curve, and up to a little above where the loss started.
    best = r.curve.index(min(r.curve))
    seen = r.losses[: best + 1] + r.curve
    low = min(seen)
    first = sorted(r.losses[: max(3, len(r.losses) // 10)])
    start = max(r.curve[0], first[len(first) // 2])  # the median of the first batches, or the curve's start
    top = start + 0.15 * (start - low) + 1e-3
    ax.set_ylim(low - 0.05 * (top - low), top)
    low = r.curve[best]
    ax.plot([r.lrs[best]], [low], "o", color="C2", label=f"lowest loss at {r.lrs[best]:.2g}")
    ax.axvline(r.suggestion, color="C3", ls="--", lw=1.5, label=f"suggested lr {r.suggestion:.2g} ({how})")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr range test: {model} on {dataset}, {optimizer}, batch {batch}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
