"""Golden record: prove that a change (a refactor) left cnntrain's behaviour bit for bit the same.

A fixed table of deterministic CPU commands (``CASES`` below: fits, resumes, lr-find, evaluate,
export, the help texts) is run against a checkout through ``python -m cnntrain`` with
``PYTHONPATH=<checkout>``, so the checkout's own code runs whatever else is installed. What the
commands leave behind is reduced to comparable items: a SHA-256 of every tensor in the checkpoints,
every plain value of the checkpoints and JSON files, every cell of the CSV files, hashes of files
and of exported models' outputs. Anything that depends on wall time (checkpoint ``progress.times``,
the timing columns of metrics.csv, ``train_seconds``, ...) is left out; its key is still recorded,
so a key that appears or disappears is seen. Paths are written as ``<tmp>/...`` and ``<repo>/...``.

Usage (from anywhere; --repo defaults to the checkout this script lives in):

    python scripts/golden.py record [--repo PATH] [--out FILE]        # default FILE: <repo>/runs/golden.json
    python scripts/golden.py check [--repo PATH] [--against FILE]     # default FILE: <repo>/runs/golden.json
    python scripts/golden.py compare OLD.json NEW.json                # two records, nothing run
    python scripts/golden.py list                                     # the cases and their commands

``check`` reruns every case and prints one line per case, ``identical`` or ``DIFFERENT`` with the
items that differ (``-v`` shows old and new values); it exits 1 on any difference or failed command.
Other options: ``--only CASE ...`` runs some cases (and those they need), ``--workdir DIR`` keeps the
run directories there instead of a temporary folder that is removed.

To prove a refactor changed nothing: record on the old commit, then check the new one, on the same
machine with the same torch build (other CPUs, thread counts or torch versions change the last bits):

    python scripts/golden.py record --out /tmp/golden.json
    python scripts/golden.py check --repo ../refactored-checkout --against /tmp/golden.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
RECORD_FORMAT = 1

# Every fit runs on the CPU, deterministically, on one thread, without a progress display.
FIT_FLAGS = ("trainer.device=cpu", "trainer.deterministic=true", "trainer.num_threads=1", "trainer.progress=none")

# Keys whose values are wall time: metrics.csv's images_per_s, epoch_s, data_s, compute_s, eval_s,
# summary.json's train_seconds, the checkpoints' progress.times.{data,compute,wall}. Matched per key
# (one path component), so a timing key added by a change is left out too, yet noticed (see EXCLUDED).
TIME_KEY = re.compile(r"time|second|wall|elapsed|duration|_s$")
EXCLUDED = "<excluded: wall time>"

# Runs the CLI and SIGKILLs it right after the N-th training step (a crash mid-epoch): tests/faults.py's
# kill-at-step, which counts GradScaler.update (a torch API, called once per optimizer step) and so depends
# on no cnntrain module path: it kills a checkout of any layout. If that stopped holding, the run would not be
# killed and the case fails on its exit code.
FAULTS = REPO / "tests" / "faults.py"


# --------------------------------------------------------------------------- the table of cases


@dataclass(frozen=True)
class Cmd:
    """One `python -m cnntrain ARGS` (placeholders: {dir} this case's folder, {tmp} the work folder)."""

    args: tuple[str, ...]
    kill_at_step: int | None = None  # SIGKILL the run right after this training step
    stdout: str | None = None  # record the command's stdout under this item name

    @property
    def expected_exit(self) -> int:
        return -signal.SIGKILL if self.kill_at_step is not None else 0


@dataclass(frozen=True)
class Read:
    """An output file (relative to the case's folder) reduced to items by READERS[kind], named label:..."""

    kind: str
    path: str
    label: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    steps: tuple[Cmd | Read, ...]  # in order: a Read sees the files of the commands before it
    needs: tuple[str, ...] = ()  # cases whose folders this one reads ({tmp}/<name>)
    requires: tuple[str, ...] = ()  # Python modules without which the case cannot run


def fit(*overrides: str, kill_at_step: int | None = None) -> Cmd:
    return Cmd(("fit", *overrides, *FIT_FLAGS, "hydra.run.dir={dir}"), kill_at_step=kill_at_step)


def fit_outputs(prefix: str = "") -> tuple[Read, ...]:
    """What a fit run leaves that is a function of the code alone: both checkpoints, metrics.csv and
    summary.json. Not read: provenance.json (git commit, versions), cli.log, tensorboard/ (events carry
    wall-time stamps; the same scalars are in metrics.csv) and figures/ (PNG bytes depend on matplotlib)."""
    return (
        Read("checkpoint", "checkpoints/best.pt", f"{prefix}best.pt"),
        Read("checkpoint", "checkpoints/last.pt", f"{prefix}last.pt"),
        Read("csv", "metrics.csv", f"{prefix}metrics.csv"),
        Read("json", "summary.json", f"{prefix}summary.json"),
    )


def export(fmt: str, *reads: Read) -> tuple[Cmd | Read, ...]:
    """`cnntrain export` of case smoke's run into {dir}/<fmt>, then preprocess.json and the given reads."""
    cmd = Cmd(("export", "ckpt={tmp}/smoke", f"format={fmt}", f"out={{dir}}/{fmt}"))
    return (cmd, Read("json", f"{fmt}/preprocess.json", f"{fmt}/preprocess.json"), *reads)


# Help texts and composed configs: what a user sees without training anything.
TEXT_COMMANDS = (
    ("--help",),
    ("--version",),
    ("fit", "--help"),
    ("fit", "--cfg", "job", "experiment=smoke"),
    ("list",),
    ("evaluate", "--help"),
    ("predict", "--help"),
    ("explain", "--help"),
    ("export", "--help"),
    ("report", "--help"),
    ("lr-find", "--help"),
)

CASES: tuple[Case, ...] = (
    Case("default", "the default fit (seed CNN on mnist5k, Adam), 2 epochs", (fit("trainer.epochs=2"), *fit_outputs())),
    Case("smoke", "experiment=smoke (tiny CNN, 1,000 digits, 3 epochs)", (fit("experiment=smoke"), *fit_outputs())),
    Case(
        "mixup-ema",
        "augment=standard with mixup and EMA weights, 2 epochs on 1,000 digits",
        (
            fit(
                "augment=standard",
                "augment.mixup_alpha=0.2",
                "trainer.ema_decay=0.99",
                "trainer.epochs=2",
                "dataset.subset=1000",
            ),
            *fit_outputs(),
        ),
    ),
    Case(
        "policy-cutmix",
        "RandAugment, affine warp, erasing, mixup and cutmix together, 1 epoch on 500 digits",
        (
            fit(
                "augment=randaugment",
                "augment.rotate=10",
                "augment.scale_min=0.9",
                "augment.scale_max=1.1",
                "augment.translate=0.1",
                "augment.erasing=0.25",
                "augment.mixup_alpha=0.2",
                "augment.cutmix_alpha=1.0",
                "trainer.epochs=1",
                "dataset.subset=500",
            ),
            *fit_outputs(),
        ),
    ),
    Case(
        "resnet8-sgd-onecycle",
        "ResNet-8, SGD, one-cycle, label smoothing, grad clipping, 2 epochs on 500 digits",
        (
            fit(
                "model=resnet8",
                "optimizer=sgd",
                "scheduler=onecycle",
                "trainer.label_smoothing=0.1",
                "trainer.grad_clip=1.0",
                "dataset.subset=500",
                "trainer.epochs=2",
                "trainer.batch_size=64",
            ),
            *fit_outputs(),
        ),
    ),
    Case(
        "bn-adamw-cosine",
        "BatchNorm CNN, AdamW, cosine with warm-up, monitor val/loss, early stopping armed",
        (
            fit(
                "model=simple_cnn_bn",
                "model.width=8",
                "optimizer=adamw",
                "scheduler=cosine",
                "scheduler.warmup_epochs=0.5",
                "trainer.monitor=val/loss",
                "trainer.early_stopping_patience=1",
                "trainer.epochs=2",
                "dataset.subset=500",
            ),
            *fit_outputs(),
        ),
    ),
    Case(
        "resume-epoch",
        "experiment=smoke for 1 epoch, then resume=<run> trainer.epochs=2",
        (
            fit("experiment=smoke", "trainer.epochs=1"),
            *fit_outputs("epoch1/"),
            Cmd(("fit", "resume={dir}", "trainer.epochs=2")),
            *fit_outputs(),
        ),
    ),
    Case(
        "resume-mid-epoch",
        "experiment=smoke, 2 epochs, last.pt every 10 steps, SIGKILLed at step 45 "
        "(epoch 2; last.pt of step 40), then resume=<run>",
        (
            fit("experiment=smoke", "trainer.epochs=2", "trainer.checkpoint_every_n_steps=10", kill_at_step=45),
            Read("checkpoint", "checkpoints/best.pt", "killed/best.pt"),
            Read("checkpoint", "checkpoints/last.pt", "killed/last.pt"),
            Read("csv", "metrics.csv", "killed/metrics.csv"),
            Read("json", "summary.json", "killed/summary.json"),
            Cmd(("fit", "resume={dir}")),
            *fit_outputs(),
        ),
    ),
    Case(
        "lr-find",
        "cnntrain lr-find on the smoke setup, 40 steps",
        (
            Cmd(("lr-find", "experiment=smoke", *FIT_FLAGS, "steps=40", "out={dir}")),
            Read("csv", "lr_find.csv"),
            Read("json", "lr_find.json"),
        ),
    ),
    Case(
        "evaluate",
        "cnntrain evaluate of case smoke's run on its test split",
        (
            Cmd(("evaluate", "ckpt={tmp}/smoke", "out={dir}", "device=cpu")),
            Read("json", "metrics.json"),
            Read("sha256", "predictions.csv"),
            Read("sha256", "per_class.csv"),
            Read("sha256", "confusion_matrix.csv"),
        ),
        needs=("smoke",),
    ),
    Case(
        "export-state-dict",
        "cnntrain export format=state_dict of case smoke's run",
        export("state_dict", Read("checkpoint", "state_dict/model.state_dict.pt")),
        needs=("smoke",),
    ),
    Case(
        "export-torchscript",
        "cnntrain export format=torchscript of case smoke's run; its outputs on a fixed batch",
        export("torchscript", Read("torchscript", "torchscript/model.torchscript.pt")),
        needs=("smoke",),
    ),
    Case(
        "export-onnx",
        "cnntrain export format=onnx of case smoke's run; onnxruntime's outputs on a fixed batch",
        export("onnx", Read("onnx", "onnx/model.onnx")),
        needs=("smoke",),
        requires=("onnx", "onnxruntime", "onnxscript"),
    ),
    Case(
        "cli-text",
        "help texts, `fit --cfg job experiment=smoke` and `list`: what users read",
        tuple(Cmd(args, stdout=" ".join(args)) for args in TEXT_COMMANDS),
    ),
)


# --------------------------------------------------------------------------- reducing outputs to items


class Normalizer:
    """Writes the work folder as <tmp> and the checkout as <repo>, so records of two places compare."""

    def __init__(self, work: Path, repo: Path) -> None:
        pairs = {str(work.resolve()): "<tmp>", str(work): "<tmp>", str(repo.resolve()): "<repo>", str(repo): "<repo>"}
        self.pairs = sorted(pairs.items(), key=lambda kv: -len(kv[0]))  # the longest first

    def __call__(self, text: str) -> str:
        for path, name in self.pairs:
            text = text.replace(path, name)
        return text


def tensor_digest(t: torch.Tensor) -> str:
    """dtype, shape and the SHA-256 of the raw bytes: equal only if the tensors are bit for bit equal."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    h.update(data)
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)} sha256:{h.hexdigest()}"


def flatten(obj: Any, prefix: str, items: dict[str, Any], norm: Normalizer) -> None:
    """Nested dicts/lists of tensors and plain values -> items keyed by dotted path."""
    if isinstance(obj, torch.Tensor):
        items[prefix] = tensor_digest(obj)
    elif isinstance(obj, dict):
        if not obj:
            items[prefix] = "{}"
        for key, value in obj.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if TIME_KEY.search(str(key)):
                items[path] = EXCLUDED
            else:
                flatten(value, path, items, norm)
    elif isinstance(obj, (list, tuple)):
        if not obj:
            items[prefix] = "[]"
        for i, value in enumerate(obj):
            flatten(value, f"{prefix}.{i}", items, norm)
    elif isinstance(obj, str):
        items[prefix] = norm(obj)
    elif obj is None or isinstance(obj, (bool, int, float)):
        items[prefix] = obj
    else:
        items[prefix] = f"<{type(obj).__name__}> {norm(repr(obj))}"


def read_checkpoint(path: Path, norm: Normalizer) -> dict[str, Any]:
    items: dict[str, Any] = {}
    flatten(torch.load(path, map_location="cpu", weights_only=True), "", items, norm)
    return items


def read_json(path: Path, norm: Normalizer) -> dict[str, Any]:
    items: dict[str, Any] = {}
    flatten(json.loads(path.read_text()), "", items, norm)
    return items


def read_csv(path: Path, norm: Normalizer) -> dict[str, Any]:
    """The header, then every cell as written (rows numbered from 1); timing columns left out."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    items: dict[str, Any] = {"columns": ",".join(header), "rows": len(body)}
    for r, row in enumerate(body, 1):
        for column, value in zip(header, row, strict=True):
            items[f"row{r}.{column}"] = EXCLUDED if TIME_KEY.search(column) else norm(value)
    return items


def read_sha256(path: Path, norm: Normalizer) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(norm(path.read_text()).encode()).hexdigest()}


