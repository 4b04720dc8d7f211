"""Batched data augmentation that runs on the training device, inside the loop.

The loop hands over a whole batch of float images in [0, 1]. Every op draws its
per-sample parameters as tensors from the caller's ``torch.Generator`` and applies them
with masks, one gather or one ``grid_sample``: no per-sample Python, no host-device sync,
and restoring ``gen.get_state()`` replays exactly the same augmentations.

Order: flips -> affine warp -> pad-and-crop -> policy (RandAugment / TrivialAugment)
-> random erasing -> Mixup / CutMix. Validation and test batches never come here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cnntrain.config import POLICY_MAX_MAGNITUDE
from cnntrain.errors import UserError

# torchvision's convention: magnitudes are bins 0..30 (the schema's range of augment.policy_magnitude); bin 30 is
# the strongest version of an op.
MAX_MAGNITUDE = POLICY_MAX_MAGNITUDE

# Policy ops, in a fixed order (the index is what each sample draws).
POLICY_OPS = (
    "identity", "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
    "autocontrast", "equalize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
)  # fmt: skip
_OP = {name: i for i, name in enumerate(POLICY_OPS)}
# Strength at the top magnitude (the same ranges for both policies).
_ENHANCE_MAX = 0.9  # brightness/color/contrast/sharpness factor 1 +- 0.9
_ROTATE_MAX = 30.0  # degrees
_SHEAR_MAX = 0.3  # shear factor
_TRANSLATE_MAX = 150 / 331  # fraction of the image size
_POSTERIZE_MAX_BITS_DROPPED = 4  # 8 bits -> 4 bits

# Random erasing: area fraction and aspect ratio (h / w) of the rectangle.
_ERASE_AREA = (0.02, 0.33)
_ERASE_RATIO = (0.3, 3.3)

Step = Callable[[Tensor, torch.Generator], Tensor]


# --------------------------------------------------------------------------- helpers


def _rand(gen: torch.Generator, x: Tensor, *size: int) -> Tensor:
    return torch.rand(size, generator=gen, device=x.device)


def _per_sample(v: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1], to broadcast over an image batch."""
    return v.view(-1, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    """Luma of an RGB batch (ITU-R 601 weights); single-channel images are their own gray."""
    if x.shape[1] != 3:
        return x
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def rotation(angle_deg: Tensor) -> Tensor:
    """[B] angles -> [B, 2, 2] forward matrices turning content counter-clockwise on screen (y points down)."""
    a = torch.deg2rad(angle_deg)
    cos, sin = torch.cos(a), torch.sin(a)
    return torch.stack([cos, sin, -sin, cos], 1).view(-1, 2, 2)


def warp(x: Tensor, lin: Tensor, shift: Tensor) -> Tensor:
    """Move the content at pixel offset p from the image centre to ``lin @ p + shift``.

    ``lin`` is [B, 2, 2] and ``shift`` [B, 2] in pixels, (x, y) order. Bilinear, zeros
    outside the image. Working in pixels keeps rotations rigid on non-square images.
    """
    b, c, h, w = x.shape
    p, q, r, s = lin[:, 0, 0], lin[:, 0, 1], lin[:, 1, 0], lin[:, 1, 1]
    # grid_sample wants the inverse map (output -> input); 2x2 inverse in closed form.
    inv = torch.stack([s, -q, -r, p], 1).view(b, 2, 2) / (p * s - q * r).view(b, 1, 1)
    # Normalised coordinates are n = S p with S = diag(2/W, 2/H) (align_corners=False), so
    # the map becomes S inv S^-1. Python scalars only: a small tensor built from a list would
    # be a blocking host-to-device copy on CUDA.
    inv_n = torch.stack([inv[:, 0, 0], inv[:, 0, 1] * (h / w), inv[:, 1, 0] * (w / h), inv[:, 1, 1]], 1).view(b, 2, 2)
    shift_n = torch.stack([shift[:, 0] * (2.0 / w), shift[:, 1] * (2.0 / h)], 1)
    offset = -(inv_n @ shift_n.unsqueeze(2))
    theta = torch.cat([inv_n, offset], 2).to(x.dtype)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _reflect(idx: Tensor, n: int) -> Tensor:
    """Reflect indices in [-(n-1), 2(n-1)] into [0, n-1] without repeating the edge (like reflect padding)."""
    idx = idx.abs()
    return (n - 1) - ((n - 1) - idx).abs()


# --------------------------------------------------------------------------- geometric ops


def random_flip(x: Tensor, gen: torch.Generator, p: float, dim: int) -> Tensor:
    flip = _per_sample(_rand(gen, x, x.shape[0]) < p)
    return torch.where(flip, x.flip(dim), x)


def random_affine(
    x: Tensor, gen: torch.Generator, rotate: float, scale_min: float, scale_max: float, translate: float
) -> Tensor:
    """One warp per sample: rotation in +-rotate degrees, isotropic scale, shift of +-translate of the size."""
    b, _, h, w = x.shape
    r = _rand(gen, x, b, 4)
    angle = (2 * r[:, 0] - 1) * rotate
    scale = scale_min + r[:, 1] * (scale_max - scale_min)
    shift = torch.stack([(2 * r[:, 2] - 1) * (translate * w), (2 * r[:, 3] - 1) * (translate * h)], 1)
    return warp(x, rotation(angle) * scale.view(b, 1, 1), shift).clamp_(0, 1)


def random_crop(x: Tensor, gen: torch.Generator, padding: int) -> Tensor:
    """Reflect-pad by ``padding`` and crop back at a per-sample offset, as one gather (no padded copy)."""
    b, c, h, w = x.shape
    if padding >= min(h, w):
        raise UserError(f"augment.crop_padding={padding} must be smaller than the image size ({h}x{w})")
    off = torch.randint(-padding, padding + 1, (b, 2), generator=gen, device=x.device)
    rows = _reflect(torch.arange(h, device=x.device) + off[:, :1], h)  # [B, H]
    cols = _reflect(torch.arange(w, device=x.device) + off[:, 1:], w)  # [B, W]
    idx = (rows.unsqueeze(2) * w + cols.unsqueeze(1)).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, idx).view(b, c, h, w)


