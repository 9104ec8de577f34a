"""keep_awake: one SCHED_IDLE spinner per core, gone with the service."""
import os
import subprocess
import sys
import time

import pytest

from pearl_runtime import keep_awake


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_until(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_auto_is_on_for_a_gpu_only():
    assert keep_awake.wanted("auto", "cuda:0") and keep_awake.wanted("auto", "cuda:0,1")
    assert not keep_awake.wanted("auto", "cpu")
    assert keep_awake.wanted("on", "cpu") and not keep_awake.wanted("off", "cuda")
    with pytest.raises(SystemExit, match="--keep-awake"):
        keep_awake.wanted("yes", "cuda")
    assert not isinstance(keep_awake.for_service("off", "cuda"), keep_awake.KeepAwake)
    assert isinstance(keep_awake.for_service("auto", "cuda:0", read_quota=lambda: None), keep_awake.KeepAwake)


def test_auto_is_off_under_a_cpu_quota():
    assert not keep_awake.wanted("auto", "cuda:0", quota=2.0)
    assert keep_awake.wanted("on", "cuda:0", quota=2.0)       # `on` still forces it
    assert not isinstance(keep_awake.for_service("auto", "cuda:0", read_quota=lambda: 1.5), keep_awake.KeepAwake)
    assert not isinstance(keep_awake.for_service("auto", "cpu", read_quota=lambda: None), keep_awake.KeepAwake)


def _cgroup(tmp_path, lines: str, files: dict[str, str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "self_cgroup").write_text(lines)
    root = tmp_path / "fs"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return dict(cgroup_root=root, proc_cgroup=tmp_path / "self_cgroup")


def test_cpu_quota_from_cgroup_v2_takes_the_tightest_level(tmp_path):
    assert keep_awake.cpu_quota(**_cgroup(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})) is None
    assert keep_awake.cpu_quota(**_cgroup(tmp_path, "0::/\n", {"cpu.max": "200000 100000\n"})) == 2.0
    # a pod's limit on the parent, none on the container's own level
    nested = _cgroup(tmp_path, "0::/kubepods/pod1/c1\n", {
        "cpu.max": "max 100000", "kubepods/pod1/cpu.max": "150000 100000", "kubepods/pod1/c1/cpu.max": "max 100000"})
    assert keep_awake.cpu_quota(**nested) == 1.5


def test_cpu_quota_from_cgroup_v1_and_none_without_cgroups(tmp_path):
    v1 = _cgroup(tmp_path, "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert keep_awake.cpu_quota(**v1) == 0.5
    unlimited = _cgroup(tmp_path / "u", "2:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert keep_awake.cpu_quota(**unlimited) is None
    assert keep_awake.cpu_quota(tmp_path / "none", tmp_path / "no_such_file") is None


def test_one_idle_priority_spinner_pinned_to_each_core_and_stopped():
    cores = sorted(os.sched_getaffinity(0))
    with keep_awake.KeepAwake() as spinners:
        pids = [p.pid for p in spinners.procs]
        assert len(pids) == len(cores)
        # each child pins and lowers itself first thing: wait until all have
        assert _wait_until(lambda: all(os.sched_getscheduler(p) == os.SCHED_IDLE for p in pids))
        assert sorted(next(iter(os.sched_getaffinity(p))) for p in pids) == cores
        assert all(len(os.sched_getaffinity(p)) == 1 for p in pids)
        assert _wait_until(lambda: all(os.getsid(p) == p for p in pids)), "a spinner shares the service's session"
    assert not any(_alive(p) for p in pids)


def test_spinners_die_with_a_killed_service():
    code = ("import sys, time; from pearl_runtime.keep_awake import KeepAwake; k = KeepAwake({0}).start(); "
            "print('spinner', k.procs[0].pid, flush=True); time.sleep(60)")
    service = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        spinner = int(next(line for line in service.stdout if line.startswith("spinner")).split()[1])
        assert _wait_until(lambda: os.sched_getscheduler(spinner) == os.SCHED_IDLE)
    finally:
        service.kill()   # no clean-up code runs: PR_SET_PDEATHSIG must end the spinner
        service.wait()
    assert _wait_until(lambda: not _alive(spinner)), "the spinner outlived its service"


def test_ranges():
    assert keep_awake._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert keep_awake._ranges([3]) == "3"