def fixed_batch(export_dir: Path) -> torch.Tensor:
    """Four normalised-range inputs of the model's shape (from preprocess.json), fixed by a seed."""
    pre = json.loads((export_dir / "preprocess.json").read_text())
    g = torch.Generator().manual_seed(1234)
    return torch.randn(4, pre["channels"], *pre["image_size"], generator=g)


def read_torchscript(path: Path, norm: Normalizer) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        model = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        out = model(fixed_batch(path.parent))
    return {"output": tensor_digest(out)}


def read_onnx(path: Path, norm: Normalizer) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = session.run(None, {name: fixed_batch(path.parent).numpy()})[0]
    return {"output": tensor_digest(torch.from_numpy(np.ascontiguousarray(out)))}


READERS: dict[str, Callable[[Path, Normalizer], dict[str, Any]]] = {
    "checkpoint": read_checkpoint,
    "json": read_json,
    "csv": read_csv,
    "sha256": read_sha256,
    "torchscript": read_torchscript,
    "onnx": read_onnx,
}


# --------------------------------------------------------------------------- running cases


class CaseFailed(Exception):
    pass


def cli_env(repo: Path) -> dict[str, str]:
    """The checkout's own code first, and no __pycache__ written into it; one thread everywhere (evaluate
    and export take no thread count); no GPU, so the record does not depend on one (last.pt would hold
    CUDA RNG states)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(repo),
        "PYTHONUNBUFFERED": "1",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def check_imports_from(repo: Path) -> None:
    """Refuse to record or check anything but the checkout's own code (an editable install elsewhere)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import cnntrain; print(cnntrain.__file__)"],
        cwd=tempfile.gettempdir(),
        env=cli_env(repo),
        capture_output=True,
        text=True,
    )
    where = Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None
    if where is None or repo.resolve() not in where.parents:
        raise SystemExit(
            f"golden: `import cnntrain` with PYTHONPATH={repo} gives {where or proc.stderr.strip()}, "
            f"not the checkout's own package"
        )


