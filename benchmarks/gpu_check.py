"""`make gpu-check`: everything cnntrain does on CUDA, in one command of a few minutes, as one table.

    python benchmarks/gpu_check.py               # on a machine with a CUDA GPU; exit 1 if any check fails
    python benchmarks/gpu_check.py --device cpu  # the same script on the CPU, small: checks the script itself

Checks: fit in bf16 and in fp16 with GradScaler; channels_last + torch.compile; a deterministic run killed
mid-epoch and resumed, bit-identical to one never interrupted; evaluate, predict and export used on the GPU;
DDP over NCCL when there are 2 GPUs; and training images/s of cnntrain against a bare loop on GPU-resident
tensors (simple_cnn and resnet20, CIFAR-shaped synthetic data, batch 512). Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
}
ENV.pop("HYDRA_FULL_ERROR", None)

# SIGKILL the CLI right after its N-th optimizer step: a crash from outside, with no hook in cnntrain.
FAULTS = REPO / "tests" / "faults.py"


class CheckFailed(Exception):
    pass


def cli(args: list[str], cwd: Path, timeout: float = 600, prefix: list[str] | None = None) -> str:
    """Run `cnntrain ARGS` (or PREFIX ARGS); its output; CheckFailed with the output's end if it fails."""
    cmd = prefix if prefix is not None else [sys.executable, "-m", "cnntrain"]
    proc = subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise CheckFailed(f"exit {proc.returncode}: {' '.join(args)}\n" + "\n".join(tail))
    return proc.stdout + proc.stderr


def fit(args: list[str], cwd: Path, run_dir: Path, timeout: float = 600) -> dict:
    """`cnntrain fit ARGS` into run_dir; its summary.json, which must say completed."""
    cli(["fit", "trainer.progress=plain", f"hydra.run.dir={run_dir}", *args], cwd, timeout)
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") != "completed":
        raise CheckFailed(f"{run_dir}: status {summary.get('status')}")
    return summary


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_images(root: Path, n_train: int, n_val: int, size: int = 32, channels: int = 3, seed: int = 0) -> Path:
    """A CIFAR-shaped image folder of random pixels: root/{train,val}/<class>/*.png, 10 classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        pixels = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
        for c in range(10):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(pixels[i].squeeze(-1) if channels == 1 else pixels[i]).save(
                root / split / f"class{i % 10}" / f"{i}.png", compress_level=0
            )
    return root


def bare_loop(model_name: str, device: str, n: int, batch: int, steps: int, precision: str) -> float:
    """images/s of the plainest training loop on device-resident tensors: the floor of any framework's cost."""
    from cnntrain.config import ModelConfig
    from cnntrain.models import build_model

    dev = torch.device(device)
    torch.manual_seed(0)
    fmt = torch.channels_last
    model = build_model(ModelConfig(name=model_name), 3, (32, 32), 10).to(dev, memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_u8 = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (n,), device=dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)

    def step(i: int) -> None:
        idx = torch.randint(0, n, (batch,), device=dev)
        x = (x_u8[idx].float().div_(255).sub_(0.5).div_(0.25)).contiguous(memory_format=fmt)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y[idx])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for i in range(10):
        step(i)
    sync()
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    return steps * batch / (time.perf_counter() - t)


