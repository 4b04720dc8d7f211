"""trainer.micro_batch (gradient accumulation in chunks) and the timed choice of layout and chunk (engine.tuning)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from cnntrain.config import AugmentConfig, FitConfig
from cnntrain.config.compose import compose_fit
from cnntrain.engine import tuning
from tests.conftest import run_cli, run_dirs, summary


def _step(micro_batch, mixup=True, class_weights=None):
    from cnntrain.augment import build_augment
    from cnntrain.engine.device import FP32
    from cnntrain.engine.inputs import Normalise
    from cnntrain.engine.step import TrainStep
    from cnntrain.models import build_model

    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(FitConfig).model, 1, (28, 28), 10)
    assert not tuning.has_batch_norm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # unlike Adam, sees a gradient's scale
    augment = build_augment(AugmentConfig(name="mix", mixup_alpha=0.4), 10) if mixup else None
    return TrainStep(
        model=model,
        forward=model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        normalise=Normalise.of([0.5], [0.25], "cpu"),
        precision=FP32,
        augment=augment,
        label_smoothing=0.1,
        micro_batch=micro_batch,
        class_weights=class_weights,
    )


def _train(step, steps=20):
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        x_u8 = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (48,), generator=g)
        x, target = step.prepare(x_u8, y, i)
        assert target.ndim == (2 if step.augment is not None else 1)  # mixup: soft targets
        logits, loss, stepped = step.train(x, target)
        assert stepped and logits.shape == (48, 10) and loss.ndim == 0
    return step.model.state_dict()


def test_chunks_train_the_same_weights_as_the_whole_batch():
    whole = _train(_step(None))
    # 20 + 20 + 8: a chunk that does not divide the batch, so each chunk's share must be weighted by its size.
    chunked = _train(_step(20))
    for k in whole:
        assert torch.allclose(whole[k], chunked[k], rtol=1e-4, atol=1e-5), k
    assert any(not torch.equal(whole[k], chunked[k]) for k in whole)  # two paths: the sums ran in another order


def test_chunks_with_class_weights_train_the_same_weights_as_the_whole_batch():
    """With class weights on hard labels cross_entropy's mean divides by the targets' weights, not the image
    count: a chunk's share is its share of those weights."""
    # Five steps: with weights up to 10, SGD with momentum magnifies the sums' rounding over twenty (to about
    # 2e-4), while shares by image count are already 5e-3 off after five.
    weights = torch.tensor([1.0, 10.0, 0.5, 2.0, 1.0, 1.0, 3.0, 1.0, 0.2, 1.0])
    whole = _train(_step(None, mixup=False, class_weights=weights), steps=5)
    chunked = _train(_step(20, mixup=False, class_weights=weights), steps=5)
    for k in whole:
        assert torch.allclose(whole[k], chunked[k], rtol=1e-4, atol=1e-5), k


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "cnntrain" / tuning.CACHE_FILE


def _build(tmp_path, *overrides):
    from cnntrain.config import typed
    from cnntrain.engine.build import build_run

    cfg = compose_fit(
        ["experiment=smoke", "trainer.precision=32", "trainer.num_threads=1", "trainer.progress=none", *overrides]
    )
    return build_run(typed(cfg), tmp_path / "run")


