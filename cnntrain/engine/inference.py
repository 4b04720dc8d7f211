"""A trained model and its preprocessing, from nothing but a checkpoint.

Shared by `evaluate`, `predict`, `explain` and `export`. The checkpoint's "meta" record holds
what the model expects (channels, image size, normalisation, class names), so images from
anywhere are turned into exactly the tensors the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnntrain.config import ModelConfig
from cnntrain.engine.checkpoint import load_checkpoint, resolve_checkpoint
from cnntrain.engine.inputs import Normalise
from cnntrain.errors import UserError
from cnntrain.io.files import RunDir, call_dir, given_output_dir, output_dir, slug
from cnntrain.io.logs import log_to

CKPT_HELP = (
    "checkpoint file (best.pt, last.pt, or export's model.pt2, model.state_dict.pt or model.safetensors), "
    "or a run directory (its checkpoints/best.pt: the weights fit tested)"
)
# The archive member of an exported .pt2 that holds what a checkpoint's meta and config hold.
EXPORTED_RECORD = "cnntrain.json"
_META_KEYS = ("classes", "channels", "image_size", "mean", "std")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input: channels, size, normalisation (all from the checkpoint)."""

    channels: int
    image_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "input": "float32 NCHW, (pixel/255 - mean) / std per channel",
            "resize": "bilinear to image_size, no crop; grayscale/RGB conversion as in training",
        }

    def normalise(self, device: torch.device | str, channels_last: bool = False) -> Normalise:
        """The training-time conversion uint8 -> model input, on ``device``: ``.from_uint8(x)`` converts a batch."""
        return Normalise.of(self.mean, self.std, device, channels_last)

    def decode(self, path: Path) -> tuple[np.ndarray | None, str | None]:
        """One file -> uint8 [C, H, W] exactly as image-folder training decodes it, or (None, reason)."""
        from cnntrain.data.decode import decode_into  # the training decoder itself, so the two never drift

        h, w = self.image_size
        out = np.empty((1, self.channels, h, w), dtype=np.uint8)
        why = decode_into(out, 0, path, self.channels)
        return (None, why) if why else (out[0], None)


@dataclass
class Trained:
    model: nn.Module
    preprocess: Preprocess
    classes: list[str]
    meta: dict[str, Any]
    config: dict[str, Any]
    progress: dict[str, Any]
    checkpoint: Path
    device: torch.device
    exported: bool = False  # model is a torch.export program (.pt2): it runs, but has no cnntrain module code

    @property
    def task(self) -> Any:
        """engine.tasks' SingleLabel or MultiLabel (with the threshold it trained with), as the meta record says."""
        from cnntrain.engine.tasks import of_meta

        return of_meta(self.meta)

    @property
    def run_dir(self) -> Path:
        """The run directory of a checkpoint under runs/.../checkpoints/, else the checkpoint's folder."""
        return RunDir.of(self.checkpoint).path

    def out_dir(self, command: str, out: str | None, default: Path | None = None) -> Path:
        """out= (created), or by default <run dir>/<command>; a path that cannot be used is a one-line error."""
        path = (
            output_dir(Path(out).expanduser(), "out")
            if out
            else output_dir(default or self.run_dir / command, "out", given=False)
        )
        log_to(path / f"{command}.log")  # the command's warnings and info, beside what it writes
        return path

    def results_dir(self, command: str, out: str | None, overwrite: bool, label: str) -> Path:
        """Where one call of evaluate, predict or explain writes: out= (new, or an earlier call's results
        folder with overwrite=true), else a new <run dir>/<command>/<label>-<date>_<time>, so no call
        replaces or mixes into another's results."""
        path = (
            given_output_dir(Path(out).expanduser(), overwrite)
            if out
            else call_dir(self.run_dir / command, slug(label, 60))
        )
        log_to(path / f"{command}.log")
        return path

    @property
    def label(self) -> str:
        from cnntrain.models import chosen_label

        arch = self.meta.get("arch")
        name = self.meta.get("target") or chosen_label(
            self.meta.get("option"), f"{self.meta.get('model')}{'/' + arch if arch else ''}"
        )
        return f"{name} trained on {self.meta.get('dataset')}"


