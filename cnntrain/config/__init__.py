"""Typed schemas for every config group.

Hydra composes the YAML files under ``configs/`` on top of :class:`FitConfig`, so a
key that is not declared here, or a value of the wrong type, is rejected while the
config is composed (before anything is built). Ranges and choices that a type cannot
express are checked by :func:`validate`. :func:`typed` then turns the composed config into
these dataclasses, once, and each builder takes its own part of it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from cnntrain.errors import UserError, did_you_mean
from cnntrain.registry import OPTIMIZERS, SCHEDULERS

_T = TypeVar("_T")

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from omegaconf import DictConfig
    from typing_extensions import dataclass_transform

    # The type checker sees every schema class as frozen: below the CLI nothing writes to the config
    # (a changed copy is dataclasses.replace).
    @dataclass_transform(frozen_default=True, field_specifiers=(field,))
    def config_schema(cls: type[_T]) -> type[_T]: ...
else:
    # At run time they stay plain dataclasses: OmegaConf makes a read-only node of a frozen one, into which
    # Hydra could merge neither the YAML files nor the command line's overrides.
    config_schema = dataclass

# OmegaConf leaves a field with this metadata out of the config it makes from the schema: `own` below is
# no config key (not in Hydra's config, --help or a checkpoint's config), only where `typed` puts the
# keys of the user's own.
_NOT_A_KEY = {"omegaconf_ignore": True}


@config_schema
class DatasetConfig:
    # Registry key in cnntrain.registry.DATASETS, or the name of an installed plug-in.
    name: str = "mnist5k"
    # dataset=custom: the dotted path of a callable that returns a torch Dataset of (image, label)
    # pairs, or a dict of them with keys train (and optionally val, test). Keys of `dataset` that
    # this schema does not declare are passed to it as keyword arguments.
    _target_: str | None = None
    # Directory holding the data; None means the dataset's default location.
    root: str | None = None
    # Fetch the files from the internet when they are not under root (torchvision sets).
    download: bool = False
    # dataset=csv: the CSV of labels (columns path,label[,split]), relative to root.
    file: str | None = None
    # Fraction of the training data held out for validation (seeded, stratified).
    val_fraction: float = 0.1
    # Fraction held out for testing, for sources that ship no test split.
    test_fraction: float = 0.1
    # Seed of the train/val/test split; independent of trainer.seed so that runs
    # with different seeds are evaluated on the same images.
    split_seed: int = 0
    # Keep only this many training images (stratified), for quick runs.
    subset: int | None = None
    # Image folders, CSV and custom datasets: resize every image to image_size x image_size.
    image_size: int | None = None
    # Image folders, CSV and custom datasets: 1 (grayscale) or 3 (RGB); None infers it from the images.
    channels: int | None = None
    # What to do with a file that cannot be decoded (and, for CSV, a row that names a missing file,
    # an unknown split or a path twice): skip (counted in one warning) | error.
    on_corrupt: str = "skip"
    # Image folders and CSV: a class with fewer training images than this is an error (a misspelt
    # label makes a class of one); 0 only warns about a class far smaller than the others.
    min_class_images: int = 0
    # Image folders, CSV and custom datasets: decode everything into memory (true), stream through
    # DataLoader workers (false), or decide by size (auto: in memory below memory_limit_mb of uint8 pixels).
    in_memory: str = "auto"
    # in_memory=auto: decoded images up to this many MB stay in memory; more are streamed.
    memory_limit_mb: int = 4096
    # Order of the training images in an epoch: shuffle (each image once) | balanced (drawn with replacement,
    # each class equally likely: minority images repeat). Both are a function of (trainer.seed, epoch) alone.
    sampler: str = "shuffle"
    # Whether mirroring an image changes its class (digits, text): test-time augmentation then refuses flips.
    flips_change_label: bool = False
    # dataset=custom and plug-ins: the keys of `dataset` this schema does not declare, the callable's keyword
    # arguments (not a config key: see _NOT_A_KEY).
    own: dict[str, Any] = field(default_factory=dict, metadata=_NOT_A_KEY)


@config_schema
class ModelConfig:
    # Registry key in cnntrain.registry.MODELS, or the name of an installed plug-in.
    name: str = "simple_cnn"
    # model=custom: the dotted path of an nn.Module class or a function that returns one. Keys of
    # `model` that this schema does not declare are passed to it as keyword arguments.
    _target_: str | None = None
    # model=torchvision / model=timm: the architecture, e.g. resnet18 / resnet10t.
    arch: str | None = None
    # Base channel width; None means the architecture's own default (its builder's keyword default).
    width: int | None = None
    # Width of the hidden dense layer, for models that have one; None means the architecture's default.
    hidden: int | None = None
    # Dropout before the classifier, for models that have a head.
    dropout: float = 0.0
    # torchvision and timm models: load the published ImageNet weights (downloads once).
    pretrained: bool = False
    # A local state_dict (.pt, .pth, or .safetensors) to start from; works offline.
    weights: str | None = None
    # Train only the classifier head...
    freeze_backbone: bool = False
    # ...until this epoch (1-based), when the backbone is unfrozen. None: never.
    unfreeze_epoch: int | None = None
    # Learning rate of the backbone relative to optimizer.lr (fine-tuning).
    backbone_lr_scale: float = 1.0
    # model=custom and plug-ins: the keys of `model` this schema does not declare, the callable's keyword
    # arguments (not a config key: see _NOT_A_KEY).
    own: dict[str, Any] = field(default_factory=dict, metadata=_NOT_A_KEY)


@config_schema
class AugmentConfig:
    # Name of the preset, for the record; the fields below say what is done.
    name: str = "none"
    # Flips: the probability of each, per image.
    hflip: float = 0.0  # left-right
    vflip: float = 0.0  # upside down (wrong for digits and text)
    # Affine warp, drawn per image; off while all four keep these values.
    rotate: float = 0.0  # degrees, uniform in +-rotate
    scale_min: float = 1.0  # isotropic zoom, uniform in [scale_min, scale_max]
    # The largest zoom (see scale_min); 1 with scale_min 1 is no zoom.
    scale_max: float = 1.0
    translate: float = 0.0  # shift per axis, uniform in +-translate of the image size
    # Pad by this many pixels (reflect) and crop back at a random offset.
    crop_padding: int = 0
    # Automatic policy: none | randaugment | trivialaugment (one op per image, random magnitude).
    policy: str = "none"
    policy_ops: int = 2  # randaugment: ops applied one after another
    policy_magnitude: int = 9  # randaugment: strength in torchvision's bins, 0..30
    # Random erasing probability (one rectangle per image).
    erasing: float = 0.0
    # Mixup / CutMix Beta(alpha, alpha); 0 disables. When both are set, each batch
    # uses one of them at random.
    mixup_alpha: float = 0.0
    # CutMix Beta(alpha, alpha): a box of another image pasted in, labels mixed by its area; 0 disables.
    cutmix_alpha: float = 0.0


@config_schema
class OptimizerConfig:
    # adam | adamw | sgd
    name: str = "adam"
    # Learning rate (the peak one with a schedule).
    lr: float = 1e-3
    # L2 weight decay (decoupled for adamw).
    weight_decay: float = 0.0
    # Apply weight decay to biases and norm layers too (off: the usual practice).
    decay_norm_and_bias: bool = False
    # adam/adamw: the decay rates of the gradient's running mean and of its square.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # adam/adamw: added to the denominator for numerical stability.
    eps: float = 1e-8
    # sgd: momentum factor.
    momentum: float = 0.9
    # sgd: Nesterov momentum (needs momentum > 0).
    nesterov: bool = False


@config_schema
class SchedulerConfig:
    # none | cosine | onecycle | step
    name: str = "none"
    # Linear warm-up from 0, in epochs (fractions allowed); cosine and step only.
    warmup_epochs: float = 0.0
    # cosine: final learning rate as a fraction of optimizer.lr.
    min_lr_ratio: float = 0.0
    # onecycle: peak learning rate (None: optimizer.lr) and share of the rise.
    max_lr: float | None = None
    # onecycle: the share of the steps spent rising to max_lr.
    pct_start: float = 0.25
    # step: multiply the learning rate by gamma every step_epochs epochs.
    step_epochs: int = 2
    # step: the factor the learning rate is multiplied by every step_epochs epochs.
    gamma: float = 0.1


@config_schema
class TrainerConfig:
    # Passes over the training images.
    epochs: int = 5
    # Training images per step (the global batch, split over the processes of a distributed run).
    batch_size: int = 32
    # Images per forward pass of validation and test (no gradients, so larger).
    eval_batch_size: int = 1000
    # auto | cpu | cuda | cuda:N | mps
    device: str = "auto"
    # auto | 32 | bf16 | fp16
    precision: str = "auto"
    # Memory layout of activations: auto (both timed at start, the verdict cached per machine, model, input,
    # batch and precision) | true | false.
    channels_last: str = "auto"
    # Forward/backward in chunks of this many images whose gradients accumulate into one optimizer step:
    # null (the whole batch), a number (gradient accumulation; BatchNorm then sees chunk statistics) or auto
    # (the fastest chunk by timing; models with BatchNorm keep the whole batch).
    micro_batch: Any = None
    # torch.compile the model: faster steps after a slower start.
    compile: bool = False
    # Seed of weights, shuffling and augmentation (the splits have dataset.split_seed).
    seed: int = 0
    # Bit-identical reruns: deterministic kernels only, and the thread count does not follow the load.
    deterministic: bool = False
    # CPU threads for torch; None: one per usable physical core, less the cores other processes keep busy (the
    # load is not looked at with trainer.deterministic; OMP_NUM_THREADS or MKL_NUM_THREADS, when set, decide).
    num_threads: int | None = None
    # Clip the global gradient norm to this value; None disables.
    grad_clip: float | None = None
    # Label smoothing of the training loss, in [0, 1).
    label_smoothing: float = 0.0
    # Validation metric that picks the `best` checkpoint: val/acc (max) or val/loss (min); val/map (max) for
    # multi-label data, where val/acc also stands for val/map (a multi-label run has no accuracy).
    monitor: str = "val/acc"
    # Per-step train loss goes to TensorBoard every this many steps.
    log_every_n_steps: int = 50
    # Also write `last` every this many steps inside an epoch; 0: at epoch ends only.
    checkpoint_every_n_steps: int = 0
    # What to do with a non-finite loss: stop | skip (skip the step and go on).
    on_nonfinite: str = "stop"
    # Terminal display: auto (rich on a terminal, plain lines otherwise) | rich | plain | none.
    progress: str = "auto"
    # Build everything, push one batch through, and stop.
    dry_run: bool = False
    # The end-of-run figures (figures/*.png and TensorBoard): background (a child process draws them after the
    # command's last line, which does not wait) | end (drawn before the command returns) | off (not drawn:
    # `cnntrain report RUN_DIR figures=true` draws them later).
    figures: str = "background"
    # Exponential moving average of the weights (e.g. 0.999); None disables. When on, validation,
    # the best checkpoint and the test use the averaged weights.
    ema_decay: float | None = None
    # Stop when trainer.monitor has not improved by more than min_delta for this many epochs.
    early_stopping_patience: int | None = None
    # The least change of trainer.monitor that counts as an improvement for early stopping.
    early_stopping_min_delta: float = 0.0
    # Weights of the classes in the training loss: null (all 1) | balanced (images / (classes x images of the
    # class), from the training split, recorded in summary.json) | [w0, w1, ...], one per class.
    class_weights: Any = None
    # k-fold cross-validation: K >= 2 runs K jobs of one sweep, fold k validating on the k-th of K stratified,
    # seeded (dataset.split_seed) parts of the training and validation images, training on the rest.
    folds: int | None = None
    # The fold this job runs (0 .. folds-1); set by trainer.folds, not by hand.
    fold: int | None = None
    # Multi-label data: a label is predicted when its sigmoid probability is above this (F1, exact match, predict).
    threshold: float = 0.5


@config_schema
class SweepConfig:
    # Stop an Optuna trial whose validation metric (trainer.monitor) falls behind at an epoch:
    # none | median | hyperband. Needs the Optuna sweeper (--multirun hydra/sweeper=optuna).
    pruner: str = "none"
    # median: trials that must finish before any is pruned.
    startup_trials: int = 2
    # The first epochs of each trial, which are never pruned.
    warmup_epochs: int = 0
    # Set by the Optuna sweeper for each job: the study's storage (an RDB URL).
    storage: str | None = None
    # Set by the Optuna sweeper for each job: the name of the study the job belongs to.
    study: str | None = None
    # Set by the Optuna sweeper for each job: the number of the trial the job is.
    trial: int | None = None


@config_schema
class LoggerConfig:
    """The backends that record the run besides metrics.csv, turned on by the logger group's options:
    logger=tensorboard (the default), logger=mlflow, or both: logger=[tensorboard,mlflow]."""

    # Write TensorBoard event files into the run directory (logger=tensorboard sets it).
    tensorboard: bool = False
    # Record the run in an MLflow tracking store (logger=mlflow sets it; needs the mlflow extra).
    mlflow: bool = False
    # MLflow tracking store (sqlite:///..., http://host:5000, ...); None: sqlite:///<cwd>/runs/mlflow.db.
    tracking_uri: str | None = None
    # MLflow experiment; None: the config's name.
    experiment: str | None = None
    # Upload figures/*.png to the MLflow run when it completes.
    log_figures: bool = True
    # Upload checkpoints/best.pt to the MLflow run when it completes.
    log_checkpoint: bool = True


@config_schema
class FitConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # Experiment name: the first level of the run directory under runs/.
    name: str = "default"
    # Continue a run: its directory or a checkpoint file (see README, "Resume").
    resume: str | None = None


# trainer.precision, and the precision= of evaluate and predict.
PRECISIONS = ("auto", "32", "bf16", "fp16")
# augment.policy: the automatic augmentation policies of augment/ops.py.
POLICIES = ("none", "randaugment", "trivialaugment")
# augment.policy_magnitude runs over torchvision's bins, 0 .. POLICY_MAX_MAGNITUDE (augment/ops.py scales by it).
POLICY_MAX_MAGNITUDE = 30

# The keys whose value is one of a list. The optimizers and schedules are their registries' names, which
# cnntrain.registry declares so that they are known here without importing their builders (and torch).
CHOICES: dict[str, tuple[str, ...]] = {
    "trainer.precision": PRECISIONS,
    "trainer.channels_last": ("auto", "true", "false"),
    "trainer.monitor": ("val/acc", "val/loss", "val/map"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "trainer.progress": ("auto", "rich", "plain", "none"),
    "trainer.figures": ("background", "end", "off"),
    "optimizer.name": OPTIMIZERS.names,
    "scheduler.name": SCHEDULERS.names,
    "augment.policy": POLICIES,
    "dataset.on_corrupt": ("skip", "error"),
    "dataset.in_memory": ("auto", "true", "false"),
    "dataset.sampler": ("shuffle", "balanced"),
    "sweep.pruner": ("none", "median", "hyperband"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# Groups whose node also takes keys of the user's own: the keyword arguments of a `_target_`
# (model=custom, dataset=custom) or of an installed plug-in.
OPEN_GROUPS = ("model", "dataset")


def takes_own_keys(group: str, name: str) -> bool:
    """Whether `group.name` passes undeclared keys on as keyword arguments (custom, or a plug-in)."""
    from cnntrain.registry import DATASETS, MODELS

    registry = {"model": MODELS, "dataset": DATASETS}.get(group)
    return registry is not None and (name == "custom" or name in registry.plugins())


def declared(schema: type) -> list[str]:
    """The config keys of a schema class: its fields, less `own` (which holds the undeclared ones)."""
    return [f.name for f in dataclasses.fields(schema) if not f.metadata.get("omegaconf_ignore")]


def own_keys(node: Any, schema: type) -> dict[str, Any]:
    """The keys of a model/dataset node that `schema` does not declare: the user's keyword arguments for a
    `_target_` or plug-in, as plain values. The node is a DictConfig, or the dataclass made from one: its
    `own` (see `typed`), or the attributes that a plain OmegaConf.to_object sets for such keys."""
    from omegaconf import DictConfig, OmegaConf

    known = declared(schema)
    if isinstance(node, DictConfig):
        return {
            str(k): OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in node.items()
            if k not in known
        }
    attributes = {k: v for k, v in vars(node).items() if k not in known and k != "own"}
    return {**getattr(node, "own", {}), **attributes}


_Open = TypeVar("_Open", ModelConfig, DatasetConfig)


def open_part(node: Any, schema: type[_Open]) -> _Open:
    """A model or dataset node (a DictConfig or a dict) as its schema class, with the keys the schema does
    not declare in `own`."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    assert isinstance(values, dict)
    known = declared(schema)
    part = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(schema), {k: v for k, v in values.items() if k in known})
    )
    assert isinstance(part, schema)
    return dataclasses.replace(part, own={str(k): v for k, v in values.items() if k not in known})


