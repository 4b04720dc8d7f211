"""The catalogue of bad input: one row per mistake a user can make, each through the real CLI.

Every row must end with a non-zero exit, exactly one `cnntrain: error:` line that names the offending
key or file (the fragments in `expect`), nothing else on stderr, no traceback, and no run directory
left under runs/ (a resumed run's recorded config is left as it was). The rows run a few at a time:
most fail before torch is imported (well under a second), the rest after loading data or a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.faults import flip_a_byte

ROOT = os.geteuid() == 0
PLUGINS = REPO / "tests" / "plugins"


@dataclass
class Case:
    id: str
    args: list[str]
    expect: list[str]  # fragments of the error line; {data} and {run} are filled in
    damage: str | None = None  # resume rows: how their copy of a finished run is broken (see _damage)
    needs_non_root: bool = False  # root writes into read-only directories anyway
    lines: int = 1  # a sweep with several bad values: the error line, then one line for each


CASES = [
    # Config composition and schema: refused before torch is imported.
    Case("unknown-group-option", ["model=resnt8"], ["unknown model 'resnt8' (did you mean 'resnet8'?)"]),
    Case("unknown-optimizer", ["optimizer=adan"], ["unknown optimizer 'adan' (did you mean 'adam'?)"]),
    Case("unknown-experiment", ["experiment=smok"], ["unknown experiment 'smok' (did you mean 'smoke'?)"]),
    Case("misspelt-group", ["optimiser=adam"], ["unknown key 'optimiser' (did you mean 'optimizer'?)"]),
    Case("misspelt-key", ["trainer.epoch=3"], ["unknown key 'trainer.epoch'", "(did you mean 'epochs'?)"]),
    Case("added-unknown-key", ["+trainer.epoch=3"], ["unknown key 'trainer.epoch'", "(did you mean 'epochs'?)"]),
    Case("key-without-its-group", ["lr=0.01"], ["unknown key 'lr'", "(did you mean 'optimizer.lr'?)"]),
    Case("key-in-the-wrong-group", ["trainer.lr=0.01"], ["unknown key 'trainer.lr'", "(did you mean 'optimizer.lr'?)"]),
    Case("option-instead-of-override", ["--lr", "0.01"], ["takes no option '--lr'", "write optimizer.lr=0.01"]),
    Case("option-with-equals", ["--batch-size=64"], ["takes no option '--batch-size'", "write trainer.batch_size=64"]),
    Case("two-hydra-modes", ["--multirun", "--cfg", "job"], ["Only one of --run, --multirun, --cfg"]),
    Case("wrong-type-int", ["trainer.epochs=abc"], ["trainer.epochs", "'abc'"]),
    Case("wrong-type-float", ["optimizer.lr=fast"], ["optimizer.lr", "'fast'"]),
    Case("wrong-type-bool", ["trainer.deterministic=maybe"], ["trainer.deterministic", "'maybe'"]),
    Case("bad-override-syntax", ["trainer.epochs=[1"], ["cannot parse the override 'trainer.epochs=[1'"]),
    Case("override-without-value", ["trainer.epochs"], ["cannot parse the override", "'trainer.epochs'"]),
    Case("batch-size-zero", ["trainer.batch_size=0"], ["trainer.batch_size=0 must be at least 1"]),
    Case("epochs-zero", ["trainer.epochs=0"], ["trainer.epochs=0 must be at least 1"]),
    Case("micro-batch-zero", ["trainer.micro_batch=0"], ["trainer.micro_batch=0 must be at least 1"]),
    Case("micro-batch-negative", ["trainer.micro_batch=-8"], ["trainer.micro_batch=-8 must be at least 1"]),
    Case(
        "micro-batch-above-batch",
        ["trainer.batch_size=32", "trainer.micro_batch=64"],
        ["trainer.micro_batch=64 is larger than trainer.batch_size=32", "use at most 32"],
    ),
    Case(
        "micro-batch-not-a-number",
        ["trainer.micro_batch=half"],
        ["trainer.micro_batch=half must be null, auto or a number of images"],
    ),
    Case("lr-negative", ["optimizer.lr=-1"], ["optimizer.lr=-1.0 must be > 0"]),
    Case("lr-zero", ["optimizer.lr=0"], ["optimizer.lr=0.0 must be > 0"]),
    Case("val-fraction-above-one", ["dataset.val_fraction=1.5"], ["dataset.val_fraction=1.5 must be between 0 and 1"]),
    Case("val-fraction-zero", ["dataset.val_fraction=0"], ["dataset.val_fraction=0.0 must be between 0 and 1"]),
    Case("unknown-precision", ["trainer.precision=fp8"], ["trainer.precision=fp8 is not a valid choice"]),
    Case(
        "misspelt-choice", ["trainer.monitor=val/accuracy"], ["trainer.monitor=val/accuracy", "did you mean 'val/acc'"]
    ),
    Case("name-is-a-path", ["name=../elsewhere"], ["name=../elsewhere must be a plain folder name"]),
    Case(
        "run-dir-under-a-file",
        ["hydra.run.dir={data}/a_file/run"],
        ["cannot create the run directory {data}/a_file/run", "hydra.run.dir"],
    ),
    Case(
        "run-dir-read-only",
        ["hydra.run.dir={data}/read_only/run"],
        ["cannot create the run directory {data}/read_only/run", "Permission denied"],
        needs_non_root=True,
    ),
    # Device and precision: need torch.
    Case("cuda-without-cuda", ["trainer.device=cuda"], ["trainer.device=cuda but no CUDA GPU is available"]),
    Case("fp16-on-cpu", ["trainer.precision=fp16", "trainer.device=cpu"], ["trainer.precision=fp16 needs a GPU"]),
    Case("unknown-device", ["trainer.device=tpu"], ["trainer.device=tpu is not a device"]),
    # Data.
    Case("unknown-dataset", ["dataset.name=cifar11"], ["unknown dataset 'cifar11' (did you mean 'cifar10'?)"]),
    Case("imagefolder-without-root", ["dataset=imagefolder"], ["dataset=imagefolder needs dataset.root"]),
    Case(
        "missing-data-dir",
        ["dataset=imagefolder", "dataset.root={data}/nowhere"],
        ["dataset.root={data}/nowhere does not exist"],
    ),
    Case(
        "missing-idx-dir",
        ["dataset=fashion_mnist", "dataset.root={data}/nowhere"],
        ["Fashion-MNIST not found", "in {data}/nowhere,", "dataset.root"],
    ),
    Case("empty-data-dir", ["dataset=imagefolder", "dataset.root={data}/empty"], ["{data}/empty has no class folders"]),
    Case(
        "empty-idx-dir",
        ["dataset=fashion_mnist", "dataset.root={data}/empty"],
        ["Fashion-MNIST not found", "{data}/empty"],
    ),
    Case(
        "non-image-files",
        ["dataset=imagefolder", "dataset.root={data}/not_images"],
        ["no image under {data}/not_images could be decoded", "{data}/not_images/a/0.png"],
    ),
    Case(
        "no-image-files",
        ["dataset=imagefolder", "dataset.root={data}/text_files"],
        ["class folder {data}/text_files/a has no images"],
    ),
    Case(
        "mixed-sizes-without-image-size",
        ["dataset=imagefolder", "dataset.root={data}/mixed_sizes"],
        ["images under {data}/mixed_sizes differ in size", "dataset.image_size=N"],
    ),
    Case(
        "truncated-idx",
        ["dataset=fashion_mnist", "dataset.root={data}/truncated_idx"],
        ["{data}/truncated_idx/train-images-idx3-ubyte: truncated idx file"],
    ),
    Case(
        "labels-images-mismatch",
        ["dataset=fashion_mnist", "dataset.root={data}/mismatched_idx"],
        ["{data}/mismatched_idx/train-images-idx3-ubyte has 60 images", "train-labels-idx1-ubyte has 50 labels"],
    ),
    Case(
        "model-too-big-for-images",
        ["dataset=imagefolder", "dataset.root={data}/tiny_images", "model=simple_cnn"],
        ["model simple_cnn needs images of at least 18x18 pixels", "4x4"],
    ),
    # Your own model, dataset and CSV (the modules are tests/plugins/mynets.py and mydata.py, on PYTHONPATH).
    Case("custom-without-target", ["model=custom"], ["model=custom needs model._target_=module.name"]),
    Case(
        "target-without-custom",
        ["model._target_=mynets.TinyNet"],
        ["model._target_=mynets.TinyNet applies to model=custom only", "add model=custom"],
    ),
    Case(
        "custom-module-missing",
        ["model=custom", "model._target_=nosuchmodule.Net"],
        ["model._target_=nosuchmodule.Net: cannot import module 'nosuchmodule'", "PYTHONPATH"],
    ),
    Case(
        "custom-class-missing",
        ["model=custom", "model._target_=mynets.TinyNte"],
        ["model._target_=mynets.TinyNte: mynets", "has no attribute 'TinyNte' (did you mean 'TinyNet'?)"],
    ),
    Case(
        "custom-wrong-outputs",
        ["model=custom", "model._target_=mynets.WrongOutputs", "dataset.subset=100"],
        ["model mynets.WrongOutputs gives outputs of shape (2, 3) for a batch of 2; expected (2, 10)"],
    ),
    Case(
        "custom-unknown-argument",
        ["model=custom", "model._target_=mynets.TinyNet", "+model.colour=red"],
        ["model.colour=red is not an argument of mynets.TinyNet", "width"],
    ),
    Case(
        "custom-not-a-class",
        ["model=custom", "model._target_=mynets.NOT_CALLABLE"],
        ["mynets.NOT_CALLABLE is a int, not an nn.Module class or a function"],
    ),
    Case(
        "custom-freeze-without-head",
        ["model=custom", "model._target_=mynets.NoHead", "model.freeze_backbone=true", "dataset.subset=100"],
        ["model.freeze_backbone=true does not apply to model mynets.NoHead", "no classifier layer"],
    ),
    Case("builtin-model-own-key", ["model=resnet8", "+model.depth=3"], ["unknown key 'model.depth' in 'model'"]),
    Case(
        "dataset-wrong-type",
        ["dataset=custom", "dataset._target_=mydata.wrong_type"],
        ["mydata.wrong_type[0]: the image is a torch.float32 tensor", "uint8"],
    ),
    Case(
        "dataset-not-a-dataset",
        ["dataset=custom", "dataset._target_=mydata.not_a_dataset"],
        ["mydata.not_a_dataset is a generator, not a map-style torch Dataset"],
    ),
    Case(
        "dataset-unknown-argument",
        ["dataset=custom", "dataset._target_=mydata.build", "+dataset.colour=red"],
        ["dataset.colour=red is not an argument of mydata.build"],
    ),
    Case(
        "csv-missing-file",
        ["dataset=csv", "dataset.root={data}/csv_missing", "dataset.on_corrupt=error"],
        ["labels.csv line 4: {data}/csv_missing/img/gone.png does not exist"],
    ),
    Case(
        "csv-unknown-split",
        ["dataset=csv", "dataset.root={data}/csv_split", "dataset.on_corrupt=error"],
        ["labels.csv line 3: split 'training' is not one of train, val, test"],
    ),
    Case(
        "csv-duplicate-path",
        ["dataset=csv", "dataset.root={data}/csv_duplicate", "dataset.on_corrupt=error"],
        ["labels.csv line 5: img/0.png is listed already (line 2)"],
    ),
    Case(
        "csv-empty-class",
        ["dataset=csv", "dataset.root={data}/csv_gap", "dataset.on_corrupt=error"],
        ["{data}/csv_gap/labels.csv: class 1 has no training images"],
    ),
    # A misspelt label makes a class of one image: a warning that names the setting that makes it this error.
    Case(
        "csv-misspelt-label",
        ["dataset=csv", "dataset.root={data}/csv_misspelt", "dataset.min_class_images=2"],
        ["{data}/csv_misspelt/labels.csv: class circel (1 image) looks like circle (12)", "dataset.min_class_images=2"],
    ),
    Case("csv-no-path-column", ["dataset=csv", "dataset.root={data}/csv_header"], ["has no 'path' column"]),
    Case(
        "csv-no-labels-file",
        ["dataset=csv", "dataset.root={data}/csv_missing", "dataset.file=nope.csv"],
        ["dataset.file=nope.csv: no such file {data}/csv_missing/nope.csv"],
    ),
    # Imbalanced classes and k-fold cross-validation.
    Case(
        "class-weights-wrong-length",
        ["trainer.class_weights=[1,10]"],
        ["trainer.class_weights has 2 weights but the dataset has 10 classes", "one weight per class"],
    ),
    Case(
        "class-weights-unknown-word",
        ["trainer.class_weights=inverse"],
        ["trainer.class_weights=inverse must be null, balanced or a list of numbers"],
    ),
    Case("class-weights-negative", ["trainer.class_weights=[1,-1]"], ["trainer.class_weights=[1, -1] must be"]),
    Case("unknown-sampler", ["dataset.sampler=weighted"], ["dataset.sampler=weighted is not a valid choice"]),
    Case("folds-one", ["trainer.folds=1"], ["trainer.folds=1 must be at least 2"]),
    Case(
        "fold-out-of-range", ["trainer.folds=3", "trainer.fold=3"], ["trainer.fold=3 must be in 0 .. trainer.folds-1"]
    ),
    Case("fold-without-folds", ["trainer.fold=1"], ["trainer.fold=1 needs trainer.folds=K"]),
    Case(
        "pruner-without-optuna",
        ["sweep.pruner=median"],
        ["sweep.pruner=median prunes the trials of an Optuna study", "hydra/sweeper=optuna"],
    ),
    Case("pruner-unknown", ["sweep.pruner=asha"], ["sweep.pruner=asha is not a valid choice"]),
    # Multi-label data (label cells a|b, - for none).
    Case(
        "csv-multilabel-empty-cell",
        ["dataset=csv", "dataset.root={data}/csv_multilabel_empty"],
        [
            "labels.csv line 3: the label cell of img/1.png is empty",
            "in a multi-label CSV every row names its labels (a|b), or - for an image with none of them",
        ],
    ),
    Case("threshold-out-of-range", ["trainer.threshold=1.5"], ["trainer.threshold=1.5 must be between 0 and 1"]),
    Case(
        "threshold-on-single-label-data",
        ["trainer.threshold=0.3"],
        ["trainer.threshold=0.3 applies to multi-label data", "this dataset gives one class per image"],
    ),
    Case(
        "monitor-map-on-single-label-data",
        ["trainer.monitor=val/map"],
        ["trainer.monitor=val/map is the mean average precision of multi-label runs", "use val/acc or val/loss"],
    ),
    Case(
        "balanced-sampler-on-multilabel-data",
        ["dataset=csv", "dataset.root={data}/csv_multilabel", "dataset.sampler=balanced"],
        ["dataset.sampler=balanced draws images by their class", "trainer.class_weights=balanced"],
    ),
    # Resume.
    # A sweep is checked job by job before its first job trains; a value list needs --multirun.
    Case(
        "sweep-bad-value",
        ["--multirun", "experiment=smoke", "optimizer.lr=1e-3,-1"],
        ["optimizer.lr=-1.0 must be > 0, in 1 job(s): optimizer.lr=-1", "nothing of the sweep (2 jobs) was trained"],
    ),
    Case(
        "sweep-two-bad-values",
        ["--multirun", "experiment=smoke", "optimizer.lr=1e-3,-1", "trainer.epochs=1,0"],
        [
            "3 of the sweep's 4 jobs have bad values; nothing was trained",
            "trainer.epochs=0 must be at least 1",
            "optimizer.lr=-1.0 must be > 0",
        ],
        lines=3,
    ),
    Case(
        "sweep-unknown-option",
        ["--multirun", "experiment=smoke", "model=tiny_cnn,resnt8"],
        ["unknown model 'resnt8'", "in 1 job(s): model=resnt8"],
    ),
    Case(
        "sweep-without-multirun",
        ["optimizer.lr=1e-3,3e-3"],
        ["optimizer.lr=1e-3,3e-3 gives several values", "cnntrain fit --multirun optimizer.lr=1e-3,3e-3"],
    ),
    Case("resume-missing", ["resume={data}/nowhere"], ["checkpoint or run directory not found: {data}/nowhere"]),
    Case("resume-not-a-run", ["resume={data}/a_file"], ["{data} is not a cnntrain run directory"]),
    Case("resume-no-checkpoint", ["resume={run}"], ["no checkpoint in run directory {run}"], damage="remove"),
    Case(
        "resume-last-missing",
        ["resume={run}"],
        ["no checkpoint in run directory {run}", "cnntrain fit resume={run}/checkpoints/last.prev.pt"],
        damage="remove-last",
    ),
    Case(
        "resume-truncated",
        ["resume={run}"],
        [
            "cannot read checkpoint {run}/checkpoints/last.pt",
            "truncated",
            "cnntrain fit resume={run}/checkpoints/last.prev.pt",
        ],
        damage="truncate",
    ),
    Case(
        "resume-corrupt",
        ["resume={run}"],
        [
            "checkpoint {run}/checkpoints/last.pt is corrupt",
            "checksum",
            "cnntrain fit resume={run}/checkpoints/last.prev.pt",
        ],
        damage="flip",
    ),
    Case(
        "resume-pickled-code",
        ["resume={run}"],
        ["refusing to load {run}/checkpoints/last.pt", "posix.system"],
        damage="booby-trap",
    ),
    # A resume continues the run it names: what would make it another run is refused, with the way out.
    Case(
        "resume-other-architecture",
        ["resume={run}", "model=resnet8"],
        [
            "resume cannot change model.name (simple_cnn -> resnet8)",
            "its weights do not fit the model of model.name=resnet8",
            "to train that as a new run: cnntrain fit experiment=smoke model=resnet8",
        ],
        damage="none",
    ),
    Case(
        "resume-other-dataset",
        ["resume={run}", "dataset=fashion_mnist", "trainer.epochs=5"],
        [
            "resume cannot change dataset.name (mnist5k -> fashion_mnist)",
            "would mix two datasets",
            "model.weights={run}/checkpoints/last.pt",
        ],
        damage="none",
    ),
    Case(
        "resume-other-subset",
        ["resume={run}", "dataset.subset=500", "trainer.epochs=5"],
        ["resume cannot change dataset.subset (1000 -> 500)"],
        damage="none",
    ),
    Case(
        "resume-other-recipe",
        ["resume={run}", "optimizer.lr=0.1", "trainer.epochs=5"],
        ["resume cannot change optimizer.lr (0.003 -> 0.1)"],
        damage="none",
    ),
    Case(
        "resume-other-data",
        ["resume={run}", "trainer.epochs=5"],
        [
            "resume: the mnist5k data (embedded) are not the data the run in {run} was trained on",
            "data fingerprint",
            "model.weights={run}/checkpoints/last.pt",
        ],
        damage="fingerprint",
    ),
    Case(
        "resume-other-class-count",
        ["resume={run}"],
        ["checkpoint {run}/checkpoints/last.pt was trained for 5 classes", "the dataset has 10"],
        damage="classes",
    ),
    Case(
        "resume-weights-only",
        ["resume={run}/checkpoints/best.pt"],
        ["{run}/checkpoints/best.pt holds model weights only", "model.weights={run}/checkpoints/best.pt"],
        damage="none",
    ),
    Case("resume-finished-run", ["resume={run}"], ["already finished 3 epochs", "trainer.epochs=N"], damage="none"),
]


# --------------------------------------------------------------------------- fixtures


def _idx(path: Path, array: np.ndarray, cut: int = 0) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(data[: len(data) - cut])


def _idx_set(folder: Path, n_train: int, n_train_labels: int, cut: int = 0) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    _idx(folder / "train-images-idx3-ubyte", rng.integers(0, 255, (n_train, 28, 28)), cut)
    _idx(folder / "train-labels-idx1-ubyte", np.arange(n_train_labels) % 10)
    _idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 255, (20, 28, 28)))
    _idx(folder / "t10k-labels-idx1-ubyte", np.arange(20) % 10)


def _images(folder: Path, sizes: list[int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / cls / f"{i}.png")


def _make_data(data: Path) -> None:
    (data / "a_file").write_text("a regular file, not a directory\n")
    (data / "empty").mkdir()
    for cls in ("a", "b"):
        for name, suffix in (("not_images", ".png"), ("text_files", ".txt")):
            (data / name / cls).mkdir(parents=True)
            for i in range(5):
                (data / name / cls / f"{i}{suffix}").write_text("hello")
    _images(data / "mixed_sizes", [10, 8] * 3)
    _images(data / "tiny_images", [4] * 10)
    _idx_set(data / "truncated_idx", 60, 60, cut=100)
    _idx_set(data / "mismatched_idx", 60, 50)
    (data / "read_only").mkdir()
    (data / "read_only").chmod(0o555)
    _csv(data / "csv_missing", ["img/0.png,a", "img/1.png,b", "img/gone.png,a"])
    _csv(data / "csv_split", ["img/0.png,a,train", "img/1.png,b,training"], header="path,label,split")
    _csv(data / "csv_duplicate", ["img/0.png,a", "img/1.png,b", "img/2.png,a", "img/0.png,b"])
    _csv(data / "csv_gap", ["img/0.png,0", "img/1.png,2", "img/2.png,0", "img/3.png,2"])
    _csv(data / "csv_header", ["img/0.png,a", "img/1.png,b"], header="file,label")
    _csv(data / "csv_multilabel_empty", ["img/0.png,a|b", "img/1.png,", "img/2.png,a", "img/3.png,b"])
    _csv(data / "csv_multilabel", [f"img/{i}.png,{('a|b', 'a', 'b', '-')[i % 4]}" for i in range(24)])
    _csv(
        data / "csv_misspelt",
        [f"img/{i}.png,{'circle' if i % 2 else 'square'}" for i in range(24)] + ["img/24.png,circel"],
    )


def _csv(folder: Path, rows: list[str], header: str = "path,label") -> None:
    """A CSV folder: labels.csv with these rows, and an 8x8 image for each path in them except img/gone.png."""
    from PIL import Image

    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for row in rows:
        path = row.split(",")[0]
        if path != "img/gone.png" and not (folder / path).exists():
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / path)
    (folder / "labels.csv").write_text("\n".join([header, *rows]) + "\n")


def _damage(run: Path, how: str, marker: Path) -> None:
    import torch

    last = run / "checkpoints" / "last.pt"
    if how == "remove":
        shutil.rmtree(run / "checkpoints")
    elif how == "remove-last":
        last.unlink()
    elif how == "truncate":
        last.write_bytes(last.read_bytes()[:1000])
    elif how == "flip":
        flip_a_byte(last)
    elif how == "booby-trap":

        class Trap:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        state = torch.load(last, weights_only=True)
        state["meta"] = Trap()
        torch.save(state, last)
    elif how == "classes":
        state = torch.load(last, weights_only=True)
        state["meta"]["classes"] = state["meta"]["classes"][:5]
        torch.save(state, last)
    elif how == "fingerprint":  # the run was trained on other images than the ones there now
        state = torch.load(last, weights_only=True)
        state["meta"]["data_fingerprint"] = "0" * 64
        torch.save(state, last)


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    cwd: Path
    data: Path
    run: Path | None
    recorded: dict[str, bytes] | None  # the resumed run's .hydra/*.yaml before the attempt


def _fill(text: str, data: Path, run: Path | None) -> str:
    return text.replace("{data}", str(data)).replace("{run}", str(run))


def _attempt(case: Case, base: Path, data: Path, finished_run: Path) -> Outcome:
    cwd = base / case.id
    cwd.mkdir()
    run = recorded = None
    if case.damage is not None:
        run = base / "resumable" / case.id / finished_run.name
        shutil.copytree(finished_run, run)
        _damage(run, case.damage, data / "pwned")
        recorded = {p.name: p.read_bytes() for p in (run / ".hydra").glob("*.yaml")}
    # tests/plugins: the model and dataset modules of the custom rows.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(PLUGINS)])}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [_fill(a, data, run) for a in case.args]
    proc = subprocess.run(
        [sys.executable, "-m", "cnntrain", "fit", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )
    return Outcome(proc, cwd, data, run, recorded)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, smoke_run) -> dict[str, Outcome]:
    """Every row, run three at a time (most of a row is interpreter start-up and imports)."""
    base = tmp_path_factory.mktemp("bad_input")
    data = base / "data"
    data.mkdir()
    _make_data(data)
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {
                c.id: pool.submit(_attempt, c, base, data, smoke_run) for c in CASES if not (c.needs_non_root and ROOT)
            }
            return {key: f.result() for key, f in futures.items()}
    finally:
        (data / "read_only").chmod(0o755)


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=[pytest.mark.skipif(c.needs_non_root and ROOT, reason="runs as root")])
        for c in CASES
    ],
)
def test_bad_input_is_refused_with_one_line(outcomes, case):
    out = outcomes[case.id]
    proc = out.proc
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == case.lines and lines[0].startswith("cnntrain: error: "), proc.stderr
    assert not any("cnntrain:" in ln for ln in lines[1:]), proc.stderr
    for fragment in case.expect:
        assert _fill(fragment, out.data, out.run) in " ".join(lines)
    # No clutter: a failed start leaves no run directory, a failed resume leaves the run as it was.
    runs = out.cwd / "runs"
    assert not runs.exists() or not [p for p in runs.rglob("*") if p.is_file()], "a failed start left files in runs/"
    if out.run is not None and (out.run / ".hydra").exists():
        assert {p.name: p.read_bytes() for p in (out.run / ".hydra").glob("*.yaml")} == out.recorded
    assert not (out.data / "pwned").exists(), "a checkpoint ran code while loading"


def test_catalogue_covers_every_kind_of_mistake():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


def test_an_op_without_a_deterministic_kernel_is_named():
    # On a GPU the ResNets' adaptive average pooling has no deterministic backward; on a CPU put_ shows
    # the same torch error, which the CLI turns into a one-line message naming the op.
    import torch

    from cnntrain.cli.fit import nondeterministic_op

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError) as e:
            torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert nondeterministic_op(e.value) == "put_"
    assert nondeterministic_op(RuntimeError("something else")) is None


# --------------------------------------------------------------------------- paths given to every command

# A path the user gave that cannot be used, in each subcommand: one line naming the key and the path, exit 2,
# never a traceback. {file} is a regular file, {folder} a folder, {image} an image, {run} a finished run,
# {runs} the folder of that run (what `report` reads), {blocked} a folder where each command's output file
# names are folders (so the error comes from deep inside the command, not from the output folder's creation),
# {damaged} a copy of the run whose metrics.csv is a folder (the error comes from inside the training job).
PATH_CASES = [
    ("evaluate-out-is-a-file", ["evaluate", "ckpt={run}", "out={file}"], ["out={file}", "a file is in the way"]),
    (
        "predict-out-is-a-file",
        ["predict", "ckpt={run}", "inputs={image}", "out={file}"],
        ["out={file}", "a file is in the way"],
    ),
    (
        "explain-out-under-a-file",
        ["explain", "ckpt={run}", "inputs={image}", "out={file}/heatmaps"],
        ["out={file}/heatmaps", "a file is in the way"],
    ),
    ("export-out-is-a-file", ["export", "ckpt={run}", "out={file}"], ["out={file}", "a file is in the way"]),
    ("lr-find-out-is-a-file", ["lr-find", "experiment=smoke", "out={file}"], ["out={file}", "a file is in the way"]),
    ("report-csv-is-a-folder", ["report", "{runs}", "csv={folder}"], ["csv={folder}", "it is a folder"]),
    (
        "report-csv-under-a-file",
        ["report", "{runs}", "csv={file}/report.csv"],
        ["csv={file}/report.csv", "a file is in the way"],
    ),
    # A folder that holds files is never written into by evaluate, predict or explain (a folder per call).
    (
        "evaluate-out-holds-files",
        ["evaluate", "ckpt={run}", "out={blocked}"],
        ["out={blocked} already holds 5 file(s) or folder(s)", "overwrite=true"],
    ),
    (
        "predict-out-holds-files",
        ["predict", "ckpt={run}", "inputs={image}", "out={blocked}"],
        ["out={blocked} already holds", "overwrite=true"],
    ),
    (
        "explain-out-not-a-results-folder",
        ["explain", "ckpt={run}", "inputs={image}", "out={blocked}", "overwrite=true"],
        ["out={blocked} holds files that evaluate, predict or explain did not write"],
    ),
    (
        "export-output-file-is-a-folder",
        ["export", "ckpt={run}", "out={blocked}"],
        ["out={blocked}", "{blocked}/model.pt2", "it is a folder"],
    ),
    (
        "fit-run-dir-is-a-file",
        ["fit", "experiment=smoke", "hydra.run.dir={file}"],
        ["cannot create the run directory {file}", "hydra.run.dir"],
    ),
    (
        "fit-resumed-run-file-is-a-folder",
        ["fit", "resume={damaged}", "trainer.epochs=4"],
        ["resume={damaged}", "{damaged}/metrics.csv", "it is a folder"],
    ),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, smoke_run) -> dict[str, str]:
    from PIL import Image

    base = tmp_path_factory.mktemp("paths")
    (base / "a_file").write_text("a regular file\n")
    (base / "a_folder").mkdir()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(base / "digit.png")
    for name in ("predictions.csv", "explain.csv", "per_class.csv", "metrics.json", "model.pt2"):
        (base / "blocked" / name).mkdir(parents=True)
    damaged = base / "damaged" / smoke_run.name
    shutil.copytree(smoke_run, damaged)
    (damaged / "metrics.csv").unlink()
    (damaged / "metrics.csv").mkdir()
    return {
        "file": str(base / "a_file"),
        "folder": str(base / "a_folder"),
        "image": str(base / "digit.png"),
        "run": str(smoke_run),
        "runs": str(smoke_run.parent),
        "blocked": str(base / "blocked"),
        "damaged": str(damaged),
    }


@pytest.mark.parametrize("args,expect", [pytest.param(a, e, id=i) for i, a, e in PATH_CASES])
def test_a_path_that_cannot_be_used_is_one_line_naming_its_key(paths, args, expect, tmp_path, capsys):
    from cnntrain import cli

    def fill(text: str) -> str:
        for name, value in paths.items():
            text = text.replace("{" + name + "}", value)
        return text

    args = [fill(a) for a in args]
    if args[0] == "fit":  # the Hydra app: in its own process, as a user runs it
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("HYDRA_FULL_ERROR", None)
        proc = subprocess.run(
            [sys.executable, "-m", "cnntrain", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        code, err = proc.returncode, proc.stderr
    else:
        code = 0
        try:
            cli.main(args)  # an exception other than SystemExit (a traceback) fails the test here
        except SystemExit as e:
            code = int(e.code or 0)
        err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cnntrain: error: "), (code, err)
    for fragment in expect:
        assert fill(fragment) in lines[0], lines[0]
    assert "Errno" not in lines[0]


# --------------------------------------------------------------------------- the optional extras' rows
# timm, MLflow and torch.export: each row runs `cnntrain ARGS` in its own process; `hide` makes those modules
# unimportable there (as without the extra), `needs` skips the row when this machine lacks one.


@dataclass
class ExtraCase:
    id: str
    args: list[str]
    expect: list[str]  # fragments of the error line; {pt2}, {foreign}, {swapped}, {image} are filled in
    needs: tuple[str, ...] = ()
    hide: tuple[str, ...] = ()


EXTRA_CASES = [
    ExtraCase(
        "timm-unknown-arch",
        ["fit", "model=timm", "model.arch=resnte10t", "dataset.subset=100"],
        ["unknown timm architecture (model.arch) 'resnte10t' (did you mean 'resnet10t'?)"],
        needs=("timm",),
    ),
    ExtraCase(
        "timm-not-installed",
        ["fit", "model=timm", "dataset.subset=100"],
        ["model=timm needs the timm package", "pip install 'cnntrain[timm]'"],
        hide=("timm",),
    ),
    ExtraCase(
        "mlflow-not-installed",
        ["fit", "logger=mlflow", "dataset.subset=100"],
        ["logger=mlflow needs the mlflow package", "pip install 'cnntrain[mlflow]'"],
        hide=("mlflow",),
    ),
    ExtraCase(
        "mlflow-unreachable",
        ["fit", "logger=mlflow", "logger.tracking_uri=http://127.0.0.1:9"],
        ["logger.tracking_uri=http://127.0.0.1:9: the MLflow tracking store cannot be reached"],
        needs=("mlflow",),
    ),
    ExtraCase(
        "pt2-without-record",
        ["predict", "ckpt={foreign}", "inputs={image}"],
        ["{foreign} is a torch.export program without cnntrain's record", "format=exported"],
    ),
    ExtraCase(
        "pt2-of-another-model",
        ["predict", "ckpt={swapped}", "inputs={image}"],
        ["{swapped}: its program does not take the 1x28x28 images its record describes", "another model"],
    ),
]


def _extra_files(base: Path, smoke_run: Path) -> dict[str, str]:
    """A digit image; the smoke run's model.pt2; a .pt2 from plain torch.export (no record); and one whose
    program is another model's (3x32x32 inputs) under the smoke run's record."""
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(base / "digit.png")
    proc = subprocess.run(
        [sys.executable, "-m", "cnntrain", "export", f"ckpt={smoke_run}", f"out={base}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    # In a process of its own: torch.export looks for onnx, which tests/without_extras.py makes raise here.
    script = f"""
