"""Imbalanced classes: the loss weights (trainer.class_weights), the class-balanced epoch order
(dataset.sampler=balanced) and the warning that points at both."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cnntrain.errors import UserError

# The largest class this many times the smallest is where an unweighted loss starts to ignore the small one.
IMBALANCE_WARN_RATIO = 10.0
# trainer.class_weights: null, balanced or one weight per class (the schema's Any: OmegaConf has no such union).
ClassWeights = str | Sequence[float] | None


def class_counts(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class; for multi-hot labels [N, labels], the images each label is on."""
    if y.dim() == 2:
        return y.cpu().sum(0).round().long()
    return torch.bincount(y.cpu(), minlength=num_classes)


def loss_weights(spec: ClassWeights, counts: torch.Tensor, classes: Sequence[str]) -> torch.Tensor | None:
    """trainer.class_weights as a float32 tensor (None: unweighted). `balanced` is n / (K * n_k): a class's
    images weigh in total what any other class's do, and the mean weight over the images is 1."""
    if spec is None:
        return None
    k = len(classes)
    if spec == "balanced":
        if bool((counts == 0).any()):  # needs the training split's labels, as the count of weights below does
            empty = [classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
            raise UserError(
                f"trainer.class_weights=balanced: the training split has no images of "
                f"{', '.join(empty[:5])}; give explicit weights or add images"
            )
        return (counts.sum() / (k * counts)).float()
    weights = [float(v) for v in spec]
    # config.validate checks the values (numbers >= 0, one of them > 0); their count needs the dataset's classes,
    # known only once it is loaded, so it is checked here.
    if len(weights) != k:
        raise UserError(
            f"trainer.class_weights has {len(weights)} weights but the dataset has {k} classes "
            f"({', '.join(classes[:10])}{', ...' if k > 10 else ''}); give one weight per class"
        )
    return torch.tensor(weights, dtype=torch.float32)


def sample_weights(sampler: str, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """Per-image draw weights of dataset.sampler=balanced (each class equally likely); None: a plain shuffle."""
    if sampler != "balanced":
        return None
    return (1.0 / counts.clamp(min=1).double())[y.cpu()]


def imbalance_warning(
    counts: torch.Tensor, classes: Sequence[str], class_weights: ClassWeights, sampler: str
) -> str | None:
    """One line when the largest class has >= 10x the images of the smallest and nothing compensates (neither
    trainer.class_weights nor dataset.sampler)."""
    if class_weights is not None or sampler != "shuffle" or len(counts) < 2:
        return None
    big, small = int(counts.argmax()), int(counts.argmin())
    n_big, n_small = int(counts[big]), int(counts[small])
    if n_small > 0 and n_big < IMBALANCE_WARN_RATIO * n_small:
        return None
    ratio = f"{n_big / n_small:.1f}x" if n_small else "all"
    return (
        f"the training classes are imbalanced: '{classes[big]}' has {ratio} the images of "
        f"'{classes[small]}' ({n_big} vs {n_small}); consider trainer.class_weights=balanced or "
        "dataset.sampler=balanced, and judge the run by balanced accuracy and macro F1"
    )
