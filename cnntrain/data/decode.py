"""Reading one image file the way training reads it: probe, channel conversion, resize.

The image-folder loader, the streaming workers and `cnntrain predict` all decode through here, so
an image is converted the same way in training and in inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# PIL modes that carry no colour; anything else (RGB, RGBA, P, CMYK, YCbCr, ...) counts as colour.
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def oneline(e: BaseException) -> str:
    """An exception's text on one line (decoder and download errors span several)."""
    return " ".join(str(e).split())


def probe(path: Path) -> tuple[bool, tuple[int, int]] | str:
    """(is grayscale, (width, height)) from the file header, or the reason it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            gray = im.mode in GRAY_MODES
            if im.mode == "P":  # a palette of greys is still a grayscale image
                pal = im.getpalette() or [0, 0, 1]
                gray = pal[0::3] == pal[1::3] == pal[2::3]
            return gray, im.size
    except Exception as e:  # any decoder failure means "not a usable image"
        return f"{type(e).__name__}: {oneline(e)}"


def to_channels(im: Any, channels: int) -> Any:
    from PIL import Image

    if im.mode.startswith("I"):
        # 16/32-bit grayscale: PIL's convert('L') would clip, so scale to 8 bits instead.
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return im.convert("L" if channels == 1 else "RGB")


def decode_into(out: np.ndarray, i: int, path: Path, channels: int) -> str | None:
    """Decode, convert and resize one image into out[i]; the reason on failure, else None."""
    from PIL import Image

    _, c, h, w = out.shape
    try:
        with Image.open(path) as im:
            if im.size != (w, h):
                im.draft("L" if channels == 1 else "RGB", (w, h))  # JPEG: decode at reduced scale when shrinking
            im = to_channels(im, channels)
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            a = np.asarray(im)
    except Exception as e:  # truncated data and the like only show when decoding
        return f"{type(e).__name__}: {oneline(e)}"
    out[i] = a.reshape(h, w, c).transpose(2, 0, 1)
    return None


# --------------------------------------------------------------------------- in-memory images (custom datasets)

IMAGE_TYPES = "PIL images, uint8 numpy arrays or uint8 torch tensors (HW, HWC or CHW)"


def as_hwc(image: Any, what: str) -> np.ndarray:
    """A PIL image, uint8 array or uint8 tensor (HW, HWC or CHW) -> uint8 [H, W, C] with C 1 or 3.

    Tensors are read as CHW and arrays as HWC when both would fit (the libraries' own conventions);
    an alpha channel is dropped.
    """
    from PIL import Image

    from cnntrain.errors import UserError

    if isinstance(image, Image.Image):
        gray = image.mode in GRAY_MODES or (image.mode == "P" and _gray_palette(image))
        a = np.asarray(to_channels(image, 1 if gray else 3))
        return a[:, :, None] if a.ndim == 2 else a
    chw_first = False
    if type(image).__module__.startswith("torch"):
        import torch

        if not isinstance(image, torch.Tensor):
            raise UserError(f"{what}: the image is a {type(image).__name__}; return {IMAGE_TYPES}")
        if image.dtype != torch.uint8:
            raise UserError(
                f"{what}: the image is a {image.dtype} tensor; return uint8 pixels (0-255) as "
                f"{IMAGE_TYPES}; cnntrain normalises them itself (drop ToTensor()/Normalize)"
            )
        image, chw_first = image.detach().cpu().numpy(), True
    elif not isinstance(image, np.ndarray):
        raise UserError(f"{what}: the image is a {type(image).__name__}; return {IMAGE_TYPES}")
    elif image.dtype != np.uint8:
        raise UserError(f"{what}: the image is a {image.dtype} array; return uint8 pixels (0-255) as {IMAGE_TYPES}")
    a = image
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.ndim == 3:
        small = (1, 2, 3, 4)
        if a.shape[0] in small and (chw_first or a.shape[2] not in small):
            a = a.transpose(1, 2, 0)
        elif a.shape[2] not in small:
            raise UserError(
                f"{what}: cannot tell the channels of an image of shape {tuple(image.shape)}; "
                "give 1, 3 or 4 channels first (CHW) or last (HWC)"
            )
    else:
        raise UserError(f"{what}: the image has shape {tuple(image.shape)}; give HW, HWC or CHW")
    c = a.shape[2]
    if c == 2:
        a = a[:, :, :1]  # grayscale + alpha
    elif c == 4:
        a = a[:, :, :3]  # RGBA
    return np.ascontiguousarray(a)


def _gray_palette(im: Any) -> bool:
    pal = im.getpalette() or [0, 0, 1]
    return pal[0::3] == pal[1::3] == pal[2::3]


def to_uint8_chw(image: Any, channels: int, size: tuple[int, int], what: str) -> np.ndarray:
    """One image of a user's dataset -> uint8 [channels, H, W] at size (H, W): channel conversion and
    bilinear resize as image files get them."""
    from PIL import Image

    a = as_hwc(image, what)
    h, w = size
    if a.shape[2] != channels or a.shape[:2] != (h, w):
        im = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, "L" if a.shape[2] == 1 else "RGB")
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        a = np.asarray(im).reshape(h, w, channels)
    return a.transpose(2, 0, 1)
