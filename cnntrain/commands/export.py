"""`cnntrain export`: the trained model as TorchScript, ONNX or a plain state_dict, checked
against the eager model before the command reports success."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnntrain.errors import UserError

FORMATS = ("torchscript", "onnx", "state_dict")
FILE_NAMES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx", "state_dict": "model.state_dict.pt"}
SAFETENSORS_NAME = "model.safetensors"  # written beside model.state_dict.pt
ONNX_HINT = "pip install 'cnntrain[onnx]'"

HELP = """\
usage: cnntrain export ckpt=<checkpoint or run dir> format=torchscript|onnx|state_dict [key=value ...]

Write the trained model in a deployable format, run the written file on a batch of inputs and
compare its outputs with the eager PyTorch model (|exported - eager| <= atol + rtol * |eager|,
elementwise); a mismatch is an error. preprocess.json beside it says how to prepare inputs
(channels, size, mean/std, class names). The exported model takes float32 NCHW input,
normalised as in preprocess.json, any batch size, and returns logits.

keys:
  ckpt=PATH            {ckpt}
  format=torchscript   torchscript (torch.jit.trace) | onnx (needs {hint}) | state_dict
                       (model.state_dict.pt, usable with ckpt=, and model.safetensors)
  out=DIR              where to write (default: <run dir>/export)
  atol=1e-4            absolute tolerance of the check
  rtol=1e-4            relative tolerance of the check
  opset=null           ONNX opset version (default: the exporter's)

examples:
  cnntrain export ckpt=runs/default/<run>
  cnntrain export ckpt=runs/default/<run> format=onnx
"""


@dataclass
class ExportArgs:
    ckpt: str = "???"
    format: str = "torchscript"
    out: str | None = None
    atol: float = 1e-4
    rtol: float = 1e-4
    opset: int | None = None


def example_inputs(trained: Any, n: int, seed: int) -> torch.Tensor:
    """Random images through the model's own preprocessing: realistic value ranges, fixed by seed."""
    g = torch.Generator().manual_seed(seed)
    h, w = trained.preprocess.image_size
    x = torch.randint(0, 256, (n, trained.preprocess.channels, h, w), generator=g, dtype=torch.uint8)
    return trained.preprocess.normalize(x)


@contextlib.contextmanager
def _quiet(fds: bool = False) -> Iterator[None]:
    """torch.jit and the ONNX exporters warn about their own deprecation and tracing details; the
    TorchScript-based ONNX exporter also dumps its whole graph to the stderr file descriptor on failure
    (fds=True silences the descriptors too; our own one-line error says what went wrong)."""
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        if fds:
            stack.enter_context(_devnull_fds())
        yield


@contextlib.contextmanager
def _devnull_fds() -> Iterator[None]:
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Callable:
    with _quiet():
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda x: loaded(x)


def export_state_dict(trained: Any, path: Path) -> Callable:
    """The weights twice: a cnntrain checkpoint (usable with ckpt=) and model.safetensors, the format other
    tools read; both are loaded back into a freshly built model, and the check runs on the safetensors one."""
    from dataclasses import asdict

    from safetensors.torch import load_file, save_file

    from cnntrain.engine.checkpoint import save_checkpoint
    from cnntrain.engine.inference import model_config
    from cnntrain.models import build_model

    cfg = model_config(trained.config, trained.checkpoint)
    state = trained.model.state_dict()
    save_checkpoint(path, {"model": state, "meta": trained.meta, "model_config": asdict(cfg)})
    tensors = path.with_name(SAFETENSORS_NAME)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tensors), metadata={
        "format": "pt", "classes": json.dumps(trained.classes), "preprocess": json.dumps(trained.preprocess.to_dict()),
        "model_config": json.dumps(asdict(cfg)),
    })
    pre = trained.preprocess
    from_checkpoint = build_model(cfg, pre.channels, pre.image_size, len(trained.classes))
    from_checkpoint.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    rebuilt = build_model(cfg, pre.channels, pre.image_size, len(trained.classes))
    rebuilt.load_state_dict(load_file(str(tensors)))
    if any(not torch.equal(a, b) for a, b in zip(from_checkpoint.state_dict().values(),
                                                 rebuilt.state_dict().values(), strict=True)):
        raise UserError(f"{tensors} and {path} hold different weights")
    rebuilt.eval()
    return lambda x: rebuilt(x)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> tuple[Callable | None, str]:
    """Export; return a runner (onnxruntime) or None when it is not installed, and what was used."""
    if importlib.util.find_spec("onnx") is None:
        raise UserError(f"export format=onnx needs the onnx package, which is not installed: {ONNX_HINT}")
    import onnx

    attempts: list[tuple[str, Callable[[], None]]] = []
    if importlib.util.find_spec("onnxscript") is not None:
        # The torch.export-based exporter (torch's default since 2.9); needs onnxscript.
        def dynamo() -> None:
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.onnx.export(model, (example,), None, input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), opset_version=opset, verbose=False)
            program.save(str(path), external_data=False)

        attempts.append(("torch.onnx (dynamo)", dynamo))

    def legacy() -> None:
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset or 17)

    attempts.append(("torch.onnx (TorchScript-based)", legacy))
    errors = []
    for how, attempt in attempts:  # noqa: B007 - `how` names the exporter that worked
        try:
            with _quiet(fds=True):
                attempt()
            break
        except Exception as e:  # an operator the exporter cannot translate, and the like
            errors.append(_root_cause(e))
    else:
        path.unlink(missing_ok=True)
        raise UserError(f"ONNX export failed: {errors[0][:300]}; format=torchscript or state_dict work for "
                        "every model") from None
    onnx.checker.check_model(str(path))
    if importlib.util.find_spec("onnxruntime") is None:
        return None, how
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])), how


