"""`cnntrain export`: the trained model as a torch.export program (.pt2), ONNX, TorchScript or a plain
state_dict, checked against the eager model before the command reports success."""

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

FORMATS = ("exported", "torchscript", "onnx", "state_dict")
FILE_NAMES = {
    "exported": "model.pt2",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
    "state_dict": "model.state_dict.pt",
}
TORCHSCRIPT_NOTE = (
    "note: TorchScript (torch.jit) is deprecated upstream in favour of torch.export; "
    "format=exported writes the program PyTorch supports"
)
SAFETENSORS_NAME = "model.safetensors"  # written beside model.state_dict.pt
ONNX_HINT = "pip install 'cnntrain[onnx]'"

HELP = """\
usage: cnntrain export ckpt=<checkpoint or run dir> format=exported|onnx|torchscript|state_dict [key=value ...]

Write the trained model in a deployable format, run the written file on a batch of inputs and
compare its outputs with the eager PyTorch model (|exported - eager| <= atol + rtol * |eager|,
elementwise); a mismatch is an error. preprocess.json beside it says how to prepare inputs
(channels, size, mean/std, class names). The exported model takes float32 NCHW input,
normalised as in preprocess.json, any batch size, and returns logits.

keys:
  ckpt=PATH            {ckpt}
  format=exported      exported: model.pt2, a torch.export ExportedProgram with a free batch size and the
                       preprocessing record inside; loads with torch.export.load (no cnntrain needed)
                       and is accepted by predict and evaluate as ckpt=
                       | onnx (needs {hint}) | torchscript (torch.jit.trace; deprecated upstream)
                       | state_dict (model.state_dict.pt, usable with ckpt=, and model.safetensors)
  out=DIR              where to write (default: <run dir>/export)
  atol=1e-4            absolute tolerance of the check
  rtol=1e-4            relative tolerance of the check
  opset=null           ONNX opset version (default: the exporter's); the file is checked to have it,
                       and an opset no exporter here can write is refused, naming the ones that work

examples:
  cnntrain export ckpt=runs/default/<run>
  cnntrain predict ckpt=runs/default/<run>/export/model.pt2 inputs=my_digits/
  cnntrain export ckpt=runs/default/<run> format=onnx
"""


@dataclass
class ExportArgs:
    ckpt: str = "???"
    format: str = "exported"
    out: str | None = None
    atol: float = 1e-4
    rtol: float = 1e-4
    opset: int | None = None


def example_inputs(trained: Any, n: int, seed: int) -> torch.Tensor:
    """Random images through the model's own preprocessing: realistic value ranges, fixed by seed."""
    g = torch.Generator().manual_seed(seed)
    h, w = trained.preprocess.image_size
    x = torch.randint(0, 256, (n, trained.preprocess.channels, h, w), generator=g, dtype=torch.uint8)
    return trained.preprocess.normalise(x.device).from_uint8(x)


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


def export_program(trained: Any, model: torch.nn.Module, example: torch.Tensor, path: Path) -> Callable:
    """torch.export with a free batch axis; the record that predict/evaluate need travels inside the archive
    (extra file cnntrain.json), so the .pt2 alone is a usable ckpt=. Checked after a round trip through the file."""
    from cnntrain.engine.inference import EXPORTED_RECORD, exported_record

    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet():
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:  # an op or Python construct torch.export cannot capture
        raise UserError(
            f"torch.export failed for {trained.label}: {_root_cause(e)[:300]}; format=onnx, "
            "torchscript or state_dict may still work"
        ) from None
    torch.export.save(program, str(path), extra_files={EXPORTED_RECORD: json.dumps(exported_record(trained))})
    loaded = torch.export.load(str(path)).module()
    return lambda x: loaded(x)


def export_state_dict(trained: Any, path: Path) -> Callable:
    """The weights twice: a cnntrain checkpoint (usable with ckpt=) and model.safetensors, the format other
    tools read; both are loaded back into a freshly built model, and the check runs on the safetensors one."""
    from safetensors.torch import load_file, save_file

    from cnntrain.engine.checkpoint import save_checkpoint
    from cnntrain.engine.inference import model_config, model_record
    from cnntrain.models import build_model

    cfg = model_config(trained.config, trained.checkpoint)
    state = trained.model.state_dict()
    # config: the run's whole config, as in best.pt, so that `ckpt=model.state_dict.pt` works like the run's
    # own checkpoint (evaluate finds the dataset, predict the precision); model_config: the architecture alone.
    save_checkpoint(
        path, {"model": state, "meta": trained.meta, "config": trained.config, "model_config": model_record(cfg)}
    )
    tensors = path.with_name(SAFETENSORS_NAME)
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()},
        str(tensors),
        metadata={
            "format": "pt",
            "classes": json.dumps(trained.classes),
            "preprocess": json.dumps(trained.preprocess.to_dict()),
            "model_config": json.dumps(model_record(cfg)),
            "meta": json.dumps(trained.meta),
        },
    )
    # safetensors creates its file private (0600); the other outputs follow the umask, and so does this one.
    tensors.chmod(path.stat().st_mode & 0o777)
    pre = trained.preprocess
    from_checkpoint = build_model(cfg, pre.channels, pre.image_size, len(trained.classes))
    from_checkpoint.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    rebuilt = build_model(cfg, pre.channels, pre.image_size, len(trained.classes))
    rebuilt.load_state_dict(load_file(str(tensors)))
    if any(
        not torch.equal(a, b)
        for a, b in zip(from_checkpoint.state_dict().values(), rebuilt.state_dict().values(), strict=True)
    ):
        raise UserError(f"{tensors} and {path} hold different weights")
    rebuilt.eval()
    return lambda x: rebuilt(x)


