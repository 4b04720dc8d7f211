"""What a run *is*, as far as `resume` is concerned: the keys a resumed run may change, and the check.

A run directory holds one recipe trained on one dataset: its metrics.csv, best epoch and best.pt only make
sense if every epoch was trained the same way on the same data. So `resume` may change how, where and how
long the run goes on (the keys in RESUME_FREE), and nothing else: not the dataset (name, root, subset,
splits; the data themselves are checked by their fingerprint when they are loaded), not the model, not the
optimizer, schedule, augmentation or batch. Continuing on other data or with another recipe is a new run
that starts from the weights: `cnntrain fit model.weights=<run>/checkpoints/last.pt ...`.

Pure functions on plain containers: the CLI checks before Hydra runs (no torch), `engine.checkpoint.restore`
checks again against the config saved in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cnntrain.errors import UserError

# Keys that do not change what a run is: where and how fast it runs, how long, what it shows and writes.
RESUME_FREE = frozenset(
    {
        "resume",
        "trainer.epochs",
        "trainer.early_stopping_patience",
        "trainer.early_stopping_min_delta",
        "trainer.device",
        "trainer.num_threads",
        "trainer.precision",
        "trainer.channels_last",
        "trainer.micro_batch",
        "trainer.compile",
        "trainer.deterministic",
        "trainer.eval_batch_size",
        "trainer.on_nonfinite",
        "trainer.progress",
        "trainer.figures",
        "trainer.log_every_n_steps",
        "trainer.checkpoint_every_n_steps",
        "trainer.dry_run",
        "dataset.download",
        "dataset.in_memory",
        "dataset.memory_limit_mb",
        "dataset.on_corrupt",
        # Which records are written; the MLflow store and experiment are not free: a resume continues its run there.
        "logger.tensorboard",
        "logger.mlflow",
        "logger.log_figures",
        "logger.log_checkpoint",
        "dataset.flips_change_label",  # what evaluate/predict may do with the model, not how it trains
    }
)


# Model keys that change how a model is trained, not its tensors: weights of the run still load after them.
_SAME_TENSORS = frozenset(
    {
        "model.dropout",
        "model.pretrained",
        "model.weights",
        "model.freeze_backbone",
        "model.unfreeze_epoch",
        "model.backbone_lr_scale",
    }
)


def changes_tensors(key: str) -> bool:
    """Whether a changed key makes a model whose tensors the run's weights cannot fill (another architecture,
    width, or input size), so that `model.weights=<its checkpoint>` would fail."""
    if key.startswith("model."):
        return key not in _SAME_TENSORS
    return key == "dataset.image_size"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested mapping (lists are values)."""
    out: dict[str, Any] = {}
    if isinstance(node, Mapping):
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif prefix:
        out[prefix[:-1]] = node
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)  # 3 and 3.0 from YAML
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def identity_changes(recorded: Mapping[str, Any], requested: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, requested value) for each key outside RESUME_FREE that differs.

    A key only one side knows (the schema grew since the run was recorded) is not compared.
    """
    old, new = flatten(recorded), flatten(requested)
    return [
        (key, old[key], new[key])
        for key in old
        if key in new and key not in RESUME_FREE and not _same(old[key], new[key])
    ]


def _what(key: str) -> str:
    if key.startswith("dataset."):
        return "mix two datasets"
    if key.startswith("model."):
        return "go on with another model"
    return "no longer be what its recorded config says"


def check_resume(
    recorded: Mapping[str, Any], requested: Mapping[str, Any], run: str, way_out: str, fresh_start: str | None = None
) -> None:
    """Refuse, in one line that names the key, a resume whose config changes what the run is. The way out
    is a new run from the run's weights (way_out), or, when the change makes a model those weights do not
    fit, a new run from scratch (fresh_start, where the caller knows the requested overrides)."""
    changes = identity_changes(recorded, requested)
    if not changes:
        return
    key, was, now = changes[0]
    more = f" (and {', '.join(k for k, _, _ in changes[1:])})" if len(changes) > 1 else ""
    tensors = [f"{k}={_show(v)}" for k, _, v in changes if changes_tensors(k)]
    if fresh_start and tensors:
        hint = f"its weights do not fit the model of {tensors[0]}; to train that as a new run: {fresh_start}"
    else:
        hint = f"to train on from its weights as a new run: {way_out}"
    raise UserError(
        f"resume cannot change {key} ({_show(was)} -> {_show(now)}){more}: the run in {run} would {_what(key)}; {hint}"
    )


def _show(value: Any) -> str:
    return "null" if value is None else str(value)
