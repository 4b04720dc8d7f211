"""The memory layout (trainer.channels_last=auto) and compute chunk (trainer.micro_batch=auto), chosen by timing.

Which layout and chunk are fastest depends on the CPU or GPU, the model, the input size, the batch and the
precision, and no rule gets all of them right: channels_last is oneDNN's native layout under bf16 but also
won on an fp32-only AVX2 CPU, and a batch whose activations overflow the cache trains faster in chunks.
So `auto` times a few real optimisation steps of a copy of the model on random inputs at start, in each
candidate, and keeps the fastest. The verdict is cached per machine, model, input shape, batch and precision
(``$XDG_CACHE_HOME/cnntrain/tuning.json``), so only the first run of a configuration pays for it, and it is
recorded in the checkpoint, so a resumed run trains exactly as it started. Deterministic runs never time
anything: their layout and chunk follow fixed rules, so two of them cannot differ by what a probe measured.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnntrain.config import ModelConfig, TrainerConfig, plain
from cnntrain.engine.device import Precision, describe, resolve_channels_last
from cnntrain.engine.step import TrainStep
from cnntrain.io.files import user_cache_dir

# Everything the probe's steps may take on a first run, warm-up steps included: with the copies of the model,
# a first run starts at most about 2 s later.
BUDGET_S = 1.8
# ...and never more than this share of the run it tunes (estimated from one warm step): a short run keeps the
# defaults, since the probe could not pay for itself there.
BUDGET_SHARE = 0.05
# A candidate replaces the default (the rule's layout, the whole batch) only when this much faster: the
# probe's timings are short, and a choice that flips with noise would make runs differ for nothing.
MARGIN = 0.03
# The probe takes about 6 steps for the layout and 7 more for the chunk; below this many optimisation steps
# they would be more than BUDGET_SHARE of the run before anything is timed, so a shorter run does not try.
MIN_STEPS = 200
SMALLEST_CHUNK = 16
CACHE_FILE = "tuning.json"


@dataclass(frozen=True)
class Tuning:
    channels_last: bool
    micro_batch: int | None  # None: the whole batch in one pass
    how: str  # where the choice came from, for the start table

    def record(self) -> dict[str, Any]:
        """What the checkpoint and summary.json hold; a resumed run passes it back to `decide` as `recorded`."""
        return {"channels_last": self.channels_last, "micro_batch": self.micro_batch, "how": self.how}


def read_cache() -> dict[str, Any]:
    try:
        data = json.loads((user_cache_dir() / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}  # none yet, unreadable or damaged: measure again
    return data if isinstance(data, dict) else {}


def write_cache(entries: dict[str, Any]) -> None:
    """Merge entries into the cache; a cache that cannot be written costs a probe next time, nothing more."""
    folder = user_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data = {**read_cache(), **entries}
        tmp = folder / f".{CACHE_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, folder / CACHE_FILE)  # atomic: a concurrent run reads the old file or the new one
    except OSError:
        pass


def cache_keys(
    model_cfg: ModelConfig,
    batch_size: int,
    device: torch.device,
    precision: Precision,
    shape: tuple[int, ...],
    channels_last: bool,
) -> tuple[str, str]:
    """(layout key, chunk key): the chunk's verdict also depends on the layout it was timed in."""
    model = json.dumps(plain(model_cfg), sort_keys=True, default=str)
    what = "|".join(
        [
            describe(device),
            f"torch {torch.__version__}",
            hashlib.sha256(model.encode()).hexdigest()[:16],
            "x".join(map(str, shape)),
            f"batch {batch_size}",
            f"precision {precision.label}",
        ]
    )
    return f"layout|{what}", f"chunk|{what}|{'channels_last' if channels_last else 'contiguous'}"


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def chunk_candidates(batch: int) -> list[int]:
    """The chunks worth timing against the whole batch: a quarter and an eighth of it (at least
    SMALLEST_CHUNK). A half rarely fits a cache the whole batch overflows, and two candidates keep the
    probe within its budget on a slow CPU."""
    return [c for c in (batch // 4, batch // 8) if c >= SMALLEST_CHUNK]


def decide(
    t: TrainerConfig,
    model_cfg: ModelConfig,
    resuming: bool,
    step: TrainStep,
    device: torch.device,
    shape: tuple[int, ...],
    num_classes: int,
    recorded: dict[str, Any],
    distributed: bool,
    total_steps: int,
) -> Tuning:
    """The layout and chunk this run trains with, and why (see the module's docstring); the model's config is
    part of the cache's keys."""
    cl_spec, mb_spec = str(t.channels_last).lower(), t.micro_batch
    cl_auto, mb_auto = cl_spec == "auto", str(mb_spec).lower() == "auto"
    rule_cl = resolve_channels_last(cl_spec, device, step.precision)
    mb_fixed = None if mb_auto or mb_spec is None or int(mb_spec) >= t.batch_size else int(mb_spec)
    if mb_fixed is not None and has_batch_norm(step.model):
        warnings.warn(
            f"trainer.micro_batch={mb_fixed}: the model's BatchNorm layers normalise each chunk of "
            f"{mb_fixed} by its own statistics (ghost batch norm), not the batch of {t.batch_size} "
            "as a whole",
            stacklevel=2,
        )
    if not (cl_auto or mb_auto):
        return Tuning(rule_cl, mb_fixed, "set")
    if recorded:
        return Tuning(
            recorded["channels_last"] if cl_auto else rule_cl,
            recorded["micro_batch"] if mb_auto else mb_fixed,
            "as recorded in the checkpoint",
        )
    if resuming:  # a checkpoint from before the record: it trained by the rule, so go on by it
        return Tuning(rule_cl, mb_fixed, "rule: the checkpoint has no record of its own")
    if mb_auto and has_batch_norm(step.model):
        mb_auto = False  # per-chunk batch statistics (ghost batch norm) would change what the model learns
    why_not = (
        "deterministic runs do not time"
        if t.deterministic
        else "not timed under torch.compile"
        if t.compile
        else "not timed under torchrun"
        if distributed
        else "not timed in a dry run"
        if t.dry_run
        else ""
    )
    if why_not or not (cl_auto or mb_auto):
        return Tuning(rule_cl, mb_fixed, f"rule: {why_not}" if why_not else "rule: BatchNorm keeps the whole batch")
    cache = read_cache()
    layout_key = cache_keys(model_cfg, t.batch_size, device, step.precision, shape, rule_cl)[0]
    cl_todo = cl_auto and not _holds(cache, layout_key, "channels_last", bool)
    channels_last = cache[layout_key]["channels_last"] if cl_auto and not cl_todo else rule_cl
    chunk_key = cache_keys(model_cfg, t.batch_size, device, step.precision, shape, channels_last)[1]
    mb_todo = mb_auto and not _holds(cache, chunk_key, "micro_batch", (int, type(None)))
    micro = cache[chunk_key]["micro_batch"] if mb_auto and not mb_todo else mb_fixed
    if not (cl_todo or mb_todo):
        return Tuning(channels_last, micro, "cached")
    if total_steps < MIN_STEPS:
        return Tuning(channels_last, micro, "rule: too short a run to time")
    return _probe(
        model_cfg, t.batch_size, step, device, shape, num_classes, cl_todo, channels_last, mb_todo, micro, total_steps
    )


def _holds(cache: dict[str, Any], key: str, name: str, kind: type | tuple[type, ...]) -> bool:
    """Whether the cache has a usable verdict (an entry edited or damaged by hand is measured again)."""
    entry = cache.get(key)
    return isinstance(entry, dict) and name in entry and isinstance(entry[name], kind)


def _probe(
    model_cfg: ModelConfig,
    batch: int,
    step: TrainStep,
    device: torch.device,
    shape: tuple[int, ...],
    num_classes: int,
    cl_todo: bool,
    channels_last: bool,
    mb_todo: bool,
    micro: int | None,
    total_steps: int,
) -> Tuning:
    """Time what is still to decide (cl_todo, mb_todo), starting from the defaults (channels_last, micro)."""
    started = time.perf_counter()
    probe = _Probe(step, device, shape, batch, num_classes)
    layout_cands = [(channels_last, micro), (not channels_last, micro)] if cl_todo else []
    chunks = chunk_candidates(batch) if mb_todo else []
    timed: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's draws stay its own
        # The first step carries one-off set-up (kernels, allocations) that the run's first step is then
        # spared; the second says what a step costs, and is the default's first sample.
        cold = probe.time((channels_last, micro))
        # A model whose first step alone eats half the budget cannot be timed within it: stop here.
        step_s = probe.time((channels_last, micro)) if cold < BUDGET_S / 2 else math.inf
        budget = min(BUDGET_S, BUDGET_SHARE * step_s * total_steps)
        deadline = started + budget
        # Steps each race needs at least (a first step per new candidate, then two rounds), to share the time.
        need_layout, need_chunks = 3 * len(layout_cands) - 1, 3 * len(chunks) + 2
        if layout_cands:
            now = time.perf_counter()
            share = need_layout / (need_layout + need_chunks) if need_chunks > 1 else 1.0
            times = probe.race(layout_cands, now + (deadline - now) * share, step_s)
            if times is not None:
                channels_last = _pick(times, layout_cands[0])[0]
                timed["layout"] = channels_last
        if mb_todo:
            cands = [(channels_last, None), *[(channels_last, c) for c in chunks]]
            times = probe.race(cands, deadline, step_s) if len(cands) > 1 else {cands[0]: step_s}
            if times is not None:
                micro = _pick(times, (channels_last, None))[1]
                timed["chunk"] = micro
    seconds = time.perf_counter() - started
    short = budget < BUDGET_S  # limited by the run's length rather than by the probe's own budget
    entries: dict[str, Any] = {}
    layout_key, chunk_key = cache_keys(model_cfg, batch, device, step.precision, shape, channels_last)
    if cl_todo and ("layout" in timed or not short):
        entries[layout_key] = {"channels_last": channels_last}
    if mb_todo and ("chunk" in timed or not short):
        entries[chunk_key] = {"micro_batch": micro}
    if entries:
        write_cache(entries)
    if timed:
        return Tuning(channels_last, micro, f"measured in {seconds:.1f} s")
    # Nothing fitted the budget. For a short run, a longer one may time it, so nothing is cached; a step too slow
    # for the probe's own budget stays so, and the defaults are cached to spare later runs the attempt.
    return Tuning(
        channels_last,
        micro,
        f"rule: {'too short a run' if short else 'a step too slow'} to time ({seconds:.1f} s spent)",
    )


Candidate = tuple[bool, int | None]  # (channels_last, micro_batch)


def _pick(times: dict[Candidate, float], default: Candidate) -> Candidate:
    best = min(times, key=times.__getitem__)
    return best if times[best] < (1 - MARGIN) * times[default] else default


class _Probe:
    """Optimisation steps of copies of the model (one per layout), with an optimizer like the run's."""

    def __init__(
        self, step: TrainStep, device: torch.device, shape: tuple[int, ...], batch: int, num_classes: int
    ) -> None:
        self.step, self.device = step, device
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn((batch, *shape), generator=gen).to(device)
        self.y = step.task.random_targets(num_classes, batch, gen).to(device)
        self.steps: dict[bool, TrainStep] = {}
        self.seen: set[Candidate] = set()  # candidates past their first step, which carries one-off set-up

    def time(self, cand: Candidate) -> float:
        """Seconds of one optimisation step in this layout and chunk."""
        channels_last, micro = cand
        if channels_last not in self.steps:
            self.steps[channels_last] = _copy_step(self.step, channels_last)
        step = self.steps[channels_last]
        step.micro_batch = micro
        x = self.x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else _nothing
        sync()
        t = time.perf_counter()
        step.train(x, self.y)
        sync()
        seconds = time.perf_counter() - t
        self.seen.add(cand)
        return seconds

    def race(self, cands: list[Candidate], deadline: float, step_s: float) -> dict[Candidate, float] | None:
        """The median step time of each candidate over two to five rounds that end by the deadline; None when
        two rounds would not fit (then nothing is run).

        Every candidate is timed afresh in the same rounds, a warm one too: its steps from an earlier race were
        taken while the process was still settling (its heap growing, the other layout's copy allocating), and
        counting them made the whole batch look slower than chunks that it beats by 13% in training.
        """
        cold = [c for c in cands if c not in self.seen]
        if time.perf_counter() + step_s * (len(cold) + 2 * len(cands)) > deadline:
            return None
        for c in cold:
            self.time(c)
        samples: dict[Candidate, list[float]] = {c: [] for c in cands}
        for rounds in range(5):
            estimate = sum(min(s) for s in samples.values()) if rounds else step_s * len(cands)
            if rounds >= 2 and time.perf_counter() + estimate > deadline:
                break
            for c in cands:
                samples[c].append(self.time(c))
        return {c: statistics.median(s) for c, s in samples.items()}


def _nothing() -> None:
    pass


def _copy_step(step: TrainStep, channels_last: bool) -> TrainStep:
    """A TrainStep of its own on a copy of the model, so timing it leaves the run's weights and optimizer alone."""
    model = copy.deepcopy(step.model).to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    twin = dict(zip(map(id, step.model.parameters()), model.parameters(), strict=True))
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [twin[id(p)] for p in g["params"]]}
        for g in step.optimizer.param_groups
    ]
    optimizer = type(step.optimizer)(groups, **step.optimizer.defaults)
    # Only fp16 needs a real scaler. Elsewhere a disabled GradScaler is pure bookkeeping, and whatever counts the
    # run's optimisation steps by it (tests/faults.py kills and signals runs at step N) must not count these.
    device = step.normalise.mean.device.type
    scaler = torch.amp.GradScaler(device) if step.scaler.is_enabled() else _NoScaler(device)
    return dataclasses.replace(
        step,
        model=model,
        forward=model,
        optimizer=optimizer,
        scaler=scaler,
        augment=None,
        normalise=dataclasses.replace(step.normalise, channels_last=channels_last),
        scheduler=None,
        ema=None,
    )


class _NoScaler(torch.amp.GradScaler):
    """A disabled GradScaler (scale, unscale_ and step pass the loss and the optimizer through), for unscaled
    (bf16, fp32) steps, with an update of its own: what counts the run's steps by GradScaler.update does not
    see it."""

    def __init__(self, device: str) -> None:
        super().__init__(device, enabled=False)

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        pass


def apply(tuning: Tuning, step: TrainStep, modules: list[nn.Module]) -> None:
    """Put the run's model (and its weight average) into the chosen layout and set the step's chunk."""
    fmt = torch.channels_last if tuning.channels_last else torch.contiguous_format
    for m in modules:
        m.to(memory_format=fmt)
    step.normalise = dataclasses.replace(step.normalise, channels_last=tuning.channels_last)
    step.micro_batch = tuning.micro_batch