def run_cmd(cmd: Cmd, case_dir: Path, work: Path, repo: Path) -> str:
    """Run one command; a wrong exit code raises CaseFailed with the end of its output."""
    args = [a.format(dir=case_dir, tmp=work) for a in cmd.args]
    if cmd.kill_at_step is not None:
        argv = [sys.executable, str(FAULTS), f"kill-at-step={cmd.kill_at_step}", "--", *args]
    else:
        argv = [sys.executable, "-m", "cnntrain", *args]
    proc = subprocess.run(argv, cwd=work, env=cli_env(repo), capture_output=True, text=True, timeout=1800)
    if proc.returncode != cmd.expected_exit:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        hint = (
            " (killed at a training step: not that many steps, or no GradScaler.update per step?)"
            if cmd.kill_at_step is not None
            else ""
        )
        raise CaseFailed(
            f"`cnntrain {' '.join(args)}` exited {proc.returncode}, expected {cmd.expected_exit}{hint}\n"
            f"--- last lines of its output ---\n{tail}"
        )
    return proc.stdout


def run_case(case: Case, work: Path, repo: Path) -> dict[str, Any]:
    case_dir = work / case.name
    norm = Normalizer(work, repo)
    items: dict[str, Any] = {}
    for step in case.steps:
        if isinstance(step, Cmd):
            stdout = run_cmd(step, case_dir, work, repo)
            if step.stdout is not None:
                items[f"stdout:{step.stdout}"] = norm(stdout)
            continue
        path = case_dir / step.path
        if not path.is_file():
            raise CaseFailed(f"the commands did not write {path}")
        label = step.label or step.path
        items.update({f"{label}:{key}": value for key, value in READERS[step.kind](path, norm).items()})
    return items


