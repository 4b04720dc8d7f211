"""What the model looks at: Grad-CAM heat maps (`cnntrain explain`) and, at the end of `fit`,
the first layer's filters and feature maps of one fixed image in TensorBoard.

Grad-CAM (Selvaraju et al. 2017): weight each channel of a late convolutional feature map by
the mean gradient of the class score over it; the positive part of the weighted sum, upsampled
to the input, shows which pixels raised that class.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnntrain.commands.args import CheckpointArgs
from cnntrain.errors import UserError

log = logging.getLogger(__name__)

HELP = """\
usage: cnntrain explain ckpt=<checkpoint or run dir> inputs=<image, folder or glob> [key=value ...]

Grad-CAM heat maps: which pixels of each image drove the model's prediction. One PNG per image
(the input as the model sees it, and the heat map over it) plus an overview grid.

keys:
  ckpt=PATH        {ckpt}
  inputs=PATH      an image file, a folder (searched recursively) or a quoted glob ('imgs/*.png')
  target=CLASS     explain this class (name or index) instead of the predicted one
  layer=NAME       the layer whose activations are weighted (default: the last one whose map is at
                   least 7x7, else the last with a map; the choice is printed, a wrong name lists them)
  out=DIR          where to write (default: a new folder per call,
                   <run dir>/explain/<inputs>-<date>_<time>); an existing out= must be empty
  overwrite=false  true: out= may hold an earlier call's results, which are removed first
  batch_size=N     images per forward pass (default 64)
  device=auto      auto | cpu | cuda | cuda:N | mps
  on_error=error   error | skip: what to do with a file that cannot be decoded

example:
  cnntrain explain ckpt=runs/default/<run> inputs=my_digits/
"""


@dataclass
class ExplainArgs(CheckpointArgs):
    inputs: str = "???"
    target: str | None = None
    layer: str | None = None
    batch_size: int = 64
    on_error: str = "error"
    overview: int = 32  # images in the overview grid


# --------------------------------------------------------------------------- Grad-CAM


def spatial_layers(model: nn.Module, example: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of every submodule with a 4D output, in the order they finish."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                seen.append((name, tuple(out.shape)))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return seen


DEFAULT_MIN_SIDE = 7  # the last conv map of ImageNet-size CNNs; on 28x28 digits the last one is 3x3, too coarse


def default_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The last layer whose map is at least 7x7, else the last one of at least 2x2."""
    layers = [(n, s) for n, s in spatial_layers(model, example) if min(s[2], s[3]) >= 2]
    if not layers:
        raise UserError("this model has no layer with a spatial output of 2x2 or more; Grad-CAM cannot run on it")
    fine = [n for n, s in layers if min(s[2], s[3]) >= DEFAULT_MIN_SIDE]
    return fine[-1] if fine else layers[-1][0]


