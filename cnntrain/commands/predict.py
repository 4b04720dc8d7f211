"""`cnntrain predict`: classify image files with a trained checkpoint (nothing else needed)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Any

import torch

from cnntrain.commands.args import CheckpointArgs
from cnntrain.config import PRECISIONS
from cnntrain.errors import UserError

HELP = """\
usage: cnntrain predict ckpt=<checkpoint or run dir> inputs=<image, folder or glob> [key=value ...]

Classify images with a trained model. Any PNG/JPEG/BMP/WebP of any size or mode is converted
the way the model's training images were (channels, size, normalisation come from the
checkpoint), so this works offline with nothing but the checkpoint. Files are read in batches:
folders of thousands of images are fine. A multi-label model lists every label whose probability
is above its threshold, with that probability (predictions.csv: path,label,score, several
labels joined by |, - for none).

keys:
  ckpt=PATH        {ckpt}
  inputs=PATH      an image file, a folder (searched recursively) or a quoted glob ('imgs/**/*.jpg')
  top_k=5          classes listed per image (at most the number of classes; single-label models)
  threshold=null   multi-label models: list the labels above this probability (default: the
                   trainer.threshold it was trained with)
  out=DIR          where predictions.csv goes (default: a new folder per call,
                   <run dir>/predict/<inputs>-<date>_<time>); an existing out= must be empty
  overwrite=false  true: out= may hold an earlier call's results, which are removed first
  show=20          rows of the table printed here (all rows go to the CSV)
  batch_size=256   images decoded and classified at once
  device=auto      auto | cpu | cuda | cuda:N | mps
  precision=auto   auto (as trained) | 32 | bf16 | fp16
  on_error=error   error | skip: what to do with a file that cannot be decoded
  tta=none         test-time augmentation: none | flip | crops | flip+crops (softmax averaged over
                   the views; flips are refused for digits and other flip-sensitive data)

examples:
  cnntrain predict ckpt=runs/default/<run> inputs=digit.png
  cnntrain predict ckpt=runs/default/<run>/checkpoints/best.pt inputs='scans/*.jpg' top_k=3
"""


@dataclass
class PredictArgs(CheckpointArgs):
    inputs: str = "???"
    top_k: int = 5
    show: int = 20
    batch_size: int = 256
    precision: str = "auto"
    on_error: str = "error"
    tta: str = "none"
    threshold: float | None = None


def main(argv: list[str]) -> None:
    from rich.table import Table

    from cnntrain.commands.args import check_choice, check_threshold, console, images_and_model, start
    from cnntrain.commands.images import image_batches, inputs_label
    from cnntrain.engine import tta
    from cnntrain.engine.inference import CKPT_HELP, logits_of, precision_for, prepare

    args = start(argv, PredictArgs, "predict", HELP.format(ckpt=CKPT_HELP))
    if args is None:
        return
    check_choice("precision", args.precision, PRECISIONS)
    check_choice("tta", args.tta, tta.CHOICES)
    if args.top_k < 1:
        raise UserError(f"top_k={args.top_k} must be at least 1")
    # The count in the header below is the number of rows the CSV gets (less any file whose pixel data then
    # fails to decode).
    paths, note, trained = images_and_model(args)
    check_threshold(args.threshold, trained)
    precision, channels_last = precision_for(trained, args.precision)
    prepare(trained, channels_last)
    views = tta.apply(trained, args.tta)
    k = min(args.top_k, len(trained.classes))
    out = trained.results_dir("predict", args.out, args.overwrite, inputs_label(args.inputs))
    csv_path = out / "predictions.csv"

    con = console()
    pre = trained.preprocess
    h, w = pre.image_size
    multilabel = trained.task.name == "multilabel"
    con.print(
        f"{trained.label}: {len(paths):,} image(s) -> {pre.channels}x{h}x{w}, "
        f"{len(trained.classes)} {'labels' if multilabel else 'classes'} ({trained.checkpoint}){note}"
    )
    if len(views) > 1:
        con.print(f"test-time augmentation {tta.describe(args.tta, views, multilabel)}")
    if multilabel:
        threshold = trained.task.threshold if args.threshold is None else args.threshold
        done, undecodable = predict_labels(args, trained, paths, csv_path, threshold, precision, channels_last)
        late = f"; skipped {len(undecodable)} more whose pixel data could not be decoded" if undecodable else ""
        con.print(f"wrote {done:,} prediction(s) to {csv_path}{late}")
        return
    table = Table(show_lines=False, title_justify="left")
    table.add_column("image", overflow="fold")
    for i in range(k):
        table.add_column("predicted" if i == 0 else f"#{i + 1}", no_wrap=True)
    done = 0
    undecodable: list = []
    with open(csv_path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["path"] + [f"{name}_{i + 1}" for i in range(k) for name in ("class", "prob")])
        for batch_paths, x in image_batches(paths, pre, args.batch_size, args.on_error, undecodable):
            probs = logits_of(trained, x, precision, channels_last).softmax(1)
            top_p, top_i = torch.topk(probs, k, dim=1)
            for path, ps, idx in zip(batch_paths, top_p.tolist(), top_i.tolist(), strict=True):
                names = [trained.classes[i] for i in idx]
                rows.writerow([str(path)] + [v for n, p in zip(names, ps, strict=True) for v in (n, f"{p:.6f}")])
                if done < args.show:
                    table.add_row(str(path), *(f"{n} ({p:.1%})" for n, p in zip(names, ps, strict=True)))
                done += 1
    if args.show > 0:
        con.print(table)
    if done > args.show > 0:
        con.print(f"... and {done - args.show:,} more rows in the CSV")
    late = f"; skipped {len(undecodable)} more whose pixel data could not be decoded" if undecodable else ""
    con.print(f"wrote {done:,} prediction(s) to {csv_path}{late}")


def predict_labels(
    args: PredictArgs, trained: Any, paths: list, csv_path: Any, threshold: float, precision: Any, channels_last: bool
) -> tuple[int, list]:
    """A multi-label model's predictions: every label above the threshold with its probability, the most probable
    first. Returns (rows written, files whose pixel data could not be decoded)."""
    from rich.table import Table

    from cnntrain.commands.args import console
    from cnntrain.commands.images import image_batches
    from cnntrain.data.images import MULTI_SEPARATOR, NO_LABELS
    from cnntrain.engine.inference import logits_of
    from cnntrain.engine.tasks import decode

    table = Table(show_lines=False, title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column(f"labels (probability > {threshold:g})")
    done, undecodable = 0, []
    with open(csv_path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["path", "label", "score"])
        for batch_paths, x in image_batches(paths, trained.preprocess, args.batch_size, args.on_error, undecodable):
            probs = logits_of(trained, x, precision, channels_last).sigmoid()
            for path, labels in zip(batch_paths, decode(probs, trained.classes, threshold), strict=True):
                rows.writerow(
                    [
                        str(path),
                        MULTI_SEPARATOR.join(n for n, _ in labels) or NO_LABELS,
                        MULTI_SEPARATOR.join(f"{p:.6f}" for _, p in labels),
                    ]
                )
                if done < args.show:
                    table.add_row(str(path), ", ".join(f"{n} ({p:.1%})" for n, p in labels) or "(none)")
                done += 1
    con = console()
    if args.show > 0:
        con.print(table)
    if done > args.show > 0:
        con.print(f"... and {done - args.show:,} more rows in the CSV")
    return done, undecodable
