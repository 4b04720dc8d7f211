"""The image files that `predict` and `explain` read (`inputs=`): found, checked, named and decoded in batches;
and a class given by name or number (explain's target=).

The decoding itself is the training decoder's (engine.inference.Preprocess.decode), so an image becomes exactly
the tensor the model was trained on.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cnntrain.engine.inference import Preprocess
from cnntrain.errors import UserError
from cnntrain.io.files import slug


def inputs_label(inputs: str) -> str:
    """What names a call's results folder: the file's or folder's name, or the glob as typed."""
    if any(c in inputs for c in "*?["):
        return slug(inputs)
    return slug(Path(inputs.rstrip("/")).expanduser().stem or inputs)


def _image_extensions() -> tuple[str, ...]:
    from cnntrain.data.decode import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def _listing(paths: Sequence[Path], n: int = 3) -> str:
    names = [p.name for p in paths[:n]]
    return ", ".join(names) + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def collect_images(spec: str, key: str = "inputs") -> tuple[list[Path], list[Path]]:
    """An image file, a folder (its image files, recursively) or a glob -> (sorted image paths,
    the other files of a folder, which are left out)."""
    if not spec:
        raise UserError(f"{key}= is empty; give an image file, a folder of images or a glob like 'photos/*.jpg'")
    path = Path(spec).expanduser()
    exts = _image_extensions()
    if path.is_file():
        return [path], []
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in exts]
        if not images:
            if not files:
                raise UserError(f"{key}={path}: the folder is empty; put images ({', '.join(exts)}) in it")
            raise UserError(
                f"{key}={path}: no image files in the folder ({len(files)} other file(s): "
                f"{_listing(files)}); images end in {', '.join(exts)}"
            )
        return images, [p for p in files if p.suffix.lower() not in exts]
    if glob.has_magic(spec):
        matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matched:
            raise UserError(f"{key}={spec}: no file matches the pattern")
        return matched, []
    raise UserError(f"{key}={path}: no such file or folder")


def check_images(paths: Sequence[Path], key: str = "inputs", on_error: str = "error") -> list[Path]:
    """Read every header before any work: a file that is not an image fails at once, naming it; with
    on_error=skip it is left out (a warning each) and the readable files are returned, so a command counts
    the images it will really process."""
    from PIL import Image

    def probe(p: Path) -> str | None:
        try:
            with Image.open(p):
                return None
        except Exception as e:  # PIL raises many types for "not an image"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return first

    readable = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for p, why in zip(paths, pool.map(probe, paths), strict=True):
            if why is None:
                readable.append(p)
            elif on_error == "skip":
                print(f"cnntrain: warning: skipped {p}: not an image that can be read ({why})", file=sys.stderr)
            else:
                raise UserError(
                    f"{p} is not an image that can be read ({why}); "
                    f"remove it or point {key}= at image files only, or pass on_error=skip"
                )
    if not readable:
        raise UserError(f"{key}=: none of the {len(paths)} file(s) is an image that can be read")
    return readable


def skipped_note(found: int, kept: int) -> str:
    """'; skipped 1 of 2 file(s) that are not readable images' for a header, or ''."""
    return f"; skipped {found - kept} of {found} file(s) that are not readable images" if kept < found else ""


def image_batches(
    paths: Sequence[Path], pre: Preprocess, batch_size: int, on_error: str = "error", skipped: list[Path] | None = None
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Decode `batch_size` files at a time (threads; PIL releases the GIL), so thousands of files
    never sit in memory together. on_error=skip drops files that fail to decode (a header that reads
    but pixel data that does not), with a warning, and adds them to `skipped`."""
    h, w = pre.image_size
    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            out = np.empty((len(chunk), pre.channels, h, w), dtype=np.uint8)
            keep: list[int] = []
            for i, (arr, why) in enumerate(pool.map(pre.decode, chunk)):
                if why is None:
                    out[i] = arr
                    keep.append(i)
                elif on_error == "skip":
                    print(f"cnntrain: warning: skipped {chunk[i]}: cannot decode it ({why})", file=sys.stderr)
                    if skipped is not None:
                        skipped.append(chunk[i])
                else:
                    raise UserError(f"cannot decode image {chunk[i]} ({why}); fix or delete it, or pass on_error=skip")
            if keep:
                yield [chunk[i] for i in keep], torch.from_numpy(out[keep] if len(keep) < len(chunk) else out)


def class_index(classes: list[str], value: str, key: str = "target") -> int:
    """A class given by name or by index."""
    if value in classes:
        return classes.index(value)
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(classes):
        return int(value)
    from cnntrain.errors import did_you_mean

    raise UserError(
        f"{key}={value} is not a class of this model{did_you_mean(value, classes)}; "
        f"classes: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}"
    )


def ignored_note(ignored: Sequence[Path]) -> str:
    return f"; left out {len(ignored)} file(s) that are not images ({_listing(ignored)})" if ignored else ""