def grad_cam(
    model: nn.Module, x: torch.Tensor, layer: str, target: int | None = None, multilabel: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heat maps in [0, 1] at the input size, the explained class and the softmax of each image (a multi-label
    model's sigmoids: each label's own probability)."""
    module = model.get_submodule(layer)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            logits = model(x).float()
            act = captured[-1]
            cls = logits.argmax(1) if target is None else torch.full((len(x),), target, device=x.device)
            score = logits.gather(1, cls[:, None]).sum()
            (grads,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act.detach().float()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    probs = logits.sigmoid() if multilabel else logits.softmax(1)
    return (cam / peak).cpu(), cls.cpu(), probs.detach().cpu()


def _display(img: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """uint8 [C, H, W] -> an array for imshow and its colour map."""
    a = img.permute(1, 2, 0).numpy()
    return (a[:, :, 0], "gray") if a.shape[2] == 1 else (a, None)


def _overlay(ax: Any, cam: torch.Tensor) -> Any:
    """The heat map over the image, more opaque where it is hot, so cold regions stay readable."""
    a = cam.numpy()
    return ax.imshow(a, cmap="jet", alpha=0.15 + 0.55 * a, vmin=0, vmax=1, interpolation="nearest")


def heatmap_figure(img: torch.Tensor, cam: torch.Tensor, title: str, source: str) -> Any:
    from cnntrain.io.figures import new_figure

    fig = new_figure(6.4, 3.6)
    axes = fig.subplots(1, 2)
    a, cmap = _display(img)
    axes[0].imshow(a, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    axes[0].set_title("input as the model sees it", fontsize=9)
    axes[1].imshow(a, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    shown = _overlay(axes[1], cam)
    axes[1].set_title(title, fontsize=9)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.03, label="Grad-CAM (relative)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(source, fontsize=8)
    return fig


def overview_figure(items: list[tuple[torch.Tensor, torch.Tensor, str]]) -> Any:
    from cnntrain.io.figures import new_figure

    cols = min(8, len(items))
    rows = int(np.ceil(len(items) / cols))
    fig = new_figure(1.7 * cols + 0.3, 1.9 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (img, cam, title) in zip(axes, items, strict=False):
        a, cmap = _display(img)
        ax.imshow(a, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
        _overlay(ax, cam)
        ax.set_title(title, fontsize=7)
    fig.suptitle("Grad-CAM: red = pixels that raised the explained class")
    return fig


def main(argv: list[str]) -> None:
    from cnntrain.commands.args import images_and_model, start
    from cnntrain.commands.images import class_index, image_batches, inputs_label
    from cnntrain.engine.inference import CKPT_HELP

    args = start(argv, ExplainArgs, "explain", HELP.format(ckpt=CKPT_HELP))
    if args is None:
        return
    paths, note, trained = images_and_model(args)
    if trained.exported:  # Grad-CAM hooks the model's layers, which a captured program no longer has
        raise UserError(
            f"ckpt={args.ckpt} is an exported program (.pt2); explain needs the checkpoint it was "
            "exported from (its run directory, best.pt or model.state_dict.pt)"
        )
    pre, model = trained.preprocess, trained.model
    target = class_index(trained.classes, args.target) if args.target is not None else None
    to_input = pre.normalise(trained.device)
    example = to_input.from_uint8(
        torch.zeros(1, pre.channels, *pre.image_size, dtype=torch.uint8, device=trained.device)
    )
    if args.layer is None:
        layer = default_layer(model, example)
    else:
        names = [n for n, _ in spatial_layers(model, example)]
        if args.layer not in names:
            from cnntrain.errors import did_you_mean

            raise UserError(
                f"layer={args.layer} is not a layer with a spatial output{did_you_mean(args.layer, names)}; "
                f"choose one of: {', '.join(names)}"
            )
        layer = args.layer
    shape = dict(spatial_layers(model, example))[layer]
    out = trained.results_dir("explain", args.out, args.overwrite, inputs_label(args.inputs))
    print(
        f"Grad-CAM of {trained.label} ({trained.checkpoint}) at layer '{layer}' "
        f"({shape[1]} channels, {shape[2]}x{shape[3]}) for {len(paths)} image(s){note}"
    )

    overview: list[tuple[torch.Tensor, torch.Tensor, str]] = []
    written = 0
    used: set[str] = set()
    with open(out / "explain.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["path", "heatmap", "explained_class", "probability", "predicted_class", "predicted_probability"])
        for batch_paths, x in image_batches(paths, pre, args.batch_size, args.on_error):
            cams, cls, probs = grad_cam(
                model, to_input.from_uint8(x.to(trained.device)), layer, target, trained.task.name == "multilabel"
            )
            for k, path in enumerate(batch_paths):
                c, top = int(cls[k]), int(probs[k].argmax())
                title = f"{trained.classes[c]} ({probs[k, c]:.0%})"
                if target is not None and top != c:
                    title += f"; predicted {trained.classes[top]}"
                name = _unique(f"{path.stem}_gradcam.png", used)
                fig = heatmap_figure(x[k], cams[k], f"Grad-CAM for {title}", str(path))
                fig.savefig(out / name, dpi=110, facecolor="white")
                rows.writerow(
                    [
                        str(path),
                        name,
                        trained.classes[c],
                        f"{float(probs[k, c]):.6f}",
                        trained.classes[top],
                        f"{float(probs[k, top]):.6f}",
                    ]
                )
                if len(overview) < args.overview:
                    overview.append((x[k], cams[k], f"{_clip(path.name)}\n{title}"))
                written += 1
    if overview:
        overview_figure(overview).savefig(out / "overview.png", dpi=110, facecolor="white")
    print(f"wrote {written} heat map(s), overview.png and explain.csv to {out}")


def _clip(text: str, n: int = 16) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _unique(name: str, used: set[str]) -> str:
    """Two inputs with one file name (from different folders) must not overwrite each other's map."""
    stem, k = name[: -len(".png")], 1
    while name in used:
        k += 1
        name = f"{stem}_{k}.png"
    used.add(name)
    return name