def opset_ranges() -> dict[str, tuple[int, int]]:
    """The ONNX opsets each exporter available here writes as asked: {exporter: (lowest, highest)}.

    The torch.export-based exporter has operator implementations from TORCHLIB_OPSET (18) up and writes any
    opset up to the newest the onnx package knows; asked for a lower one it exports at 18 and tries a version
    conversion that, when it fails, silently keeps 18. The TorchScript-based exporter writes its own range."""
    import onnx

    try:
        from torch.onnx import _constants
    except ImportError:  # a torch without the TorchScript-based exporter's table
        _constants = None
    ranges = {}
    if importlib.util.find_spec("onnxscript") is not None:
        try:
            from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET as lowest
        except ImportError:
            lowest = 18
        ranges["torch.onnx (dynamo)"] = (int(lowest), int(onnx.defs.onnx_opset_version()))
    ranges["torch.onnx (TorchScript-based)"] = (
        int(getattr(_constants, "ONNX_MIN_OPSET", 7)),
        int(getattr(_constants, "ONNX_MAX_OPSET", 20)),
    )
    return ranges


def _describe(ranges: dict[str, tuple[int, int]]) -> str:
    """'7-28' when the ranges join up, else '7-20 or 22-28'."""
    spans: list[list[int]] = []
    for lo, hi in sorted(ranges.values()):
        if spans and lo <= spans[-1][1] + 1:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    return " or ".join(f"{lo}-{hi}" for lo, hi in spans)


def check_opset(opset: int | None) -> None:
    """Refuse, before any work, an opset that no exporter here writes."""
    if opset is None:
        return
    ranges = opset_ranges()
    if not any(lo <= opset <= hi for lo, hi in ranges.values()):
        raise UserError(
            f"opset={opset} cannot be written by the ONNX exporters of this installation (torch "
            f"{torch.__version__}): they write opsets {_describe(ranges)}; pass one of those, or "
            "opset=null for the exporter's default"
        )