# --------------------------------------------------------------------------- policy ops


def _smooth(x: Tensor) -> Tensor:
    """PIL's 3x3 SMOOTH filter (ones with 5 in the centre, /13), border pixels kept.

    Written as shifted-slice sums: a depthwise conv2d is tens of times slower on CPU.
    """
    if x.shape[-2] < 3 or x.shape[-1] < 3:
        return x
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = x.clone()
    out[..., 1:-1, 1:-1] = (box + 4 * x[..., 1:-1, 1:-1]) / 13
    return out


def equalize(x: Tensor) -> Tensor:
    """Histogram equalisation per image and channel over 256 levels (textbook CDF mapping, min -> 0, max -> 1).

    Batched as one scatter_add into a [B*C, 256] histogram; constant channels are left alone.
    """
    b, c, h, w = x.shape
    levels = (x.reshape(b * c, h * w) * 255).round_().long().clamp_(0, 255)
    hist = torch.zeros(b * c, 256, device=x.device, dtype=torch.float32)
    hist.scatter_add_(1, levels, torch.ones(1, 1, device=x.device).expand_as(levels))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(cdf > 0, cdf, float(h * w)).amin(1, keepdim=True)
    span = float(h * w) - cdf_min
    lut = ((cdf - cdf_min) / span.clamp_min(1)).clamp_(0, 1)
    out = lut.gather(1, levels).to(x.dtype).view(b, c, h, w)
    return torch.where((span > 0).view(b, c, 1, 1), out, x)