class Checks:
    def __init__(self, work: Path, device: str, small: bool):
        self.work, self.device, self.small = work, device, small
        self.rows: list[tuple[str, str, float, str]] = []
        self.cuda = device.startswith("cuda")
        self.base = ["experiment=smoke", f"trainer.device={device}"]

    def run(self, name: str, fn) -> None:
        t = time.perf_counter()
        try:
            detail = fn() or ""
            status = "ok"
        except CheckFailed as e:
            status, detail = "FAILED", str(e)
        except Exception as e:  # the script's own bug or an unexpected CUDA error: a failure, with where
            status, detail = "FAILED", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        if detail.startswith("skipped"):
            status = "skipped"
        seconds = time.perf_counter() - t
        self.rows.append((name, status, seconds, detail))
        first = detail.splitlines()[0] if detail else ""
        print(f"[{status}] {name} ({seconds:.1f} s) {first}", flush=True)
        if status == "FAILED":
            print("    " + detail.replace("\n", "\n    "), flush=True)

    # ------------------------------------------------------------------ the checks

    def fit_precision(self, precision: str) -> str:
        if precision == "fp16" and not self.cuda:
            return "skipped: fp16 needs a GPU"
        run_dir = self.work / f"fit-{precision}"
        s = fit([*self.base, f"trainer.precision={precision}"], self.work, run_dir)
        if not 0.5 <= s["test_acc"] <= 1:  # smoke reaches about 0.86; chance is 0.1
            raise CheckFailed(f"test accuracy {s['test_acc']:.3f}: the {precision} run did not learn")
        return f"test acc {s['test_acc']:.3f}{' (GradScaler)' if precision == 'fp16' else ''}"

    def channels_last_compile(self) -> str:
        args = [*self.base, "trainer.channels_last=true", "trainer.compile=true"]
        if not self.cuda:
            return "skipped: compile on the CPU is slow and not what this checks"
        s = fit(args, self.work, self.work / "fit-compile", timeout=900)
        if not 0.5 <= s["test_acc"] <= 1:
            raise CheckFailed(f"test accuracy {s['test_acc']:.3f}")
        return f"test acc {s['test_acc']:.3f}"

    def resume_after_kill(self) -> str:
        args = [
            *self.base,
            "trainer.epochs=2",
            "trainer.deterministic=true",
            "trainer.checkpoint_every_n_steps=10",
            "trainer.progress=none",
        ]
        whole, broken = self.work / "resume-whole", self.work / "resume-killed"
        fit(args, self.work, whole)
        proc = subprocess.run(
            [sys.executable, str(FAULTS), "kill-at-step=45", "--", "fit", *args, f"hydra.run.dir={broken}"],
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=600,
            env=ENV,
        )
        if proc.returncode != -9:
            raise CheckFailed(f"the run to kill ended with {proc.returncode}, not SIGKILL:\n{proc.stderr[-1500:]}")
        cli(["fit", f"resume={broken}", "trainer.progress=none"], self.work)
        a = torch.load(whole / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
        b = torch.load(broken / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        if differ:
            raise CheckFailed(
                f"resumed weights differ from the uninterrupted run's in {len(differ)} tensors (e.g. {differ[0]})"
            )
        drop = {"images_per_s", "epoch_s", "data_s", "compute_s", "eval_s"}
        rows = [[{k: v for k, v in r.items() if k not in drop} for r in metrics(d)] for d in (whole, broken)]
        if rows[0] != rows[1]:
            raise CheckFailed(f"metrics.csv differs:\n{rows[0]}\n{rows[1]}")
        return "killed at step 45 of 64, resumed: weights and metrics bit-identical"

    def after_training(self) -> str:
        from PIL import Image

        from cnntrain.engine.inference import load_trained

        run_dir = self.work / "fit-bf16"
        if not (run_dir / "checkpoints" / "best.pt").exists():
            raise CheckFailed("no run to use: the bf16 fit failed")
        out = cli(["evaluate", f"ckpt={run_dir}", f"device={self.device}", f"out={self.work / 'evaluate'}"], self.work)
        report = json.loads((self.work / "evaluate" / "metrics.json").read_text())
        image = self.work / "digit.png"
        Image.new("L", (28, 28), 0).save(image)
        out = cli(
            ["predict", f"ckpt={run_dir}", f"inputs={image}", f"device={self.device}", f"out={self.work / 'predict'}"],
            self.work,
        )
        if not (self.work / "predict" / "predictions.csv").exists():
            raise CheckFailed(f"predict wrote no predictions.csv:\n{out[-1000:]}")
        cli(["export", f"ckpt={run_dir}", "format=torchscript", f"out={self.work / 'export'}"], self.work)
        (path,) = (self.work / "export").glob("*.pt")
        scripted = torch.jit.load(str(path), map_location=self.device)
        trained = load_trained(str(run_dir), self.device)
        x = torch.randn(8, 1, 28, 28, device=self.device)
        with torch.no_grad():
            diff = (scripted(x).float() - trained.model(x).float()).abs().max().item()
        if diff > 1e-3:
            raise CheckFailed(f"the exported model on {self.device} differs from the checkpoint's by {diff:g}")
        acc = report.get("acc", report.get("accuracy"))
        return f"evaluate acc {acc}, predict ok, TorchScript on {self.device} matches (max diff {diff:.1e})"

    def ddp(self) -> str:
        if not self.cuda:
            return "skipped: checks NCCL, which needs GPUs"
        if torch.cuda.device_count() < 2:
            return f"skipped: {torch.cuda.device_count()} GPU visible, DDP needs 2"
        run_dir = self.work / "ddp"
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "cnntrain",
        ]
        cli(
            ["fit", *self.base, "trainer.batch_size=64", "trainer.progress=plain", f"hydra.run.dir={run_dir}"],
            self.work,
            prefix=torchrun,
        )
        s = json.loads((run_dir / "summary.json").read_text())
        if s.get("status") != "completed" or not 0.5 <= s["test_acc"] <= 1:
            raise CheckFailed(f"DDP run: status {s.get('status')}, test acc {s.get('test_acc')}")
        return f"2 ranks over NCCL, test acc {s['test_acc']:.3f}"

    def throughput(self, model: str) -> str:
        n_train, batch, epochs = (256, 64, 2) if self.small else (25600, 512, 3)
        data = self.work / "cifar-shaped"
        if not data.exists():
            write_images(data, n_train, 128 if self.small else 1024)
        run_dir = self.work / f"speed-{model}"
        fit(
            [
                f"trainer.device={self.device}",
                "dataset=imagefolder",
                f"dataset.root={data}",
                f"model={model}",
                f"trainer.batch_size={batch}",
                f"trainer.epochs={epochs}",
                "trainer.eval_batch_size=1024",
                "scheduler=none",
            ],
            self.work,
            run_dir,
        )
        ours = float(metrics(run_dir)[-1]["images_per_s"])
        from cnntrain.engine.device import resolve_precision

        # The bare loop runs what the fit's precision=auto ran: a CPU without native bf16 trains fp32 there.
        precision = resolve_precision("auto", torch.device(self.device)).label
        bare = bare_loop(model, self.device, n_train, batch, n_train // batch, precision)
        self.speed.append((model, ours, bare))
        return f"cnntrain {ours:,.0f} images/s, bare loop {bare:,.0f}: cnntrain is {ours / bare:.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu to check this script on a CPU")
    ap.add_argument("--keep", action="store_true", help="keep the runs (their folder is printed)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}, {build} build): nothing to check.")
        return 0
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"gpu-check on {name} ({torch.cuda.device_count() if args.device.startswith('cuda') else 0} GPUs), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="cnntrain-gpu-check-"))
    c = Checks(work, args.device, small=not args.device.startswith("cuda"))
    c.speed = []
    try:
        c.run("fit, bf16 autocast", lambda: c.fit_precision("bf16"))
        c.run("fit, fp16 autocast + GradScaler", lambda: c.fit_precision("fp16"))
        c.run("fit, channels_last + torch.compile", c.channels_last_compile)
        c.run("deterministic resume after SIGKILL", c.resume_after_kill)
        c.run("evaluate, predict, export", c.after_training)
        c.run("DDP over NCCL, 2 GPUs", c.ddp)
        c.run("images/s: simple_cnn", lambda: c.throughput("simple_cnn"))
        c.run("images/s: resnet20", lambda: c.throughput("resnet20"))
    finally:
        if args.keep:
            print(f"runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n## gpu-check: {name}, torch {torch.__version__}\n")
    print("| check | result | seconds | detail |\n|---|---|---:|---|")
    for check, status, seconds, detail in c.rows:
        print(f"| {check} | {status} | {seconds:.1f} | {detail.splitlines()[0] if detail else ''} |")
    if c.speed:
        print(
            "\n| model, CIFAR-shaped synthetic data | cnntrain images/s | bare loop images/s | ratio |\n"
            "|---|---:|---:|---:|"
        )
        for model, ours, bare in c.speed:
            print(f"| {model} | {ours:,.0f} | {bare:,.0f} | {ours / bare:.2f}x |")
    failed = [r[0] for r in c.rows if r[1] == "FAILED"]
    skipped = sum(r[1] == "skipped" for r in c.rows)
    print(
        f"\ngpu-check: {len(c.rows) - len(failed) - skipped} ok, {skipped} skipped, {len(failed)} FAILED"
        + (f": {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
