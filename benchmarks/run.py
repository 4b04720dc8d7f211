"""cnntrain's benchmark suite: throughput against peers, scaling, memory, start-up, time to accuracy.

Every contender runs in its own fresh process, one after another, on the same machine in one invocation, so
the ratios are comparable even when absolute figures drift on shared machines.

    python benchmarks/run.py                 # everything (about 10 minutes on 2 CPU cores); writes RESULTS.md
    python benchmarks/run.py --only peers    # one section: peers | scaling | startup | accuracy
    python benchmarks/run.py --quick         # tiny sizes: checks the suite runs (used by the tests)

The Keras peer needs TensorFlow in its own environment, never in cnntrain's:
    python -m venv benchmarks/.env && benchmarks/.env/bin/pip install tensorflow-cpu
(or point $KERAS_PYTHON at an interpreter that has it); without it that row is skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
PY = sys.executable
# What experiment=fashion_fast ships: the bare loop is run with the same settings.
FAST = {"batch_size": 256, "precision": "bf16", "channels_last": True}


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 1800) -> tuple[dict, float, float]:
    """Run a command; return its RESULT json (if any), wall seconds, and its peak RSS in MB."""
    wrapper = (
        "import resource, subprocess, sys;"
        "p = subprocess.run(sys.argv[1:]);"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True);"
        "sys.exit(p.returncode)"
    )
    t = time.perf_counter()
    proc = subprocess.run([PY, "-c", wrapper, *cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result, rss = {}, 0.0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        elif line.startswith("PEAK_RSS_KB"):
            rss = int(line.split()[1]) / 1024
    return result, wall, rss


def cnntrain_fit(args: list[str], work: Path) -> tuple[dict, list[dict], float, float]:
    """`cnntrain fit ARGS` in work/; returns its summary, metrics rows, wall seconds, peak RSS MB."""
    before = set(work.rglob("summary.json"))
    _, wall, rss = run([PY, "-m", "cnntrain", "fit", "trainer.progress=plain", *args], cwd=work)
    (path,) = set(work.rglob("summary.json")) - before
    with open(path.parent / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return json.loads(path.read_text()), rows, wall, rss


def steady_ips(rows: list[dict]) -> float:
    """Training images/s of the last epoch (the first carries one-off kernel set-up)."""
    return float(rows[-1]["images_per_s"])


def keras_python() -> str | None:
    candidate = os.environ.get("KERAS_PYTHON") or str(HERE / ".env" / "bin" / "python")
    if Path(candidate).exists():
        ok = subprocess.run([candidate, "-c", "import tensorflow"], capture_output=True).returncode == 0
        return candidate if ok else None
    return None


def section_peers(work: Path, quick: bool) -> list[tuple[str, float, str]]:
    images = 4000 if quick else None
    rows: list[tuple[str, float, str]] = []
    subset = [f"dataset.subset={images}"] if quick else []
    s, metrics, _, _ = cnntrain_fit(["experiment=fashion_fast", "trainer.epochs=2", *subset], work)
    rows.append(("cnntrain fit experiment=fashion_fast (batch 256, bf16, channels_last)", steady_ips(metrics),
                 "epoch 2 of 2, logging and progress included"))
    fast = ["--batch-size", str(FAST["batch_size"]), "--precision", FAST["precision"], "--channels-last"]
    n = ["--images", str(images)] if quick else []
    r, _, _ = run([PY, str(PEERS / "bare_loop.py"), *fast, *n])
    rows.append(("bare loop, in-memory tensors, same settings", r["images_per_s"], "one epoch after warm-up"))
    r, _, _ = run([PY, str(PEERS / "bare_loop.py"), "--batch-size", "128", "--precision", "32", *n])
    rows.append(("bare loop, in-memory tensors, batch 128, fp32", r["images_per_s"], "one epoch after warm-up"))
    r, _, _ = run([PY, str(PEERS / "tutorial_loop.py"), *n])
    rows.append(("tutorial loop: torchvision + ToTensor + DataLoader, batch 32, fp32", r["images_per_s"],
                 "one epoch after warm-up"))
    kp = keras_python()
    if kp:
        r, _, _ = run([kp, str(PEERS / "keras_seed.py"), "--epochs", "2", *n])
        rows.append(("Keras seed recipe (tensorflow-cpu), batch 32", r["images_per_s"], "epoch 2 of 2"))
    else:
        rows.append(("Keras seed recipe (tensorflow-cpu), batch 32", float("nan"), "skipped: no TensorFlow env"))
    return rows


def section_scaling(work: Path, quick: bool) -> tuple[list, list, float]:
    sub = "2000" if quick else "16384"
    batches = [32, 256] if quick else [32, 64, 128, 256, 512, 1024]
    by_batch = []
    for bs in batches:
        _, m, _, _ = cnntrain_fit(["experiment=fashion_fast", "trainer.epochs=2", f"dataset.subset={sub}",
                                   f"trainer.batch_size={bs}", "scheduler=none"], work)
        by_batch.append((bs, steady_ips(m)))
    by_model = []
    for model, n in (("simple_cnn", sub), ("resnet8", "1000" if quick else "8192"),
                     ("resnet20", "500" if quick else "4096")):
        s, m, _, _ = cnntrain_fit(["experiment=fashion_fast", f"model={model}", "trainer.epochs=2",
                                   f"dataset.subset={n}", "scheduler=none"], work)
        by_model.append((model, s["parameters"], steady_ips(m)))
    _, _, _, rss = cnntrain_fit(["experiment=fashion_fast", "trainer.epochs=1"]
                                + (["dataset.subset=2000"] if quick else []), work)
    return by_batch, by_model, rss


def section_startup(work: Path) -> tuple[float, float]:
    help_times = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run(["cnntrain", "--help"], capture_output=True, check=True)
        help_times.append(time.perf_counter() - t)
    _, _, wall, _ = cnntrain_fit(["experiment=smoke"], work)
    return min(help_times), wall


def section_accuracy(work: Path, quick: bool) -> list[tuple[str, str, float, float, float]]:
    rows = []
    extra = ["dataset.subset=2000", "trainer.epochs=1"] if quick else []
    for recipe, args in (("default (embedded MNIST 5k, seed recipe)", []),
                         ("experiment=fashion_fast", ["experiment=fashion_fast"])):
        for precision in ("bf16", "32"):
            s, m, _, _ = cnntrain_fit([*args, f"trainer.precision={precision}", *extra], work)
            train_s = sum(float(r["epoch_s"]) - float(r["eval_s"]) for r in m)
            rows.append((recipe, precision, s["test_acc"], train_s, s["best_val_acc"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["peers", "scaling", "startup", "accuracy"], action="append")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the suite runs")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    sections = args.only or ["peers", "scaling", "startup", "accuracy"]
    work = Path(tempfile.mkdtemp(prefix="cnntrain-bench-"))
    lines = [f"# Benchmark results\n\nMachine: {machine()}  \nDate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
             f"  \nCommand: `python benchmarks/run.py{' --quick' if args.quick else ''}"
             f"{''.join(' --only ' + s for s in args.only or [])}`\n"]
    try:
        if "peers" in sections:
            rows = section_peers(work, args.quick)
            ours = rows[0][1]
            lines += ["## Training throughput, seed CNN, Fashion-MNIST (images/s)\n",
                      "| contender | images/s | cnntrain is | how measured |", "|---|---:|---:|---|"]
            for name, ips, how in rows:
                ratio = "" if name == rows[0][0] or ips != ips else f"{ours / ips:.2f}x"
                lines.append(f"| {name} | {ips:,.0f} | {ratio} | {how} |")
            lines.append("")
            print("\n".join(lines[-len(rows) - 3:]), flush=True)
        if "scaling" in sections:
            by_batch, by_model, rss = section_scaling(work, args.quick)
            lines += ["## Scaling (cnntrain fit, fashion_fast settings, images/s of epoch 2)\n",
                      "| batch size | images/s |", "|---:|---:|"]
            lines += [f"| {bs} | {ips:,.0f} |" for bs, ips in by_batch]
            lines += ["", "| model (batch 256) | parameters | images/s |", "|---|---:|---:|"]
            lines += [f"| {m} | {p:,} | {ips:,.0f} |" for m, p, ips in by_model]
            lines += ["", f"Peak memory (RSS) of `cnntrain fit experiment=fashion_fast` (one epoch, full "
                          f"Fashion-MNIST): **{rss:,.0f} MB**\n"]
            print("\n".join(lines[-12:]), flush=True)
        if "startup" in sections:
            help_s, smoke_s = section_startup(work)
            lines += ["## Start-up\n", f"- `cnntrain --help`: {help_s:.2f} s (best of 5)",
                      f"- `cnntrain fit experiment=smoke`, whole command: {smoke_s:.1f} s\n"]
            print("\n".join(lines[-3:]), flush=True)
        if "accuracy" in sections:
            acc = section_accuracy(work, args.quick)
            lines += ["## Accuracy: bf16 autocast against fp32\n",
                      "| recipe | precision | test acc | best val acc | training s |", "|---|---|---:|---:|---:|"]
            lines += [f"| {r} | {p} | {a:.4f} | {v:.4f} | {s:.1f} |" for r, p, a, s, v in acc]
            lines.append("")
            print("\n".join(lines[-len(acc) - 3:]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.quick:
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
