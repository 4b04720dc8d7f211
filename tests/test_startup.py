"""Start-up: what a fit imports before it trains, commands that need no torch, the optimizers without
torch._dynamo, and the end-of-run figures drawn off the path the user waits on (README, "Start-up")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, run_cli, run_dirs, wait_for_figures

# Never needed before the first training step of a fit of the built-in sets: each costs seconds or hundreds of
# MB of a short run's start-up (a module and everything under it).
DENIED_BEFORE_FIRST_STEP = ("matplotlib", "tensorboard.plugins", "torchvision", "onnx", "optuna", "torch._dynamo")

MARK = "cnntrain-test: first training step done"

# Loaded by the fit's interpreter before anything else (sitecustomize): when cnntrain.engine.step is imported,
# its TrainStep.update is wrapped to write MARK to stderr after the first step, so the import log splits there.
SITECUSTOMIZE = f"""
import sys


class _MarkFirstStep:
    def find_spec(self, name, path=None, target=None):
        if name != "cnntrain.engine.step":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            update = module.TrainStep.update

            def marked(self, loss):
                result = update(self, loss)
                if not getattr(marked, "done", False):
                    marked.done = True
                    print({MARK!r}, file=sys.stderr, flush=True)
                return result

            module.TrainStep.update = marked

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _MarkFirstStep())
"""


def imported_before_first_step(stderr: str) -> list[str]:
    """Module names of `-X importtime` lines before MARK."""
    head, found, _ = stderr.partition(MARK)
    assert found, f"the first training step was never marked:\n{stderr[-3000:]}"
    return [ln.rsplit("|", 1)[1].strip() for ln in head.splitlines() if ln.startswith("import time:")]


def denied(modules: list[str]) -> list[str]:
    return sorted({m for m in modules for d in DENIED_BEFORE_FIRST_STEP if m == d or m.startswith(d + ".")})


def test_fit_imports_nothing_denied_before_its_first_step(tmp_path):
    """`python -X importtime -m cnntrain fit experiment=smoke`: nothing on the deny-list before the first step is
    done. Fails when, say, engine/loop.py imports matplotlib at its top."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    proc = run_cli(
        ["fit", "experiment=smoke", "trainer.progress=none"],
        tmp_path,
        env={"PYTHONPROFILEIMPORTTIME": "1", "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    modules = imported_before_first_step(proc.stderr)
    assert "torch" in modules and "cnntrain.engine.loop" in modules  # the log is what it should be
    assert denied(modules) == [], f"imported before the first training step: {denied(modules)}"


def test_commands_that_do_not_train_do_not_import_torch(tmp_path):
    code = """
import sys
from cnntrain.cli import main
for argv in ([], ["--help"], ["fit", "--help"], ["fit", "--cfg", "job"], ["list"], ["init", "proj"]):
    try:
        main(argv)
    except SystemExit as e:
        assert not e.code, (argv, e.code)
    assert "torch" not in sys.modules, argv
print("no torch")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("no torch")


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_builtin_optimizers_match_torch(name):
    """Same updates and state_dict as torch's own class (cnntrain.optim.eager only skips the dynamo wrappers)."""
    from cnntrain.config import ModelConfig, OptimizerConfig
    from cnntrain.optim import build_optimizer

    def train(make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
        opt = make(model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
        x = torch.randn(8, 1, 8, 8)
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
            sched.step()
        opt.load_state_dict(opt.state_dict())
        return [p.detach() for p in model.parameters()], opt.state_dict()

    cfg = OptimizerConfig(name=name, lr=0.01, momentum=0.9)
    ours, ours_state = train(lambda m: build_optimizer(m, cfg, ModelConfig()))
    base = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    theirs, their_state = train(lambda m: base(build_optimizer(m, cfg, ModelConfig()).param_groups))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert ours_state["param_groups"] == their_state["param_groups"]


def test_builtin_optimizers_do_not_import_dynamo():
    code = """
import sys, torch
from cnntrain.config import ModelConfig, OptimizerConfig
from cnntrain.optim import build_optimizer
for name in ("adam", "adamw", "sgd"):
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, OptimizerConfig(name=name), ModelConfig())
    model(torch.randn(4, 3)).sum().backward()
    opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.strip() == "no dynamo", proc.stdout + proc.stderr


def test_figures_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A process stopped while a PNG is being written leaves the previous file (or none), never half of one."""
    from cnntrain.io import figures

    fig = figures.curves_figure(
        [{"epoch": "1", "train_loss": "1", "val_loss": "1", "train_acc": "0.5", "val_acc": "0.5"}]
    )
    path = tmp_path / "figures" / "curves.png"
    figures.save_png(fig, path)
    before = path.read_bytes()

    def stopped(target, **kwargs):
        Path(target).write_bytes(before[:100])  # half written when the signal arrived
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", stopped)
    with pytest.raises(KeyboardInterrupt):
        figures.save_png(fig, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temporary file left behind


def test_figures_end_draws_before_the_command_returns(tmp_path):
    """trainer.figures=end: the figures are there when the command returns; =off: none, until
    `cnntrain report RUN figures=true` draws them."""
    args = ["fit", "experiment=smoke", "trainer.epochs=1", "trainer.progress=none"]
    proc = run_cli([*args, "trainer.figures=end", "name=end"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli([*args, "trainer.figures=off", "name=off"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    end, off = run_dirs(tmp_path)
    assert sorted(p.name for p in (end / "figures").iterdir()) == [
        "confusion_test.png",
        "curves.png",
        "mistakes_test.png",
    ]
    assert not (off / "figures" / "curves.png").exists()
    drawn = run_cli(["report", str(off), "figures=true", "csv=null"], tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    assert f"figures: {off / 'figures'}" in drawn.stdout
    wait_for_figures(off)
    for name in ("curves.png", "confusion_test.png", "mistakes_test.png"):
        with Image.open(off / "figures" / name) as im:
            assert im.format == "PNG" and np.asarray(im).std() > 0


def test_fit_help_without_hydra_is_hydras_text(tmp_path, monkeypatch, capsys):
    """`fit --help` alone is rendered by cnntrain (Hydra's own takes seconds); with an override beside it Hydra
    renders it: the same text, the user's own groups included."""
    from tests.conftest import cli_in_process

    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "mine.yaml").write_text("# my model\nname: simple_cnn\n")
    (tmp_path / "configs" / "extra" / "deep").mkdir(parents=True)
    (tmp_path / "configs" / "extra" / "deep" / "x.yaml").write_text("a: 1\n")
    monkeypatch.chdir(tmp_path)
    code, ours, err = cli_in_process(["fit", "--help"], capsys)
    assert code == 0, err
    code, hydras, err = cli_in_process(["fit", "--help", "name=default"], capsys)
    assert code == 0, err
    assert "model: custom, lenet5, mine," in ours and "extra/deep: x" in ours
    assert ours == hydras
