"""`cnntrain evaluate`: score a checkpoint on a dataset split, per class, with a confusion matrix."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnntrain.commands.args import CheckpointArgs
from cnntrain.config import PRECISIONS, DatasetConfig
from cnntrain.errors import UserError

HELP = """\
usage: cnntrain evaluate ckpt=<checkpoint or run dir> [key=value ...] [dataset.KEY=VALUE ...]

Score a trained model on a split of its dataset (or of another one): loss, accuracy, balanced
accuracy, macro F1, top-5 accuracy (models with 6 or more classes), precision, recall (= accuracy
on the class) and F1 per class, and the confusion matrix. Printed as tables; written as metrics.json,
per_class.csv, confusion_matrix.csv, predictions.csv, PNG figures and TensorBoard events. A multi-label
model gets mAP, micro/macro F1, exact match and per-label AP, precision, recall and F1 instead
(per_label.csv in place of per_class.csv and the confusion matrix).

keys:
  ckpt=PATH         {ckpt}
  split=test        test | val | train
  dataset.KEY=V     change the run's dataset config (the dataset.* keys of `cnntrain fit`),
                    e.g. dataset.root=/data/new_photos or dataset.name=mnist
  out=DIR           where to write (default: a new folder per call,
                    <run dir>/evaluate/<dataset>[-<folder>]-<split>-<date>_<time>); an
                    existing out= must be empty
  overwrite=false   true: out= may hold an earlier call's results, which are removed first
  batch_size=N      images per forward pass (default: the run's trainer.eval_batch_size)
  device=auto       auto | cpu | cuda | cuda:N | mps
  precision=auto    auto (as trained, so the numbers match fit's) | 32 | bf16 | fp16
  mistakes=16       most confidently wrong images in mistakes.png
  tta=none          test-time augmentation: none | flip | crops | flip+crops (softmax averaged
                    over the views; flips are refused for digits and other flip-sensitive data)
  threshold=null    multi-label models: a label is predicted above this probability (default:
                    the trainer.threshold it was trained with)
  tensorboard=true  also write TensorBoard events under out/tensorboard

examples:
  cnntrain evaluate ckpt=runs/default/<run>
  cnntrain evaluate ckpt=runs/default/<run> split=val
  cnntrain evaluate ckpt=runs/photos/<run> dataset.root=/data/more_photos
"""


@dataclass
class EvaluateArgs(CheckpointArgs):
    split: str = "test"
    batch_size: int | None = None
    precision: str = "auto"
    mistakes: int = 16
    tensorboard: bool = True
    tta: str = "none"
    threshold: float | None = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)


def _matching_dataset(args: EvaluateArgs, trained: Any) -> Any:
    """Load the dataset; check it fits the model; map its labels onto the model's classes."""
    from cnntrain.config import takes_own_keys
    from cnntrain.data import load_dataset

    pre = trained.preprocess
    cfg = args.dataset
    if cfg.name in ("imagefolder", "csv") or takes_own_keys("dataset", cfg.name):
        # New folders (and the user's own datasets) are read at the model's input format unless told otherwise.
        cfg.channels = cfg.channels or pre.channels
        if cfg.image_size is None and pre.image_size[0] == pre.image_size[1]:
            cfg.image_size = pre.image_size[0]
    data = load_dataset(cfg)
    c, (h, w) = data.channels, data.image_size
    if (c, (h, w)) != (pre.channels, pre.image_size):
        mh, mw = pre.image_size
        raise UserError(
            f"dataset {data.name} gives {c}x{h}x{w} images but the model takes {pre.channels}x{mh}x{mw}; "
            f"for an image folder, CSV or custom dataset set dataset.image_size={mh} "
            f"dataset.channels={pre.channels}"
        )
    x, y = getattr(data, f"{args.split}_x"), getattr(data, f"{args.split}_y")
    if data.multilabel != (trained.task.name == "multilabel"):
        kind = "multi-label (sets of labels)" if data.multilabel else "single-label (one class per image)"
        raise UserError(
            f"dataset {data.name} is {kind}, but the model was trained on "
            f"{'single' if data.multilabel else 'multi'}-label data; evaluate it on data of its kind"
        )
    if data.multilabel and list(data.classes) != trained.classes:
        unknown = [name for name in data.classes if name not in trained.classes]
        if unknown:
            raise UserError(
                f"dataset {data.name} has labels the model does not know: {', '.join(unknown[:10])}; "
                f"the model's labels are {', '.join(trained.classes[:20])}"
            )
        columns = torch.zeros(len(y), len(trained.classes))
        columns[:, [trained.classes.index(name) for name in data.classes]] = y
        return data, x, columns
    if list(data.classes) != trained.classes:
        unknown = [name for name in data.classes if name not in trained.classes]
        if unknown:
            raise UserError(
                f"dataset {data.name} has classes the model does not know: {', '.join(unknown[:10])}; "
                f"the model's classes are {', '.join(trained.classes[:20])}"
            )
        lookup = torch.tensor([trained.classes.index(name) for name in data.classes])
        y = lookup[y]
    return data, x, y


def _label(data: Any, split: str) -> str:
    """Names the call's folder: the dataset, the folder or CSV it read (two sources of one dataset kind are
    told apart), and the split."""
    from cnntrain.io.files import slug

    source = Path(str(data.source))
    if data.name == "imagefolder":
        return f"{data.name}-{slug(source.name)}-{split}"
    if data.name == "csv":
        return f"{data.name}-{slug(source.parent.name + '_' + source.stem)}-{split}"
    return f"{data.name}-{split}"


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall (= accuracy on the class's images), F1, support; NaN where undefined."""
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1).astype(np.float64), cm.sum(0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.where(support > 0, 0.0, np.nan))
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = np.where(np.isnan(recall), np.nan, f1)
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, -1)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": cm.sum(1),
        "confused_with": off.argmax(1),
        "confused_count": np.maximum(off.max(1), 0),
    }


