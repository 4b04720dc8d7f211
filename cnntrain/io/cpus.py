"""The CPU cores this process may use, and how busy other processes keep them. No torch here.

The default torch thread count comes from these (cnntrain.engine.device.configure_torch). One thread per core
is fastest on a quiet machine, but when other processes want the same cores the threads wait on each other at
every parallel region and a run can get many times slower than with one thread. So the count is the cores this
process may use (affinity mask, cgroup CPU quota) less those that other processes kept busy while cnntrain was
starting: `mark_start()` reads the CPU counters when the command starts, and `others_busy()` compares them with
the counters a few seconds later, after the imports, minus this process's own CPU time. No sampling delay.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

# A sample shorter than this says little; without a start mark the sampler waits this long.
MIN_SAMPLE_S = 0.25


def affinity() -> set[int] | None:
    """The CPUs this process may run on (taskset, SLURM, container cpusets), or None where unknown."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return None


def cgroup_quota(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (docker --cpus, Kubernetes limits), or None if unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    candidates: list[tuple[Path, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.lstrip("/")
        if controllers == "":  # cgroup v2
            candidates += [(root / path / "cpu.max", "v2"), (root / "cpu.max", "v2")]
        elif "cpu" in controllers.split(","):  # cgroup v1
            for name in (controllers, "cpu", "cpu,cpuacct"):
                candidates += [(root / name / path, "v1"), (root / name, "v1")]
    for where, version in candidates:
        try:
            if version == "v2":
                quota, period = where.read_text().split()[:2]
                if quota != "max":
                    return int(quota) / int(period)
                return None
            quota_us = int((where / "cpu.cfs_quota_us").read_text())
            period_us = int((where / "cpu.cfs_period_us").read_text())
            return quota_us / period_us if quota_us > 0 else None
        except (OSError, ValueError):
            continue
    return None


def usable_cores() -> int:
    """Cores this process may keep busy: the affinity mask, capped by a cgroup CPU quota (rounded up)."""
    cpus = affinity()
    n = len(cpus) if cpus else (os.cpu_count() or 1)
    quota = cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 0.01)))
    return max(1, n)


@dataclass(frozen=True)
class CpuSample:
    wall: float  # time.monotonic()
    busy: float  # CPU-seconds spent by everything on the sampled CPUs
    own: float  # CPU-seconds spent by this process (all its threads)


def sample(cpus: set[int] | None = None, stat: str = "/proc/stat") -> CpuSample | None:
    """Busy CPU-seconds of the machine (only `cpus` when given) and of this process; None without /proc/stat."""
    cpus = affinity() if cpus is None else cpus
    try:
        with open(stat) as f:
            lines = [ln for ln in f if ln.startswith("cpu")]
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    # Niced processes (a finished fit's figure drawer, a user's `nice` jobs) yield the cores to us, so their time
    # is not load that competes: left out, unless this process is niced itself and so counts in that column.
    skip_nice = _priority() <= 0
    busy = 0
    for ln in lines:
        name, *fields = ln.split()
        if name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        busy += sum(values) - values[3] - values[4]  # all but idle and iowait (steal: the host took it)
        if skip_nice:
            busy -= values[1]
    t = os.times()
    return CpuSample(time.monotonic(), busy / tick, t.user + t.system)


def _priority() -> int:
    """This process's nice value (0 where it cannot be read)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, AttributeError):
        return 0


_START: CpuSample | None = None


def mark_start() -> None:
    """Read the counters now (the CLI does, first thing); others_busy() measures from here."""
    global _START
    _START = sample()


def others_busy(since: CpuSample | None = None) -> float | None:
    """Cores other processes kept busy since `since` (default: mark_start()), on this process's CPUs.

    Without a usable start mark (too recent, or none: fit called from Python) it samples for MIN_SAMPLE_S.
    None where the counters cannot be read (not Linux).
    """
    start = since or _START
    if start is None or time.monotonic() - start.wall < MIN_SAMPLE_S:
        start = sample()
        if start is None:
            return None
        time.sleep(MIN_SAMPLE_S)
    now = sample()
    if now is None:
        return None
    others = (now.busy - start.busy) - (now.own - start.own)
    return max(0.0, others / max(1e-6, now.wall - start.wall))


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # why, in a few words, for the start table


def choose_threads(torch_default: int, deterministic: bool = False) -> ThreadChoice:
    """The default torch thread count: the usable cores less those other processes keep busy.

    torch_default (torch's own count, one per physical core) caps it, so a quiet machine runs exactly as before.
    With trainer.deterministic=true the load is not looked at: the count, and so the bits, must not depend on
    what else happens to run.
    """
    cores = usable_cores()
    cap = max(1, min(cores, torch_default))
    quota = cgroup_quota()
    limit = f"{cores} usable cores" + (
        f" (CPU quota {quota:g})" if quota is not None and quota < len(affinity() or []) else ""
    )
    # Each reason starts with the count it explains, so the line never reads as two different numbers.
    base = f"all {limit}" if cap == cores else f"{cap} of {limit}, one per physical core (torch's default)"
    if deterministic or cap == 1:
        return ThreadChoice(cap, base + (", deterministic: load not considered" if deterministic and cap > 1 else ""))
    busy = others_busy()
    if busy is None:
        return ThreadChoice(cap, base)
    cpus = len(affinity() or []) or cores
    free = max(0.0, cpus - busy) * cores / cpus  # the free share of the CPUs we may use
    threads = max(1, min(cap, int(free + 0.5)))
    if threads == cap:
        return ThreadChoice(cap, base)
    return ThreadChoice(
        threads,
        f"{threads} of {limit}: other processes keep {busy:.1f} of {cpus} cores busy; "
        "trainer.num_threads=N to override",
    )


class CollapseWatch:
    """Notices when training throughput collapses while other processes take the cores, and says so once.

    Fed the images of each training step; every `window_s` of training it compares the window's images/s with
    the best window so far. Two windows in a row below `drop` of the best, with other processes busy, make one
    line naming the setting that fixes it. Only for CPU runs with more than one thread.
    """

    def __init__(self, threads: int, say, window_s: float = 3.0, drop: float = 0.5, clock=time.monotonic):
        self.threads, self.say, self.window_s, self.drop, self.clock = threads, say, window_s, drop, clock
        self.best = 0.0
        self.slow_windows = 0
        self.done = threads <= 1
        self._t0 = self._images = 0
        self._cpu: CpuSample | None = None

    def resume(self) -> None:
        """Start a new window (at each epoch's steps: validation time is not training time)."""
        self._t0, self._images, self._cpu = self.clock(), 0, None if self.done else sample()

    def step(self, images: int) -> None:
        if self.done:
            return
        self._images += images
        now = self.clock()
        if now - self._t0 < self.window_s:
            return
        ips = self._images / (now - self._t0)
        busy = others_busy(self._cpu) if self._cpu is not None else None
        if ips < self.drop * self.best and busy is not None and busy >= 0.5:
            self.slow_windows += 1
        else:
            self.slow_windows = 0
        self.best = max(self.best, ips)
        if self.slow_windows >= 2:
            self.done = True
            self.say(
                f"throughput fell from {self.best:,.0f} to {ips:,.0f} images/s while other processes keep "
                f"{busy:.1f} cores busy: {self.threads} torch threads wait on each other; "
                "trainer.num_threads=1 avoids it"
            )
        self.resume()
