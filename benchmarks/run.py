"""cnntrain's benchmark suite: throughput against peers, scaling, the compute limit, busy machines, start-up
and memory, time to accuracy.

Every contender runs in its own fresh process, one after another, on the same machine in one invocation, so
the ratios are comparable even when absolute figures drift on shared machines. Run it on a quiet machine: the
contention section makes its own load, and any other load skews every section.

    python benchmarks/run.py                 # everything (about 15 minutes on 2 CPU cores); writes RESULTS.md
    python benchmarks/run.py --only peers    # one section: peers | scaling | limit | contention | startup | accuracy
    python benchmarks/run.py --quick         # tiny sizes: checks the suite runs (used by the tests), writes nothing
    python benchmarks/run.py --only peers --repo ../before --out /tmp/before.md   # another checkout's cnntrain
    python benchmarks/run.py --only peers --only limit --only accuracy --rounds 3   # issue 18's table and targets

The peers section runs every contender once per round, in turn (--rounds, default 2), and reports each round
and the median. cnntrain's layout/chunk probe starts from an empty cache in the run's own folder, so the first
cnntrain run pays for it and the later ones read the cache, as on a user's machine.

The Keras peer needs TensorFlow in its own environment, never in cnntrain's:
    python -m venv benchmarks/.env && benchmarks/.env/bin/pip install tensorflow-cpu
(or point $KERAS_PYTHON at an interpreter that has it); without it that row is skipped.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = HERE / "peers"
PY = sys.executable
SECTIONS = ["peers", "scaling", "limit", "contention", "startup", "accuracy"]
# The checkout's own cnntrain, whatever an installed one points at.
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
}
# experiment=fashion_fast's batch; precision and layout are `auto` there (see fast_settings).
FAST_BATCH = 256


# --precision 32: every contender in fp32 on a CPU whose `auto` would pick bf16, so a machine with native bf16
# can also measure what CPUs without it get. Empty: what `auto` picks.
FORCED_PRECISION: list[str] = []


@functools.cache
def fast_settings() -> tuple[str, bool]:
    """What this benchmark's precision (auto unless --precision) and channels_last=auto resolve to on this CPU
    ("bf16" or "32"; channels_last), through cnntrain's own resolver, so the bare loop runs what the fit ran: a
    CPU without native bf16 trains fp32 there, and a bare loop forced into emulated bf16 would be a strawman."""
    sys.path.insert(0, str(REPO))
    import torch

    from cnntrain.engine.device import resolve_channels_last, resolve_precision

    cpu = torch.device("cpu")
    precision = resolve_precision(FORCED_PRECISION[0] if FORCED_PRECISION else "auto", cpu)
    return precision.label, resolve_channels_last("auto", cpu, precision)


@functools.cache
def native_bf16() -> bool:
    """Whether precision=auto picks bf16 on this CPU (AVX512-BF16 or AMX), whatever --precision says."""
    import torch

    from cnntrain.engine.device import resolve_precision

    return resolve_precision("auto", torch.device("cpu")).label == "bf16"


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    # Native bf16 (AVX512-BF16/AMX) or not decides which runs' figures compare: auto trains bf16 or fp32.
    bf16 = "native bf16" if native_bf16() else "no native bf16"
    return (
        f"{cpu}, {os.cpu_count()} cores ({bf16}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"
    )


def run(
    cmd: list[str], cwd: Path | None = None, timeout: float = 1800, env: dict[str, str] | None = None
) -> tuple[dict, float, float]:
    """Run a command; return its RESULT json (if any), wall seconds, and its peak RSS in MB."""
    wrapper = (
        "import resource, subprocess, sys;"
        "p = subprocess.run(sys.argv[1:]);"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True);"
        "sys.exit(p.returncode)"
    )
    t = time.perf_counter()
    proc = subprocess.run(
        [PY, "-c", wrapper, *cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})}
    )
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


# --quick: every fit on the embedded 5,000 digits (a 500-image test split) instead of full Fashion-MNIST, whose
# decoding and 16,000 validation and test images would make most of a quick run.
QUICK_DATA: list[str] = []


def cnntrain_fit(
    args: list[str], work: Path, env: dict[str, str] | None = None
) -> tuple[dict, list[dict], float, float]:
    """`cnntrain fit ARGS` in work/; returns its summary (plus the torch threads it ran), metrics rows, wall
    seconds, peak RSS MB."""
    before = set(work.rglob("summary.json"))
    forced = [f"trainer.precision={FORCED_PRECISION[0]}"] if FORCED_PRECISION else []
    # No figures unless asked: the default background drawer outlives the command, so it would load the machine
    # during the next timed fit and write into a run folder the caller may already be removing.
    quiet = [] if any(a.startswith("trainer.figures=") for a in args) else ["trainer.figures=off"]
    _, wall, rss = run(
        [PY, "-m", "cnntrain", "fit", "trainer.progress=plain", *quiet, *args, *QUICK_DATA, *forced],
        cwd=work,
        env=env,
    )
    (path,) = set(work.rglob("summary.json")) - before
    with open(path.parent / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads(path.read_text())
    summary["threads"] = json.loads((path.parent / "provenance.json").read_text()).get("torch_threads")
    summary["run_dir"] = str(path.parent)
    return summary, rows, wall, rss


def train_seconds(rows: list[dict]) -> float:
    """Time spent in training steps (validation left out), all epochs."""
    return sum(float(r["epoch_s"]) - float(r["eval_s"]) for r in rows)


def steady_ips(rows: list[dict]) -> float:
    """Training images/s of the last epoch (the first carries one-off kernel set-up)."""
    return float(rows[-1]["images_per_s"])


def keras_python() -> tuple[str | None, str]:
    """(an interpreter with TensorFlow, or None; why not): $KERAS_PYTHON, else benchmarks/.env."""
    named = os.environ.get("KERAS_PYTHON")
    candidate = named or str(HERE / ".env" / "bin" / "python")
    where = "$KERAS_PYTHON" if named else "benchmarks/.env"
    if not Path(candidate).exists():
        return None, f"skipped: no TensorFlow environment ({where} does not exist; see this file's docstring)"
    if subprocess.run([candidate, "-c", "import tensorflow"], capture_output=True).returncode != 0:
        return None, f"skipped: {candidate} ({where}) cannot import tensorflow"
    return candidate, ""


@dataclass
class Contender:
    name: str
    how: str
    measure: Callable[[], float]  # one fresh-process run -> images/s
    figures: list[float] = field(default_factory=list)
    skipped: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.figures) if self.figures else float("nan")


def peer_contenders(work: Path, quick: bool) -> tuple[list[Contender], dict]:
    """fashion_fast with every default, the bare loop in both layouts (same batch and precision), the tutorial
    loop and Keras. The first is cnntrain; `probe` collects what its layout/chunk probe chose each run."""
    images = 4000 if quick else None
    subset = [f"dataset.subset={images}"] if quick else []
    n = ["--images", str(images)] if quick else []
    precision, _ = fast_settings()
    label = "bf16" if precision == "bf16" else "fp32"
    probe: dict = {"runs": []}

    def fit() -> float:  # round 1 pays for the layout/chunk probe (main() starts with an empty cache), later ones not
        s, metrics, _, _ = cnntrain_fit(["experiment=fashion_fast", "trainer.epochs=2", *subset], work)
        probe["runs"].append(s.get("tuning", {}))
        return steady_ips(metrics)

    def bare(layout: list[str]) -> Callable[[], float]:
        cmd = [PY, str(PEERS / "bare_loop.py"), "--batch-size", str(FAST_BATCH), "--precision", precision, *layout, *n]
        return lambda: run(cmd)[0]["images_per_s"]

    def tutorial() -> float:
        return run([PY, str(PEERS / "tutorial_loop.py"), *n])[0]["images_per_s"]

    kp, why = keras_python()

    def keras() -> float:
        return run([kp, str(PEERS / "keras_seed.py"), "--epochs", "2", *n])[0]["images_per_s"]

    contenders = [
        Contender(
            "cnntrain fit experiment=fashion_fast (every default)",
            "epoch 2 of 2, logging and display included; layout and chunk as its probe chose; end-of-run figures "
            "off (drawn after training, they would only load the next contender)",
            fit,
        ),
        Contender(
            f"bare loop, in-memory tensors, batch {FAST_BATCH}, {label}, contiguous",
            "one epoch after warm-up",
            bare([]),
        ),
        Contender(
            f"bare loop, in-memory tensors, batch {FAST_BATCH}, {label}, channels_last",
            "one epoch after warm-up",
            bare(["--channels-last"]),
        ),
        Contender(
            "tutorial loop: torchvision + ToTensor + DataLoader, batch 32, fp32", "one epoch after warm-up", tutorial
        ),
        Contender("Keras seed recipe (tensorflow-cpu), batch 32", "epoch 2 of 2", keras, skipped=why),
    ]
    return contenders, probe


def section_peers(work: Path, quick: bool, rounds: int) -> tuple[list[Contender], dict]:
    """Every contender once per round, in turn, so a slow spell of a shared machine hits them all alike."""
    contenders, probe = peer_contenders(work, quick)
    for r in range(rounds):
        for c in contenders:
            if not c.skipped:
                c.figures.append(c.measure())
                print(f"peers: round {r + 1}/{rounds}: {c.name}: {c.figures[-1]:,.0f} images/s", flush=True)
    return contenders, probe


def peers_lines(contenders: list[Contender], probe: dict, rounds: int) -> list[str]:
    ours = contenders[0].median
    heads = " | ".join(f"round {r + 1}" for r in range(rounds))
    lines = [
        "## Training throughput, seed CNN, Fashion-MNIST (images/s)\n",
        f"Each contender ran once per round, in turn, in a fresh process; {rounds} rounds; the ratio is of medians.\n",
        f"| contender | {heads} | median | cnntrain is | how measured |",
        "|---|" + "---:|" * (rounds + 2) + "---|",
    ]
    for c in contenders:
        if c.skipped:
            lines.append(f"| {c.name} | {' | '.join('' for _ in range(rounds))} | | | {c.skipped} |")
            continue
        ratio = "" if c is contenders[0] else f"{ours / c.median:.2f}x"
        cells = " | ".join(f"{v:,.0f}" for v in c.figures)
        lines.append(f"| {c.name} | {cells} | {c.median:,.0f} | {ratio} | {c.how} |")
    bare = [c for c in contenders[1:3] if c.figures]
    if bare:
        fastest = max(bare, key=lambda c: c.median)
        lines.append(
            f"\ncnntrain / the faster bare loop ({fastest.name.rsplit(', ', 1)[1]}): "
            f"**{ours / fastest.median:.2f}x** (target >= 1.15x)."
        )
    for i, t in enumerate(probe["runs"], 1):
        chunk = f"chunks of {t.get('micro_batch')}" if t.get("micro_batch") else "whole batch"
        layout = "channels_last" if t.get("channels_last") else "contiguous"
        lines.append(f"{'' if i > 1 else chr(10)}- cnntrain run {i}: {layout}, {chunk} ({t.get('how', '?')})")
    lines.append("")
    return lines


def section_scaling(work: Path, quick: bool) -> tuple[list, list, float]:
    sub = "2000" if quick else "16384"
    batches = [32, 256] if quick else [32, 64, 128, 256, 512, 1024]
    by_batch = []
    for bs in batches:
        _, m, _, _ = cnntrain_fit(
            [
                "experiment=fashion_fast",
                "trainer.epochs=2",
                f"dataset.subset={sub}",
                f"trainer.batch_size={bs}",
                "scheduler=none",
            ],
            work,
        )
        by_batch.append((bs, steady_ips(m)))
    by_model = []
    for model, n in (
        ("simple_cnn", sub),
        ("resnet8", "1000" if quick else "8192"),
        ("resnet20", "500" if quick else "4096"),
    ):
        s, m, _, _ = cnntrain_fit(
            ["experiment=fashion_fast", f"model={model}", "trainer.epochs=2", f"dataset.subset={n}", "scheduler=none"],
            work,
        )
        by_model.append((model, s["parameters"], steady_ips(m)))
    _, _, _, rss = cnntrain_fit(
        ["experiment=fashion_fast", "trainer.epochs=1"] + (["dataset.subset=2000"] if quick else []), work
    )
    return by_batch, by_model, rss


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# What a fit imports beyond torch, each measured on top of `import torch` in a fresh process.
IMPORT_COST = """
import importlib, json, sys, time
def rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024
import torch
r0, out = rss(), {}
for name in sys.argv[1:]:
    t = time.perf_counter(); r = rss()
    importlib.import_module(name)
    out[name] = (time.perf_counter() - t, rss() - r)
