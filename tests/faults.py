"""Run the real `cnntrain` CLI with faults injected from outside the production code.

    python tests/faults.py FAULT [FAULT ...] -- fit OVERRIDES...

The faults wrap functions the CLI calls anyway (no test hooks in cnntrain), then the CLI runs as
`python -m cnntrain` would. Counts are per process and 1-based. A training step is counted when
the loop calls GradScaler.update (once per optimizer step; skipped steps do not count).

    kill-at-step=N           SIGKILL right after the N-th training step
    kill-after-save=N        SIGKILL right after the N-th write of last.pt completed
    kill-before-rename=N     SIGKILL once the N-th last.pt is written to its temp file, before the rename
    signal-at-step=SIG:N     send SIG (INT, TERM) to this process during the N-th training step
    signal-at-eval=SIG:N     send SIG at the N-th evaluation batch (validation or test)
    signal-at-test=SIG       send SIG when the test of the best checkpoint begins
    nan-at-step=N[,M...]     make the training loss of those loss computations NaN
    slow-steps=SECONDS       every training step takes this much longer (a window for signals)
    report-steps             print "fault: step N" to stderr after each training step
"""

from __future__ import annotations

import csv
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMING = {"images_per_s", "epoch_s", "data_s", "compute_s", "eval_s"}  # metrics.csv columns that vary by run


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_faulty(
    faults: list[str], args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`cnntrain ARGS` under these faults, to the end; a SIGKILLed run returns -9. env: more variables."""
    return subprocess.run(
        [sys.executable, __file__, *faults, "--", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_env(), **(env or {})},
    )


def start_faulty(faults: list[str], args: list[str], cwd: Path, new_session: bool = False) -> subprocess.Popen:
    """The same, started in the background (to send it signals); new_session: in its own process group,
    so that os.killpg reaches it and its workers together, as Ctrl-C in a terminal does."""
    return subprocess.Popen(
        [sys.executable, __file__, *faults, "--", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=new_session,
    )


def csv_rows(run_dir: Path, drop: set[str] = TIMING) -> list[dict[str, str]]:
    """metrics.csv without the timing columns."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def flip_a_byte(checkpoint: Path) -> None:
    """Change one byte inside the largest tensor record of a checkpoint, as a disk or a copy could: the file
    still opens as a zip, but the record's CRC no longer matches."""
    import zipfile

    with zipfile.ZipFile(checkpoint) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 10
    raw = bytearray(checkpoint.read_bytes())
    raw[offset] ^= 0x40
    checkpoint.write_bytes(bytes(raw))


def _kill() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _signal(name: str) -> None:
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


def install(faults: list[str]) -> None:
    import torch
    import torch.nn.functional as F

    spec = dict(f.split("=", 1) if "=" in f else (f, "") for f in faults)
    counts = {"step": 0, "save": 0, "rename": 0, "eval": 0, "loss": 0}

    update = torch.amp.GradScaler.update

    def counted_update(self, *args, **kwargs):
        if "signal-at-step" in spec:
            sig, n = spec["signal-at-step"].split(":")
            if counts["step"] + 1 == int(n):
                _signal(sig)
        if "slow-steps" in spec:
            time.sleep(float(spec["slow-steps"]))
        out = update(self, *args, **kwargs)
        counts["step"] += 1
        if "report-steps" in spec:
            print(f"fault: step {counts['step']}", file=sys.stderr, flush=True)
        if counts["step"] == int(spec.get("kill-at-step", 0)):
            _kill()
        return out

    torch.amp.GradScaler.update = counted_update
    # The faults above need only torch, so scripts/golden.py can kill a checkout of any layout with them.
    if spec.keys() & {"kill-after-save", "kill-before-rename", "signal-at-test"}:
        _watch_checkpoints(spec, counts)

    cross_entropy = F.cross_entropy
    nan_at = {int(n) for n in spec.get("nan-at-step", "").split(",") if n}

    def faulty_cross_entropy(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        if kwargs.get("reduction") == "sum":  # evaluation batches (the training loss is a mean)
            counts["eval"] += 1
            if "signal-at-eval" in spec:
                sig, n = spec["signal-at-eval"].split(":")
                if counts["eval"] == int(n):
                    _signal(sig)
        elif torch.is_grad_enabled():
            counts["loss"] += 1
            if counts["loss"] in nan_at:
                loss = loss * float("nan")
        return loss

    F.cross_entropy = faulty_cross_entropy


def _watch_checkpoints(spec: dict[str, str], counts: dict[str, int]) -> None:
    from cnntrain.engine import checkpoint
    from cnntrain.io.files import BEST, LAST

    save = checkpoint.save_checkpoint

    def counted_save(path, state, **kwargs):
        save(path, state, **kwargs)
        if os.path.basename(path) == LAST:
            counts["save"] += 1
            if counts["save"] == int(spec.get("kill-after-save", 0)):
                _kill()

    checkpoint.save_checkpoint = counted_save

    replace = os.replace

    def counted_replace(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == LAST and str(src).endswith(".tmp"):
            counts["rename"] += 1
            if counts["rename"] == int(spec.get("kill-before-rename", 0)):
                _kill()
        return replace(src, dst, *args, **kwargs)

    os.replace = counted_replace

    load = checkpoint.load_checkpoint

    def watched_load(path):
        if os.path.basename(str(path)) == BEST and "signal-at-test" in spec:
            _signal(spec["signal-at-test"])
        return load(path)

    checkpoint.load_checkpoint = watched_load


if __name__ == "__main__":
    split = sys.argv.index("--")
    install(sys.argv[1:split])
    sys.argv = ["cnntrain", *sys.argv[split + 1 :]]
    runpy.run_module("cnntrain", run_name="__main__", alter_sys=True)
