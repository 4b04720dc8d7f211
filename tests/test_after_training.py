"""After training: evaluate, predict, explain, export, list, and the figures `fit` leaves behind.

Most tests call the command in-process (`cli.main`, exactly what the console script runs) on the
one shared smoke run, so they take about a second each; one test goes through a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnntrain.config import DatasetConfig
from cnntrain.data import load_dataset
from cnntrain.engine.inference import load_trained
from tests.conftest import cli_in_process, needs, run_cli, summary


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path, min_side: int = 150) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (path, im.size)


@pytest.fixture(scope="module")
def digits():
    """The smoke run's test split (the embedded digits)."""
    return load_dataset(DatasetConfig(name="mnist5k"))


@pytest.fixture(scope="module")
def confident(smoke_run, digits):
    """Indices of test images the smoke model classifies with probability > 0.9 (fp32), and the classes."""
    trained = load_trained(str(smoke_run), "cpu")
    with torch.no_grad():
        probs = trained.model(trained.preprocess.normalise("cpu").from_uint8(digits.test_x[:200])).softmax(1)
    p, c = probs.max(1)
    idx = torch.nonzero(p > 0.9).flatten()[:4].tolist()
    assert len(idx) == 4
    return idx, c[idx].tolist(), probs[idx]


# --------------------------------------------------------------------------- fit's figures


