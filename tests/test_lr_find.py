"""`cnntrain lr-find`: the learning-rate range test writes a plot and a CSV, suggests a learning
rate inside the swept range, stops when the loss explodes, and leaves no training run behind."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from cnntrain.cli import main
from cnntrain.commands.lr_find import centred, lr_at, suggest
from tests.conftest import run_cli, run_dirs


@pytest.mark.slow
def test_lr_find_plots_the_sweep_and_suggests_an_lr_without_a_training_run(tmp_path):
    proc = run_cli(
        ["lr-find", "experiment=smoke", "steps=40", "lr_min=1e-6", "lr_max=1", "trainer.progress=plain"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    (out,) = (tmp_path / "runs" / "lr_find").iterdir()  # the default folder, printed
    assert f"plot           {out.relative_to(tmp_path)}/lr_find.png" in proc.stdout
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "lr_find.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    info = json.loads((out / "lr_find.json").read_text())
    assert len(rows) == info["steps_done"] >= 10
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-6) and all(b > a for a, b in zip(lrs, lrs[1:], strict=False))
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    s = info["suggested_lr"]
    assert math.isfinite(s) and 1e-6 <= s <= 1
    assert f"optimizer.lr={s:.2g}" in proc.stdout
    assert f"cnntrain fit experiment=smoke optimizer.lr={s:.2g}" in proc.stdout
    log = (out / "lr_find.log").read_text()  # the command's log beside its results, from the start
    assert "cnntrain lr-find" in log and f"optimizer.lr={s:.2g}" in log
    # A throwaway run: no run directory of the experiment, nothing but the lr_find folder.
    assert run_dirs(tmp_path) == [] and not (tmp_path / "runs" / "smoke").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lr_find"]


@pytest.mark.slow
def test_lr_find_stops_when_the_loss_explodes(tmp_path):
    proc = run_cli(
        ["lr-find", "experiment=smoke", "optimizer=sgd", "lr_min=1e-4", "lr_max=1e4", "steps=40", "out=sweep"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "sweep" / "lr_find.json").read_text())
    assert info["stopped_early"] and info["steps_done"] < 40
    assert "stopped: the loss exploded" in proc.stdout
    # The suggestion lies below where it blew up.
    assert 1e-4 <= info["suggested_lr"] < info["lr_range"][1]
    assert not (tmp_path / "runs").exists()


def test_suggestion_is_where_a_smoothed_noisy_curve_falls_fastest():
    steps = 100
    lrs = [lr_at(i, steps, 1e-6, 1.0) for i in range(steps)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    x = np.log10(lrs)
    # Falls fastest at lr 1e-3, bottoms out, then blows up past 0.1.
    clean = 2.3 - 1.5 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -1, 30 * (x + 1) ** 2, 0)
    noisy = clean + np.random.default_rng(0).normal(0, 0.1, steps)
    curve = centred(list(noisy), 0.8)
    steepest, min10 = suggest(lrs, curve)
    assert 10**-3.4 < steepest < 10**-2.6
    assert 1e-3 < min10 < 2e-2  # the bottom lies around 1e-2..1e-1
    # Too short a curve before its minimum: no steepest point, min/10 still given.
    assert suggest(lrs[:3], [2.0, 1.0, 3.0])[0] is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["lr_mni=1e-5"], "unknown key 'lr_mni' for cnntrain lr-find (did you mean 'lr_min'?)"),
        (["lr_min=1", "lr_max=0.1"], "lr_max=0.1 must be above lr_min=1"),
        (["steps=many"], "steps"),
        (["suggest=best"], "suggest=best must be one of: steepest, min10"),
        (["model=nope"], "unknown model 'nope'"),
        (["trainer.epoch=3"], "unknown key 'trainer.epoch'"),
        (["resume=runs/x"], "lr-find starts from the configured model"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(["lr-find", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cnntrain: error: ") and expected in err and len(err.strip().splitlines()) == 1


def test_help_lists_the_keys(capsys):
    main(["lr-find", "--help"])
    out = capsys.readouterr().out
    assert all(k in out for k in ("lr_min=", "lr_max=", "steps=", "suggest=", "out="))
    main(["--help"])
    assert "lr-find" in capsys.readouterr().out
