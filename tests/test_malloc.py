"""Training steps reuse freed memory instead of faulting fresh pages in: the allocator settings every command
makes at start (cnntrain.io.malloc). Counted in page faults, not timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cnntrain.io import malloc

# Training steps of the seed CNN at batch 256; page faults of the median step once it has run a few.
STEPS = r"""
import json, resource, sys
import torch
if sys.argv[1] == "set":
    from cnntrain.io.malloc import keep_freed_memory
    took = keep_freed_memory()
elif sys.argv[1] == "cli":  # what every command does first
    import contextlib, io
    from cnntrain.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        main(["list"])
    took = True
else:
    took = None
from cnntrain.models.zoo import simple_cnn

torch.manual_seed(0)
model = simple_cnn(1, (28, 28), 10)
opt = torch.optim.Adam(model.parameters())
x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))

def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

for _ in range(3):  # the heap grows to the step's peak
    step()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median step: the kernel may reclaim idle pages of any process now and then (a burst in one step).
print(json.dumps({"took": took, "faults": sorted(faults)[4]}))
"""

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's allocator"
)


def _faults(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in malloc.ENV}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


@glibc
def test_steps_reuse_their_memory_instead_of_faulting_it_in():
    first_map = 256 * 32 * 26 * 26 * 4 // 4096  # pages of the first convolution's output
    # What the settings are for. glibc's own mmap threshold adapts to what the process freed first, so now and
    # then a run of the default settles where it mostly reuses memory (2 of 52 here and one in CI: 0, 2,704 and
    # 5,376 faults a step against 10,968-16,193 in the rest): a faulting run among up to five shows the cost.
    tries = [_faults("default")]
    while tries[-1]["faults"] <= first_map and len(tries) < 5:
        tries.append(_faults("default"))
    assert tries[-1]["faults"] > first_map, tries
    kept, command = _faults("set"), _faults("cli")
    assert kept["took"] is True
    assert kept["faults"] < first_map / 20, kept
    assert command["faults"] < first_map / 20, command


def test_the_users_own_allocator_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert malloc.keep_freed_memory() is False