def _root_cause(e: BaseException) -> str:
    """The innermost cause's first line, without colour codes: the exporters wrap the real reason."""
    import re

    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def compare(eager: torch.Tensor, exported: torch.Tensor, atol: float, rtol: float) -> tuple[bool, float]:
    diff = (exported.float() - eager.float()).abs()
    ok = bool((diff <= atol + rtol * eager.float().abs()).all()) and exported.shape == eager.shape
    return ok, float(diff.max()) if diff.numel() else 0.0


def main(argv: list[str]) -> None:
    from cnntrain.commands.args import check_choice, parse_args, plain_warnings, print_help, wants_help
    from cnntrain.engine.inference import CKPT_HELP, load_trained
    from cnntrain.io.files import write_json

    if wants_help(argv):
        print_help(HELP.format(ckpt=CKPT_HELP, hint=ONNX_HINT))
        return
    plain_warnings()
    args = parse_args(ExportArgs, argv, "export")
    check_choice("format", args.format, FORMATS)
    if args.atol < 0 or args.rtol < 0:
        raise UserError("atol and rtol must not be negative")
    if args.format == "onnx" and importlib.util.find_spec("onnx") is None:
        raise UserError(f"export format=onnx needs the onnx package, which is not installed: {ONNX_HINT}")
    trained = load_trained(args.ckpt, "cpu")  # exported graphs are device-neutral; trace on the CPU
    model = trained.model.float().eval()
    out = trained.out_dir("export", args.out)
    path = out / FILE_NAMES[args.format]
    example = example_inputs(trained, 2, seed=0)
    check = example_inputs(trained, 5, seed=1)  # another batch size: proves the batch axis is free

    how = args.format
    with torch.no_grad():
        if args.format == "torchscript":
            run = export_torchscript(model, example, path)
        elif args.format == "state_dict":
            run = export_state_dict(trained, path)
        else:
            run, how = export_onnx(model, example, path, args.opset)
        eager = model(check)
        result: dict[str, Any] = {"format": args.format, "file": path.name, "exporter": how,
                                  "atol": args.atol, "rtol": args.rtol, "check_batch": len(check)}
        if run is None:
            result.update(checked=False, max_abs_diff=None)
            verdict = (f"graph valid (onnx.checker); outputs NOT compared: onnxruntime is not installed "
                       f"({ONNX_HINT})")
        else:
            ok, max_diff = compare(eager, run(check), args.atol, args.rtol)
            result.update(checked=True, max_abs_diff=max_diff, ok=ok)
            if not ok:
                raise UserError(f"exported {args.format} model differs from the eager model: max |diff| "
                                f"{max_diff:.3g} > atol {args.atol:g} + rtol {args.rtol:g} * |y|; file kept at {path}")
            verdict = f"outputs match the eager model: max |diff| {max_diff:.2e} (atol {args.atol:g}, rtol {args.rtol:g})"
    pre = trained.preprocess
    write_json(out / "preprocess.json", {"classes": trained.classes, **pre.to_dict(),
                                         "model": trained.label, "checkpoint": str(trained.checkpoint),
                                         "exports": {**_previous_exports(out), args.format: result}})
    size = path.stat().st_size
    print(f"exported {trained.label} as {args.format} ({how}): {path} ({size / 1e6:.2f} MB)")
    print(f"check on a batch of {len(check)}: {verdict}")
    print(f"preprocessing for other runtimes: {out / 'preprocess.json'}")


def _previous_exports(out: Path) -> dict[str, Any]:
    """Keep the records of other formats exported into the same folder."""
    try:
        return dict(json.loads((out / "preprocess.json").read_text()).get("exports", {}))
    except (OSError, ValueError, AttributeError):
        return {}