def model_config(config: dict[str, Any], path: Path) -> ModelConfig:
    """The checkpoint's ModelConfig, set to build the bare architecture (no download, no weights file).
    A custom model's own keys come along in its `own`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cnntrain.config import open_part

    try:
        base = OmegaConf.structured(ModelConfig)
        OmegaConf.set_struct(base, False)  # a custom model's arguments
        cfg = OmegaConf.merge(base, config["model"])
    except (OmegaConfBaseException, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: cannot read its model config ({first}); was it written by another cnntrain version?"
        ) from None
    cfg.weights, cfg.pretrained, cfg.freeze_backbone = None, False, False
    return open_part(cfg, ModelConfig)


def model_record(cfg: ModelConfig) -> dict[str, Any]:
    """A ModelConfig (with a custom model's own keys) as a plain dict."""
    from cnntrain.config import declared, own_keys

    return {**{k: getattr(cfg, k) for k in declared(ModelConfig)}, **own_keys(cfg, ModelConfig)}


def _rebuild(
    config: dict[str, Any], meta: dict[str, Any], path: Path, pre: Preprocess, classes: list[str]
) -> nn.Module:
    """The checkpoint's model, built again; a custom model whose module is not importable here is one line."""
    from cnntrain.models import build_model
    from cnntrain.registry import TargetImportError

    try:
        return build_model(model_config(config, path), pre.channels, pre.image_size, len(classes))
    except TargetImportError as e:
        file = meta.get("module_file")
        if not file:
            raise
        folder = Path(file).parent
        for _ in range(len(str(meta.get("module", "")).split(".")) - 1):
            folder = folder.parent  # the folder above a package
        raise UserError(
            f"checkpoint {path} holds model {meta.get('target')}, whose module '{e.module}' cannot be "
            f"imported here; it was {file} when the run trained: run from {folder} or add it to "
            f"PYTHONPATH (PYTHONPATH={folder})"
        ) from None


def _preprocess_of(meta: Any, path: Path) -> tuple[Preprocess, list[str]]:
    if not isinstance(meta, dict) or any(k not in meta for k in _META_KEYS):
        missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
        raise UserError(
            f"{path} lacks the preprocessing record (meta: {', '.join(missing)}) that cnntrain fit "
            "writes; it cannot be used for inference"
        )
    classes = [str(c) for c in meta["classes"]]
    size = (int(meta["image_size"][0]), int(meta["image_size"][1]))
    return Preprocess(
        int(meta["channels"]), size, tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"])
    ), classes


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    from cnntrain.engine.device import resolve_device

    return resolve_device(device)


def load_trained(spec: str, device: str | torch.device = "cpu") -> Trained:
    """Rebuild the model of a checkpoint (or run directory) with its weights, in eval mode; an exported .pt2
    is loaded as its program instead."""
    path = resolve_checkpoint(spec)
    if is_exported(path):
        return load_exported(path, device)
    state = read_safetensors(path) if is_safetensors(path) else load_checkpoint(path)
    meta, config = state.get("meta"), state.get("config")
    if not isinstance(config, dict) and isinstance(state.get("model_config"), dict):
        config = {"model": state["model_config"]}  # export format=state_dict of cnntrain <= 0.1: the model only
    pre, classes = _preprocess_of(meta, path)
    assert isinstance(meta, dict)  # _preprocess_of refuses any other
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(
            f"{path} lacks the model config (config or model_config) that cnntrain fit and export "
            "write, so the architecture cannot be rebuilt; it cannot be used for inference"
        )
    model = _rebuild(config, meta, path, pre, classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"checkpoint {path}: its weights do not fit its own model config ({detail})") from None
    device = _device(device)
    model.to(device).eval()
    return Trained(model, pre, classes, meta, config, dict(state.get("progress") or {}), path, device)


class ExportedModule(nn.Module):
    """A .pt2's program as an nn.Module the evaluation loop can switch: the program was captured in eval mode
    and its module refuses train()/eval(), so the switch stops here."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program
        self.training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self


def exported_record(trained: Trained) -> dict[str, Any]:
    """What a .pt2 carries beside its program: the checkpoint's meta and the run's config (evaluate finds the
    dataset in it, predict the precision)."""
    return {
        "meta": trained.meta,
        "config": trained.config,
        "checkpoint": str(trained.checkpoint),
        "preprocess": trained.preprocess.to_dict(),
        "classes": trained.classes,
    }


def is_exported(path: Path) -> bool:
    """A torch.export archive: a zip whose members include <name>/archive_format (a torch.save file has none)."""
    import zipfile

    if path.suffix == ".pt2":
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/archive_format") or n == "archive_format" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_exported(path: Path, device: str | torch.device) -> Trained:
    """An exported .pt2 as a Trained: its program's module, and the record `cnntrain export` put beside it. The
    program must answer the record's input with one logit per class, or it belongs to another model."""
    import json

    extra = {EXPORTED_RECORD: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # a truncated or foreign archive, or one from an incompatible torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {path} as a torch.export program ({first[:200]})") from None
    if not extra[EXPORTED_RECORD]:
        raise UserError(
            f"{path} is a torch.export program without cnntrain's record ({EXPORTED_RECORD}: classes, "
            "input size, normalisation); write it with cnntrain export format=exported"
        )
    try:
        record = json.loads(extra[EXPORTED_RECORD])
    except ValueError as e:
        raise UserError(f"{path}: its {EXPORTED_RECORD} is not valid JSON ({e})") from None
    meta, config = record.get("meta"), record.get("config") or {}
    pre, classes = _preprocess_of(meta, path)
    device = _device(device)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    model = ExportedModule(program.module())
    x = torch.zeros(2, pre.channels, *pre.image_size, device=device)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # the program's input guards refuse the record's image shape
        first = " ".join(str(e).split())[:200]
        raise UserError(
            f"{path}: its program does not take the {pre.channels}x{pre.image_size[0]}x"
            f"{pre.image_size[1]} images its record describes ({first}); was the .pt2 of another "
            "model put with this record?"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, len(classes)):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"{path}: its program gives outputs of shape {shape} for a batch of 2, but its record "
            f"names {len(classes)} classes; was the .pt2 of another model put with this record?"
        )
    return Trained(
        model, pre, classes, meta, config if isinstance(config, dict) else {}, {}, path, device, exported=True
    )


def is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return path.suffix == ".safetensors" or (
        len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size
    )


def read_safetensors(path: Path) -> dict[str, Any]:
    """model.safetensors of `cnntrain export format=state_dict` as a checkpoint: its weights, and the class
    names, input recipe and model config from its metadata."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), no iteration
    except Exception as e:  # SafetensorError: truncated, bad header...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {path}: it is truncated or not a safetensors file ({first[:160]})") from None
    try:
        info = {k: json.loads(metadata[k]) for k in ("classes", "preprocess", "model_config") if k in metadata}
        meta = json.loads(metadata["meta"]) if "meta" in metadata else {}
    except ValueError as e:
        raise UserError(f"{path}: its metadata is not valid JSON ({e})") from None
    if "preprocess" in info and "classes" in info:
        pre = info["preprocess"]
        meta = {
            **meta,
            "classes": info["classes"],
            **{k: pre[k] for k in ("channels", "image_size", "mean", "std") if k in pre},
        }
    else:
        meta = None  # a safetensors file from elsewhere: refused as lacking the record
    state: dict[str, Any] = {"model": tensors, "meta": meta}
    if "model_config" in info:
        state["config"] = {"model": info["model_config"]}
    return state


def precision_for(trained: Trained, spec: str) -> tuple[Any, bool]:
    """(Precision, channels_last) for inference: 'auto' means as the run was trained, on this device."""
    from cnntrain.engine.device import resolve_channels_last, resolve_precision

    trainer = trained.config.get("trainer") or {}
    if spec == "auto":
        spec = str(trainer.get("precision", "auto"))
    precision = resolve_precision(spec, trained.device)
    return precision, resolve_channels_last(str(trainer.get("channels_last", "auto")), trained.device, precision)


@torch.no_grad()
def logits_of(trained: Trained, x: torch.Tensor, precision: Any = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 [N, C, H, W] (any device) -> float32 logits on the CPU."""
    inp = trained.preprocess.normalise(trained.device, channels_last).from_uint8(x.to(trained.device))
    dtype = getattr(precision, "dtype", None)
    with torch.autocast(trained.device.type, dtype=dtype, enabled=dtype is not None):
        return trained.model(inp).float().cpu()


def prepare(trained: Trained, channels_last: bool) -> None:
    if channels_last:
        trained.model.to(memory_format=torch.channels_last)