def typed(cfg: DictConfig) -> FitConfig:
    """The composed, validated config as FitConfig's dataclasses, made once where a run is built: each
    builder then takes its own part (FitConfig.model, .optimizer, ...). A custom or plug-in model's or
    dataset's own keys go to its `own`."""
    from omegaconf import OmegaConf

    parts: dict[str, Any] = {}
    for f in dataclasses.fields(FitConfig):
        node = cfg[f.name]
        if f.name == "model":
            parts[f.name] = open_part(node, ModelConfig)
        elif f.name == "dataset":
            parts[f.name] = open_part(node, DatasetConfig)
        else:
            parts[f.name] = OmegaConf.to_object(node) if OmegaConf.is_config(node) else node
    return FitConfig(**parts)


def plain(part: DataclassInstance) -> dict[str, Any]:
    """The typed config (or a part of it) back as the plain dict that `OmegaConf.to_container(cfg, resolve=True)`
    makes of the composed config, its keys in the same order: a part's own keys (`own`) after its declared ones,
    where the composed node has them. What a checkpoint, the resume check and the hparams record, so that they
    stay what they were when the engine held the composed config itself."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(part):
        value = getattr(part, f.name)
        if f.metadata.get("omegaconf_ignore"):
            out.update(copy.deepcopy(value))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = plain(value)
        else:  # a copy, as to_container makes: the record shares no list with the config
            out[f.name] = copy.deepcopy(value)
    return out


def check_known_keys(cfg: Any, prefix: str = "") -> None:
    """Refuse keys the schema does not declare.

    Hydra opens the config to apply `+key=value`, so `+trainer.epoch=3` would otherwise be
    composed in and silently ignored. `model` and `dataset` take keys of their own only for
    a `_target_` (name custom) or an installed plug-in, whose arguments they are.
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    group = prefix.rstrip(".")
    if group in OPEN_GROUPS and takes_own_keys(group, str(cfg.get("name"))):
        return
    known = declared(schema)
    for key in map(str, cfg):
        if key not in known:
            where = f" in '{prefix.rstrip('.')}'" if prefix else ""
            raise UserError(
                f"unknown key '{prefix}{key}'{where}{did_you_mean(key, known)}; known keys: {', '.join(known)}"
            )
    for key in known:
        check_known_keys(cfg._get_node(key), f"{prefix}{key}.")