def apply_policy_ops(x: Tensor, op: Tensor, magnitude: Tensor, sign: Tensor) -> Tensor:
    """Apply op[i] (index into POLICY_OPS) to sample i at strength magnitude[i] in [0, 1], direction sign[i] (+-1).

    Each op runs over the whole batch with parameters that make it an exact identity on the
    samples that did not pick it (or is masked per sample), so chaining them applies each
    sample's own op. No sub-batches: their sizes would have to be read on the host.
    """
    b, _, h, w = x.shape
    dt = x.dtype
    m = magnitude.to(dt)
    signed = m * sign.to(dt)
    picked = {name: op == i for name, i in _OP.items()}
    zero = torch.zeros_like(m)

    def only(name: str, value: Tensor, otherwise: float | Tensor) -> Tensor:
        return _per_sample(torch.where(picked[name], value, otherwise))

    # Brightness, color, contrast and sharpness blend away from a degenerate image d:
    # f*x + (1-f)*d, with f = 1 (and every d weight 0) for the other samples.
    is_blend = picked["brightness"] | picked["color"] | picked["contrast"] | picked["sharpness"]
    factor = torch.where(is_blend, 1 + _ENHANCE_MAX * signed, 1.0)
    gray = _gray(x)
    out = x * _per_sample(factor)
    out = out + only("color", 1 - factor, zero) * gray
    out = out + only("contrast", 1 - factor, zero) * gray.mean((1, 2, 3), keepdim=True)
    out = torch.addcmul(out, only("sharpness", 1 - factor, zero), _smooth(x)).clamp_(0, 1)

    step = torch.exp2(torch.round(m * _POSTERIZE_MAX_BITS_DROPPED)).view(b, 1, 1, 1)
    posterized = torch.floor(torch.round(out * 255) / step) * step / 255
    out = torch.where(_per_sample(picked["posterize"]), posterized, out)

    # Threshold 2 inverts nothing; the arithmetic form beats a per-pixel where on CPU.
    above = (out >= only("solarize", 1 - m, 2.0)).to(dt)
    out = torch.addcmul(out, above, 1 - 2 * out)

    # Autocontrast as (x - lo) * gain, with lo = 0 and gain = 1 for the other samples.
    lo = out.amin((2, 3), keepdim=True)
    hi = out.amax((2, 3), keepdim=True)
    stretch = _per_sample(picked["autocontrast"]) & (hi > lo)
    gain = torch.where(stretch, 1 / (hi - lo).clamp_min(1e-12), 1.0)
    out = ((out - torch.where(stretch, lo, 0.0)) * gain).clamp_(0, 1)

    out = torch.where(_per_sample(picked["equalize"]), equalize(out), out)

    # One warp for all geometric choices; the others are masked out.
    angle = torch.where(picked["rotate"], signed * _ROTATE_MAX, zero)
    shear_x = torch.where(picked["shear_x"], signed * _SHEAR_MAX, zero)
    shear_y = torch.where(picked["shear_y"], signed * _SHEAR_MAX, zero)
    one = torch.ones_like(zero)
    shear = torch.stack([one, shear_x, shear_y, one], 1).view(b, 2, 2)
    tx = torch.where(picked["translate_x"], signed * _TRANSLATE_MAX * w, zero)
    ty = torch.where(picked["translate_y"], signed * _TRANSLATE_MAX * h, zero)
    warped = warp(out, rotation(angle).to(dt) @ shear, torch.stack([tx, ty], 1)).clamp_(0, 1)
    is_geo = picked["rotate"] | picked["shear_x"] | picked["shear_y"] | picked["translate_x"] | picked["translate_y"]
    return torch.where(_per_sample(is_geo), warped, out)


def random_policy(x: Tensor, gen: torch.Generator, num_ops: int, magnitude: int | None) -> Tensor:
    """RandAugment (fixed magnitude, num_ops ops) or TrivialAugment (magnitude None: one op, random magnitude)."""
    b = x.shape[0]
    for _ in range(num_ops):
        op = torch.randint(0, len(POLICY_OPS), (b,), generator=gen, device=x.device)
        sign = torch.where(_rand(gen, x, b) < 0.5, -1.0, 1.0)
        if magnitude is None:
            mag = torch.randint(0, MAX_MAGNITUDE + 1, (b,), generator=gen, device=x.device) / MAX_MAGNITUDE
        else:
            mag = torch.full((b,), magnitude / MAX_MAGNITUDE, device=x.device)
        x = apply_policy_ops(x, op, mag, sign)
    return x


