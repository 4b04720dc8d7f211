"""The configs themselves: every option composes and validates, and defaults live in the schema only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnntrain.config import FitConfig, plain, typed, validate
from cnntrain.config.compose import compose_fit
from cnntrain.registry import AUGMENTATIONS, DATASETS, MODELS, OPTIMIZERS, SCHEDULERS
from tests.conftest import needs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GROUPS = [f.name for f in dataclasses.fields(FitConfig) if f.default_factory is not dataclasses.MISSING]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))]
# Presets of hydra/sweeper and hydra/launcher that come from an optional Hydra plugin: its module and extra.
PLUGINS = {
    "optuna_study": ("optuna", "optuna"),
    "parallel": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}


def _experiment(path: Path):
    """An experiment as a test parameter, skipped (naming the extra) when it uses a plugin that is not installed."""
    defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []
    chosen = [v for d in defaults if isinstance(d, dict) for k, v in d.items() if "/hydra/" in k]
    return pytest.param(path.stem, marks=[needs(*PLUGINS[v]) for v in chosen if v in PLUGINS])


EXPERIMENTS = [_experiment(p) for p in sorted((CONFIGS / "experiment").glob("*.yaml"))]


# Options that need a key of the user's to be complete.
NEEDS = {
    ("model", "custom"): ["model._target_=mynets.TinyNet"],
    ("dataset", "custom"): ["dataset._target_=mydata.build"],
    ("dataset", "imagefolder"): ["dataset.root=photos"],
    ("dataset", "csv"): ["dataset.root=photos", "dataset.file=labels.csv"],
}


# Options that validation refuses without their extra (the package is checked before any data are loaded).
EXTRA_OPTIONS = {("model", "timm"): ("timm", "timm")}


@pytest.mark.parametrize(
    ("group", "option"),
    [pytest.param(g, o, marks=[needs(*EXTRA_OPTIONS[(g, o)])] if (g, o) in EXTRA_OPTIONS else []) for g, o in OPTIONS],
)
def test_every_option_composes_and_validates(group, option):
    cfg = compose_fit([f"{group}={option}", *NEEDS.get((group, option), [])])
    validate(cfg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    validate(compose_fit([f"experiment={name}"]))


def test_the_typed_config_gives_back_the_composed_record():
    """The engine holds config.typed's dataclasses; what it records of them (a checkpoint's config, the resume
    check, the hparams) is config.plain, which must be the composed config's own plain dict, keys in order."""

    def shape(node):
        return [(k, type(v).__name__, shape(v)) for k, v in node.items()] if isinstance(node, dict) else repr(node)

    runs = [[f"{g}={o}", *NEEDS.get((g, o), [])] for g, o in OPTIONS]
    runs += [[f"experiment={p.stem}"] for p in sorted((CONFIGS / "experiment").glob("*.yaml"))]
    runs += [
        [
            "model=custom",
            "model._target_=mynets.TinyNet",
            "+model.depth=3",
            "model.width=8",
            "+model.sizes={a: [1, 2]}",
            "dataset=custom",
            "dataset._target_=mydata.build",
            "+dataset.n=5",
        ],
        ["trainer.class_weights=[1,10]", "trainer.micro_batch=8", "optimizer.lr=1", "resume=runs/x"],
    ]
    for overrides in runs:
        cfg = compose_fit(overrides)
        assert shape(plain(typed(cfg))) == shape(OmegaConf.to_container(cfg, resolve=True)), overrides


EXPERIMENT_FILES = [("experiment", p.stem) for p in sorted((CONFIGS / "experiment").glob("*.yaml"))]


def _schema(group: str):
    return next(f.default_factory() for f in dataclasses.fields(FitConfig) if f.name == group)


def _yaml(path: Path) -> dict:
    return (OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None) or {}


def _beneath(experiment: str) -> tuple[dict[str, str], dict[str, dict]]:
    """(group -> option, group -> {key: value}) that an experiment's own values are merged onto: fit.yaml's
    options, replaced by the experiment's `override /group: option`, and the experiments it extends."""
    chosen = {g: o for d in _yaml(CONFIGS / "fit.yaml")["defaults"] if isinstance(d, dict) for g, o in d.items()}
    values: dict[str, dict] = {}
    for entry in _yaml(CONFIGS / "experiment" / f"{experiment}.yaml").get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":  # another experiment, merged first
            parent_chosen, parent_values = _beneath(entry)
            chosen.update(parent_chosen)
            own = _yaml(CONFIGS / "experiment" / f"{entry}.yaml")
            for group in GROUPS:
                values[group] = {**values.get(group, {}), **parent_values.get(group, {}), **own.get(group, {})}
        elif isinstance(entry, dict):
            for key, option in entry.items():
                chosen[key.removeprefix("override").strip().strip("/")] = option
    return chosen, values


def _experiment_repeats(name: str) -> list[str]:
    """group.key of an experiment's values that are the schema's default and would be without it: neither an
    option it selects nor an experiment it extends sets the key otherwise."""
    chosen, values = _beneath(name)
    data = _yaml(CONFIGS / "experiment" / f"{name}.yaml")
    repeated = []
    for group in GROUPS:
        schema, option = _schema(group), _yaml(CONFIGS / group / f"{chosen.get(group)}.yaml")
        for key, value in (data.get(group) or {}).items():
            default = getattr(schema, key, object())
            if value == default and values.get(group, {}).get(key, option.get(key, default)) == default:
                repeated.append(f"{group}.{key}")
    return repeated


@pytest.mark.parametrize(("group", "option"), OPTIONS + EXPERIMENT_FILES)
def test_no_yaml_repeats_a_schema_default(group, option):
    if group == "experiment":
        repeated = _experiment_repeats(option)
    else:
        data = _yaml(CONFIGS / group / f"{option}.yaml")
        repeated = [k for k, v in data.items() if k != "name" and getattr(_schema(group), k, object()) == v]
    assert repeated == [], f"{group}/{option}.yaml repeats the schema's defaults of {repeated}"


def test_every_named_option_has_a_builder():
    import cnntrain.augment
    import cnntrain.data
    import cnntrain.models
    import cnntrain.optim  # noqa: F401  (importing the layers fills their registries)

    names = {"dataset": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}
    for group, registry in names.items():
        for p in sorted((CONFIGS / group).glob("*.yaml")):
            assert OmegaConf.load(p).name in registry, p
    assert list(AUGMENTATIONS) == ["hflip", "vflip", "affine", "crop", "policy", "erasing", "mix"]  # the order
    # Validation knows the optimizers and schedules by their declared names: each has its builder.
    assert list(OPTIMIZERS) == list(OPTIMIZERS.names) and list(SCHEDULERS) == list(SCHEDULERS.names)


def test_every_option_file_describes_itself():
    # `cnntrain list` shows the first comment line of each file.
    for group, option in OPTIONS:
        first = (CONFIGS / group / f"{option}.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 10, f"{group}/{option}.yaml"


def test_every_schema_key_has_a_description():
    # `cnntrain fit --help GROUP` shows the comment beside each field of the schema: a key added without one
    # would be listed with nothing to say what it does.
    from cnntrain.config import FitConfig
    from cnntrain.config.describe import keys

    missing = [k.name for k in keys(FitConfig) if len(k.description) < 8]
    assert not missing, f"give these schema fields a comment (their description): {missing}"