print("RESULT " + json.dumps({"torch_rss": r0, "added": out}))
"""
IMPORTS = [
    "torch._dynamo",
    "hydra",
    "omegaconf",
    "torch.utils.tensorboard",
    "matplotlib.backends.backend_agg",
    "torchvision",
]


# Whole commands of the start-up table: (key, label, arguments after the interpreter, target). The fits print
# plain lines; the figures variants show what trainer.figures costs the command.
SMOKE = ["-m", "cnntrain", "fit", "experiment=smoke", "trainer.progress=plain"]
STARTUP = [
    ("torch", '`python -c "import torch"`', ["-c", "import torch"], ""),
    # cnntrain leaves through os._exit (cli.run): this row is `import torch` without the interpreter's teardown,
    # which alone raises the peak RSS by about 130 MB (gc) and costs about a third of the seconds.
    ("torch_exit", '`python -c "import torch, os; os._exit(0)"`', ["-c", "import torch, os; os._exit(0)"], ""),
    ("dynamo", '`python -c "import torch, torch._dynamo"`', ["-c", "import torch, torch._dynamo"], ""),
    ("smoke", "`cnntrain fit experiment=smoke`", SMOKE, "<= 2.0x, <= 150 MB beyond torch"),
    ("smoke_end", "... `trainer.figures=end` (drawn before it returns)", [*SMOKE, "trainer.figures=end"], ""),
    ("smoke_off", "... `trainer.figures=off` (none drawn)", [*SMOKE, "trainer.figures=off"], ""),
    ("predict", "`cnntrain predict` one image", None, ""),
    ("help", "`cnntrain --help`", ["-m", "cnntrain", "--help"], "<= 0.5 s"),
    ("fit_help", "`cnntrain fit --help`", ["-m", "cnntrain", "fit", "--help"], "<= 0.5 s"),
    ("cfg", "`cnntrain fit --cfg job`", ["-m", "cnntrain", "fit", "--cfg", "job"], "<= 0.5 s"),
    ("list", "`cnntrain list`", ["-m", "cnntrain", "list"], "<= 0.5 s"),
    ("init", "`cnntrain init DIR`", None, "<= 0.5 s"),
]


def _figures_done(work: Path, timeout: float = 300) -> float:
    """Wait until no figure drawer started under work is still at work (the background drawer of
    trainer.figures=background would otherwise load the machine during the next command); seconds waited."""
    t = time.perf_counter()
    # Only runs whose drawer was started (it logs to figures/draw.log): a run with trainer.figures=off, as every
    # cnntrain_fit is by default, leaves its figures pending for `cnntrain report RUN figures=true` and nobody
    # draws them.
    while (
        any((p.parent / "draw.log").exists() for p in work.rglob("figures/.pending.npz"))
        and time.perf_counter() - t < timeout
    ):
        time.sleep(0.05)
    return time.perf_counter() - t


def section_startup(work: Path, quick: bool) -> dict:
    """Whole commands against `python -c "import torch"`, interleaved: each round runs every command once, so a
    change in the machine's load touches all of them; ratios are taken within a round. Seconds and ratios are
    medians of the rounds, RSS the highest peak."""
    import statistics

    from PIL import Image

    rounds = 1 if quick else 5
    image = work / "one.png"
    Image.new("L", (28, 28), 128).save(image)
    walls: dict[str, list[float]] = {k: [] for k, *_ in STARTUP}
    ratios: dict[str, list[float]] = {k: [] for k, *_ in STARTUP}
    rss: dict[str, float] = {}
    drawn: list[float] = []
    for r in range(rounds):
        timed: dict[str, float] = {}
        for key, _, argv, _ in STARTUP:
            if key == "predict":
                ckpt = next(iter(work.rglob("best.pt")))
                argv = [
                    "-m",
                    "cnntrain",
                    "predict",
                    f"ckpt={ckpt}",
                    f"inputs={image}",
                    f"out={work / 'predict'}",
                    "overwrite=true",
                ]  # each round replaces the last round's prediction
            elif key == "init":
                argv = ["-m", "cnntrain", "init", str(work / f"init{r}")]
            _, wall, peak = run([PY, *argv], cwd=work)
            if key == "smoke":
                drawn.append(_figures_done(work))
            timed[key] = wall
            walls[key].append(wall)
            rss[key] = max(rss.get(key, 0.0), peak)
        for key, wall in timed.items():
            ratios[key].append(wall / timed["torch"])
    r, _, _ = run([PY, "-c", IMPORT_COST, *IMPORTS])
    return {
        "rounds": rounds,
        "imports": r,
        "figures_after_s": statistics.median(drawn),
        "rows": {k: (statistics.median(walls[k]), statistics.median(ratios[k]), rss[k]) for k in walls},
    }


def startup_lines(r: dict) -> list[str]:
    rows = r["rows"]
    torch_s, _, torch_mb = rows["torch"]
    lines = [
        "## Start-up and memory\n",
        f'Whole commands (fresh processes, the wall time of the whole command) against `python -c "import '
        f'torch"` ({torch_s:.2f} s, {torch_mb:,.0f} MB peak RSS), interleaved over {r["rounds"]} rounds: '
        "seconds and ratios are medians (each ratio taken within its round), RSS the highest peak.\n",
        "| command | seconds | x import torch | peak RSS MB | beyond torch MB | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key, name, _, target in STARTUP:
        sec, ratio, mb = rows[key]
        lines.append(f"| {name} | {sec:.2f} | {ratio:.2f}x | {mb:,.0f} | {mb - torch_mb:+,.0f} | {target} |")
    lines += [
        "",
        "`x import torch` and `beyond torch` are against the first row, as the targets are. The second row "
        "is the same import without the interpreter's teardown, which cnntrain skips (it leaves through "
        f"os._exit): against it the smoke fit holds {rows['smoke'][2] - rows['torch_exit'][2]:+,.0f} MB.",
    ]
    lines += [
        "",
        f"With trainer.figures=background (the default) the figures were on disk "
        f"{r['figures_after_s']:.1f} s after the command returned (median; a child process draws them, "
        "and the next command of this table waited for it).",
    ]
    imp = r["imports"]
    lines += [
        "",
        f"Where the memory goes: `import torch` alone holds {imp['torch_rss']:,.0f} MB. What each import "
        "adds on top of it (in this order, one process):\n",
        "| import | seconds | MB | who needs it |",
        "|---|---:|---:|---|",
    ]
    who = {
        "torch._dynamo": "torch.optim's methods import it on first use; cnntrain's optimizers skip those "
        "wrappers (cnntrain.optim.eager), so a fit never imports it",
        "hydra": "fit: configs",
        "omegaconf": "every command: configs and arguments",
        "torch.utils.tensorboard": "fit: event files",
        "matplotlib.backends.backend_agg": "figures: a fit's child process, evaluate",
        "torchvision": "only its datasets and models (not imported by the commands above)",
    }
    for name, (sec, mb) in imp["added"].items():
        lines.append(f"| {name} | {sec:.2f} | {mb:,.0f} | {who.get(name, '')} |")
    lines.append("")
    return lines


def gemm_rates(threads: int | None = None) -> dict:
    r, _, _ = run([PY, str(PEERS / "gemm.py"), *(["--threads", str(threads)] if threads else [])])
    return r


def flops(model: str) -> float:
    r, _, _ = run([PY, str(HERE / "flops.py"), "--model", model])
    return r["flops_per_image"]


def section_limit(work: Path, quick: bool, peers_ips: float | None = None) -> dict:
    """images/s of fashion_fast as a share of what the machine's GEMM rate allows for the model's FLOPs; for the
    seed CNN, the peers section's median when it ran (the figure the issue's targets are about)."""
    precision = "bf16" if fast_settings()[0] == "bf16" else "fp32"  # what precision=auto picks on this CPU
    rates = gemm_rates()
    rows = []
    for model, n in (("simple_cnn", "2000" if quick else None), ("resnet8", "1000" if quick else "8192")):
        if model == "simple_cnn" and peers_ips is not None:
            rows.append((model, flops(model), peers_ips, "peers' median"))
            continue
        s, m, _, _ = cnntrain_fit(
            ["experiment=fashion_fast", f"model={model}", "trainer.epochs=2", *([f"dataset.subset={n}"] if n else [])],
            work,
        )
        f = flops(model)
        ips = steady_ips(m)
        rows.append((model, f, ips, s["threads"]))
    return {"rates": rates, "precision": precision, "rows": rows}


def limit_lines(r: dict) -> list[str]:
    rates, precision = r["rates"], r["precision"]
    limit = rates[precision]
    lines = [
        "## The compute limit\n",
        f"Matrix multiply (torch.mm, {rates['threads']} threads): **{rates['fp32']:,.0f} GFLOP/s fp32** "
        f"({rates['size']}x{rates['size']}), **{rates['bf16']:,.1f} GFLOP/s bf16** "
        f"({rates['bf16_size']}x{rates['bf16_size']}{'' if rates['bf16_size'] == rates['size'] else ': no native bf16, emulated'}). "
        f"{'`--precision 32` trains' if FORCED_PRECISION else '`precision=auto` trains'} in {precision} here, "
        f"so the limit is {limit:,.0f} GFLOP/s. FLOPs per trained "
        "image: forward + backward of a batch, counted by torch.utils.flop_counter (convolutions and matrix "
        "multiplies; the rest is not counted).\n",
        "| model, experiment=fashion_fast | MFLOP per image | limit images/s | cnntrain images/s | % of limit |",
        "|---|---:|---:|---:|---:|",
    ]
    for model, f, ips, threads in r["rows"]:
        cap = limit * 1e9 / f
        source = " (median of the peers rounds)" if threads == "peers' median" else ""
        lines.append(f"| {model}{source} | {f / 1e6:.1f} | {cap:,.0f} | {ips:,.0f} | {100 * ips / cap:.0f}% |")
    lines.append("\nTarget for simple_cnn: >= 45% of the limit (50% the aim).")
    lines.append("")
    return lines


SPIN = "while True: pass"


def section_contention(work: Path, quick: bool) -> list[tuple[str, dict[str, tuple[float, int]]]]:
    """experiment=smoke's training seconds beside other load: the default threads against 1 and all cores."""
    n = cores()
    settings = {"default": [], "1 thread": ["trainer.num_threads=1"], f"{n} threads": [f"trainer.num_threads={n}"]}
    scenarios = [
        ("no load", 0, False),
        ("1 busy process", 1, False),
        ("2 busy processes", 2, False),
        ("another cnntrain fit beside it", 0, True),
    ]
    if quick:
        scenarios = scenarios[:2]
    repeats = 1 if quick else 2
    out = []
    for name, spinners, beside in scenarios:
        load = [subprocess.Popen([PY, "-c", SPIN]) for _ in range(spinners)]
        if beside:  # a long training run with its own default threads, started first (outside work/)
            elsewhere = tempfile.mkdtemp(prefix="cnntrain-beside-")
            load.append(
                subprocess.Popen(
                    [
                        PY,
                        "-m",
                        "cnntrain",
                        "fit",
                        "experiment=smoke",
                        "dataset.subset=null",
                        "trainer.epochs=1000",
                        "trainer.progress=none",
                        f"hydra.run.dir={elsewhere}/run",
                    ],
                    cwd=elsewhere,
                    env=ENV,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            time.sleep(8)  # past its start-up: training
        else:
            time.sleep(1)
        try:
            cells = {}
            for setting, args in settings.items():
                times = []
                for _ in range(repeats):
                    s, m, _, _ = cnntrain_fit(["experiment=smoke", *args], work)
                    times.append((train_seconds(m), s["threads"]))
                cells[setting] = min(times)
        finally:
            for proc in load:
                proc.kill()
                proc.wait()
            if beside:
                shutil.rmtree(elsewhere, ignore_errors=True)
        out.append((name, cells))
        print(
            f"contention: {name}: " + ", ".join(f"{k} {v[0]:.2f}s ({v[1]} threads)" for k, v in cells.items()),
            flush=True,
        )
    return out


def contention_lines(rows: list) -> list[str]:
    n = cores()
    lines = [
        "## Busy machines: thread count\n",
        f"`cnntrain fit experiment=smoke`, training seconds (validation left out; best of repeats) on {n} cores "
        "beside other load. Busy process: `python -c 'while True: pass'`. Another cnntrain: a long "
        "`experiment=smoke` fit with its own default threads. Target: default within 1.2x of the best.\n",
        f"| other load | default (threads it chose) | 1 thread | {n} threads | default / best |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, cells in rows:
        default, one, every = cells["default"], cells["1 thread"], cells[f"{n} threads"]
        best = min(default[0], one[0], every[0])
        lines.append(
            f"| {name} | {default[0]:.2f} s ({default[1]}) | {one[0]:.2f} s | {every[0]:.2f} s | "
            f"{default[0] / best:.2f}x |"
        )
    lines.append("")
    return lines


def section_accuracy(work: Path, quick: bool) -> list[tuple[str, str, float, float, float]]:
    rows = []
    extra = ["dataset.subset=2000", "trainer.epochs=1"] if quick else []
    for recipe, args in (
        ("default (embedded MNIST 5k, seed recipe)", []),
        ("experiment=fashion_fast", ["experiment=fashion_fast"]),
    ):
        for precision in ("bf16", "32"):
            if precision == "bf16" and FORCED_PRECISION:
                continue
            if precision == "bf16" and args and fast_settings()[0] != "bf16":
                continue  # emulated bf16 takes a quarter of an hour here, for a precision auto never picks
            s, m, _, _ = cnntrain_fit([*args, f"trainer.precision={precision}", *extra], work)
            train_s = train_seconds(m)
            rows.append((recipe, precision, s["test_acc"], train_s, s["best_val_acc"]))
    return rows


# The tutorial loop trains on all of Fashion-MNIST's training images, for 5 epochs in the tutorial.
TUTORIAL_IMAGES, TUTORIAL_EPOCHS = 60000, 5


def tutorial_comparison(acc: list, tutorial_ips: float | None) -> list[str]:
    """fashion_fast's training time to its test accuracy against the tutorial's 5 epochs at its median speed."""
    native = fast_settings()[0]
    rows = [r for r in acc if r[0] == "experiment=fashion_fast" and r[1] == native]
    if not rows or not tutorial_ips:
        return []
    _, _, test_acc, seconds, _ = rows[0]
    tutorial_s = TUTORIAL_EPOCHS * TUTORIAL_IMAGES / tutorial_ips
    return [
        "",
        f"Time to accuracy: `fashion_fast` ({native}) reached test accuracy {test_acc:.4f} after {seconds:.1f} s "
        f"of training; the tutorial loop's {TUTORIAL_EPOCHS} epochs take {tutorial_s:.0f} s at its median "
        f"{tutorial_ips:,.0f} images/s (peers section), so cnntrain needs **{seconds / tutorial_s:.2f}** of "
        "that time (target <= 0.5, at >= 0.91).",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=SECTIONS, action="append")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the suite runs")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument(
        "--rounds", type=int, help="peers: interleaved rounds of every contender (default 2; 1 with --quick)"
    )
    ap.add_argument(
        "--precision",
        choices=["32"],
        help="train every contender in fp32, even where auto would "
        "pick bf16: the figures of CPUs without native bf16, measured on one that has it",
    )
    ap.add_argument(
        "--repo",
        type=Path,
        help="time the cnntrain of another checkout (e.g. the commit before a "
        "refactor) against the same peers; compare the ratios of two runs, not their images/s",
    )
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 2)
    if args.precision:
        FORCED_PRECISION.append(args.precision)
    if args.quick:
        QUICK_DATA.append("dataset=mnist5k")
    if args.repo:
        if not (args.repo / "cnntrain" / "__init__.py").is_file():
            ap.error(f"--repo {args.repo}: no cnntrain package there")
        ENV["PYTHONPATH"] = os.pathsep.join([str(args.repo.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])
    sections = args.only or SECTIONS
    work = Path(tempfile.mkdtemp(prefix="cnntrain-bench-"))
    # cnntrain's layout/chunk probe caches its verdicts: start from none, as a first run on this machine does,
    # and leave the user's cache alone.
    ENV["XDG_CACHE_HOME"] = str(work / "xdg-cache")
    peers_median: float | None = None
    tutorial_median: float | None = None
    lines = [
        f"# Benchmark results\n\nMachine: {machine()}  \nDate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f"  \nCommand: `python benchmarks/run.py{' --quick' if args.quick else ''}"
        f"{''.join(' --only ' + s for s in args.only or [])}{f' --repo {args.repo}' if args.repo else ''}"
        f"{f' --precision {args.precision} --rounds {args.rounds}' if args.precision else ''}`\n"
    ]

    def show(new: list[str]) -> None:
        lines.extend(new)
        print("\n".join(new), flush=True)

    try:
        if "peers" in sections:
            contenders, probe = section_peers(work, args.quick, args.rounds)
            peers_median = contenders[0].median
            tutorial_median = contenders[3].median if contenders[3].figures else None
            show(peers_lines(contenders, probe, args.rounds))
        if "scaling" in sections:
            by_batch, by_model, rss = section_scaling(work, args.quick)
            table = [
                "## Scaling (cnntrain fit, fashion_fast settings, images/s of epoch 2)\n",
                "| batch size | images/s |",
                "|---:|---:|",
            ]
            table += [f"| {bs} | {ips:,.0f} |" for bs, ips in by_batch]
            table += ["", "| model (batch 256) | parameters | images/s |", "|---|---:|---:|"]
            table += [f"| {m} | {p:,} | {ips:,.0f} |" for m, p, ips in by_model]
            table += [
                "",
                f"Peak memory (RSS) of `cnntrain fit experiment=fashion_fast` (one epoch, full "
                f"Fashion-MNIST): **{rss:,.0f} MB**\n",
            ]
            show(table)
        if "limit" in sections:
            show(limit_lines(section_limit(work, args.quick, peers_median)))
        if "contention" in sections:
            show(contention_lines(section_contention(work, args.quick)))
        if "startup" in sections:
            show(startup_lines(section_startup(work, args.quick)))
        if "accuracy" in sections:
            acc = section_accuracy(work, args.quick)
            table = [
                "## Accuracy: bf16 autocast against fp32\n",
                "| recipe | precision | test acc | best val acc | training s |",
                "|---|---|---:|---:|---:|",
            ]
            table += [f"| {r} | {p} | {a:.4f} | {v:.4f} | {s:.1f} |" for r, p, a, s, v in acc]
            if FORCED_PRECISION:
                table += ["", "`--precision 32`: every run in fp32, as on a CPU without native bf16."]
            elif not native_bf16():
                table += [
                    "",
                    "This CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 is emulated and several "
                    "times slower, and `precision=auto` trains fp32. The default recipe still shows "
                    "both; fashion_fast runs fp32 only.",
                ]
            table += tutorial_comparison(acc, tutorial_median)
            show([*table, ""])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.quick:
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
