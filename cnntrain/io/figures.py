"""Figures of a run: learning curves, confusion matrix, most confidently wrong images.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
state), saved as PNG and the same pixels sent to TensorBoard.

This module imports neither torch nor matplotlib at import time: the end-of-fit figures are drawn by a child
process (`python -m cnntrain.io.draw RUN_DIR`, see `hand_over`) that needs neither torch's 2 s nor its memory.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnntrain.io.files import RunDir

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# What the fit hands to the figure drawer: the test's confusion matrix, its worst mistakes, the run's name. Its
# presence also says "figures pending": the drawer removes it when every figure is on disk and in TensorBoard.
PENDING = ".pending.npz"

MAX_ANNOTATED_CLASSES = 20  # above this the cells are too small for numbers
MAX_LABELLED_CLASSES = 60  # above this tick labels would overlap: show every k-th


def new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: Path, dpi: int = 110) -> np.ndarray:
    """Write the figure as PNG; return its pixels (H, W, 3 uint8) for TensorBoard."""
    from PIL import Image

    save_png(fig, path, dpi)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def save_png(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write the figure as PNG through a temporary file: a process stopped mid-write leaves the old file or none,
    never half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, facecolor="white", format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_tensorboard(writer: Any, tag: str, pixels: np.ndarray, step: int) -> None:
    writer.add_image(tag, pixels, step, dataformats="HWC")


# --------------------------------------------------------------------------- the figures


def curves_figure(rows: Sequence[dict[str, Any]], title: str = "") -> Any:
    """Training and validation loss and accuracy per epoch (rows of metrics.csv); for a multi-label run binary
    cross-entropy and exact match, with the validation mAP beside them."""
    epochs = [int(r["epoch"]) for r in rows]
    fig = new_figure(10, 4)
    axes = fig.subplots(1, 2)
    marker = "o" if len(epochs) <= 30 else None
    multilabel = bool(rows) and "train_exact_match" in rows[0]
    panels = (
        (axes[0], "loss", "binary cross-entropy loss" if multilabel else "cross-entropy loss"),
        (axes[1], "exact_match" if multilabel else "acc", "exact match" if multilabel else "accuracy"),
    )
    for ax, metric, label in panels:
        for split, style in (("train", "-"), ("val", "--")):
            values = [_number(r[f"{split}_{metric}"]) for r in rows]
            ax.plot(epochs, values, style, marker=marker, label="training" if split == "train" else "validation")
        if multilabel and metric == "exact_match":
            ax.plot(epochs, [_number(r["val_map"]) for r in rows], ":", marker=marker, label="validation mAP")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize())
        ax.grid(alpha=0.3)
        ax.legend()
        if epochs and max(epochs) <= 30:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)
    return fig


def confusion_figure(cm: np.ndarray, classes: Sequence[str], title: str) -> Any:
    """Rows: true class, columns: predicted; colour = share of the row, numbers = image counts."""
    n = len(classes)
    side = float(np.clip(0.42 * n + 2.5, 5, 28))
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    totals = cm.sum(1, keepdims=True)
    share = cm / np.maximum(totals, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="share of the true class")
    step = max(1, int(np.ceil(n / MAX_LABELLED_CLASSES)))
    ticks = np.arange(0, n, step)
    names = [_short(classes[i]) for i in ticks]
    ax.set_xticks(
        ticks,
        names,
        rotation=45 if max(len(s) for s in names) > 2 else 0,
        ha="right" if max(len(s) for s in names) > 2 else "center",
        rotation_mode="anchor",
    )
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(int(cm[i, j])),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    return fig


def per_class_figure(classes: Sequence[str], precision: np.ndarray, recall: np.ndarray, title: str) -> Any:
    """Precision and recall per class as horizontal bars."""
    n = len(classes)
    fig = new_figure(7, float(np.clip(0.3 * n + 1.5, 3, 30)))
    ax = fig.subplots()
    y = np.arange(n)
    ax.barh(y - 0.2, precision, height=0.4, label="precision")
    ax.barh(y + 0.2, recall, height=0.4, label="recall (accuracy on the class)")
    ax.set_yticks(y, [_short(c) for c in classes])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")
    ax.set_ylabel("class")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)  # below the axes: never over a bar
    return fig


def mistakes_figure(
    images: Any, true: Sequence[int], pred: Sequence[int], conf: Sequence[float], classes: Sequence[str], title: str
) -> Any:
    """A grid of images (uint8 [N, C, H, W], a CPU tensor or an array), each titled with its true and predicted
    class."""
    n = len(images)
    cols = min(8, max(1, n))
    rows = max(1, int(np.ceil(n / cols)))
    width, height = 1.6 * cols + 0.4, 1.9 * rows + 0.6
    fig = new_figure(width, height)
    # A fixed layout: image cells have no tick labels to fit, and constrained layout would cost a second here.
    fig.set_layout_engine(None)
    fig.subplots_adjust(
        left=0.2 / width, right=1 - 0.2 / width, bottom=0.1 / height, top=1 - 0.55 / height, wspace=0.15, hspace=0.3
    )
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    if n == 0:
        axes[0].text(0.5, 0.5, "no wrong predictions", ha="center", va="center")
    for k in range(n):
        img = np.asarray(images[k]).transpose(1, 2, 0)
        if img.shape[2] == 1:
            axes[k].imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            axes[k].imshow(img, interpolation="nearest")
        axes[k].set_title(
            f"true: {_short(classes[true[k]], 14)}\npred: {_short(classes[pred[k]], 14)} ({conf[k]:.1%})", fontsize=8
        )
    fig.suptitle(title)
    return fig


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


# --------------------------------------------------------------------------- helpers


def confusion_matrix(true: torch.Tensor, pred: torch.Tensor, n: int) -> np.ndarray:
    """n x n counts, rows true class, columns predicted."""
    import torch

    flat = true.cpu().long() * n + pred.cpu().long()
    return torch.bincount(flat, minlength=n * n).view(n, n).numpy()


def worst_mistakes(true: torch.Tensor, pred: torch.Tensor, conf: torch.Tensor, k: int = 16) -> torch.Tensor:
    """Indices of the k wrong predictions made with the highest confidence."""
    import torch

    wrong = torch.nonzero(true.cpu() != pred.cpu()).flatten()
    order = torch.argsort(conf.cpu()[wrong].float(), descending=True, stable=True)
    return wrong[order[:k]]


def _number(v: str) -> float:
    return float(v) if v not in ("", None) else float("nan")


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("epoch")]


# --------------------------------------------------------------------------- end of fit


def hand_over(
    run_dir: Path,
    step: int,
    name: str,
    classes: list[str],
    x: torch.Tensor,
    y: torch.Tensor,
    test: dict[str, Any],
    how: str,
    tensorboard: bool = True,
) -> None:
    """figures/ of a finished run (curves, test confusion matrix, most confidently wrong test images) and the same
    images in TensorBoard. What they need is written to figures/.pending.npz; `how` (trainer.figures) says who
    draws them: `background` a child process that the command does not wait for, `end` this process, now;
    `off` nobody (`cnntrain report RUN_DIR figures=true` draws them later). A failure here is logged, never fails
    a finished run."""
    try:
        pending = _write_pending(run_dir, step, name, classes, x, y, test, tensorboard)
        if how == "background" and os.environ.get("SLURM_JOB_ID"):
            how = "end"  # Slurm ends every process of a job when its main one exits: a drawer would be killed
        if how == "end":
            draw_pending(run_dir)
        elif how == "background":
            _spawn_drawer(run_dir)
        else:
            log.info(
                "figures not drawn (trainer.figures=off); draw them with: cnntrain report %s figures=true",
                pending.parent.parent,
            )
    except Exception as e:  # figures are a by-product: report, keep the trained run
        log.warning("could not draw the run's figures: %s: %s", type(e).__name__, e)


def _write_pending(
    run_dir: Path,
    step: int,
    name: str,
    classes: list[str],
    x: torch.Tensor,
    y: torch.Tensor,
    test: dict[str, Any],
    tensorboard: bool = True,
) -> Path:
    if y.dim() == 2:
        return _write_pending_labels(run_dir, step, name, classes, len(y), test, tensorboard)
    pred, y = test["pred"].cpu(), y.cpu()
    conf = test.get("conf")
    idx = worst_mistakes(y, pred, conf) if conf is not None else y[:0].long()
    out = RunDir(run_dir).figures / PENDING
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".pending.{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        step=step,
        name=name,
        classes=np.array(classes, dtype=str),
        images=len(y),
        correct=int((pred == y).sum()),
        cm=confusion_matrix(y, pred, len(classes)),
        mistakes=x[idx.to(x.device)].cpu().numpy(),
        true=y[idx].numpy(),
        pred=pred[idx].numpy(),
        conf=(conf.cpu()[idx].float().numpy() if conf is not None else np.zeros(0)),
        has_conf=conf is not None,
        tensorboard=tensorboard,
    )
    os.replace(tmp, out)
    return out


def _write_pending_labels(
    run_dir: Path, step: int, name: str, classes: list[str], images: int, test: dict[str, Any], tensorboard: bool
) -> Path:
    """A multi-label run's: no confusion matrix or single mistakes, the test's precision and recall per label."""

    def floats(key: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in test["per_label"][key]], dtype=np.float64)

    out = run_dir / "figures" / PENDING
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".pending.{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        step=step,
        name=name,
        classes=np.array(classes, dtype=str),
        images=images,
        task="multilabel",
        precision=floats("precision"),
        recall=floats("recall"),
        map=np.nan if test["map"] is None else test["map"],
        tensorboard=tensorboard,
    )
    os.replace(tmp, out)
    return out


def _spawn_drawer(run_dir: Path) -> None:
    """Start the drawer in its own session (a Ctrl-C at the terminal after the command returned does not reach it),
    with this checkout's cnntrain on its path and its messages in the run's log."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(RunDir(run_dir).figures / "draw.log", "ab") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "cnntrain.io.draw", str(run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            env=env,
            close_fds=True,
            start_new_session=True,
        )
    # Lowest priority: the next fit (a sweep's next job, a shell loop) gets the cores, and its thread count
    # does not count the drawer as load (io.cpus leaves niced work out). Set from here, not with preexec_fn,
    # which is unsafe in a process that runs torch's threads.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, child.pid, 19)