import torch
extra = {{"cnntrain.json": ""}}
torch.export.load({str(base / "model.pt2")!r}, extra_files=extra)
other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10))
program = torch.export.export(other.eval(), (torch.zeros(2, 3, 32, 32),))
torch.export.save(program, {str(base / "foreign.pt2")!r})
torch.export.save(program, {str(base / "swapped.pt2")!r}, extra_files=extra)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {
        "pt2": str(base / "model.pt2"),
        "foreign": str(base / "foreign.pt2"),
        "swapped": str(base / "swapped.pt2"),
        "image": str(base / "digit.png"),
    }


@pytest.fixture(scope="module")
def extra_files(tmp_path_factory, smoke_run) -> dict[str, str]:
    return _extra_files(tmp_path_factory.mktemp("extras"), smoke_run)


def _mark(case: ExtraCase) -> list[pytest.MarkDecorator]:
    from tests.conftest import needs

    return [needs(m, m) for m in case.needs]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_mark(c)) for c in EXTRA_CASES])
def test_the_extras_bad_input_is_refused_with_one_line(case, extra_files, tmp_path):
    def fill(text: str) -> str:
        for name, value in extra_files.items():
            text = text.replace("{" + name + "}", value)
        return text.replace("{tmp}", str(tmp_path))

    # The CLI as `python -m cnntrain` runs it, after hiding the modules of an extra that "is not installed".
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.without_extras import hide; "
        f"hide({case.hide!r}); from cnntrain.cli import main; main()"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-c", code, *[fill(a) for a in case.args]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("cnntrain: error: "), proc.stderr
    for fragment in case.expect:
        assert fill(fragment) in lines[0], lines[0]
    runs = tmp_path / "runs"
    assert not runs.exists() or not [p for p in runs.rglob("*") if p.is_file()], "a failed start left files in runs/"
