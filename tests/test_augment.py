"""Batched augmentation: each op does what its config says, reproducibly, within [0, 1]."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cnntrain.augment import build_augment
from cnntrain.augment.ops import (
    POLICY_OPS,
    apply_policy_ops,
    equalize,
    random_policy,
    rotation,
    warp,
)
from cnntrain.config import AugmentConfig, FitConfig, validate
from cnntrain.errors import UserError

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "augment"
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The batches here are tiny: extra intra-op threads only add overhead (a lot on a busy machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def preset(name: str) -> AugmentConfig:
    node = OmegaConf.merge(OmegaConf.structured(AugmentConfig), OmegaConf.load(PRESET_DIR / f"{name}.yaml"))
    return OmegaConf.to_object(node)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(cfg: AugmentConfig, x: torch.Tensor, seed: int = 0, num_classes: int = 10):
    aug = build_augment(cfg, num_classes)
    assert aug is not None
    y = torch.arange(x.shape[0]) % num_classes
    return aug(x, y, gen(seed))


def asymmetric(b: int = 8, c: int = 1, size: int = 28) -> torch.Tensor:
    """A bright 'L' in the left half plus a dim ramp: no flip or rotation maps it onto itself."""
    img = torch.zeros(c, size, size)
    img[:, 4:22, 5:9] = 1.0
    img[:, 18:22, 5:13] = 1.0
    img += torch.linspace(0, 0.3, size).view(1, size, 1) * (img == 0)
    return img.expand(b, c, size, size).clone()


def centroid(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] -> [B, 2] intensity centroid (row, col)."""
    h, w = x.shape[-2:]
    mass = x.sum((1, 2, 3))
    rows = (x.sum((1, 3)) * torch.arange(h)).sum(1) / mass
    cols = (x.sum((1, 2)) * torch.arange(w)).sum(1) / mass
    return torch.stack([rows, cols], 1)


# ------------------------------------------------------------------ presets and building


def test_presets_parse_and_describe_themselves():
    assert {"none", "digits", "fashion", "standard", "randaugment", "trivialaugment", "mixup", "cutmix",
            "erasing"} <= set(PRESETS)  # fmt: skip
    for name in PRESETS:
        first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 10, name
        assert preset(name).name == name