def written_opset(path: Path) -> int | None:
    """The default-domain (ai.onnx) opset an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(
    model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int | None
) -> tuple[Callable | None, str]:
    """Export; return a runner (onnxruntime) or None when it is not installed, and what was used.

    With opset=N the file must declare opset N: an exporter that wrote another one counts as failed and the
    next is tried (so opset=13 goes to the TorchScript-based exporter, which writes 13 itself)."""
    if importlib.util.find_spec("onnx") is None:
        raise UserError(f"export format=onnx needs the onnx package, which is not installed: {ONNX_HINT}")
    import onnx

    check_opset(opset)
    ranges = opset_ranges()
    attempts: list[tuple[str, Callable[[], None]]] = []
    if importlib.util.find_spec("onnxscript") is not None:
        # The torch.export-based exporter (torch's default since 2.9); needs onnxscript.
        def dynamo() -> None:
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.onnx.export(
                model,
                (example,),
                None,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                verbose=False,
            )
            program.save(str(path), external_data=False)

        attempts.append(("torch.onnx (dynamo)", dynamo))

    def legacy() -> None:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset or 17,
        )

    attempts.append(("torch.onnx (TorchScript-based)", legacy))
    if opset is not None:  # only the exporters that write this opset themselves
        attempts = [(how, a) for how, a in attempts if ranges[how][0] <= opset <= ranges[how][1]]
    errors = []
    for how, attempt in attempts:  # noqa: B007 - `how` names the exporter that worked
        try:
            with _quiet(fds=True):
                attempt()
            got = written_opset(path)
            if opset is not None and got != opset:
                raise RuntimeError(f"{how} wrote opset {got}, not the requested {opset}")
            break
        except Exception as e:  # an operator the exporter cannot translate, and the like
            errors.append(_root_cause(e))
    else:
        path.unlink(missing_ok=True)
        at = f" at opset={opset}" if opset is not None else ""
        raise UserError(
            f"ONNX export{at} failed: {errors[0][:300]}; format=torchscript or state_dict work for every model"
        ) from None
    onnx.checker.check_model(str(path))
    if importlib.util.find_spec("onnxruntime") is None:
        return None, how
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # e.g. an opset newer than this onnxruntime knows
        raise UserError(
            f"onnxruntime {ort.__version__} cannot load the exported {path} ({_root_cause(e)[:200]}); "
            "the file is kept; a lower opset= may load"
        ) from None
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
    from cnntrain.commands.args import check_choice, start
    from cnntrain.engine.inference import CKPT_HELP, load_trained
    from cnntrain.io.files import write_json

    args = start(argv, ExportArgs, "export", HELP.format(ckpt=CKPT_HELP, hint=ONNX_HINT))
    if args is None:
        return
    check_choice("format", args.format, FORMATS)
    if args.atol < 0 or args.rtol < 0:
        raise UserError("atol and rtol must not be negative")
    if args.format == "onnx" and importlib.util.find_spec("onnx") is None:
        raise UserError(f"export format=onnx needs the onnx package, which is not installed: {ONNX_HINT}")
    if args.opset is not None and args.format != "onnx":
        raise UserError(f"opset={args.opset} is for format=onnx; format={args.format} has no opset")
    if args.format == "onnx":
        check_opset(args.opset)  # before the checkpoint is read
    trained = load_trained(args.ckpt, "cpu")  # exported graphs are device-neutral; trace on the CPU
    if trained.exported:
        raise UserError(
            f"ckpt={args.ckpt} is already an exported program; export reads a checkpoint (best.pt, "
            "last.pt, model.state_dict.pt) or a run directory"
        )
    model = trained.model.float().eval()
    out = trained.out_dir("export", args.out)
    path = out / FILE_NAMES[args.format]
    for target in (path, path.with_name(SAFETENSORS_NAME), out / "preprocess.json"):
        if target.is_dir():  # torch.jit.save and torch.save report this as a RuntimeError, not an OSError
            where = f"out={args.out}: cannot write" if args.out else "cannot write"
            raise UserError(f"{where} {target}: it is a folder (a file name is needed)")
    example = example_inputs(trained, 2, seed=0)
    check = example_inputs(trained, 5, seed=1)  # another batch size: proves the batch axis is free

    how = args.format
    with torch.no_grad():
        if args.format == "exported":
            run = export_program(trained, model, example, path)
        elif args.format == "torchscript":
            print(TORCHSCRIPT_NOTE)
            run = export_torchscript(model, example, path)
        elif args.format == "state_dict":
            run = export_state_dict(trained, path)
        else:
            run, how = export_onnx(model, example, path, args.opset)
        eager = model(check)
        result: dict[str, Any] = {
            "format": args.format,
            "file": path.name,
            "exporter": how,
            "atol": args.atol,
            "rtol": args.rtol,
            "check_batch": len(check),
        }
        if args.format == "onnx":
            result["opset"] = written_opset(path)
            how = f"{how}, opset {result['opset']}"
        if run is None:
            result.update(checked=False, max_abs_diff=None)
            verdict = f"graph valid (onnx.checker); outputs NOT compared: onnxruntime is not installed ({ONNX_HINT})"
        else:
            ok, max_diff = compare(eager, run(check), args.atol, args.rtol)
            result.update(checked=True, max_abs_diff=max_diff, ok=ok)
            if not ok:
                raise UserError(
                    f"exported {args.format} model differs from the eager model: max |diff| "
                    f"{max_diff:.3g} > atol {args.atol:g} + rtol {args.rtol:g} * |y|; file kept at {path}"
                )
            verdict = (
                f"outputs match the eager model: max |diff| {max_diff:.2e} (atol {args.atol:g}, rtol {args.rtol:g})"
            )
    pre = trained.preprocess
    task = trained.task
    labels = (
        {
            "task": task.name,
            "threshold": task.threshold,
            "output": "one logit per label; a label is predicted when sigmoid(logit) > threshold",
        }
        if task.name == "multilabel"
        else {}
    )
    write_json(
        out / "preprocess.json",
        {
            "classes": trained.classes,
            **pre.to_dict(),
            **labels,
            "model": trained.label,
            "checkpoint": str(trained.checkpoint),
            "exports": {**_previous_exports(out), args.format: result},
        },
    )
    written = [path, *([path.with_name(SAFETENSORS_NAME)] if args.format == "state_dict" else [])]
    files = " and ".join(f"{p} ({p.stat().st_size / 1e6:.2f} MB)" for p in written)
    print(f"exported {trained.label} as {args.format} ({how}): {files}")
    print(f"check on a batch of {len(check)}: {verdict}")
    print(f"preprocessing for other runtimes: {out / 'preprocess.json'}")


def _previous_exports(out: Path) -> dict[str, Any]:
    """Keep the records of other formats exported into the same folder."""
    try:
        return dict(json.loads((out / "preprocess.json").read_text()).get("exports", {}))
    except (OSError, ValueError, AttributeError):
        return {}