def figures_pending(run_dir: Path) -> bool:
    """Whether the fit's figures of run_dir are still to be drawn (or being drawn)."""
    return (RunDir(run_dir).figures / PENDING).is_file()


def draw_pending(run_dir: Path) -> None:
    """Draw what figures/.pending.npz describes into figures/*.png and a TensorBoard event file of its own
    beside the run's; then remove it. Needs numpy, matplotlib and tensorboard, never torch."""
    run = RunDir(run_dir)
    folder = run.figures
    with np.load(folder / PENDING) as f:
        data = {k: f[k] for k in f.files}
    step, classes, images = int(data["step"]), [str(c) for c in data["classes"]], int(data["images"])
    pngs: dict[str, Path] = {}
    rows = read_metrics(run.metrics)
    if rows:
        save_png(curves_figure(rows, f"{data['name']}: {run_dir.name}"), folder / "curves.png")
        pngs["curves"] = folder / "curves.png"
    if str(data.get("task", "")) == "multilabel":
        save_png(
            per_class_figure(
                classes,
                data["precision"],
                data["recall"],
                f"Per label: test ({images:,} images, mAP {float(data['map']):.4f})",
            ),
            folder / "per_label_test.png",
        )
        pngs["per_label_test"] = folder / "per_label_test.png"
        if bool(data.get("tensorboard", True)):
            _png_events(run_dir / "tensorboard", {f"figures/{k}": p for k, p in pngs.items()}, step)
        (folder / PENDING).unlink(missing_ok=True)
        return
    acc = int(data["correct"]) / images if images else 0.0
    save_png(
        confusion_figure(data["cm"], classes, f"Test confusion matrix ({images:,} images, accuracy {acc:.2%})"),
        folder / "confusion_test.png",
    )
    pngs["confusion_test"] = folder / "confusion_test.png"
    if bool(data["has_conf"]):
        save_png(
            mistakes_figure(
                data["mistakes"],
                data["true"].tolist(),
                data["pred"].tolist(),
                data["conf"].tolist(),
                classes,
                "Most confidently wrong test images",
            ),
            folder / "mistakes_test.png",
        )
        pngs["mistakes_test"] = folder / "mistakes_test.png"
    if bool(data.get("tensorboard", True)):  # logger.tensorboard: the run keeps event files
        _png_events(run.tensorboard, {f"figures/{k}": p for k, p in pngs.items()}, step)
    (folder / PENDING).unlink(missing_ok=True)


