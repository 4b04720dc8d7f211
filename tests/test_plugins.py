"""Bring your own: a model module, a dataset factory, a CSV of labels, a project folder of configs, and an
installed plug-in package, each used as a user would (tests/plugins/ holds the modules and the package).

The fast tests build models and datasets in this process; the slow ones train each extension through the
real CLI, kill and resume it, sweep it, and evaluate, predict with and export what it trained.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cnntrain.config import DatasetConfig, ModelConfig, OptimizerConfig, validate
from cnntrain.config.compose import compose_fit, take_config_dir_flags
from cnntrain.errors import UserError
from cnntrain.registry import DATASETS, MODELS, TargetImportError, import_target
from tests.conftest import REPO, cli_in_process, run_cli, run_dirs, summary
from tests.faults import run_faulty

PLUGINS = REPO / "tests" / "plugins"
SITE = PLUGINS / "site"  # holds cnntrain_demo and its .dist-info: an "installed" package


@pytest.fixture
def user_code(monkeypatch):
    """tests/plugins importable (as the current directory would be), and the demo package installed; undone after."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.syspath_prepend(str(SITE))
    MODELS.refresh()
    DATASETS.refresh()
    yield
    for name in ("mynets", "mydata", "cnntrain_demo"):
        sys.modules.pop(name, None)
    MODELS.refresh()
    DATASETS.refresh()
    # register_configs gave the demo's plug-ins options in Hydra's ConfigStore, which outlives the test: a later
    # test in this process would see options of a package that is no longer installed.
    from hydra.core.config_store import ConfigStore

    repo = ConfigStore.instance().repo
    for group in ("model", "dataset"):
        options = repo.get(group, {})
        for key in [k for k, node in options.items() if getattr(node, "provider", None) == "cnntrain-plugins"]:
            del options[key]


def model_cfg(**keys) -> ModelConfig:
    """A ModelConfig as fit passes it, with keys of the callable's own among the given ones."""
    base = OmegaConf.structured(ModelConfig)
    OmegaConf.set_struct(base, False)
    return OmegaConf.merge(base, keys)


def dataset_cfg(**keys) -> DatasetConfig:
    base = OmegaConf.structured(DatasetConfig)
    OmegaConf.set_struct(base, False)
    return OmegaConf.to_object(OmegaConf.merge(base, keys))


# --------------------------------------------------------------------------- your own model


def test_import_target_names_what_is_missing_and_how_to_fix_it(user_code, tmp_path, monkeypatch):
    import mynets

    assert import_target("mynets.TinyNet", "model._target_") is mynets.TinyNet
    assert import_target("mynets:TinyNet", "model._target_") is mynets.TinyNet
    with pytest.raises(TargetImportError, match="cannot import module 'nosuch'.*PYTHONPATH") as e:
        import_target("nosuch.Net", "model._target_")
    assert e.value.module == "nosuch"
    with pytest.raises(UserError, match="has no attribute 'TinyNte' \\(did you mean 'TinyNet'\\?\\)"):
        import_target("mynets.TinyNte", "model._target_")
    with pytest.raises(UserError, match="is not a dotted path"):
        import_target("TinyNet", "model._target_")
    # A module that imports something missing: the missing dependency is named, not the module.
    (tmp_path / "needs_dep.py").write_text("import not_installed_dep\n")
    monkeypatch.chdir(tmp_path)  # the current directory is importable
    with pytest.raises(UserError, match="importing module needs_dep failed: No module named 'not_installed_dep'"):
        import_target("needs_dep.Net", "model._target_")


def test_custom_model_gets_the_dataset_shape_and_the_keys_the_user_set(user_code):
    from cnntrain.models import build_model, head_module

    model = build_model(model_cfg(name="custom", _target_="mynets.tiny_factory", width=6, depth=2), 3, (12, 10), 4)
    assert model.given == {"in_channels": 3, "image_size": (12, 10), "num_classes": 4, "width": 6, "depth": 2}
    assert model(torch.zeros(2, 3, 12, 10)).shape == (2, 4)
    # A class takes what its signature names; unset built-in keys are not passed (its own defaults hold).
    model = build_model(model_cfg(name="custom", _target_="mynets.TinyNet"), 1, (8, 8), 5)
    assert model.classifier.in_features == 8
    assert head_module(model) is model.classifier  # the last nn.Linear
    with pytest.raises(UserError, match="model.colour=red is not an argument of mynets.TinyNet"):
        build_model(model_cfg(name="custom", _target_="mynets.TinyNet", colour="red"), 1, (8, 8), 5)
    with pytest.raises(UserError, match="gives outputs of shape \\(2, 3\\) for a batch of 2; expected \\(2, 5\\)"):
        build_model(model_cfg(name="custom", _target_="mynets.WrongOutputs"), 1, (8, 8), 5)