def commands_of(case: Case) -> list[str]:
    out = []
    for step in case.steps:
        if isinstance(step, Cmd):
            kill = f" (SIGKILL after step {step.kill_at_step})" if step.kill_at_step else ""
            out.append(f"cnntrain {' '.join(step.args)}{kill}")
    return out


def missing_modules(case: Case) -> list[str]:
    return [m for m in case.requires if importlib.util.find_spec(m) is None]


def select(only: list[str] | None) -> list[Case]:
    """The cases asked for (all by default) plus the ones they need, in table order."""
    by_name = {c.name: c for c in CASES}
    if not only:
        return list(CASES)
    unknown = [n for n in only if n not in by_name]
    if unknown:
        raise SystemExit(f"golden: unknown case(s) {', '.join(unknown)}; cases: {', '.join(by_name)}")
    wanted = set(only)
    for name in only:
        wanted.update(by_name[name].needs)
    return [c for c in CASES if c.name in wanted]


@contextlib.contextmanager
def work_folder(keep: str | None) -> Iterator[Path]:
    if keep is not None:
        path = Path(keep).resolve()
        if path.exists() and any(path.iterdir()):
            raise SystemExit(f"golden: --workdir {path} is not empty")
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="cnntrain-golden-")).resolve()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Outcome:
    items: dict[str, Any] | None = None
    error: str | None = None
    unavailable: bool = False  # not run for a missing optional module (onnx): record leaves it out
    seconds: float = 0.0