def _png_events(log_dir: Path, pngs: dict[str, Path], step: int) -> None:
    """The PNG files, as they are, as TensorBoard images at `step`, in an event file of their own (TensorBoard
    reads every file of the folder); tensorboard's own writer, so no torch."""
    import time

    from PIL import Image
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    values = []
    for tag, path in pngs.items():
        data = path.read_bytes()
        with Image.open(path) as im:
            width, height, channels = im.width, im.height, len(im.getbands())
        values.append(
            Summary.Value(
                tag=tag, image=Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=data)
            )
        )
    writer = EventFileWriter(str(log_dir), filename_suffix=".figures")
    try:
        writer.add_event(Event(summary=Summary(value=values), wall_time=time.time(), step=step))
    finally:
        writer.close()


# --------------------------------------------------------------------------- the model itself, for TensorBoard


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """[N, C, H, W] -> one [C, H', W'] image (C=1 becomes 3), nrow images a row: torchvision's make_grid, whose
    import would cost more than the rest of a small run's logging."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, cols)
        top, left = y * (h + padding) + padding, x * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = images[k]
    return grid


def _tile(maps: torch.Tensor, size: tuple[int, int], nrow: int = 8) -> torch.Tensor:
    """[N, H, W] -> a grid image [3, H', W'] with each map scaled to [0, 1] on its own."""
    import torch.nn.functional as F

    flat = maps.flatten(1)
    lo, hi = flat.amin(1).view(-1, 1, 1), flat.amax(1).view(-1, 1, 1)
    maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
    maps = F.interpolate(maps[:, None], size=size, mode="nearest")
    return image_grid(maps, nrow=nrow, padding=2, pad_value=1.0)


def first_layer_filters(model: nn.Module) -> torch.Tensor | None:
    """The first convolution's kernels as an image grid: RGB for 3 input channels, else their mean."""
    import torch.nn.functional as F
    from torch import nn

    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    w = conv.weight.detach().float().cpu()
    k = max(w.shape[2], w.shape[3])
    scale = max(1, 48 // k)  # 3x3 kernels would be invisible dots
    size = (w.shape[2] * scale, w.shape[3] * scale)
    if w.shape[1] == 3:
        flat = w.flatten(1)
        lo, hi = flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)
        w = F.interpolate((w - lo) / (hi - lo).clamp_min(1e-12), size=size, mode="nearest")
        return image_grid(w, nrow=8, padding=2, pad_value=1.0)
    return _tile(w.mean(1), size)