def test_dropout_freezing_and_backbone_lr_act_on_the_classifier_or_are_refused(user_code, tmp_path):
    from cnntrain.models import build_model
    from cnntrain.optim import param_groups

    cfg = model_cfg(name="custom", _target_="mynets.TinyNet", dropout=0.5, freeze_backbone=True, backbone_lr_scale=0.1)
    model = build_model(cfg, 1, (8, 8), 3)
    assert not any(p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    # Dropout before the classifier in training only: eval outputs are deterministic, training ones are not.
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
    assert len(model.classifier._forward_pre_hooks) == 1
    groups = param_groups(model, OptimizerConfig(), cfg)
    assert sorted(g["lr"] for g in groups) == pytest.approx([1e-4, 1e-4, 1e-3, 1e-3])
    # model.weights: any state_dict; a classifier that does not fit the class count starts from scratch.
    torch.save(model.state_dict(), tmp_path / "w.pt")
    other = build_model(
        model_cfg(name="custom", _target_="mynets.TinyNet", weights=str(tmp_path / "w.pt")), 1, (8, 8), 7
    )
    assert torch.equal(other.features[0].weight, model.features[0].weight)
    # No classifier layer: what needs one is refused in one line; dropout too, as it takes no dropout argument.
    for key, value, text in (
        ("freeze_backbone", True, "true"),
        ("backbone_lr_scale", 0.5, "0.5"),
        ("dropout", 0.2, "0.2"),
    ):
        with pytest.raises(UserError, match=f"model.{key}={text} does not apply to .*mynets.NoHead"):
            build_model(model_cfg(name="custom", _target_="mynets.NoHead", **{key: value}), 1, (8, 8), 3)


def test_config_takes_own_keys_only_for_custom_models_and_plugins(user_code):
    validate(compose_fit(["model=custom", "model._target_=mynets.TinyNet", "+model.width=16", "+model.depth=3"]))
    validate(compose_fit(["model=demo_net", "+model.colour=red"]))  # checked against its signature when built
    with pytest.raises(UserError, match="unknown key 'model.depth' in 'model'"):
        validate(compose_fit(["model=resnet8", "+model.depth=3"]))
    with pytest.raises(UserError, match="model=custom needs model._target_"):
        validate(compose_fit(["model=custom"]))
    with pytest.raises(UserError, match="dataset._target_=mydata.build applies to dataset=custom only"):
        validate(compose_fit(["dataset._target_=mydata.build"]))


# --------------------------------------------------------------------------- your own dataset


def test_custom_dataset_dict_of_splits_with_class_names(user_code):
    from cnntrain.data import load_dataset

    data = load_dataset(dataset_cfg(name="custom", _target_="mydata.build", root="unused-root", n=30))
    assert data.classes == ["red", "green", "blue"]
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (30, 10, 10)
    assert data.channels == 3 and data.image_size == (12, 12)
    import mydata

    x, y = mydata._images(30, 12, 0)
    assert torch.equal(data.train_x, torch.from_numpy(x).permute(0, 3, 1, 2))  # HWC arrays -> CHW, unchanged
    assert data.train_y.tolist() == y.tolist()
    rows = data.split_rows()
    assert rows[0] == ("train:0", "red", "train") and rows[-1] == ("test:9", "red", "test")


def test_custom_dataset_one_pool_is_split_seeded_and_stratified_and_streams_like_resident(user_code):
    from cnntrain.data import load_dataset
    from cnntrain.data.batches import DatasetImages, sequential

    common = dict(name="custom", _target_="mydata.build", n=60, splits=False, tensors=True, image_size=8, channels=1)
    resident = load_dataset(dataset_cfg(**common))
    again = load_dataset(dataset_cfg(**common))
    assert (
        torch.equal(resident.val_x, again.val_x)
        and resident.items.index["val"].tolist() == again.items.index["val"].tolist()
    )
    assert (len(resident.train_y), len(resident.val_y), len(resident.test_y)) == (48, 6, 6)
    assert np.bincount(resident.val_y.numpy()).tolist() == [2, 2, 2]  # stratified
    assert resident.train_x.shape[1:] == (1, 8, 8)  # CHW tensors, converted to grayscale and resized
    streamed = load_dataset(dataset_cfg(**common, in_memory="false"))
    assert isinstance(streamed.train_x, DatasetImages)
    assert torch.equal(streamed.train_y, resident.train_y)
    pixels = torch.cat([b for b, _ in sequential(streamed.train_x, streamed.train_y, 16, torch.device("cpu"))])
    assert torch.equal(pixels, resident.train_x)


def test_custom_dataset_of_the_wrong_kind_is_one_line(user_code):
    from cnntrain.data import load_dataset

    with pytest.raises(UserError, match="the image is a torch.float32 tensor; return uint8 pixels"):
        load_dataset(dataset_cfg(name="custom", _target_="mydata.wrong_type"))
    with pytest.raises(UserError, match="is a generator, not a map-style torch Dataset"):
        load_dataset(dataset_cfg(name="custom", _target_="mydata.not_a_dataset"))
    with pytest.raises(UserError, match="dataset.colour=red is not an argument of mydata.build"):
        load_dataset(dataset_cfg(name="custom", _target_="mydata.build", colour="red"))


# --------------------------------------------------------------------------- a CSV of labels


def write_csv_folder(
    root: Path, n_per_class: int = 20, split: bool = True, int_labels: bool = False, extra_rows: tuple[str, ...] = ()
) -> Path:
    """root/img/*.png (three classes of 10x10 RGB blobs) and root/labels.csv."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = ["cat", "dog", "owl"]
    lines = ["path,label,split" if split else "path,label"]
    for i in range(3 * n_per_class):
        c = i % 3
        a = (rng.random((10, 10, 3)) * 60).astype(np.uint8)
        a[:, :, c] += 180
        Image.fromarray(a).save(root / "img" / f"{i:03d}.png")
        label = str(c) if int_labels else names[c]
        part = "train" if i < 2 * n_per_class * 3 // 3 else ("val" if i < 5 * n_per_class // 2 else "test")
        lines.append(f"img/{i:03d}.png,{label}" + (f",{part}" if split else ""))
    lines += extra_rows
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_csv_names_splits_and_the_recorded_split_file(tmp_path):
    from cnntrain.data import load_dataset

    root = write_csv_folder(tmp_path / "photos", 10)
    data = load_dataset(dataset_cfg(name="csv", root=str(root), file="labels.csv"))
    assert data.classes == ["cat", "dog", "owl"]
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (20, 5, 5)
    assert data.channels == 3 and data.image_size == (10, 10)
    expected = np.array(Image.open(root / "img" / "000.png")).transpose(2, 0, 1)
    assert torch.equal(data.train_x[0], torch.from_numpy(expected))
    assert data.split_rows()[0] == ("img/000.png", "cat", "train")
    # Without a split column: seeded, stratified fractions; integer labels are class indices.
    root2 = write_csv_folder(tmp_path / "ints", 10, split=False, int_labels=True)
    data = load_dataset(dataset_cfg(name="csv", root=str(root2), file="labels.csv", image_size=6, channels=1))
    assert data.classes == ["0", "1", "2"] and data.train_x.shape[1:] == (1, 6, 6)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (24, 3, 3)
    streamed = load_dataset(
        dataset_cfg(name="csv", root=str(root2), file="labels.csv", image_size=6, channels=1, in_memory="false")
    )
    assert torch.equal(streamed.test_x[:], data.test_x) and torch.equal(streamed.train_y, data.train_y)


def test_csv_problems_are_one_line_or_one_counted_warning(tmp_path):
    from cnntrain.data import load_dataset

    bad = ("img/gone.png,cat,train", "img/001.png,dog,train", "img/002.png,owl,holdout", "img/missing2.png,dog,val")
    root = write_csv_folder(tmp_path / "photos", 10, extra_rows=bad)
    cfg = dataset_cfg(name="csv", root=str(root), file="labels.csv")
    with pytest.warns(UserWarning) as caught:
        data = load_dataset(cfg)
    (warning,) = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert "left out 4 row(s): 2 missing file(s), 1 duplicate path(s), 1 unknown split value(s)" in warning
    assert len(data.train_y) == 20  # the good rows only
    cfg.on_corrupt = "error"
    with pytest.raises(UserError, match=f"labels.csv line 32: {root / 'img' / 'gone.png'} does not exist"):
        load_dataset(cfg)
    # An empty class: a warning under skip, one line under error.
    (root / "labels.csv").write_text(
        "path,label\nimg/000.png,0\nimg/001.png,2\nimg/003.png,0\nimg/004.png,2\n"
        "img/006.png,0\nimg/007.png,2\nimg/009.png,0\nimg/010.png,2\n"
        "img/012.png,0\nimg/013.png,2\n"
    )
    with pytest.raises(UserError, match="class 1 has no training images"):
        load_dataset(cfg)
    cfg.on_corrupt = "skip"
    with pytest.warns(UserWarning, match="1 class\\(es\\) without training images: 1"):
        assert load_dataset(cfg).classes == ["0", "1", "2"]


# --------------------------------------------------------------------------- installed plug-ins


def test_entry_points_register_models_and_datasets_without_importing_them(user_code, capsys):
    assert MODELS.plugins()["demo_net"].package == "cnntrain-demo"
    assert DATASETS.plugin("demo_digits").value == "cnntrain_demo:demo_digits"
    assert "cnntrain_demo" not in sys.modules  # listed from metadata only
    code, out, err = cli_in_process(["list"], capsys)
    assert code == 0, err
    assert "demo_net" in out and "demo_digits" in out and "plug-in: cnntrain-demo 0.1" in out
    assert "cnntrain_demo" not in sys.modules
    cfg = compose_fit(["model=demo_net", "dataset=demo_digits", "model.width=4"])
    validate(cfg)
    from cnntrain.data import load_dataset
    from cnntrain.models import build_model, head_module

    data = load_dataset(cfg.dataset)
    assert data.name == "demo_digits" and data.classes == ["horizontal", "vertical", "diagonal"]
    assert data.channels == 1 and data.image_size == (16, 16)  # grayscale PIL images
    model = build_model(cfg.model, data.channels, data.image_size, data.num_classes)
    assert head_module(model) is model.head
    with pytest.raises(UserError, match="unknown model 'demo_nett' \\(did you mean 'demo_net'\\?\\)"):
        MODELS.get("demo_nett")


# --------------------------------------------------------------------------- your own configs


def test_init_writes_a_project_whose_configs_join_the_search_path(tmp_path, monkeypatch, capsys):
    code, out, err = cli_in_process(["init", str(tmp_path / "proj")], capsys)
    assert code == 0, err
    proj = tmp_path / "proj"
    for name in ("configs/experiment/example.yaml", "models.py", "README.md"):
        assert (proj / name).is_file(), name
    code, _, err = cli_in_process(["init", str(proj)], capsys)
    assert code == 2 and "never overwrites" in err
    # From inside the folder: its options join the built-in ones; a file named like a built-in replaces it.
    (proj / "configs" / "model").mkdir()
    (proj / "configs" / "model" / "tiny_cnn.yaml").write_text("# mine\nname: simple_cnn\nwidth: 3\n")
    monkeypatch.chdir(proj)
    take_config_dir_flags([])
    cfg = compose_fit(["experiment=example"])
    validate(cfg)
    assert (cfg.model.name, cfg.model._target_, cfg.name) == ("custom", "models.ExampleNet", "example")
    assert compose_fit(["model=tiny_cnn"]).model.width == 3
    assert compose_fit(["model=resnet8"]).model.name == "resnet8"  # the built-in ones are still there
    code, out, err = cli_in_process(["list"], capsys)
    assert code == 0, err
    assert "yours, replaces the built-in" in out and "example" in out
    rows = [line for line in out.splitlines() if line.startswith("│ example")]
    assert rows and "yours" in rows[0]
    # --config-dir from elsewhere.
    monkeypatch.chdir(tmp_path)
    assert take_config_dir_flags(["--config-dir", str(proj / "configs"), "x=1"]) == ["x=1"]
    assert compose_fit(["experiment=example"]).name == "example"
    take_config_dir_flags([])
    with pytest.raises(UserError, match="unknown experiment 'example'"):
        compose_fit(["experiment=example"])


@pytest.mark.slow
def test_init_project_trains_with_no_flags_and_says_which_files_replace_builtins(tmp_path):
    proc = run_cli(["init", "proj"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    proj = tmp_path / "proj"
    proc = run_cli(["fit", "experiment=example"], proj)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = run_dirs(proj)
    # Seeds 0-7 of the example recipe: test accuracy 0.776-0.928 on the 500 test digits (chance 0.1); a floor
    # below every trajectory, since the layout probe and a busy worker change the trajectory as a seed would.
    assert summary(run_dir)["status"] == "completed" and summary(run_dir)["test_acc"] > 0.7
    assert "models.ExampleNet" in proc.stdout
    (proj / "configs" / "trainer").mkdir()
    (proj / "configs" / "trainer" / "default.yaml").write_text("# my trainer defaults\nbatch_size: 64\n")
    proc = run_cli(["fit", "experiment=example", "--cfg", "job"], proj)
    assert proc.returncode == 0, proc.stderr
    assert (
        f"cnntrain: note: your {proj / 'configs' / 'trainer' / 'default.yaml'} replaces the built-in trainer "
        "option 'default'" in proc.stderr
    )
    assert "batch_size: 64" in proc.stdout


# --------------------------------------------------------------------------- end to end, through the CLI

# Each extension with the rest built-in or another extension: trained (killed at step KILL_AT, after the
# step checkpoint of step KILL_AT - 1, and resumed), swept, then evaluated, used for predict and exported to ONNX.
KILL_AT = 5
KINDS = {
    # The model module (in the run's folder) on images with a CSV of labels; the sweep streams one job.
    "model+csv": [
        "model=custom",
        "model._target_=mynets.TinyNet",
        "+model.width=6",
        "dataset=csv",
        "dataset.root={cwd}/photos",
        "dataset.file=labels.csv",
    ],
    # The dataset factory (one pool, split by cnntrain) with a built-in model.
    "dataset": [
        "dataset=custom",
        "dataset._target_=mydata.build",
        "+dataset.n=60",
        "+dataset.splits=false",
        "model=resnet8",
        "model.width=4",
    ],
    # The installed package: its model and its dataset.
    "plugin": ["model=demo_net", "dataset=demo_digits", "+dataset.n=60", "model.width=4", "model.dropout=0.1"],
}
SWEEPS = {
    "model+csv": "dataset.in_memory=true,false",
    "dataset": "dataset.in_memory=true,false",
    "plugin": "model.width=4,6",
}
COMMON = ["trainer.batch_size=8", "trainer.progress=plain", "trainer.deterministic=true", "trainer.precision=32"]


def _env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(SITE)])}  # the demo package is "installed"


@pytest.fixture(scope="module", params=list(KINDS))
def trained(request, tmp_path_factory):
    """A run of this kind: killed mid-epoch 2, then resumed to the end; and a 2-job sweep beside it."""
    kind = request.param
    cwd = tmp_path_factory.mktemp(kind.replace("+", "_"))
    shutil.copy(PLUGINS / "mynets.py", cwd)  # the folder cnntrain runs from is importable
    shutil.copy(PLUGINS / "mydata.py", cwd)
    write_csv_folder(cwd / "photos", 12)
    args = [a.replace("{cwd}", str(cwd)) for a in KINDS[kind]]
    sweep = run_cli(["fit", "--multirun", *args, *COMMON, "trainer.epochs=1", SWEEPS[kind]], cwd, env=_env())
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    jobs = sorted(p.parent for p in (cwd / "runs").glob("*/multirun/*/*/summary.json"))
    killed = run_faulty(
        [f"kill-at-step={KILL_AT}"],
        ["fit", *args, *COMMON, "trainer.epochs=2", "trainer.checkpoint_every_n_steps=2"],
        cwd,
        env=_env(),
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    (run_dir,) = [d for d in run_dirs(cwd) if "multirun" not in str(d)]
    resumed = run_cli(["fit", f"resume={run_dir}"], cwd, env=_env())
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return kind, cwd, run_dir, jobs, resumed


@pytest.mark.slow
def test_each_extension_is_killed_resumed_and_swept(trained):
    kind, cwd, run_dir, jobs, resumed = trained
    assert f"{KILL_AT - 1} steps" in resumed.stdout  # from the last step checkpoint before the kill
    s = summary(run_dir)
    assert s["status"] == "completed" and s["epochs_done"] == 2
    with open(run_dir / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]  # none repeated
    assert len(jobs) == 2 and all(summary(j)["status"] == "completed" for j in jobs)
    if SWEEPS[kind].startswith("dataset.in_memory"):  # resident and streamed: the same training, bit for bit
        a, b = (torch.load(j / "checkpoints" / "last.pt", weights_only=True)["model"] for j in jobs)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert summary(jobs[0])["test_acc"] == summary(jobs[1])["test_acc"]
    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    if kind == "model+csv":
        assert ckpt["config"]["model"]["_target_"] == "mynets.TinyNet" and ckpt["config"]["model"]["width"] == 6
        assert ckpt["meta"]["module_file"] == str(cwd / "mynets.py")
    if kind == "plugin":
        assert ckpt["meta"]["package"] == "cnntrain-demo"
    # The splits cnntrain made, recorded; for CSV data a labels file that reproduces them.
    with open(run_dir / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert list(rows[0]) == (["path", "label", "split"] if kind == "model+csv" else ["item", "label", "split"])


@pytest.mark.slow
def test_each_extension_is_evaluated_predicted_and_exported_from_the_checkpoint(trained, monkeypatch, capsys):
    kind, cwd, run_dir, _, _ = trained
    monkeypatch.chdir(cwd)  # as a user runs them: from the project folder
    monkeypatch.syspath_prepend(str(SITE))
    MODELS.refresh()
    DATASETS.refresh()
    try:
        code, out, err = cli_in_process(["evaluate", f"ckpt={run_dir}", "tensorboard=false"], capsys)
        assert code == 0, err
        (record,) = [json.loads(p.read_text()) for p in (run_dir / "evaluate").glob("*/metrics.json")]
        assert record["acc"] == pytest.approx(summary(run_dir)["test_acc"], abs=1e-6)  # fit's test (6 decimals)

        from cnntrain.data import load_dataset
        from cnntrain.engine.inference import load_trained, model_config  # noqa: F401

        trained_model = load_trained(str(run_dir))
        stored = OmegaConf.structured(DatasetConfig)
        OmegaConf.set_struct(stored, False)
        data = load_dataset(OmegaConf.to_object(OmegaConf.merge(stored, trained_model.config["dataset"])))
        folder = cwd / "to_predict"
        folder.mkdir(exist_ok=True)
        for i in range(3):
            a = data.test_x[i].numpy()
            Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)).save(folder / f"{i}.png")
        code, out, err = cli_in_process(["predict", f"ckpt={run_dir}", f"inputs={folder}", "precision=32"], capsys)
        assert code == 0, err
        (predictions,) = (run_dir / "predict").glob("*/predictions.csv")  # a folder per call
        with open(predictions) as f:
            got = [r["class_1"] for r in csv.DictReader(f)]
        with torch.no_grad():
            x = trained_model.preprocess.normalise("cpu").from_uint8(data.test_x[:3])
            want = trained_model.model(x).argmax(1).tolist()
        assert got == [trained_model.classes[c] for c in want]

        pytest.importorskip("onnxruntime")
        code, out, err = cli_in_process(["export", f"ckpt={run_dir}", "format=onnx"], capsys)
        assert code == 0, err
        assert "outputs match the eager model" in out
        assert json.loads((run_dir / "export" / "preprocess.json").read_text())["exports"]["onnx"]["ok"]
    finally:
        for name in ("mynets", "mydata", "cnntrain_demo"):
            sys.modules.pop(name, None)
        MODELS.refresh()
        DATASETS.refresh()


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["model+csv"], indirect=True)
def test_a_checkpoint_whose_module_is_not_importable_says_where_it_was(trained, tmp_path):
    _, cwd, run_dir, _, _ = trained
    proc = run_cli(["export", f"ckpt={run_dir}", "format=torchscript"], tmp_path)  # not the project folder
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "module 'mynets' cannot be imported here" in line and f"PYTHONPATH={cwd}" in line