def test_fit_leaves_figures_and_tensorboard_images(smoke_run):
    for name in ("curves.png", "confusion_test.png", "mistakes_test.png"):
        assert_png(smoke_run / "figures" / name)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(smoke_run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Tags()["images"]
    for tag in (
        "figures/curves",
        "figures/confusion_test",
        "figures/mistakes_test",
        "model/first_layer_filters",
        "model/feature_maps/0_input",
    ):
        assert tag in images, (tag, images)
    assert sum(t.startswith("model/feature_maps/") for t in images) >= 3  # the input and at least two layers


# --------------------------------------------------------------------------- evaluate


def test_evaluate_reports_match_fit_and_are_written(smoke_run, capsys):
    code, out, err = cli_in_process(["evaluate", f"ckpt={smoke_run}"], capsys)
    assert code == 0, err
    # A folder of its own, named by the data, the split and the time, and said on the last line.
    folder = Path(out.strip().splitlines()[-1].rpartition(" to ")[2])
    assert folder.parent == smoke_run / "evaluate" and folder.name.startswith("mnist5k-test-")
    record = json.loads((folder / "metrics.json").read_text())
    s = summary(smoke_run)
    # Same weights (best.pt), same images, same precision as fit's test: the same accuracy, exactly.
    assert record["acc"] == pytest.approx(s["test_acc"], abs=1e-9)
    assert record["loss"] == pytest.approx(s["test_loss"], rel=1e-4)
    assert record["images"] == 500 and record["top5_acc"] >= record["acc"]
    cm = np.array(record["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 500 and np.trace(cm) == round(record["acc"] * 500)
    per_class = rows(folder / "per_class.csv")
    assert [r["class"] for r in per_class] == [str(i) for i in range(10)]
    for r, i in zip(per_class, range(10), strict=True):
        assert float(r["recall"]) == pytest.approx(cm[i, i] / cm[i].sum(), abs=1e-6)
        assert float(r["precision"]) == pytest.approx(cm[i, i] / cm[:, i].sum(), abs=1e-6)
    assert len(rows(folder / "predictions.csv")) == 500
    assert rows(folder / "confusion_matrix.csv")[3]["3"] == str(cm[3, 3])
    for name in ("confusion_matrix", "per_class", "mistakes"):
        assert_png(folder / f"{name}.png")
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    # The tables on the terminal.
    assert "per class" in out and "confusion matrix" in out and "top-5 accuracy" in out


def test_evaluate_other_split_and_bad_keys(smoke_run, tmp_path, capsys):
    code, _, err = cli_in_process(
        ["evaluate", f"ckpt={smoke_run}", "split=val", f"out={tmp_path}", "tensorboard=false", "precision=32"], capsys
    )
    assert code == 0, err
    assert json.loads((tmp_path / "metrics.json").read_text())["split"] == "val"
    code, _, err = cli_in_process(["evaluate", f"ckpt={smoke_run}", "dataset.rot=/x"], capsys)
    assert code == 2 and "dataset.root" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli_in_process(["evaluate", f"ckpt={smoke_run}", "split=holdout"], capsys)
    assert code == 2 and "split=holdout" in err and "test, val, train" in err


# --------------------------------------------------------------------------- predict


def _write_variants(folder: Path, image: np.ndarray, stem: str) -> dict[str, bool]:
    """The same 28x28 digit in several files; value: whether the pixels reach the model unchanged."""
    folder.mkdir(parents=True, exist_ok=True)
    gray = Image.fromarray(image, "L")
    gray.save(folder / f"{stem}_gray.png")
    gray.convert("RGB").save(folder / f"{stem}_rgb.png")  # colour file, grayscale model
    gray.convert("RGBA").save(folder / f"{stem}_rgba.png")
    gray.convert("P").save(folder / f"{stem}_palette.png")
    Image.fromarray(image.astype(np.uint16) * 257).save(folder / f"{stem}_16bit.png")
    gray.resize((84, 84), Image.Resampling.BICUBIC).convert("RGB").save(folder / f"{stem}_big.jpg", quality=95)
    gray.resize((40, 30), Image.Resampling.BILINEAR).save(folder / f"{stem}_wide.png")
    return {"gray": True, "rgb": True, "rgba": True, "palette": True, "16bit": True, "big": False, "wide": False}


def test_predict_any_file_format_gives_the_models_class(smoke_run, digits, confident, tmp_path, capsys):
    idx, classes, probs = confident
    folder = tmp_path / "images"
    exact = {}
    for i in idx:
        exact.update({f"d{i}_{k}": v for k, v in _write_variants(folder, digits.test_x[i, 0].numpy(), f"d{i}").items()})
    out = tmp_path / "out"
    code, stdout, err = cli_in_process(
        ["predict", f"ckpt={smoke_run}", f"inputs={folder}", f"out={out}", "precision=32", "batch_size=5", "top_k=3"],
        capsys,
    )
    assert code == 0, err
    got = {Path(r["path"]).stem: r for r in rows(out / "predictions.csv")}
    assert len(got) == len(exact) == 28
    for i, cls, p in zip(idx, classes, probs, strict=True):
        for stem, lossless in exact.items():
            if not stem.startswith(f"d{i}_"):
                continue
            r = got[stem]
            assert r["class_1"] == str(cls), stem
            if lossless:  # identical pixels: identical probabilities
                assert float(r["prob_1"]) == pytest.approx(float(p[cls]), abs=1e-5), stem
    assert "predicted" in stdout and str(out / "predictions.csv") in stdout.replace("\n", "")


def test_predict_single_file_and_glob(smoke_run, digits, tmp_path, capsys):
    for i in range(3):
        Image.fromarray(digits.test_x[i, 0].numpy()).save(tmp_path / f"x{i}.png")
    code, _, err = cli_in_process(
        [
            "predict",
            f"ckpt={smoke_run}/checkpoints/best.pt",
            f"inputs={tmp_path / 'x1.png'}",
            f"out={tmp_path / 'one'}",
        ],
        capsys,
    )
    assert code == 0, err
    assert len(rows(tmp_path / "one" / "predictions.csv")) == 1
    code, _, err = cli_in_process(
        ["predict", f"ckpt={smoke_run}", f"inputs={tmp_path}/x*.png", f"out={tmp_path / 'glob'}"], capsys
    )
    assert code == 0, err
    assert [Path(r["path"]).name for r in rows(tmp_path / "glob" / "predictions.csv")] == ["x0.png", "x1.png", "x2.png"]


def test_predict_errors_are_one_line(smoke_run, digits, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(digits.test_x[0, 0].numpy()).save(mixed / "ok.png")
    (mixed / "notes.png").write_text("this is not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "readme.txt").write_text("hello")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((smoke_run / "checkpoints" / "best.pt").read_bytes()[:2000])
    cases = [
        ([f"inputs={mixed}"], "notes.png is not an image"),
        ([f"inputs={empty}"], "the folder is empty"),
        ([f"inputs={texts}"], "no image files in the folder"),
        ([f"inputs={texts / 'readme.txt'}"], "readme.txt is not an image"),
        ([f"inputs={tmp_path / 'missing'}"], "no such file or folder"),
        ([f"inputs={tmp_path}/*.gif"], "no file matches"),
        (["inputs=x.png", "topk=3"], "did you mean 'top_k'"),
    ]
    for args, expected in cases:
        code, _, err = cli_in_process(["predict", f"ckpt={smoke_run}", *args], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (args, err)
    for ckpt, expected in ((tmp_path / "nothing.pt", "not found"), (corrupt, "corrupt"), (empty, "no checkpoint in")):
        code, _, err = cli_in_process(["predict", f"ckpt={ckpt}", f"inputs={mixed / 'ok.png'}"], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (ckpt, err)
    # on_error=skip: the readable images are still classified.
    code, _, err = cli_in_process(
        ["predict", f"ckpt={smoke_run}", f"inputs={mixed}", "on_error=skip", f"out={tmp_path / 'skip'}"], capsys
    )
    assert code == 0 and "skipped" in err and len(rows(tmp_path / "skip" / "predictions.csv")) == 1


def test_commands_help_and_subprocess_wiring(tmp_path, capsys):
    for command in ("evaluate", "predict", "explain", "export", "list"):
        code, out, _ = cli_in_process([command, "--help"], capsys)
        assert code == 0 and f"cnntrain {command}" in out, command
    proc = run_cli(["predict", "inputs=x.png"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "cnntrain: error: cnntrain predict needs ckpt=...; see `cnntrain predict --help`"
    )


# --------------------------------------------------------------------------- export


def _eager(smoke_run):
    trained = load_trained(str(smoke_run), "cpu")
    x = trained.preprocess.normalise("cpu").from_uint8(
        torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    )
    with torch.no_grad():
        return trained, x, trained.model(x)


def test_export_torchscript_and_state_dict_match_the_eager_model(smoke_run, tmp_path, capsys):
    trained, x, expected = _eager(smoke_run)
    code, out, err = cli_in_process(["export", f"ckpt={smoke_run}", "format=torchscript", f"out={tmp_path}"], capsys)
    assert code == 0, err
    assert "outputs match the eager model" in out
    assert "TorchScript (torch.jit) is deprecated upstream" in out
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(tmp_path / "model.torchscript.pt"))
    torch.testing.assert_close(scripted(x), expected, atol=1e-4, rtol=1e-4)

    code, out, err = cli_in_process(["export", f"ckpt={smoke_run}", "format=state_dict", f"out={tmp_path}"], capsys)
    assert code == 0, err
    saved = torch.load(tmp_path / "model.state_dict.pt", weights_only=True)
    from cnntrain.config import ModelConfig
    from cnntrain.models import build_model

    model = build_model(ModelConfig(**saved["model_config"]), 1, (28, 28), 10)
    model.load_state_dict(saved["model"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected, atol=0, rtol=0)
    pre = json.loads((tmp_path / "preprocess.json").read_text())
    assert pre["classes"] == trained.classes and pre["image_size"] == [28, 28]
    assert set(pre["exports"]) == {"torchscript", "state_dict"} and pre["exports"]["torchscript"]["ok"]


def test_export_onnx_without_the_package_names_the_extra(smoke_run, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    code, _, err = cli_in_process(["export", f"ckpt={smoke_run}", "format=onnx"], capsys)
    assert code == 2 and "pip install 'cnntrain[onnx]'" in err
    code, _, err = cli_in_process(["export", f"ckpt={smoke_run}", "format=tflite"], capsys)
    assert code == 2 and "exported, torchscript, onnx, state_dict" in err


@needs("onnx", "onnx")
@needs("onnxruntime", "onnx")
@pytest.mark.slow
def test_export_onnx_runs_in_onnxruntime_like_the_eager_model(smoke_run, tmp_path, capsys):
    import onnxruntime as ort

    _, x, expected = _eager(smoke_run)
    code, out, err = cli_in_process(["export", f"ckpt={smoke_run}", "format=onnx", f"out={tmp_path}"], capsys)
    assert code == 0, err
    assert "outputs match the eager model" in out
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])  # batch 7: not the traced batch size
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_every_pytorch_file_export_writes_works_as_ckpt(smoke_run, digits, tmp_path, capsys):
    """model.state_dict.pt and model.safetensors are checkpoints for predict/evaluate/explain/export; the
    TorchScript file is refused, saying what it is and what to use instead."""
    out = tmp_path / "export"
    for fmt in ("state_dict", "torchscript"):
        code, _, err = cli_in_process(["export", f"ckpt={smoke_run}", f"format={fmt}", f"out={out}"], capsys)
        assert code == 0, err
    image = tmp_path / "digit.png"
    Image.fromarray(digits.test_x[0, 0].numpy()).save(image)
    _, want, _ = cli_in_process(["predict", f"ckpt={smoke_run}", f"inputs={image}", f"out={tmp_path / 'p0'}"], capsys)
    expected = rows(tmp_path / "p0" / "predictions.csv")
    for name in ("model.state_dict.pt", "model.safetensors"):
        code, _, err = cli_in_process(
            ["predict", f"ckpt={out / name}", f"inputs={image}", f"out={tmp_path / name}"], capsys
        )
        assert code == 0, (name, err)
        assert rows(tmp_path / name / "predictions.csv") == expected, name
        code, text, err = cli_in_process(["evaluate", f"ckpt={out / name}", f"out={tmp_path / name / 'eval'}"], capsys)
        assert code == 0, (name, err)
        metrics = json.loads((tmp_path / name / "eval" / "metrics.json").read_text())
        assert metrics["acc"] == pytest.approx(summary(smoke_run)["test_acc"]), name
    # A state_dict export of an earlier cnntrain: model_config instead of the run's config.
    old = torch.load(out / "model.state_dict.pt", weights_only=True)
    del old["config"]
    torch.save(old, tmp_path / "old.state_dict.pt")
    code, _, err = cli_in_process(
        ["predict", f"ckpt={tmp_path / 'old.state_dict.pt'}", f"inputs={image}", f"out={tmp_path / 'old'}"], capsys
    )
    assert code == 0, err
    assert rows(tmp_path / "old" / "predictions.csv") == expected

    code, _, err = cli_in_process(["predict", f"ckpt={out / 'model.torchscript.pt'}", f"inputs={image}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "is a TorchScript program" in err and "model.state_dict.pt or model.safetensors" in err


def _probabilities(path: Path) -> tuple[list[str], np.ndarray]:
    """predictions.csv -> (each image's top class, its top-k probabilities)."""
    table = rows(path)
    return [r["class_1"] for r in table], np.array(
        [[float(v) for k, v in r.items() if k.startswith("prob_")] for r in table]
    )


def test_export_default_is_a_pt2_that_predict_and_evaluate_take(smoke_run, digits, tmp_path, capsys):
    """format=exported (the default): a .pt2 whose predictions on the test split agree with the checkpoint's,
    usable as ckpt= by predict and evaluate, and refused by explain and export with what to pass instead."""
    out = tmp_path / "export"
    code, text, err = cli_in_process(["export", f"ckpt={smoke_run}", f"out={out}"], capsys)
    assert code == 0, err
    assert "as exported" in text and "outputs match the eager model" in text
    pt2 = out / "model.pt2"
    assert json.loads((out / "preprocess.json").read_text())["exports"]["exported"]["ok"]

    code, _, err = cli_in_process(["evaluate", f"ckpt={pt2}", f"out={tmp_path / 'eval'}"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["acc"] == pytest.approx(summary(smoke_run)["test_acc"])

    # Per image, on the test split: the exported program's logits against the checkpoint's model.
    trained, _, _ = _eager(smoke_run)
    exported = load_trained(str(pt2), "cpu")
    assert exported.exported and exported.classes == trained.classes
    x = trained.preprocess.normalise("cpu").from_uint8(digits.test_x[:300])
    with torch.no_grad():
        torch.testing.assert_close(exported.model(x), trained.model(x), atol=1e-4, rtol=1e-4)

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(digits.test_x[i, 0].numpy()).save(images / f"{i}.png")
    for ckpt, where in ((smoke_run, "p0"), (pt2, "p1")):
        code, _, err = cli_in_process(
            ["predict", f"ckpt={ckpt}", f"inputs={images}", f"out={tmp_path / where}"], capsys
        )
        assert code == 0, err
    want, got = _probabilities(tmp_path / "p0" / "predictions.csv"), _probabilities(tmp_path / "p1" / "predictions.csv")
    assert want[0] == got[0]
    np.testing.assert_allclose(got[1], want[1], atol=1e-3)

    for command in (["explain", f"inputs={images}"], ["export"]):
        code, _, err = cli_in_process([command[0], f"ckpt={pt2}", *command[1:]], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "exported program" in err, err


def test_a_pt2_loads_in_a_fresh_process_without_cnntrain(smoke_run, tmp_path, capsys):
    """Deployment needs torch alone: torch.export.load, no cnntrain model code importable, any batch size."""
    import subprocess
    import sys

    code, _, err = cli_in_process(["export", f"ckpt={smoke_run}", f"out={tmp_path}"], capsys)
    assert code == 0, err
    _, x, expected = _eager(smoke_run)  # a batch of 7; the export traced a batch of 2
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, json, torch\n"
        "sys.modules['cnntrain'] = None  # any import of cnntrain now fails\n"
        "extra = {'cnntrain.json': ''}\n"
        f"program = torch.export.load({str(tmp_path / 'model.pt2')!r}, extra_files=extra)\n"
        f"y = program.module()(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
        "print(json.loads(extra['cnntrain.json'])['preprocess']['image_size'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[28, 28]"
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, atol=1e-4, rtol=1e-4)


def test_predict_skip_counts_only_the_images_it_classifies(smoke_run, digits, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(digits.test_x[0, 0].numpy()).save(mixed / "ok.png")
    (mixed / "notes.png").write_text("this is not an image")
    code, out, err = cli_in_process(
        ["predict", f"ckpt={smoke_run}", f"inputs={mixed}", "on_error=skip", f"out={tmp_path / 'skip'}"], capsys
    )
    assert code == 0, err
    assert "notes.png" in err and "skipped" in err
    header = out.splitlines()[0]
    assert ": 1 image(s) ->" in header and "skipped 1 of 2 file(s)" in header, header
    assert "wrote 1 prediction(s)" in out
    assert len(rows(tmp_path / "skip" / "predictions.csv")) == 1


@needs("onnx", "onnx")
@needs("onnxruntime", "onnx")
@pytest.mark.slow
def test_export_onnx_writes_the_opset_asked_for_or_refuses_it(smoke_run, tmp_path, capsys):
    import onnx

    from cnntrain.commands.export import opset_ranges

    for opset in (13, 18):  # below the dynamo exporter's 18: the TorchScript-based one writes it
        out = tmp_path / str(opset)
        code, text, err = cli_in_process(
            ["export", f"ckpt={smoke_run}", "format=onnx", f"opset={opset}", f"out={out}"], capsys
        )
        assert code == 0, err
        declared = {o.domain: o.version for o in onnx.load(str(out / "model.onnx")).opset_import}
        assert declared.get("", declared.get("ai.onnx")) == opset, declared
        assert json.loads((out / "preprocess.json").read_text())["exports"]["onnx"]["opset"] == opset
        assert f"opset {opset}" in text
    highest = max(hi for _, hi in opset_ranges().values())
    for opset in (1, highest + 1):
        code, _, err = cli_in_process(
            ["export", f"ckpt={smoke_run}", "format=onnx", f"opset={opset}", f"out={tmp_path / 'no'}"], capsys
        )
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"opset={opset} cannot be written" in err and f"-{highest}" in err
        assert not (tmp_path / "no" / "model.onnx").exists()


# --------------------------------------------------------------------------- explain


def test_explain_writes_heat_maps_and_explains_errors(smoke_run, digits, confident, tmp_path, capsys):
    idx, _, _ = confident
    folder = tmp_path / "in"
    folder.mkdir()
    for i in idx[:2]:
        Image.fromarray(digits.test_x[i, 0].numpy()).save(folder / f"digit{i}.png")
    code, out, err = cli_in_process(
        ["explain", f"ckpt={smoke_run}", f"inputs={folder}", f"out={tmp_path / 'out'}"], capsys
    )
    assert code == 0, err
    for i in idx[:2]:
        assert_png(tmp_path / "out" / f"digit{i}_gradcam.png")
    assert_png(tmp_path / "out" / "overview.png")
    assert len(rows(tmp_path / "out" / "explain.csv")) == 2

    code, _, err = cli_in_process(["explain", f"ckpt={smoke_run}", f"inputs={folder}", "layer=nope"], capsys)
    assert code == 2 and "choose one of" in err
    code, _, err = cli_in_process(["explain", f"ckpt={smoke_run}", f"inputs={folder}", "target=eleven"], capsys)
    assert code == 2 and "not a class" in err


def test_grad_cam_lands_on_the_object_that_drives_the_class():
    """A model whose class-0 score is the mean brightness after a conv and a pool: the evidence is the
    bright rectangle, so the heat map must sit on it (and not be transposed, shifted or on the border)."""
    from torch import nn

    from cnntrain.commands.explain import default_layer, grad_cam

    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    nn.init.zeros_(conv.weight)
    conv.weight.data[0, 0, 1, 1] = 1.0
    head = nn.Linear(1, 2)
    head.weight.data = torch.tensor([[1.0], [-1.0]])
    model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    x = torch.zeros(2, 1, 24, 36)
    x[0, 0, 4:10, 24:32] = 1.0  # top right
    x[1, 0, 14:20, 2:8] = 1.0  # bottom left
    layer = default_layer(model, x[:1])
    assert layer == "2"  # the pooled 12x18 map: the last one of at least 7x7
    cams, cls, _ = grad_cam(model, x, layer, target=0)
    assert cls.tolist() == [0, 0] and cams.shape == (2, 24, 36)
    for cam, img in zip(cams, x[:, 0], strict=True):
        inside = img > 0
        assert cam[inside].mean() > 0.6 and cam[~inside].mean() < 0.1
        peak = torch.nonzero(cam == cam.max())[0]
        assert inside[peak[0], peak[1]]


# --------------------------------------------------------------------------- list


def test_list_shows_every_group_and_option_with_its_description(capsys):
    from cnntrain.commands.catalog import describe

    code, out, err = cli_in_process(["list"], capsys)
    assert code == 0, err
    from cnntrain.config.compose import config_dir

    configs = config_dir()
    groups = [p for p in configs.iterdir() if p.is_dir() and p.name != "hydra"]
    assert {"dataset", "model", "augment", "optimizer", "scheduler", "experiment"} <= {g.name for g in groups}
    for group in groups:
        assert f"{group.name}=OPTION" in out
        for option in group.glob("*.yaml"):
            text = describe(option)
            assert text and not text.startswith("@package"), option
            assert option.stem in out and text[:40] in out, (option, text)
    assert "mnist5k (default)" in out
    code, out, _ = cli_in_process(["list", "models"], capsys)
    assert code == 0 and "resnet8" in out and "adamw" not in out
    code, _, err = cli_in_process(["list", "modle"], capsys)
    assert code == 2 and "did you mean 'model'" in err


def test_checkpoint_outside_a_run_dir_writes_beside_it(smoke_run, digits, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    shutil.copy(smoke_run / "checkpoints" / "best.pt", ckpt)
    Image.fromarray(digits.test_x[0, 0].numpy()).save(tmp_path / "a.png")
    code, _, err = cli_in_process(["predict", f"ckpt={ckpt}", f"inputs={tmp_path / 'a.png'}"], capsys)
    assert code == 0, err
    (folder,) = (tmp_path / "predict").iterdir()
    assert folder.name.startswith("a-") and (folder / "predictions.csv").is_file()
