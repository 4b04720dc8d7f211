"""The metrics of a multi-label evaluation, on the device: mAP (the mean over labels of average precision),
micro and macro F1 and exact match at a threshold, and the per-label figures behind them."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from cnntrain.engine import distributed

MULTILABEL_METRICS = ("map", "micro_f1", "macro_f1", "exact_match")


def average_precision(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Average precision of each label ([N, K] scores and 0/1 truth -> [K], NaN for a label without positives):
    the precision at each positive, ranked by score, averaged over the positives. Tied scores count as one
    threshold (the precision of the whole tie), as scikit-learn's average_precision_score counts them."""
    s = scores.t().float()
    order = s.argsort(dim=1, descending=True, stable=True)
    s_sorted = s.gather(1, order).contiguous()
    t_sorted = truth.t().to(torch.float64).gather(1, order)
    tp = t_sorted.cumsum(1)
    negated = s_sorted.neg().contiguous()  # ascending, as searchsorted wants
    ends = torch.searchsorted(negated, negated, right=True) - 1  # the last place of each run of ties
    precision = tp.gather(1, ends) / (ends + 1).to(torch.float64)
    positives = t_sorted.sum(1)
    ap = (precision * t_sorted).sum(1) / positives.clamp(min=1)
    return torch.where(positives > 0, ap, torch.full_like(ap, math.nan))


class MultiLabelScores:
    """The evaluation's running record of a multi-label split: the logits and labels of each batch, kept on the
    device; `result` turns them into the metrics (the split's images on every rank under torchrun)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.logits: list[torch.Tensor] = []
        self.truth: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.logits.append(logits.float())
        self.truth.append((y > 0.5).to(torch.uint8))

    def result(self, num_labels: int, device: torch.device, dist: distributed.Dist | None = None) -> dict[str, Any]:
        logits = torch.cat(self.logits) if self.logits else torch.zeros(0, num_labels, device=device)
        truth = torch.cat(self.truth) if self.truth else torch.zeros(0, num_labels, dtype=torch.uint8, device=device)
        if dist is not None and dist.enabled:
            logits, truth = distributed.all_gather_rows(dist, logits), distributed.all_gather_rows(dist, truth)
        return multilabel_metrics(logits, truth.bool(), self.threshold)


def multilabel_metrics(logits: torch.Tensor, truth: torch.Tensor, threshold: float) -> dict[str, Any]:
    """Loss, mAP, micro/macro F1, exact match and the per-label figures behind them, of [N, K] logits and truth.
    Macro F1 and mAP average over the labels that have positives in the split."""
    n, k = truth.shape
    probs = logits.sigmoid()
    pred = probs > threshold
    loss = F.binary_cross_entropy_with_logits(logits, truth.float(), reduction="sum").double()
    tp = (pred & truth).sum(0).double()
    fp = (pred & ~truth).sum(0).double()
    fn = (~pred & truth).sum(0).double()
    exact = (pred == truth).all(1).sum().double()
    ap = average_precision(logits, truth) if n else torch.full((k,), math.nan, device=logits.device)
    totals = torch.stack([loss, tp.sum(), fp.sum(), fn.sum(), exact]).tolist()  # one sync for the lot
    loss_sum, tp_all, fp_all, fn_all, exact_count = totals
    support = (tp + fn).cpu()
    nan = torch.tensor(math.nan, dtype=torch.float64)
    tp, fp, fn, ap = tp.cpu(), fp.cpu(), fn.cpu(), ap.cpu()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.where(support > 0, 0.0, nan))
    recall = torch.where(support > 0, tp / support.clamp(min=1), nan)
    f1 = torch.where(support > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), nan)
    present = support > 0
    micro = 2 * tp_all + fp_all + fn_all
    return {
        "loss": loss_sum / max(1, n * k),
        "map": float(ap[present].mean()) if bool(present.any()) else None,
        "micro_f1": 2 * tp_all / micro if micro else None,
        "macro_f1": float(f1[present].mean()) if bool(present.any()) else None,
        "exact_match": exact_count / max(1, n),
        "per_label": {
            "ap": _listed(ap),
            "precision": _listed(precision),
            "recall": _listed(recall),
            "f1": _listed(f1),
            "support": [int(v) for v in support.tolist()],
        },
        "pred": pred,
        "scores": probs,
    }


def _listed(values: torch.Tensor) -> list[float | None]:
    return [None if v != v else round(float(v), 6) for v in values.tolist()]
