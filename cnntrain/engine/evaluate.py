"""The evaluation loop: fit's validation and test, and `cnntrain evaluate`, all score a model here."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnntrain.data import batches
from cnntrain.engine import distributed
from cnntrain.engine.device import Precision
from cnntrain.engine.inputs import Normalise
from cnntrain.engine.multilabel import MultiLabelScores
from cnntrain.engine.signals import StopRequested

TOP5_MIN_CLASSES = 6  # top-5 accuracy says little with fewer classes


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x_all: torch.Tensor | batches.StreamedImages,
    y_all: torch.Tensor,
    normalise: Normalise,
    batch_size: int,
    precision: Precision,
    stop: StopRequested | None = None,
    dist: distributed.Dist | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Loss, accuracy, top-5 accuracy (6+ classes), predictions and confidences on a split; for multi-hot
    labels [N, labels] the multi-label metrics of engine.multilabel instead (a label counts as predicted when its
    probability is above `threshold`).

    Metrics stay on the device until the end (no sync per batch). Under torchrun (``dist``) each rank
    evaluates its share and the sums are reduced, so every rank gets the metrics of the whole split
    (predictions stay per rank). All values are None if a stop was requested.
    """
    if dist is not None and dist.enabled:
        x_all, y_all = batches.shard(x_all, dist.rank, dist.world), y_all[dist.rank :: dist.world]
    was_training = model.training
    model.eval()
    device = normalise.mean.device
    y_all = y_all.to(device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top5 = torch.zeros((), device=device, dtype=torch.int64)
    with_top5 = None
    preds, confs = [], []
    multilabel = MultiLabelScores(threshold) if y_all.dim() == 2 else None
    for x_u8, y in batches.sequential(x_all, y_all, batch_size, device):
        if stop:
            model.train(was_training)
            return {"loss": None, "acc": None, "top5_acc": None, "pred": None, "conf": None}
        x = normalise.from_uint8(x_u8.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=precision.dtype, enabled=precision.dtype is not None):
            logits = model(x)
        logits = logits.float()
        if multilabel is not None:
            multilabel.add(logits, y)
            continue
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        preds.append(logits.argmax(1))
        confs.append(logits.softmax(1).amax(1))  # top-1 probability
        with_top5 = logits.shape[1] >= TOP5_MIN_CLASSES
        if with_top5:
            top5 += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
    model.train(was_training)
    if multilabel is not None:
        return multilabel.result(y_all.shape[1], device, dist)
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)
    totals = torch.stack(
        [loss_sum, (pred == y_all).sum().double(), torch.tensor(len(y_all), device=device).double(), top5.double()]
    )
    if dist is not None:
        distributed.all_reduce_sum(dist, totals)
    loss_total, correct, n, top5_total = totals.tolist()
    n = max(1.0, n)
    return {
        "loss": loss_total / n,
        "acc": correct / n,
        "top5_acc": top5_total / n if with_top5 else None,
        "pred": pred,
        "conf": torch.cat(confs) if confs else torch.zeros(0, device=device),
    }


def class_metrics(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Balanced accuracy (the mean of the per-class recalls) and macro F1, over the classes the split has
    images of, with the per-class precision and recall behind them: the figures accuracy hides when one
    class dominates."""
    y = y.to(pred.device)
    cm = torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, num_classes)
    cm = cm.double().cpu()
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    present = support > 0
    recall = torch.where(present, tp / support.clamp(min=1), torch.nan)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.where(present, 0.0, torch.nan))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = torch.where(present, f1, torch.nan)
    if not bool(present.any()):
        return {"balanced_acc": None, "macro_f1": None, "precision": [], "recall": []}
    return {
        "balanced_acc": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "precision": [None if v != v else round(float(v), 6) for v in precision.tolist()],
        "recall": [None if v != v else round(float(v), 6) for v in recall.tolist()],
    }