def test_none_builds_nothing_and_every_other_preset_builds():
    assert build_augment(preset("none"), 10) is None
    assert build_augment(AugmentConfig(), 10) is None
    for name in set(PRESETS) - {"none"}:
        assert build_augment(preset(name), 10) is not None, name


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"none"}))
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_keep_shape_dtype_range_and_change_images(name, channels):
    x = torch.rand(16, channels, 28, 28)
    out, target = run(preset(name), x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    if name in ("mixup", "cutmix"):
        assert target.shape == (16, 10) and target.dtype == torch.float32
    else:
        assert torch.equal(target, torch.arange(16) % 10)


def test_digits_preset_never_mirrors():
    cfg = preset("digits")
    assert cfg.hflip == 0 and cfg.vflip == 0
    x = asymmetric(64)
    out, _ = run(cfg, x)
    same = (out * x).flatten(1).sum(1)
    mirrored = (out * x.flip(-1)).flatten(1).sum(1)
    assert (same > mirrored).all() and (same / mirrored).median() > 1.5
    assert not torch.equal(out[0], out[1])  # per-sample parameters


def test_invalid_policy_is_a_user_error():
    # config.validate's checks, before anything is built.
    with pytest.raises(UserError, match="augment.policy.*randaugment"):
        validate(FitConfig(augment=AugmentConfig(policy="randaugmnt")))
    with pytest.raises(UserError, match="policy_magnitude"):
        validate(FitConfig(augment=AugmentConfig(policy="randaugment", policy_magnitude=31)))


@pytest.mark.parametrize("policy", ["none", "trivialaugment"])
def test_randaugment_keys_under_another_policy_warn_that_they_are_ignored(policy):
    cfg = dataclasses.replace(AugmentConfig(), policy=policy, policy_ops=3)
    with pytest.warns(
        UserWarning, match=rf"augment.policy_ops=3 only apply to augment.policy=randaugment, not '{policy}'"
    ):
        build_augment(cfg, 10)
    cfg = dataclasses.replace(AugmentConfig(), policy="randaugment", policy_ops=3, policy_magnitude=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_augment(cfg, 10) is not None


def test_crop_padding_larger_than_image_is_a_user_error():
    with pytest.raises(UserError, match="crop_padding"):
        run(AugmentConfig(crop_padding=8), torch.rand(2, 1, 8, 8))


# ------------------------------------------------------------------ reproducibility and layout


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment", "mixup", "cutmix", "erasing", "digits"])
def test_same_generator_state_same_output(name):
    x = torch.rand(8, 3, 32, 32)
    g = gen(3)
    state = g.get_state()
    aug = build_augment(preset(name), 10)
    y = torch.arange(8)
    torch.manual_seed(1)
    a, ya = aug(x, y, g)
    g.set_state(state)
    torch.manual_seed(2)  # the global RNG must not matter
    b, yb = aug(x, y, g)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    c, _ = aug(x, y, g)  # the generator moved on
    d, _ = aug(x, y, gen(4))
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_channels_last_input_gives_the_same_images_in_the_same_layout():
    x = torch.rand(8, 3, 32, 32)
    cfg = dataclasses.replace(preset("randaugment"), erasing=0.5, rotate=10.0, mixup_alpha=0.2)
    a, ya = run(cfg, x)
    b, yb = run(cfg, x.contiguous(memory_format=torch.channels_last))
    assert b.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ya, yb)


def test_input_is_not_modified():
    x = torch.rand(8, 3, 32, 32)
    before = x.clone()
    run(dataclasses.replace(preset("randaugment"), erasing=1.0, cutmix_alpha=1.0), x)
    assert torch.equal(x, before)


# ------------------------------------------------------------------ geometric ops


def test_flips_with_probability_one_and_half():
    x = asymmetric(64)
    assert torch.equal(run(AugmentConfig(hflip=1.0), x)[0], x.flip(-1))
    assert torch.equal(run(AugmentConfig(vflip=1.0), x)[0], x.flip(-2))
    out, _ = run(AugmentConfig(hflip=0.5), x)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert (flipped ^ kept).all() and 16 < flipped.sum() < 48


def test_warp_by_90_degrees_is_rot90_counter_clockwise():
    x = asymmetric(2, 3, 12)
    quarter = torch.tensor([[0.0, 1.0], [-1.0, 0.0]]).expand(2, 2, 2)
    assert torch.allclose(rotation(torch.full((2,), 90.0)), quarter, atol=1e-6)  # positive angles turn left
    torch.testing.assert_close(warp(x, quarter, torch.zeros(2, 2)), torch.rot90(x, 1, (-2, -1)), atol=1e-5, rtol=0)
    # On a non-square image the turn stays rigid: a centred square maps onto itself, not onto a stretched box.
    wide = torch.zeros(1, 1, 12, 24)
    wide[..., 4:8, 10:14] = 1.0
    torch.testing.assert_close(warp(wide, quarter[:1], torch.zeros(1, 2)), wide, atol=1e-5, rtol=0)


def test_rotation_setting_rotates_within_range():
    x = asymmetric(32)
    out, _ = run(AugmentConfig(rotate=90.0), x)
    # Every output is a rotation between -90 and 90 degrees: never closer to the 180-degree turn.
    upside = torch.rot90(x, 2, (-2, -1))
    assert ((out * x).flatten(1).sum(1) > (out * upside).flatten(1).sum(1)).all()
    assert len({round(v, 3) for v in (out * x).flatten(1).sum(1).tolist()}) > 16  # angles differ per sample


def test_translate_moves_the_centroid_within_the_range():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 12:16, 12:16] = 1.0
    out, _ = run(AugmentConfig(translate=0.1), x)
    shift = centroid(out) - centroid(x)
    assert shift.abs().max() <= 0.1 * 28 + 1e-3
    assert shift.abs().max() > 1.5 and shift.std() > 0.5


def test_scale_changes_object_size_within_the_range():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    out, _ = run(AugmentConfig(scale_min=0.5, scale_max=1.5), x)
    area = out.sum((1, 2, 3)) / 64  # mass scales with the square of the factor
    assert area.min() >= 0.25 - 0.05 and area.max() <= 2.25 + 0.05
    assert area.min() < 0.6 and area.max() > 1.6


def test_crop_is_a_shifted_window_of_the_reflect_padded_image():
    x = torch.rand(16, 3, 10, 10)
    out, _ = run(AugmentConfig(crop_padding=2), x)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    offsets = set()
    for i in range(16):
        hits = [(r, c) for r in range(5) for c in range(5) if torch.equal(out[i], padded[i, :, r : r + 10, c : c + 10])]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 4


# ------------------------------------------------------------------ policies


def test_policy_op_identity_and_pixel_ops_by_index():
    x = torch.rand(6, 3, 16, 16)
    n = x.shape[0]

    def apply(name, magnitude=1.0, sign=1.0):
        return apply_policy_ops(x, torch.full((n,), POLICY_OPS.index(name)), torch.full((n,), magnitude),
                                torch.full((n,), sign))  # fmt: skip

    assert torch.equal(apply("identity"), x)
    torch.testing.assert_close(apply("solarize", 0.5), torch.where(x >= 0.5, 1 - x, x))
    torch.testing.assert_close(apply("brightness", 0.5, -1.0), x * 0.55)
    assert apply("posterize", 1.0).mul(255).round().unique().remainder(16).eq(0).all()  # 4 bits left
    stretched = apply("autocontrast")
    assert torch.allclose(stretched.amin((2, 3)), torch.zeros(1)) and torch.allclose(
        stretched.amax((2, 3)), torch.ones(1)
    )
    torch.testing.assert_close(apply("rotate"), warp(x, torch.tensor([[0.866025, 0.5], [-0.5, 0.866025]]).expand(n, 2, 2),
                                                     torch.zeros(n, 2)), atol=1e-4, rtol=0)  # fmt: skip


