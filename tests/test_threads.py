"""The default thread count: usable cores (affinity, cgroup quota) less the ones other processes keep busy,
and the one-line notice when throughput collapses mid-run. Timing-free: load and clocks are faked."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from cnntrain.engine.device import configure_torch
from cnntrain.io import cpus
from tests.conftest import run_dirs


def _cgroup(tmp_path, proc: str, files: dict[str, str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc_cgroup").write_text(proc)
    for rel, text in files.items():
        path = tmp_path / "cg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "cg", tmp_path / "proc_cgroup"


def test_cgroup_v2_quota_is_read_in_cores(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/job\n", {"job/cpu.max": "150000 100000\n"})
    assert cpus.cgroup_quota(root, proc) == 1.5
    root, proc = _cgroup(tmp_path / "b", "0::/job\n", {"job/cpu.max": "max 100000\n"})
    assert cpus.cgroup_quota(root, proc) is None


def test_cgroup_v1_quota_is_read_in_cores(tmp_path):
    files = {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"}
    root, proc = _cgroup(tmp_path, "4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n", files)
    assert cpus.cgroup_quota(root, proc) == 2.0
    files = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    root, proc = _cgroup(tmp_path / "b", "1:cpu:/\n", files)
    assert cpus.cgroup_quota(root, proc) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cpus.cgroup_quota(tmp_path / "none", tmp_path / "missing") is None


def test_usable_cores_takes_the_smaller_of_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(cpus, "affinity", lambda: set(range(8)))
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: 2.5)
    assert cpus.usable_cores() == 3
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: None)
    assert cpus.usable_cores() == 8


def _machine(monkeypatch, cores: int, busy: float | None):
    monkeypatch.setattr(cpus, "affinity", lambda: set(range(cores)))
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: None)
    monkeypatch.setattr(cpus, "others_busy", lambda since=None: busy)


def test_a_quiet_machine_keeps_one_thread_per_core(monkeypatch):
    _machine(monkeypatch, 2, 0.1)
    assert cpus.choose_threads(torch_default=2).threads == 2
    _machine(monkeypatch, 16, 0.3)
    assert cpus.choose_threads(torch_default=8).threads == 8  # never more than torch's own default


def test_busy_cores_are_left_to_the_processes_using_them(monkeypatch):
    _machine(monkeypatch, 2, 1.0)
    choice = cpus.choose_threads(torch_default=2)
    assert choice.threads == 1 and "1.0 of 2 cores busy" in choice.reason and "trainer.num_threads" in choice.reason
    _machine(monkeypatch, 2, 3.0)
    assert cpus.choose_threads(torch_default=2).threads == 1  # never fewer than one
    _machine(monkeypatch, 8, 5.0)
    assert cpus.choose_threads(torch_default=8).threads == 3


def test_deterministic_runs_do_not_depend_on_the_load(monkeypatch):
    _machine(monkeypatch, 4, 3.0)
    choice = cpus.choose_threads(torch_default=4, deterministic=True)
    assert choice.threads == 4 and "deterministic" in choice.reason


def test_unreadable_counters_keep_the_usable_cores(monkeypatch):
    _machine(monkeypatch, 4, None)
    assert cpus.choose_threads(torch_default=4).threads == 4


def test_others_busy_measures_the_counters_on_this_machine():
    busy = cpus.others_busy()
    assert busy is None or busy >= 0.0


def test_configure_torch_leaves_threads_set_by_the_user_or_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        _machine(monkeypatch, 2, 1.5)
        note = configure_torch(torch.device("cpu"), False, None, 0)
        assert torch.get_num_threads() == 1 and "busy" in note
        assert configure_torch(torch.device("cpu"), False, 2, 0) == "trainer.num_threads"
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert configure_torch(torch.device("cpu"), False, None, 0) == ""
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _watch(monkeypatch, busy: float):
    clock, said = _Clock(), []
    monkeypatch.setattr(cpus, "others_busy", lambda since=None: busy)
    watch = cpus.CollapseWatch(2, said.append, window_s=1.0, clock=clock)
    watch.resume()
    return watch, clock, said


def _train(watch, clock, images_per_s: float, seconds: float, steps_per_s: int = 10):
    for _ in range(int(seconds * steps_per_s)):
        clock.t += 1 / steps_per_s
        watch.step(int(images_per_s / steps_per_s))


def test_a_collapse_beside_busy_processes_is_reported_once(monkeypatch):
    watch, clock, said = _watch(monkeypatch, busy=1.8)
    _train(watch, clock, 10_000, 3)
    assert said == []
    _train(watch, clock, 2_000, 5)
    assert len(said) == 1
    assert "trainer.num_threads=1" in said[0] and "10,000" in said[0] and "2,000" in said[0]


def test_a_slowdown_on_a_quiet_machine_is_not_blamed_on_threads(monkeypatch):
    watch, clock, said = _watch(monkeypatch, busy=0.1)
    _train(watch, clock, 10_000, 3)
    _train(watch, clock, 2_000, 5)
    assert said == []


def test_one_thread_has_nothing_to_report(monkeypatch):
    watch = cpus.CollapseWatch(1, print)
    assert watch.done


def test_the_start_table_says_why_the_thread_count(one_epoch_smoke):
    proc, cwd = one_epoch_smoke
    assert proc.returncode == 0, proc.stdout + proc.stderr
    device_line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("device"))
    assert "thread" in device_line
    (run_dir,) = run_dirs(cwd)
    assert (run_dir / "provenance.json").exists()


def test_niced_work_is_not_load_that_takes_threads_away(tmp_path, monkeypatch):
    """A finished fit's figure drawer runs niced: the next fit (a sweep's next job) must keep every core."""
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal, in clock ticks
    stat.write_text("cpu  900 700 100 0 0 0 0 0\ncpu0 400 300 50 0 0 0 0 0\ncpu1 500 400 50 0 0 0 0 0\n")
    tick = os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr(cpus, "_priority", lambda: 0)
    assert cpus.sample({0, 1}, str(stat)).busy == 1000 / tick  # the 700 niced ticks left out
    monkeypatch.setattr(cpus, "_priority", lambda: 10)  # niced itself: its own time is in that column
    assert cpus.sample({0, 1}, str(stat)).busy == 1700 / tick


def test_the_background_figure_drawer_runs_niced(tmp_path, monkeypatch):
    """trainer.figures=background leaves a drawer behind; it yields the cores to whatever runs next."""
    from cnntrain.io import figures

    children = []
    real = subprocess.Popen

    def stand_in(*args, **kwargs):  # the drawer's place in the process table, without drawing
        children.append(real([sys.executable, "-c", "import time; time.sleep(30)"]))
        return children[-1]

    monkeypatch.setattr(figures.subprocess, "Popen", stand_in)
    (tmp_path / "figures").mkdir()
    try:
        figures._spawn_drawer(tmp_path)
        assert os.getpriority(os.PRIO_PROCESS, children[0].pid) == 19
    finally:
        for child in children:
            child.kill()
