"""Accuracy of the Fashion-MNIST recipes on the full test set (10,000 images), for the README's table.

Runs `cnntrain fit experiment=X` for each recipe, one after another, in fresh processes, and writes
benchmarks/ACCURACY.md (and accuracy.json, which keeps the rows of recipes not re-run with --only).

    python benchmarks/accuracy.py                       # all three (about 15-20 minutes on 2 CPU cores)
    python benchmarks/accuracy.py --only fashion_cnn    # one recipe (repeatable)
    python benchmarks/accuracy.py --threads 1           # trainer.num_threads=1: steadier on a busy machine
    python benchmarks/accuracy.py --quick               # 2,000 images, 1 epoch: checks the script, writes nothing

Needs the full Fashion-MNIST (Debian: apt-get install dataset-fashion-mnist, or dataset.root=...).
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
from pathlib import Path

from run import machine  # benchmarks/run.py, beside this script

HERE = Path(__file__).resolve().parent
# Recipe -> the accuracy it is meant to reach on the test set.
RECIPES = {
    "fashion_seed": ("the seed's Keras recipe: simple_cnn, Adam 1e-3, batch 32, 5 epochs", "about 0.905"),
    "fashion_cnn": ("simple_cnn_bn, AdamW 3e-3 one-cycle, batch 128, 8 epochs", ">= 0.925"),
    "fashion_resnet": ("resnet9 width 16, crop+flip, label smoothing 0.1, AdamW one-cycle, 25 epochs", ">= 0.94"),
}


def fit(name: str, extra: list[str], work: Path) -> dict:
    """One `cnntrain fit experiment=NAME` in work/; its summary plus times and the command."""
    args = [f"experiment={name}", *extra]
    before = set(work.rglob("summary.json"))
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cnntrain", "fit", "trainer.progress=plain", *args],
        cwd=work,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"cnntrain fit {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    (path,) = set(work.rglob("summary.json")) - before
    s = json.loads(path.read_text())
    with open(path.parent / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        "experiment": name,
        "command": " ".join(["cnntrain fit", *args]),
        "test_acc": s["test_acc"],
        "best_val_acc": s.get("best_val_acc"),
        "best_epoch": s.get("best_epoch"),
        "epochs": s["epochs_done"],
        "train_s": round(sum(float(r["epoch_s"]) for r in rows), 1),
        "wall_s": round(wall, 1),
        "parameters": s.get("parameters"),
        "run_dir": str(path.parent),
    }


def table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| experiment | recipe | target | test acc | best val acc (epoch) | epochs | training | whole command |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in RECIPES:
        r = results.get(name)
        if r is None:
            continue
        recipe, target = RECIPES[name]
        lines.append(
            f"| `{r['command']}` | {recipe} | {target} | **{r['test_acc']:.4f}** | "
            f"{r['best_val_acc']:.4f} ({r['best_epoch']}) | {r['epochs']} | {r['train_s'] / 60:.1f} min | "
            f"{r['wall_s'] / 60:.1f} min |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=list(RECIPES), action="append", help="run this recipe only (repeatable)")
    ap.add_argument("--threads", type=int, help="trainer.num_threads for every run (default: torch's, one per core)")
    ap.add_argument("--quick", action="store_true", help="2,000 images and 1 epoch each: checks the script runs")
    ap.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=HERE / "ACCURACY.md")
    args = ap.parse_args()
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        print("note: /usr/share/datasets/fashion-mnist is missing; cnntrain will look in its other places", flush=True)
    extra = [f"trainer.num_threads={args.threads}"] if args.threads else []
    if args.quick:
        extra += ["dataset.subset=2000", "trainer.epochs=1"]
    work = args.keep or Path(tempfile.mkdtemp(prefix="cnntrain-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    store = args.out.with_suffix(".json")
    results: dict[str, dict] = {} if args.quick or not store.exists() else json.loads(store.read_text())["results"]
    try:
        for name in args.only or list(RECIPES):
            print(f"running cnntrain fit experiment={name} {' '.join(extra)}".rstrip(), flush=True)
            r = fit(name, extra, work)
            r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            results[name] = r
            print(
                f"  test acc {r['test_acc']:.4f}, best val acc {r['best_val_acc']:.4f} (epoch {r['best_epoch']}), "
                f"{r['epochs']} epochs, training {r['train_s']:.0f} s, whole command {r['wall_s']:.0f} s",
                flush=True,
            )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(table(results)))
    if args.quick:
        return
    store.write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")
    threads = f"trainer.num_threads={args.threads}" if args.threads else "torch's default threads (one per core)"
    lines = [
        "# Accuracy of the Fashion-MNIST recipes\n",
        f"Full Fashion-MNIST: 54,000 training / 6,000 validation images (the split of `dataset.val_fraction=0.1`), "
        f"tested on the 10,000 test images with the weights of the best validation epoch.  \n"
        f"Machine: {machine()}; {threads}.  \n"
        f"Written by `python benchmarks/accuracy.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        "each row gives the date it was run in accuracy.json.\n",
        *table(results),
        "",
        "`training` is the sum of the epochs (training steps and validation); `whole command` adds start-up, "
        "data loading, the test and the figures.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {store}")


if __name__ == "__main__":
    main()