def check_targets(cfg: Any) -> None:
    """`_target_` goes with name custom, and custom needs one."""
    for group, example in (("model", "mynets.TinyNet"), ("dataset", "mydata.build")):
        node = getattr(cfg, group)
        target, name = node._target_, node.name
        if name == "custom" and not target:
            raise UserError(
                f"{group}=custom needs {group}._target_=module.name, the dotted path of your "
                f"{'nn.Module class or factory' if group == 'model' else 'dataset function or class'} "
                f"(e.g. {group}._target_={example})"
            )
        if target and name != "custom":
            raise UserError(
                f"{group}._target_={target} applies to {group}=custom only (this config has "
                f"{group}={name}); add {group}=custom, or remove {group}._target_"
            )


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def validate(cfg: Any) -> None:
    """Reject values that are well-typed but impossible, naming the key and the fix."""
    check_known_keys(cfg)
    check_targets(cfg)
    for key, options in CHOICES.items():
        _check_choice(key, _get(cfg, key), options)
    if cfg.model.name == "timm" and not _installed("timm"):  # now, not after the data have loaded
        raise UserError("model=timm needs the timm package, which is not installed: pip install 'cnntrain[timm]'")
    t, d, o, s, a = cfg.trainer, cfg.dataset, cfg.optimizer, cfg.scheduler, cfg.augment
    checks = [
        (t.epochs >= 1, "trainer.epochs", t.epochs, "must be at least 1"),
        (t.batch_size >= 1, "trainer.batch_size", t.batch_size, "must be at least 1"),
        (t.eval_batch_size >= 1, "trainer.eval_batch_size", t.eval_batch_size, "must be at least 1"),
        (t.num_threads is None or t.num_threads >= 1, "trainer.num_threads", t.num_threads, "must be at least 1"),
        (t.grad_clip is None or t.grad_clip > 0, "trainer.grad_clip", t.grad_clip, "must be > 0 (or null to disable)"),
        (0 <= t.label_smoothing < 1, "trainer.label_smoothing", t.label_smoothing, "must be in [0, 1)"),
        (t.ema_decay is None or 0 < t.ema_decay < 1, "trainer.ema_decay", t.ema_decay, "must be in (0, 1) or null"),
        (
            t.early_stopping_patience is None or t.early_stopping_patience >= 1,
            "trainer.early_stopping_patience",
            t.early_stopping_patience,
            "must be at least 1 or null",
        ),
        (
            t.early_stopping_min_delta >= 0,
            "trainer.early_stopping_min_delta",
            t.early_stopping_min_delta,
            "must be >= 0",
        ),
        (t.log_every_n_steps >= 1, "trainer.log_every_n_steps", t.log_every_n_steps, "must be at least 1"),
        (
            t.checkpoint_every_n_steps >= 0,
            "trainer.checkpoint_every_n_steps",
            t.checkpoint_every_n_steps,
            "must be >= 0",
        ),
        (0 < t.threshold < 1, "trainer.threshold", t.threshold, "must be between 0 and 1 (exclusive)"),
        *_dataset_checks(d),
        (o.lr > 0, "optimizer.lr", o.lr, "must be > 0"),
        (o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0"),
        (
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            "optimizer.betas",
            o.betas,
            "must be two numbers in [0, 1)",
        ),
        (o.momentum >= 0, "optimizer.momentum", o.momentum, "must be >= 0"),
        (
            not (o.nesterov and o.name == "sgd" and o.momentum == 0),
            "optimizer.nesterov",
            o.nesterov,
            "needs optimizer.momentum > 0",
        ),
        (s.warmup_epochs >= 0, "scheduler.warmup_epochs", s.warmup_epochs, "must be >= 0"),
        (0 <= s.min_lr_ratio <= 1, "scheduler.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]"),
        (s.max_lr is None or s.max_lr > 0, "scheduler.max_lr", s.max_lr, "must be > 0"),
        (0 < s.pct_start < 1, "scheduler.pct_start", s.pct_start, "must be between 0 and 1"),
        (s.step_epochs >= 1, "scheduler.step_epochs", s.step_epochs, "must be at least 1"),
        (0 < s.gamma <= 1, "scheduler.gamma", s.gamma, "must be in (0, 1]"),
        (0 <= cfg.model.dropout < 1, "model.dropout", cfg.model.dropout, "must be in [0, 1)"),
        (
            cfg.model.width is None or cfg.model.width >= 1,
            "model.width",
            cfg.model.width,
            "must be at least 1 (or null for the architecture's default)",
        ),
        (
            cfg.model.hidden is None or cfg.model.hidden >= 1,
            "model.hidden",
            cfg.model.hidden,
            "must be at least 1 (or null for the architecture's default)",
        ),
        (
            s.name != "onecycle" or s.warmup_epochs == 0,
            "scheduler.warmup_epochs",
            s.warmup_epochs,
            "does not apply to scheduler=onecycle, whose rise is its warm-up (scheduler.pct_start); remove it",
        ),
        (cfg.model.backbone_lr_scale >= 0, "model.backbone_lr_scale", cfg.model.backbone_lr_scale, "must be >= 0"),
        (
            all(0 <= p <= 1 for p in (a.hflip, a.vflip, a.erasing)),
            "augment.hflip/vflip/erasing",
            (a.hflip, a.vflip, a.erasing),
            "are probabilities in [0, 1]",
        ),
        (
            0 < a.scale_min <= a.scale_max,
            "augment.scale_min",
            (a.scale_min, a.scale_max),
            "must satisfy 0 < scale_min <= scale_max",
        ),
        (0 <= a.translate < 1, "augment.translate", a.translate, "must be in [0, 1)"),
        (a.crop_padding >= 0, "augment.crop_padding", a.crop_padding, "must be >= 0"),
        (a.policy != "randaugment" or a.policy_ops >= 1, "augment.policy_ops", a.policy_ops, "must be at least 1"),
        (
            a.policy != "randaugment" or 0 <= a.policy_magnitude <= POLICY_MAX_MAGNITUDE,
            "augment.policy_magnitude",
            a.policy_magnitude,
            f"must be in 0..{POLICY_MAX_MAGNITUDE} (torchvision's bins)",
        ),
        (
            a.mixup_alpha >= 0 and a.cutmix_alpha >= 0,
            "augment.mixup_alpha/cutmix_alpha",
            (a.mixup_alpha, a.cutmix_alpha),
            "must be >= 0",
        ),
    ]
    checks += _fold_checks(t)
    checks += [
        (cfg.sweep.startup_trials >= 0, "sweep.startup_trials", cfg.sweep.startup_trials, "must be >= 0"),
        (cfg.sweep.warmup_epochs >= 0, "sweep.warmup_epochs", cfg.sweep.warmup_epochs, "must be >= 0"),
    ]
    checks.append(_class_weights_check(t.class_weights))
    # name is the run's folder under runs/: a path there would put the run somewhere else.
    name = str(cfg.name)
    checks.append(
        (
            bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name,
            "name",
            name,
            "must be a plain folder name (no '/'; it becomes runs/<name>/)",
        )
    )
    checks.append(_micro_batch_check(t.micro_batch, t.batch_size))
    _raise_first(checks)


def _check_choice(key: str, value: Any, options: tuple[str, ...]) -> None:
    value = str(value)
    if value.lower() not in options:  # `true`/`false` on the command line arrive as booleans
        raise UserError(
            f"{key}={value} is not a valid choice; use one of: {', '.join(options)}" + did_you_mean(value, options)
        )


def _raise_first(checks: list[tuple[bool, str, Any, str]]) -> None:
    for ok, key, value, what in checks:
        if not ok:
            raise UserError(f"{key}={value} {what}")


def _dataset_checks(d: Any) -> list[tuple[bool, str, Any, str]]:
    """The checks of the dataset's values alone. What needs the files (does dataset.root exist, is the CSV
    there and well-formed) is the loader's, which reads them."""
    return [
        (0 < d.val_fraction < 1, "dataset.val_fraction", d.val_fraction, "must be between 0 and 1 (exclusive)"),
        (0 < d.test_fraction < 1, "dataset.test_fraction", d.test_fraction, "must be between 0 and 1 (exclusive)"),
        (
            d.val_fraction + d.test_fraction < 1,
            "dataset.val_fraction",
            d.val_fraction,
            "plus dataset.test_fraction must be below 1",
        ),
        (d.subset is None or d.subset >= 1, "dataset.subset", d.subset, "must be at least 1"),
        (d.image_size is None or d.image_size >= 1, "dataset.image_size", d.image_size, "must be at least 1"),
        (d.channels in (None, 1, 3), "dataset.channels", d.channels, "must be 1, 3 or null"),
        (d.min_class_images >= 0, "dataset.min_class_images", d.min_class_images, "must be >= 0 (0: warn only)"),
        (
            d.name != "imagefolder" or d.root is not None,
            "dataset",
            d.name,
            "needs dataset.root=DIR: a folder of class folders, or one with train/ and val/ class folders",
        ),
        (
            d.name != "csv" or d.root is not None,
            "dataset",
            d.name,
            "needs dataset.root=DIR, the folder the CSV's paths are relative to",
        ),
        (
            d.name != "csv" or bool(d.file),
            "dataset",
            d.name,
            "needs dataset.file=NAME.csv, the CSV of labels (columns path,label[,split])",
        ),
    ]


def check_dataset(d: Any) -> None:
    """The dataset's values, checked as validate checks them, for every dataset that is loaded
    (data.load_dataset): `cnntrain evaluate dataset.KEY=VALUE` loads one without a fit's validation."""
    for key, options in CHOICES.items():
        group, _, leaf = key.partition(".")
        if group == "dataset":
            _check_choice(key, getattr(d, leaf), options)
    _raise_first(_dataset_checks(d))


def _fold_checks(t: Any) -> list[tuple[bool, str, Any, str]]:
    return [
        (
            t.folds is None or t.folds >= 2,
            "trainer.folds",
            t.folds,
            "must be at least 2 (each fold validates on 1/folds of the images; null: no cross-validation)",
        ),
        (t.fold is None or t.folds is not None, "trainer.fold", t.fold, "needs trainer.folds=K"),
        (
            t.folds is None or t.fold is not None,
            "trainer.folds",
            t.folds,
            "runs one job per fold: give it on the command line (cnntrain fit trainer.folds=K sets trainer.fold "
            "for each job), or pick one fold with trainer.fold=k",
        ),
        (
            t.fold is None or t.folds is None or 0 <= t.fold < t.folds,
            "trainer.fold",
            t.fold,
            f"must be in 0 .. trainer.folds-1 ({t.folds})",
        ),
    ]


def _class_weights_check(w: Any) -> tuple[bool, str, Any, str]:
    """The length is checked against the dataset's classes when they are known (engine.balance.loss_weights)."""
    from omegaconf import ListConfig

    what = "must be null, balanced or a list of numbers >= 0, one per class, e.g. [1, 10]"
    if w is None or w == "balanced":
        return True, "trainer.class_weights", w, what
    if isinstance(w, (list, ListConfig)):
        ok = len(w) > 0 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in w)
        ok = ok and any(v > 0 for v in w)
        return ok, "trainer.class_weights", list(w), what
    return False, "trainer.class_weights", w, what


def _micro_batch_check(value: Any, batch_size: int) -> tuple[bool, str, Any, str]:
    """trainer.micro_batch: null, auto or a whole number of images from 1 to trainer.batch_size."""
    key = "trainer.micro_batch"
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return True, key, value, ""
    if isinstance(value, bool) or not isinstance(value, int):
        return False, key, value, "must be null, auto or a number of images (1 to trainer.batch_size)"
    if value < 1:
        return False, key, value, "must be at least 1 (or null for the whole batch, or auto)"
    return (
        value <= batch_size,
        key,
        value,
        f"is larger than trainer.batch_size={batch_size}; use at most {batch_size} (or null for the whole batch)",
    )