def _num(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


def _fmt(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


def run_evaluation(args: EvaluateArgs, trained: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Loss, accuracy, top-5, and per-sample predictions and confidences of the model on (x, y):
    the same evaluation loop as fit's validation and test."""
    from cnntrain.engine import tta
    from cnntrain.engine.evaluate import evaluate
    from cnntrain.engine.inference import precision_for, prepare

    precision, channels_last = precision_for(trained, args.precision)
    prepare(trained, channels_last)
    views = tta.apply(trained, args.tta)
    trainer = trained.config.get("trainer") or {}
    batch = args.batch_size or int(trainer.get("eval_batch_size", 1000))
    if batch < 1:
        raise UserError(f"batch_size={batch} must be at least 1")
    threshold = trained.task.threshold if args.threshold is None else args.threshold
    res = evaluate(
        trained.model,
        x,
        y,
        trained.preprocess.normalise(trained.device, channels_last),
        batch,
        precision,
        threshold=threshold,
    )
    info = {"precision": precision.label, "tta": tta.describe(args.tta, views, y.dim() == 2), "views": list(views)}
    if y.dim() == 2:
        return {**res, "pred": res["pred"].cpu(), "scores": res["scores"].cpu(), "threshold": threshold, **info}
    return {**res, "pred": res["pred"].cpu(), "conf": res["conf"].cpu(), **info}


def _write_csvs(
    out: Path, classes: list[str], cm: np.ndarray, stats: dict[str, np.ndarray], y: torch.Tensor, res: dict[str, Any]
) -> None:
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "images", "precision", "recall", "accuracy", "f1", "most_confused_with", "times"])
        for i, name in enumerate(classes):
            confused = classes[stats["confused_with"][i]] if stats["confused_count"][i] else ""
            w.writerow(
                [
                    name,
                    int(stats["support"][i]),
                    _num(stats["precision"][i]),
                    _num(stats["recall"][i]),
                    _num(stats["recall"][i]),
                    _num(stats["f1"][i]),
                    confused,
                    int(stats["confused_count"][i]),
                ]
            )
    with open(out / "confusion_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *classes])
        for i, name in enumerate(classes):
            w.writerow([name, *(int(v) for v in cm[i])])
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "true", "predicted", "confidence", "correct"])
        for i, (t, p, c) in enumerate(zip(y.tolist(), res["pred"].tolist(), res["conf"].tolist(), strict=True)):
            w.writerow([i, classes[t], classes[p], f"{c:.6f}", int(t == p)])