def test_policy_picks_an_op_per_sample():
    n = 2 * len(POLICY_OPS)
    x = torch.rand(n, 3, 16, 16)
    op = torch.arange(n) % len(POLICY_OPS)
    out = apply_policy_ops(x, op, torch.full((n,), 0.5), torch.ones(n))
    for i in range(n):
        alone = apply_policy_ops(x[i : i + 1], op[i : i + 1], torch.full((1,), 0.5), torch.ones(1))
        torch.testing.assert_close(out[i : i + 1], alone, atol=1e-5, rtol=0)


def test_equalize_flattens_the_histogram():
    x = (torch.rand(2, 1, 32, 32) * 0.2 + 0.4).mul(255).round().div(255)  # a narrow band of levels
    out = equalize(x)
    assert out.min() == 0 and out.max() == 1
    assert out.std() > 2 * x.std()
    assert torch.equal(equalize(torch.full((1, 1, 4, 4), 0.5)), torch.full((1, 1, 4, 4), 0.5))


def test_trivialaugment_draws_one_op_with_varied_magnitudes_per_image():
    x = torch.rand(1, 1, 16, 16).expand(64, 1, 16, 16).contiguous()
    out = random_policy(x, gen(0), num_ops=1, magnitude=None)
    changed = (out != x).flatten(1).any(1)
    distinct = {tuple(o.flatten()[:32].tolist()) for o in out}
    assert 32 < changed.sum() < 64  # identity (and magnitude-0 ops) leave some untouched
    assert len(distinct) > 30


# ------------------------------------------------------------------ erasing, mixup, cutmix


def test_erasing_changes_one_rectangle_only():
    x = torch.full((32, 1, 24, 24), 0.5)
    out, _ = run(AugmentConfig(erasing=1.0), x)
    for img in out[:, 0]:
        changed = img != 0.5
        rows = changed.any(1).nonzero().flatten()
        cols = changed.any(0).nonzero().flatten()
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert changed.sum() == box  # a filled rectangle
        assert 0.02 * 576 * 0.7 <= box <= 0.33 * 576 * 1.3
    none, _ = run(AugmentConfig(erasing=0.5), x)
    erased = (none != 0.5).flatten(1).any(1).sum()
    assert 6 < erased < 26


def constant_batch(b: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant (i + 1) / (b + 1): a pixel value tells which image it came from."""
    levels = (torch.arange(b) + 1.0) / (b + 1)
    return levels.view(b, 1, 1, 1).expand(b, 1, 8, 8).clone(), levels


def test_mixup_targets_are_the_pixel_mixing_weights():
    x, levels = constant_batch()
    out, target = run(AugmentConfig(mixup_alpha=0.4), x, num_classes=16)
    torch.testing.assert_close(target.sum(1), torch.ones(16))
    assert ((target > 0).sum(1) <= 2).all() and (target >= 0).all()
    torch.testing.assert_close(out[:, 0, 0, 0], target @ levels)
    assert (out == out[:, :, :1, :1]).all()  # a blend, no box


def test_cutmix_targets_are_the_pasted_area_fractions():
    x, levels = constant_batch()
    for seed in range(4):
        out, target = run(AugmentConfig(cutmix_alpha=1.0), x, seed=seed, num_classes=16)
        share = (out.flatten(1).unsqueeze(2) == levels).float().mean(1)  # [B, source image]
        torch.testing.assert_close(target, share)


def test_mixup_or_cutmix_per_batch_when_both_are_set():
    x, _ = constant_batch()
    kinds = set()
    for seed in range(12):
        out, target = run(AugmentConfig(mixup_alpha=1.0, cutmix_alpha=1.0), x, seed=seed, num_classes=16)
        torch.testing.assert_close(target.sum(1), torch.ones(16))
        kinds.add("cutmix" if (out.flatten(1).unique(dim=1).shape[1] > 1) else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_mixup_lambda_is_one_host_draw_per_step():
    x, _ = constant_batch()
    own = torch.arange(16)  # run() labels image i with class i
    draws = []
    for seed in range(200):
        _, target = run(AugmentConfig(mixup_alpha=0.4), x, seed=seed, num_classes=16)
        draws.append(target[own, own].min().item())  # an image's own label keeps lambda
    again = [run(AugmentConfig(mixup_alpha=0.4), x, seed=seed, num_classes=16)[1] for seed in range(3)]
    assert all(
        torch.equal(a, run(AugmentConfig(mixup_alpha=0.4), x, seed=s, num_classes=16)[1]) for s, a in enumerate(again)
    )  # a function of the step's seed alone
    # Beta(0.4, 0.4) is U-shaped: most lambdas lie near 0 or 1, and they vary from step to step.
    assert len(set(draws)) > 150 and sum(d < 0.1 for d in draws) > 40