# --------------------------------------------------------------------------- erasing and mixing


def _box_mask(h: int, w: int, top: Tensor, left: Tensor, bottom: Tensor, right: Tensor) -> Tensor:
    """[N] box edges (bottom/right exclusive) -> bool [N, 1, H, W] masks."""
    rows = torch.arange(h, device=top.device).view(1, h, 1)
    cols = torch.arange(w, device=top.device).view(1, 1, w)
    inside = (rows >= top.view(-1, 1, 1)) & (rows < bottom.view(-1, 1, 1))
    inside = inside & (cols >= left.view(-1, 1, 1)) & (cols < right.view(-1, 1, 1))
    return inside.unsqueeze(1)


def random_erasing(x: Tensor, gen: torch.Generator, p: float) -> Tensor:
    """With probability p, fill one rectangle per image with uniform noise in [0, 1).

    Area is 2%-33% of the image and the aspect ratio (h/w) log-uniform in 0.3-3.3; a side
    that would not fit is clipped to the image instead of redrawing (no host-side retries).
    """
    b, c, h, w = x.shape
    r = _rand(gen, x, b, 5)
    area = (_ERASE_AREA[0] + r[:, 0] * (_ERASE_AREA[1] - _ERASE_AREA[0])) * (h * w)
    lo, hi = math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])
    ratio = torch.exp(lo + r[:, 1] * (hi - lo))
    eh = torch.sqrt(area * ratio).round().clamp(1, h)
    ew = torch.sqrt(area / ratio).round().clamp(1, w)
    top = torch.floor(r[:, 2] * (h - eh + 1))
    left = torch.floor(r[:, 3] * (w - ew + 1))
    mask = _box_mask(h, w, top, left, top + eh, left + ew) & _per_sample(r[:, 4] < p)
    noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return torch.where(mask, noise, x)


def _one_hot(y: Tensor, num_classes: int) -> Tensor:
    if y.dim() == 2:  # multi-hot labels (multi-label data) are their own soft targets, mixed like one-hot ones
        return y.float()
    # scatter_ rather than F.one_hot, which checks the label range on the host (a sync on CUDA).
    return torch.zeros(y.shape[0], num_classes, device=y.device).scatter_(1, y.view(-1, 1), 1.0)


def mix_batch(
    x: Tensor, y: Tensor, gen: torch.Generator, num_classes: int, mixup_alpha: float, cutmix_alpha: float
) -> tuple[Tensor, Tensor]:
    """Mixup or CutMix with a random permutation of the batch; returns soft targets [B, num_classes]. Multi-hot
    labels [B, num_classes] are mixed the same way: each label's target is lam * its own + (1 - lam) * the partner's.

    One lambda per batch, so it is drawn on the host, from a generator seeded like ``gen`` (by the
    step): no device-side sampler and no host-device sync. With both alphas set, each batch uses one
    of them at random.
    """
    b, _, h, w = x.shape
    rng = random.Random(gen.initial_seed())
    cut = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    lam = rng.betavariate(*(2 * [cutmix_alpha if cut else mixup_alpha]))
    weight: Tensor | float = lam
    if cut:  # paste a box of area (1 - lam) from the partner image
        bh, bw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
        top, left = rng.randrange(h - bh + 1), rng.randrange(w - bw + 1)
        weight = torch.ones(1, 1, h, w, device=x.device, dtype=x.dtype)
        weight[..., top : top + bh, left : left + bw] = 0
        lam = 1 - bh * bw / (h * w)  # the area actually pasted
    perm = torch.randperm(b, generator=gen, device=x.device)
    mixed = (x * weight + x[perm] * (1 - weight)).clamp_(0, 1)
    soft = lam * _one_hot(y, num_classes) + (1 - lam) * _one_hot(y[perm], num_classes)
    return mixed, soft