def _print_tables(
    con: Any,
    title: str,
    summary: list[tuple[str, str]],
    classes: list[str],
    cm: np.ndarray,
    stats: dict[str, np.ndarray],
) -> None:
    from rich.table import Table
    from rich.text import Text

    head = Table(title=title, show_header=False, title_justify="left", title_style="bold")
    head.add_column(style="cyan", no_wrap=True)
    head.add_column()
    for k, v in summary:
        head.add_row(k, v)
    con.print(head)

    table = Table(title="per class", title_justify="left")
    for name, justify in (
        ("class", "left"),
        ("images", "right"),
        ("precision", "right"),
        ("recall (acc)", "right"),
        ("f1", "right"),
        ("most confused with", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for i, name in enumerate(classes):
        confused = (
            f"{classes[stats['confused_with'][i]]} ({stats['confused_count'][i]})" if stats["confused_count"][i] else ""
        )
        table.add_row(
            name,
            str(int(stats["support"][i])),
            _fmt(stats["precision"][i]),
            _fmt(stats["recall"][i]),
            _fmt(stats["f1"][i]),
            confused,
        )
    con.print(table)

    n = len(classes)
    if n > 20:
        con.print(f"confusion matrix ({n} classes): see confusion_matrix.csv and confusion_matrix.png")
        return
    matrix = Table(title="confusion matrix (rows: true class, columns: predicted)", title_justify="left")
    matrix.add_column("true \\ pred", style="cyan")
    for name in classes:
        matrix.add_column(name[:8], justify="right")
    for i, name in enumerate(classes):
        cells = [
            Text(str(v), style="bold") if i == j else Text(str(v) if v else "·", style="" if v else "dim")
            for j, v in enumerate(cm[i])
        ]
        matrix.add_row(name, *cells)
    con.print(matrix)


def main(argv: list[str]) -> None:
    from cnntrain.commands.args import (
        check_choice,
        check_threshold,
        console,
        parse_args,
        plain_warnings,
        print_help,
        wants_help,
    )
    from cnntrain.engine import tta
    from cnntrain.engine.inference import CKPT_HELP, load_trained
    from cnntrain.io import figures
    from cnntrain.io.files import write_json

    if wants_help(argv):
        print_help(HELP.format(ckpt=CKPT_HELP))
        return
    plain_warnings()
    first = parse_args(EvaluateArgs, argv, "evaluate")  # validates keys before the checkpoint is read
    check_choice("split", first.split, ("test", "val", "train"))
    check_choice("precision", first.precision, PRECISIONS)
    check_choice("tta", first.tta, tta.CHOICES)  # before loading
    trained = load_trained(first.ckpt, first.device)
    check_threshold(first.threshold, trained)  # before the data load
    stored = trained.config.get("dataset")
    base = {"dataset": stored} if isinstance(stored, dict) else None
    args = parse_args(EvaluateArgs, argv, "evaluate", base=base)
    data, x, y = _matching_dataset(args, trained)
    classes = trained.classes
    out = trained.results_dir("evaluate", args.out, args.overwrite, _label(data, args.split))

    res = run_evaluation(args, trained, x, y)
    if data.multilabel:
        report_labels(args, trained, data, x, y, res, out)
        return
    cm = figures.confusion_matrix(y, res["pred"], len(classes))
    stats = per_class(cm)
    macro = {
        k: _num(float(np.nanmean(stats[k]))) if not np.all(np.isnan(stats[k])) else None
        for k in ("precision", "recall", "f1")
    }
    record = {
        **_source(trained, data, args.split, len(y)),
        "loss": _num(res["loss"]),
        "acc": _num(res["acc"]),
        "top5_acc": _num(res["top5_acc"]) if res["top5_acc"] is not None else None,
        # The mean of the per-class recalls: what accuracy says when every class counts the same.
        "balanced_acc": macro["recall"],
        "macro_precision": macro["precision"],
        "macro_recall": macro["recall"],
        "macro_f1": macro["f1"],
        **_how(res, trained, classes),
        "per_class": [
            {
                "class": name,
                "images": int(stats["support"][i]),
                "precision": _num(stats["precision"][i]),
                "recall": _num(stats["recall"][i]),
                "accuracy": _num(stats["recall"][i]),
                "f1": _num(stats["f1"][i]),
            }
            for i, name in enumerate(classes)
        ],
        "confusion_matrix": cm.tolist(),
    }
    write_json(out / "metrics.json", record)
    _write_csvs(out, classes, cm, stats, y, res)

    where = f"{data.name} {args.split} ({len(y):,} images)"
    pngs = {
        "confusion_matrix": figures.confusion_figure(
            cm, classes, f"Confusion matrix: {where}, accuracy {res['acc']:.2%}"
        ),
        "per_class": figures.per_class_figure(classes, stats["precision"], stats["recall"], f"Per class: {where}"),
    }
    idx = figures.worst_mistakes(y, res["pred"], res["conf"], max(0, args.mistakes))
    pngs["mistakes"] = figures.mistakes_figure(
        x[idx],
        y[idx].tolist(),
        res["pred"][idx].tolist(),
        res["conf"][idx].tolist(),
        classes,
        f"Most confidently wrong: {where}",
    )
    pixels = {name: figures.save(fig, out / f"{name}.png") for name, fig in pngs.items()}
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        step = int(trained.progress.get("global_step") or 0)
        with SummaryWriter(log_dir=str(out / "tensorboard")) as tb:
            for key in ("loss", "acc", "top5_acc"):
                if record[key] is not None:
                    tb.add_scalar(f"evaluate/{args.split}/{key}", record[key], step)
            for name, px in pixels.items():
                figures.to_tensorboard(tb, f"evaluate/{args.split}/{name}", px, step)

    summary = [
        ("checkpoint", str(trained.checkpoint)),
        ("data", f"{where}, {data.source}"),
        ("loss", f"{res['loss']:.4f}"),
        ("accuracy", f"{res['acc']:.4f}"),
    ]
    if res["top5_acc"] is not None:
        summary.append(("top-5 accuracy", f"{res['top5_acc']:.4f}"))
    summary += [
        ("balanced accuracy", _fmt(macro["recall"] if macro["recall"] is not None else float("nan"))),
        ("macro F1", _fmt(macro["f1"] if macro["f1"] is not None else float("nan"))),
        ("precision", f"{res['precision']} on {trained.device}"),
        ("test-time augmentation", res["tta"]),
    ]
    con = console()
    _print_tables(con, f"evaluate: {trained.label}", summary, classes, cm, stats)
    con.print(
        f"wrote metrics.json, per_class.csv, confusion_matrix.csv, predictions.csv, "
        f"{', '.join(p + '.png' for p in pngs)}{' and tensorboard/' if args.tensorboard else ''} to {out}"
    )


def report_labels(
    args: EvaluateArgs, trained: Any, data: Any, x: torch.Tensor, y: torch.Tensor, res: dict[str, Any], out: Path
) -> None:
    """A multi-label model's evaluation: mAP, F1, exact match and per-label figures, as tables and files."""
    from cnntrain.commands.args import console
    from cnntrain.data.images import MULTI_SEPARATOR, NO_LABELS
    from cnntrain.engine.tasks import MULTILABEL_METRICS, decode
    from cnntrain.io import figures
    from cnntrain.io.files import write_json

    classes, stats = trained.classes, res["per_label"]
    per_label = [
        {
            "label": name,
            "images": stats["support"][i],
            "ap": stats["ap"][i],
            "precision": stats["precision"][i],
            "recall": stats["recall"][i],
            "f1": stats["f1"][i],
        }
        for i, name in enumerate(classes)
    ]
    record = {
        **_source(trained, data, args.split, len(y)),
        "task": "multilabel",
        "threshold": res["threshold"],
        "loss": _num(res["loss"]),
        **{m: _num(res[m]) for m in MULTILABEL_METRICS},
        **_how(res, trained, classes),
        "per_label": per_label,
    }
    write_json(out / "metrics.json", record)
    with open(out / "per_label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "images", "ap", "precision", "recall", "f1"])
        for row in per_label:
            w.writerow(list(row.values()))
    labelled = decode(res["scores"], classes, res["threshold"])
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "true", "predicted", "scores", "exact"])
        for i, (truth, pred) in enumerate(zip(y.tolist(), labelled, strict=True)):
            true = [c for c, v in zip(classes, truth, strict=True) if v > 0.5]
            w.writerow(
                [
                    i,
                    MULTI_SEPARATOR.join(true) or NO_LABELS,
                    MULTI_SEPARATOR.join(name for name, _ in pred) or NO_LABELS,
                    MULTI_SEPARATOR.join(f"{p:.6f}" for _, p in pred),
                    int(set(true) == {n for n, _ in pred}),
                ]
            )
    where = f"{data.name} {args.split} ({len(y):,} images)"
    precision = np.array([np.nan if v is None else v for v in stats["precision"]], dtype=np.float64)
    recall = np.array([np.nan if v is None else v for v in stats["recall"]], dtype=np.float64)
    pixels = {
        "per_label": figures.save(
            figures.per_class_figure(classes, precision, recall, f"Per label: {where}"), out / "per_label.png"
        )
    }
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        step = int(trained.progress.get("global_step") or 0)
        with SummaryWriter(log_dir=str(out / "tensorboard")) as tb:
            for key in ("loss", *MULTILABEL_METRICS):
                if record[key] is not None:
                    tb.add_scalar(f"evaluate/{args.split}/{key}", record[key], step)
            figures.to_tensorboard(tb, f"evaluate/{args.split}/per_label", pixels["per_label"], step)
    _print_labels(record, where, data.source, trained)
    console().print(
        f"wrote metrics.json, per_label.csv, predictions.csv, per_label.png"
        f"{' and tensorboard/' if args.tensorboard else ''} to {out}"
    )


def _print_labels(record: dict[str, Any], where: str, source: str, trained: Any) -> None:
    from rich.table import Table

    from cnntrain.commands.args import console

    head = Table(title=f"evaluate: {trained.label}", show_header=False, title_justify="left", title_style="bold")
    head.add_column(style="cyan", no_wrap=True)
    head.add_column()
    for k, v in [
        ("checkpoint", str(trained.checkpoint)),
        ("data", f"{where}, {source}"),
        ("task", f"multi-label, labels above {record['threshold']:g}"),
        ("loss", _fmt(record["loss"])),
        ("mAP", _fmt(record["map"])),
        ("F1 micro / macro", f"{_fmt(record['micro_f1'])} / {_fmt(record['macro_f1'])}"),
        ("exact match", _fmt(record["exact_match"])),
        ("precision", f"{record['precision_mode']} on {trained.device}"),
        ("test-time augmentation", record["tta"]),
    ]:
        head.add_row(k, v)
    table = Table(title="per label", title_justify="left")
    for name in ("label", "images", "AP", "precision", "recall", "f1"):
        table.add_column(name, justify="left" if name == "label" else "right")
    for row in record["per_label"]:
        table.add_row(row["label"], str(row["images"]), *(_fmt(row[k]) for k in ("ap", "precision", "recall", "f1")))
    con = console()
    con.print(head)
    con.print(table)


def _source(trained: Any, data: Any, split: str, images: int) -> dict[str, Any]:
    """metrics.json's first keys, for either task: which model was scored on which images."""
    return {
        "checkpoint": str(trained.checkpoint),
        "model": trained.label,
        "dataset": data.name,
        "source": data.source,
        "split": split,
        "images": images,
    }


def _how(res: dict[str, Any], trained: Any, classes: list[str]) -> dict[str, Any]:
    """metrics.json's keys after the metrics, for either task: how the scores were made, and the class names."""
    return {
        "precision_mode": res["precision"],
        "device": str(trained.device),
        "tta": res["tta"],
        "tta_views": res["views"],
        "epoch": trained.progress.get("epoch"),
        "global_step": trained.progress.get("global_step"),
        "classes": classes,
    }