def test_the_probe_times_once_and_the_second_run_uses_its_cache(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(tuning, "BUDGET_SHARE", 1.0)  # smoke is too short a run to earn a probe otherwise
    monkeypatch.setattr(tuning, "MIN_STEPS", 0)
    first = _build(tmp_path, "trainer.micro_batch=auto").progress.tuning
    assert first["how"].startswith("measured in "), first
    assert float(first["how"].split()[2]) <= tuning.BUDGET_S + 0.2
    entries = json.loads(cache.read_text())
    assert sorted(k.split("|")[0] for k in entries) == ["chunk", "layout"]

    def no_timing(*args):
        raise AssertionError("timed again despite the cache")

    monkeypatch.setattr(tuning._Probe, "time", no_timing)
    second = _build(tmp_path, "trainer.micro_batch=auto")
    assert second.progress.tuning == {**first, "how": "cached"}
    assert second.step.normalise.channels_last == first["channels_last"]
    assert second.step.micro_batch == first["micro_batch"]
    assert next(second.model.parameters()).is_contiguous(
        memory_format=torch.channels_last if first["channels_last"] else torch.contiguous_format
    )
    # Deterministic runs never time: the fixed rule (CPU: channels_last, whole batch), whatever the cache says.
    fixed = _build(tmp_path, "trainer.micro_batch=auto", "trainer.deterministic=true").progress.tuning
    assert fixed == {"channels_last": True, "micro_batch": None, "how": "rule: deterministic runs do not time"}


def test_forced_values_are_not_timed_and_batch_norm_keeps_the_whole_batch(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(tuning, "BUDGET_SHARE", 1.0)
    monkeypatch.setattr(tuning._Probe, "time", lambda *a: pytest.fail("timed a forced choice"))
    run = _build(tmp_path, "trainer.channels_last=true", "trainer.micro_batch=8")
    assert run.progress.tuning == {"channels_last": True, "micro_batch": 8, "how": "set"}
    with pytest.warns(UserWarning, match="micro_batch=8: the model's BatchNorm layers normalise each chunk of 8"):
        _build(tmp_path, "model=simple_cnn_bn", "trainer.channels_last=false", "trainer.micro_batch=8")
    bn = _build(tmp_path, "model=simple_cnn_bn", "trainer.channels_last=false", "trainer.micro_batch=auto")
    assert bn.progress.tuning == {
        "channels_last": False,
        "micro_batch": None,
        "how": "rule: BatchNorm keeps the whole batch",
    }


FIT = ["experiment=smoke", "trainer.precision=32", "trainer.num_threads=1", "trainer.micro_batch=auto"]


def _seed_cache(cache, channels_last, micro_batch):
    """The verdicts a probe on this machine would have cached for FIT, as the subprocess computes its keys."""
    from cnntrain.config import typed
    from cnntrain.engine.device import FP32

    cfg = typed(compose_fit(FIT))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine part of the key names the thread count the run trains with
    try:
        keys = (cfg.model, cfg.trainer.batch_size, torch.device("cpu"), FP32, (1, 28, 28), channels_last)
        layout, _ = tuning.cache_keys(*keys)
        _, chunk = tuning.cache_keys(*keys)
    finally:
        torch.set_num_threads(threads)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({layout: {"channels_last": channels_last}, chunk: {"micro_batch": micro_batch}}))


def test_a_resumed_run_keeps_the_recorded_layout_and_chunk(tmp_path, cache):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    # Not what fp32's rule would pick (contiguous, whole batch): it can only come from the cache.
    _seed_cache(cache, True, 8)
    proc = run_cli(["fit", *FIT, "trainer.epochs=1"], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "channels_last, chunks of 8 (gradients accumulated) (cached)" in proc.stdout
    (run_dir,) = run_dirs(tmp_path)
    recorded = {"channels_last": True, "micro_batch": 8, "how": "cached"}
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["progress"]["tuning"] == recorded
    assert summary(run_dir)["tuning"] == recorded
    _seed_cache(cache, False, None)  # the machine's verdict has changed since
    proc = run_cli(["fit", f"resume={run_dir}", "trainer.epochs=2"], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "channels_last, chunks of 8 (gradients accumulated) (as recorded in the checkpoint)" in proc.stdout
    kept = {**recorded, "how": "as recorded in the checkpoint"}
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["progress"]["tuning"] == kept
    assert summary(run_dir)["tuning"] == kept and summary(run_dir)["status"] == "completed"


@pytest.mark.slow
def test_a_resumed_run_with_a_timed_choice_is_bitwise_equal_to_an_uninterrupted_one(tmp_path, cache):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    _seed_cache(cache, True, 8)
    assert run_cli(["fit", *FIT, "trainer.epochs=2"], straight, env=env).returncode == 0
    assert run_cli(["fit", *FIT, "trainer.epochs=1"], split, env=env).returncode == 0
    (first,) = run_dirs(split)
    _seed_cache(cache, False, None)
    assert run_cli(["fit", f"resume={first}", "trainer.epochs=2"], split, env=env).returncode == 0
    (reference,) = run_dirs(straight)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (reference, first))
    assert a["progress"]["tuning"]["channels_last"] and b["progress"]["tuning"]["micro_batch"] == 8
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def _fake_timing(monkeypatch, seconds):
    """Step times by candidate (channels_last, micro_batch), so the choice does not depend on this machine's noise."""

    def fake(self, cand):
        self.seen.add(cand)
        return seconds[cand]

    monkeypatch.setattr(tuning._Probe, "time", fake)


def test_the_fastest_candidate_wins_only_by_a_clear_margin(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(tuning, "BUDGET_SHARE", 1.0)
    monkeypatch.setattr(tuning, "MIN_STEPS", 0)
    args = ("trainer.batch_size=128", "trainer.micro_batch=auto")  # chunks of 32 and 16 are timed
    # The CPU rule says channels_last; contiguous is 20% faster, and in it chunks of 32 are 10% faster than the
    # whole batch and chunks of 16 only 1% (within the margin, but slower than 32 anyway).
    _fake_timing(monkeypatch, {(True, None): 0.012, (False, None): 0.010, (False, 32): 0.009, (False, 16): 0.0099})
    run = _build(tmp_path, *args)
    assert run.progress.tuning["channels_last"] is False and run.progress.tuning["micro_batch"] == 32
    assert run.step.micro_batch == 32 and not run.step.normalise.channels_last
    cache.unlink()
    # 2% faster is noise on a shared machine: the defaults stay.
    _fake_timing(monkeypatch, {(True, None): 0.010, (False, None): 0.0098, (True, 32): 0.0098, (True, 16): 0.0098})
    assert _build(tmp_path, *args).progress.tuning["channels_last"] is True
    assert json.loads(cache.read_text()) and _build(tmp_path, *args).progress.tuning["micro_batch"] is None


def test_chunks_are_raced_against_fresh_steps_of_the_whole_batch(tmp_path, cache, monkeypatch):
    # A process settles in its first steps (its heap grows, the other layout's copy allocates): the layout race's
    # steps ran 3 ms slower than the whole batch's later ones. Chunks that are 5% slower than the settled whole
    # batch must not win against those stale steps, as they did in 6 of 10 fp32 fits on a 2-core EPYC.
    monkeypatch.setattr(tuning, "BUDGET_SHARE", 1.0)
    monkeypatch.setattr(tuning, "MIN_STEPS", 0)
    settled = {(True, None): 0.010, (False, None): 0.014, (True, 32): 0.0105, (True, 16): 0.0105}

    def fake(self, cand):
        chunks_timed = any(micro is not None for _, micro in self.seen)
        self.seen.add(cand)
        return settled[cand] + (0.0 if chunks_timed else 0.003)

    monkeypatch.setattr(tuning._Probe, "time", fake)
    run = _build(tmp_path, "trainer.batch_size=128", "trainer.micro_batch=auto")
    assert run.progress.tuning["channels_last"] is True and run.progress.tuning["micro_batch"] is None


def test_a_run_too_short_for_the_probe_keeps_the_rule_and_caches_nothing(tmp_path, cache, monkeypatch):
    _fake_timing(monkeypatch, {(True, None): 0.01, (False, None): 0.001})  # contiguous would win by far
    monkeypatch.setattr(tuning, "MIN_STEPS", 0)
    run = _build(tmp_path, "trainer.epochs=1")  # 32 steps: their 5% would not pay for two rounds of both layouts
    assert run.progress.tuning["channels_last"] is True
    assert run.progress.tuning["how"].startswith("rule: too short a run to time (")  # found out by timing a step
    assert not cache.exists()
    monkeypatch.setattr(tuning, "MIN_STEPS", 200)
    monkeypatch.setattr(tuning._Probe, "time", lambda *a: pytest.fail("timed a run shorter than MIN_STEPS"))
    # smoke's 96 steps (fault-injection tests count its losses and steps: a probe there would shift them)
    assert _build(tmp_path).progress.tuning["how"] == "rule: too short a run to time"
