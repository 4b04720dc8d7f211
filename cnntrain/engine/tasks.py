"""What a run learns to predict: one class per image (`single`) or any set of labels (`multilabel`).

The task follows from the data: targets that are class indices [N] give `single` (softmax, cross-entropy,
accuracy); multi-hot targets [N, labels] (a CSV whose label cells hold `a|b`, a custom dataset returning 0/1
vectors) give `multilabel`: one sigmoid per label, binary cross-entropy, a label predicted when its probability
is above trainer.threshold, and mAP, micro/macro F1 and exact match in place of accuracy (engine.multilabel
computes them). Everything else that differs between the two lives here (the loss, the training count, the
monitored metric, what the records and the final table say, how predictions are read), so the loop, the step,
the records (engine.records) and the commands only ask their task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cnntrain.config import DatasetConfig, TrainerConfig
from cnntrain.engine import balance
from cnntrain.engine.evaluate import class_metrics
from cnntrain.engine.multilabel import MULTILABEL_METRICS
from cnntrain.errors import UserError

SINGLE, MULTILABEL = "single", "multilabel"


def task_of(y: torch.Tensor) -> str:
    """Class indices [N] are single-label; multi-hot rows [N, labels] multi-label."""
    return MULTILABEL if y.dim() == 2 else SINGLE


@dataclass(frozen=True)
class Monitor:
    """trainer.monitor as a run of this task reads it: the metric's name, its key in evaluate's result, its sense."""

    name: str
    key: str
    maximize: bool

    @property
    def column(self) -> str:
        """Its column in metrics.csv (an epoch's row): val_acc, val_loss, val_map."""
        return f"val_{self.key}"


class SingleLabel:
    """One class per image: what cnntrain did before multi-label existed, unchanged."""

    name = SINGLE
    threshold = 0.5  # no meaning here; the multi-label task's
    train_key = "acc"  # the running count of the training steps, as the progress line names it

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, label_smoothing: float
    ) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(1) == y).sum()

    def random_targets(self, num_classes: int, batch: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(num_classes, (batch,), generator=gen)

    def monitor(self, name: str) -> Monitor:
        if name == "val/map":
            raise UserError(
                "trainer.monitor=val/map is the mean average precision of multi-label runs; this dataset "
                "gives one class per image: use val/acc or val/loss"
            )
        return Monitor(name, name.removeprefix("val/"), name != "val/loss")

    def loss_weights(
        self, spec: balance.ClassWeights, counts: torch.Tensor, images: int, classes: list[str]
    ) -> torch.Tensor | None:
        return balance.loss_weights(spec, counts, classes)

    def columns(self, columns: list[str]) -> list[str]:
        return columns

    def row(self, train_ratio: float, val: dict[str, Any]) -> dict[str, Any]:
        """The task's metrics of an epoch's row of metrics.csv."""
        return {"train_acc": train_ratio, "val_acc": val["acc"]}

    def epoch_text(self, row: dict[str, Any]) -> str:
        """The console's line of an epoch's row (its metrics.csv row)."""
        return (
            f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
        )

    def test_record(self, test: dict[str, Any], y: torch.Tensor, num_classes: int) -> dict[str, Any]:
        """What the test gives summary.json, the scalars, the final table and the HParams table."""
        balanced = class_metrics(test["pred"], y, num_classes)
        return {
            "summary": {
                "test_loss": test["loss"],
                "test_acc": test["acc"],
                "test_balanced_acc": balanced["balanced_acc"],
                "test_macro_f1": balanced["macro_f1"],
            },
            "scalars": {"test/loss": test["loss"], "test/acc": test["acc"]},
            "rows": [
                ("test acc", f"{test['acc']:.4f}"),
                (
                    "test balanced acc / macro F1",
                    f"{balanced['balanced_acc'] or 0:.4f} / {balanced['macro_f1'] or 0:.4f}",
                ),
                ("test loss", f"{test['loss']:.4f}"),
            ],
            "hparams": {"hparam/test_acc": test["acc"], "hparam/test_loss": test["loss"]},
        }


class MultiLabel:
    """Any set of labels per image: a sigmoid per label, binary cross-entropy, labels above `threshold`."""

    name = MULTILABEL
    train_key = "exact"

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = float(threshold)

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, label_smoothing: float
    ) -> torch.Tensor:
        """Mean binary cross-entropy over images and labels. Label smoothing pulls each 0/1 target towards 0.5
        (y (1 - e) + e / 2); class weights weigh each label's positives (BCE's pos_weight)."""
        if label_smoothing:
            target = target * (1 - label_smoothing) + label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)

    def predicted(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid() > self.threshold

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Images whose predicted label set is exactly the true one (y: the batch's multi-hot labels)."""
        return (self.predicted(logits) == (y > 0.5)).all(1).sum()

    def random_targets(self, num_classes: int, batch: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(2, (batch, num_classes), generator=gen).float()

    def monitor(self, name: str) -> Monitor:
        """val/acc, the default, stands for val/map here: a multi-label run has no accuracy, and mAP does not
        depend on the threshold."""
        if name == "val/loss":
            return Monitor(name, "loss", False)
        return Monitor("val/map", "map", True)

    def loss_weights(
        self, spec: balance.ClassWeights, counts: torch.Tensor, images: int, classes: list[str]
    ) -> torch.Tensor | None:
        """trainer.class_weights as BCE's pos_weight: balanced is negatives / positives of each label in the
        training split (a label's positives weigh what its negatives do); a list gives one weight per label."""
        if spec is None:
            return None
        if spec == "balanced":
            if bool((counts == 0).any()):
                empty = [classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
                raise UserError(
                    f"trainer.class_weights=balanced: no training image has the label "
                    f"{', '.join(empty[:5])}; give explicit weights or add images"
                )
            return ((images - counts) / counts).float()
        weights = [float(v) for v in spec]
        if len(weights) != len(classes):
            raise UserError(
                f"trainer.class_weights has {len(weights)} weights but the dataset has {len(classes)} "
                f"labels ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); give one "
                "weight per label (it weighs the label's positives)"
            )
        return torch.tensor(weights, dtype=torch.float32)

    def columns(self, columns: list[str]) -> list[str]:
        """metrics.csv: training exact match, and the four validation metrics, where accuracy would be."""
        out = []
        for c in columns:
            if c == "train_acc":
                out.append("train_exact_match")
            elif c == "val_acc":
                out += [f"val_{m}" for m in MULTILABEL_METRICS]
            else:
                out.append(c)
        return out

    def row(self, train_ratio: float, val: dict[str, Any]) -> dict[str, Any]:
        return {"train_exact_match": train_ratio, **{f"val_{m}": val[m] for m in MULTILABEL_METRICS}}

    def epoch_text(self, row: dict[str, Any]) -> str:
        return (
            f"train loss {row['train_loss']:.4f} exact {row['train_exact_match']:.4f}  "
            f"val loss {row['val_loss']:.4f} mAP {_f(row['val_map'])} F1 {_f(row['val_micro_f1'])} "
            f"exact {_f(row['val_exact_match'])}"
        )

    def test_record(self, test: dict[str, Any], y: torch.Tensor, num_classes: int) -> dict[str, Any]:
        values = {m: test[m] for m in MULTILABEL_METRICS}
        return {
            "summary": {"test_loss": test["loss"], **{f"test_{m}": v for m, v in values.items()}},
            "scalars": {"test/loss": test["loss"], **{f"test/{m}": v for m, v in values.items() if v is not None}},
            "rows": [
                ("test mAP", _f(values["map"])),
                ("test F1 micro / macro", f"{_f(values['micro_f1'])} / {_f(values['macro_f1'])}"),
                ("test exact match", _f(values["exact_match"])),
                ("test loss", f"{test['loss']:.4f}"),
            ],
            "hparams": {"hparam/test_map": _nan(values["map"]), "hparam/test_loss": test["loss"]},
        }


Task = SingleLabel | MultiLabel


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _nan(v: float | None) -> float:
    return float("nan") if v is None else v


def build_task(t: TrainerConfig, d: DatasetConfig, y: torch.Tensor, val_y: torch.Tensor | None = None) -> Task:
    """The task of a run on training labels y (and validation labels val_y), with the options that do not fit it
    refused (config validation cannot: which task a run is follows from its data)."""
    if task_of(y) == SINGLE:
        task: Task = SingleLabel()
        if t.threshold != 0.5:
            raise UserError(
                f"trainer.threshold={t.threshold} applies to multi-label data (a CSV with `a|b` labels, a "
                "dataset of multi-hot targets); this dataset gives one class per image"
            )
    else:
        task = MultiLabel(t.threshold)
        if d.sampler != "shuffle":
            raise UserError(
                f"dataset.sampler={d.sampler} draws images by their class, and a multi-label "
                "image has none or several; use trainer.class_weights=balanced (it weighs each label's "
                "positives) with dataset.sampler=shuffle"
            )
    monitor = task.monitor(str(t.monitor))  # refuses val/map for single-label data
    if monitor.key == "map" and val_y is not None and len(val_y) and not bool(val_y.any()):
        # The mean is over the labels with a positive to rank: with none, there is no mAP to pick a best epoch by.
        raise UserError(
            f"trainer.monitor={monitor.name}: none of the {len(val_y):,} validation images has any of the "
            f"{val_y.shape[1]} labels, so their mean average precision is undefined; use trainer.monitor=val/loss, "
            "or a validation split with positive labels"
        )
    return task


def record(task: Task, monitor: str) -> dict[str, Any]:
    """What summary.json says of a multi-label run (nothing for a single-label one); `monitor`: trainer.monitor."""
    if task.name == SINGLE:
        return {}
    return {"task": task.name, "threshold": task.threshold, "monitor": task.monitor(monitor).name}


def start_row(task: Task, monitor: str) -> tuple[str, str] | None:
    """The start table's line on a multi-label task (none for a single-label one)."""
    if task.name == SINGLE:
        return None
    m = task.monitor(monitor)
    return (
        "task",
        f"multi-label: a sigmoid per label, binary cross-entropy, labels above {task.threshold:g}; "
        f"best epoch by {m.name}",
    )


# --------------------------------------------------------------------------- after training


def of_meta(meta: dict[str, Any] | None) -> Task:
    """The task a checkpoint's (or an export's) meta record names; records without one are single-label."""
    meta = meta or {}
    if meta.get("task") == MULTILABEL:
        return MultiLabel(float(meta.get("threshold", 0.5)))
    return SingleLabel()


def decode(probs: torch.Tensor, classes: list[str], threshold: float) -> list[list[tuple[str, float]]]:
    """Per image, every label whose probability is above the threshold with it, the most probable first."""
    out = []
    for row in probs.tolist():
        above = sorted(((p, i) for i, p in enumerate(row) if p > threshold), key=lambda pi: (-pi[0], pi[1]))
        out.append([(classes[i], p) for p, i in above])
    return out
