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