def run_all(cases: list[Case], repo: Path, keep: str | None, on_case: Callable[[Case, Outcome], None]) -> None:
    check_imports_from(repo)
    torch.set_num_threads(1)  # exported models run here; one thread, as the commands
    failed: set[str] = set()
    with work_folder(keep) as work:
        for case in cases:
            t0 = time.perf_counter()
            outcome = Outcome()
            broken = [n for n in case.needs if n in failed]
            missing = missing_modules(case)
            if broken:
                outcome.error = f"not run: it needs case(s) {', '.join(broken)}, which failed"
            elif missing:
                outcome.error = f"not run: needs the Python module(s) {', '.join(missing)}, not installed"
                outcome.unavailable = True
            else:
                try:
                    outcome.items = run_case(case, work, repo)
                except (CaseFailed, subprocess.TimeoutExpired) as e:
                    outcome.error = str(e)
            outcome.seconds = time.perf_counter() - t0
            if outcome.error is not None:
                failed.add(case.name)
            on_case(case, outcome)


# --------------------------------------------------------------------------- record and check


def environment(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    fast_bf16 = any(
        getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_fast_bf16": fast_bf16,
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def source_of(env: dict[str, Any]) -> str:
    """'commit 0123abcd4567[, dirty]' (tracked files changed), or 'no git commit'."""
    if not env.get("commit"):
        return "no git commit"
    return f"commit {env['commit'][:12]}{', dirty' if env['dirty'] else ''}"


def record(args: argparse.Namespace) -> int:
    repo = Path(args.repo).resolve()
    out = Path(args.out).resolve() if args.out else repo / "runs" / "golden.json"
    cases = select(args.only)
    result: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "environment": environment(repo),
        "cases": {},
    }
    t0 = time.perf_counter()
    failures = []

    def on_case(case: Case, outcome: Outcome) -> None:
        if outcome.unavailable:
            print(f"{case.name:<22} left out of the record: {outcome.error}", flush=True)
            return
        if outcome.error is not None:
            print(f"{case.name:<22} FAILED  {outcome.error}", flush=True)
            failures.append(case.name)
            return
        assert outcome.items is not None
        result["cases"][case.name] = {"what": case.what, "commands": commands_of(case), "items": outcome.items}
        print(f"{case.name:<22} recorded {len(outcome.items):>5} items  {outcome.seconds:6.1f}s", flush=True)

    run_all(cases, repo, args.workdir, on_case)
    if failures:
        print(f"golden: nothing written: {len(failures)} case(s) failed ({', '.join(failures)})", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    env = result["environment"]
    print(
        f"recorded {len(result['cases'])} cases of {repo} ({source_of(env)}) "
        f"in {time.perf_counter() - t0:.0f}s -> {out}"
    )
    return 0


def same(a: Any, b: Any) -> bool:
    """Equal values of the same type (1 and 1.0 differ: the JSON written would); NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def report_case(name: str, old: dict[str, Any], new: dict[str, Any], verbose: bool, note: str = "") -> bool:
    """Print the case's line (identical / DIFFERENT and which items); True if identical."""
    changed = [k for k in old if k in new and not same(old[k], new[k])]
    missing = [k for k in old if k not in new]  # recorded, not produced now
    extra = [k for k in new if k not in old]  # produced now, not recorded
    if not (changed or missing or extra):
        print(f"{name:<22} identical ({len(new)} items){note}", flush=True)
        return True
    parts = [f"{k} (changed)" for k in changed] + [f"{k} (missing)" for k in missing] + [f"{k} (new)" for k in extra]
    more = f" ... (+{len(parts) - 6} more; -v lists them)" if len(parts) > 6 else ""
    print(f"{name:<22} DIFFERENT {len(parts)} of {len(old)} items: {', '.join(parts[:6])}{more}{note}", flush=True)
    if verbose:
        for k in changed:
            print(f"    {k}: {show(old[k])} -> {show(new[k])}")
        for k in missing:
            print(f"    {k}: {show(old[k])} -> (not produced)")
        for k in extra:
            print(f"    {k}: (not recorded) -> {show(new[k])}")
    return False


def load_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"golden: no record at {path}; take one with `golden.py record` (--out) first")
    golden = json.loads(path.read_text())
    if golden.get("format") != RECORD_FORMAT:
        raise SystemExit(f"golden: {path} has record format {golden.get('format')}, this script reads {RECORD_FORMAT}")
    return golden


def describe_record(golden: dict[str, Any]) -> str:
    return f"{source_of(golden['environment'])}, {golden['created']}"


def warn_environment(old: dict[str, Any], new: dict[str, Any]) -> None:
    for key in ("python", "torch", "numpy", "machine", "cpu", "cpu_fast_bf16"):
        if old.get(key) != new.get(key):
            print(
                f"warning: {key} was {old.get(key)!r} for the record, is {new.get(key)!r} now: results may differ "
                "in the last bits for that reason alone"
            )


def final_line(bad: list[str], total: int, unchecked: list[str]) -> int:
    if unchecked:
        print(f"note: not in the record, so not checked: {', '.join(unchecked)}")
    if bad:
        print(f"golden: {len(bad)} of {total} case(s) not identical: {', '.join(bad)}")
        return 1
    print(f"golden: all {total} cases identical")
    return 0


def check(args: argparse.Namespace) -> int:
    repo = Path(args.repo).resolve()
    against = Path(args.against).resolve() if args.against else repo / "runs" / "golden.json"
    golden = load_record(against)
    now = environment(repo)
    print(f"checking {repo} ({source_of(now)}) against {against} ({describe_record(golden)})")
    warn_environment(golden["environment"], now)
    names = args.only or list(golden["cases"])
    unrecorded = [n for n in names if n not in golden["cases"]]
    if unrecorded:
        raise SystemExit(f"golden: case(s) {', '.join(unrecorded)} are not in {against}")
    bad: list[str] = []

    def on_case(case: Case, outcome: Outcome) -> None:
        if case.name not in names:  # run only because another case needs it
            if outcome.error is not None:
                print(f"{case.name:<22} FAILED (needed by other cases)  {outcome.error}", flush=True)
            return
        recorded = golden["cases"][case.name]
        note = "" if recorded["commands"] == commands_of(case) else "  (note: its commands changed since the record)"
        if outcome.error is not None:
            bad.append(case.name)
            print(f"{case.name:<22} FAILED  {outcome.error}{note}", flush=True)
            return
        assert outcome.items is not None
        if not report_case(
            case.name, recorded["items"], outcome.items, args.verbose, f"  {outcome.seconds:.1f}s{note}"
        ):
            bad.append(case.name)

    run_all(select(names), repo, args.workdir, on_case)
    unchecked = [] if args.only else [c.name for c in CASES if c.name not in golden["cases"]]
    return final_line(bad, len(names), unchecked)


def compare(args: argparse.Namespace) -> int:
    """Two records, case by case, without running anything (e.g. records of two checkouts)."""
    old, new = load_record(Path(args.old)), load_record(Path(args.new))
    print(f"comparing {args.old} ({describe_record(old)}) with {args.new} ({describe_record(new)})")
    warn_environment(old["environment"], new["environment"])
    bad = []
    for name, case in old["cases"].items():
        if name not in new["cases"]:
            print(f"{name:<22} MISSING from {args.new}")
            bad.append(name)
        elif not report_case(name, case["items"], new["cases"][name]["items"], args.verbose):
            bad.append(name)
    return final_line(bad, len(old["cases"]), [n for n in new["cases"] if n not in old["cases"]])


def list_cases(args: argparse.Namespace) -> int:
    for case in CASES:
        extra = f" [needs {', '.join(case.needs)}]" if case.needs else ""
        extra += f" [requires {', '.join(case.requires)}]" if case.requires else ""
        print(f"{case.name}: {case.what}{extra}")
        for command in commands_of(case):
            print(f"    {command}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="golden.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repo", default=str(REPO), help="the checkout to run (default: %(default)s)")
    common.add_argument("--only", nargs="+", metavar="CASE", help="run only these cases (and the ones they need)")
    common.add_argument("--workdir", help="keep the run directories here (an empty or new folder)")
    rec = sub.add_parser("record", parents=[common], help="run the cases and write their outcomes")
    rec.add_argument("--out", help="where to write the record (default: <repo>/runs/golden.json)")
    rec.set_defaults(func=record)
    chk = sub.add_parser("check", parents=[common], help="rerun the cases and compare with a record")
    chk.add_argument("--against", help="the record to compare with (default: <repo>/runs/golden.json)")
    chk.add_argument("-v", "--verbose", action="store_true", help="show the old and new value of each difference")
    chk.set_defaults(func=check)
    cmp = sub.add_parser("compare", help="compare two records without running anything")
    cmp.add_argument("old")
    cmp.add_argument("new")
    cmp.add_argument("-v", "--verbose", action="store_true", help="show the old and new value of each difference")
    cmp.set_defaults(func=compare)
    sub.add_parser("list", help="the cases and their commands").set_defaults(func=list_cases)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