def feature_maps(
    model: nn.Module, x: torch.Tensor, max_layers: int = 4, max_channels: int = 16
) -> list[tuple[str, torch.Tensor]]:
    """Grids of the first channels of a few convolutions (first to last) for one input [1, C, H, W]."""
    import torch
    from torch import nn

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return []
    pick = sorted({round(i) for i in np.linspace(0, len(convs) - 1, min(max_layers, len(convs)))})
    chosen = [convs[i] for i in pick]
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: outputs.setdefault(n, out.detach())) for n, m in chosen]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    size = _display_size(tuple(x.shape[2:]))
    return [(n, _tile(outputs[n][0, :max_channels].float().cpu(), size)) for n, _ in chosen if n in outputs]


def _display_size(size: tuple[int, ...], at_least: int = 84) -> tuple[int, int]:
    """Small inputs (28x28) are enlarged by a whole factor so TensorBoard shows something readable."""
    factor = max(1, -(-at_least // min(size)))
    return size[0] * factor, size[1] * factor


def model_images(model: Any, x_u8: torch.Tensor, to_input: Any, writer: Any, step: int) -> None:
    """First-layer filters and feature maps of one image (uint8 [1, C, H, W]), to a run's TensorBoard."""
    import torch.nn.functional as F

    try:
        filters = first_layer_filters(model)
        if filters is not None:
            writer.add_image("model/first_layer_filters", filters, step)
        shown = F.interpolate(x_u8.float().cpu() / 255, size=_display_size(tuple(x_u8.shape[2:])), mode="nearest")
        writer.add_image("model/feature_maps/0_input", shown[0], step)
        for i, (name, grid) in enumerate(feature_maps(model, to_input(x_u8)), start=1):
            writer.add_image(f"model/feature_maps/{i}_{name}", grid, step)
        writer.flush()
    except Exception as e:  # a by-product: never fail a finished run for it
        log.warning("could not log filters and feature maps: %s: %s", type(e).__name__, e)
