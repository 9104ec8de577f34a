"""Idle cores kept from sleeping, so that a message wakes its reader at once.

An sd round crosses the draft link twice, and each crossing wakes threads that were asleep:
gRPC's poller, then the event loop. On the lent GPU machines (virtual machines) a core with
nothing to run halts, and waking a halted core costs a fraction of a millisecond. A gRPC echo
that idles between pings takes several times longer a round trip than one sent back to back,
and the link's two hops become a noticeable share of an sd round.

With a busy loop at SCHED_IDLE priority on every core the service may use, no core halts,
and a real thread that wakes takes the core from the loop at once: the idle echo then runs
about as fast as the back-to-back one, and sd's hops shrink with it (measured:
benchmarks/journal/BENCHMARKS.md).

The price: those cores read 100% busy. The loops run at the lowest priority and give way to
any work, but they spend power, and under a CPU quota (cgroup `cpu.max`, a container's
`--cpus`, a Kubernetes CPU limit) their time counts against the quota like any other: the
spinners would use it up and the kernel would then throttle the service itself. So
`--keep-awake auto` turns them on only for a service on a GPU whose cgroup has no CPU quota;
off on CPU devices (the cores run the model, CI machines are small) and under a quota.
`on` and `off` force it.
"""
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from pearl_runtime.log import get_logger

log = get_logger(__name__)

CHOICES = ("auto", "on", "off")

# The spinner. PR_SET_PDEATHSIG: it dies with the service, even with a service killed -9; the
# parent check catches a service that died before prctl. A session of its own: where the
# kernel groups tasks by session (autogroup, on in the lent VMs), a woken service thread
# preempts an idle-policy task of its own group at once, but a task of another group only when
# the scheduler's pick favours its group: spinners inside the draft's and the target's own
# groups left wake-ups waiting (slower hops than with the spinners outside). Nice 19 for that group, so its pick loses to any service's.
_SPIN = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
if os.getppid() != int(sys.argv[2]):
    sys.exit(0)
os.setsid()
try:
    with open("/proc/self/autogroup", "w") as f:
        f.write("19")
except OSError:
    pass
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while True:
    pass
"""


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (the tightest along its path), None without one.

    cgroup v2: `cpu.max` holds "QUOTA PERIOD" or "max PERIOD"; v1: cpu.cfs_quota_us (-1: none)
    over cpu.cfs_period_us. A parent's quota limits its children, so every level counts.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":                                   # v2: one unified hierarchy
            base, files = cgroup_root, ("cpu.max",)
        elif "cpu" in controllers.split(","):                   # v1: the cpu controller's own tree
            base = next((cgroup_root / d for d in ("cpu", "cpu,cpuacct", "cpuacct,cpu")
                         if (cgroup_root / d).is_dir()), cgroup_root / "cpu")
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        level = base / path.lstrip("/")
        while True:
            quotas.append(_quota_at(level, files))
            if level == base or base not in level.parents:
                break
            level = level.parent
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _quota_at(level: Path, files: tuple[str, ...]) -> float | None:
    try:
        if len(files) == 1:
            quota, period = (level / files[0]).read_text().split()[:2]
        else:
            quota, period = ((level / f).read_text().strip() for f in files)
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1"):
        return None
    return int(quota) / int(period)


def wanted(choice: str, device: str, quota: float | None = None) -> bool:
    """Spinners or not; `auto` is on for a GPU service whose cgroup has no CPU quota."""
    if choice not in CHOICES:
        raise SystemExit(f"--keep-awake wants one of {', '.join(CHOICES)}, got {choice!r}")
    return choice == "on" or (choice == "auto" and device.startswith("cuda") and quota is None)


class KeepAwake:
    """One SCHED_IDLE spinner process pinned to each core this process may run on."""

    def __init__(self, cores: set[int] | None = None):
        self.cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "KeepAwake":
        me = str(os.getpid())
        self.procs = [subprocess.Popen([sys.executable, "-S", "-c", _SPIN, str(c), me],
                                       stdin=subprocess.DEVNULL, close_fds=True) for c in self.cores]
        log.info("keep-awake on: a SCHED_IDLE busy loop on each core, so waking threads find a core awake "
                 "(--keep-awake off to stop)", cores=_ranges(self.cores))
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()
        self.procs = []

    def __enter__(self) -> "KeepAwake":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def for_service(choice: str, device: str, read_quota=cpu_quota):
    """A context manager: spinners while the service runs when `choice` asks for them on `device`
    (`read_quota`: where the cgroup's CPU quota comes from)."""
    quota = read_quota() if choice == "auto" else None
    if wanted(choice, device, quota):
        return KeepAwake()
    why = ("a CPU quota of %.2f cores: spinners would spend it and throttle the service" % quota
           if choice == "auto" and quota is not None and device.startswith("cuda") else f"--keep-awake {choice} on {device}")
    log.info("keep-awake off: idle cores may sleep, and waking one adds to each gRPC hop", reason=why)
    return contextlib.nullcontext()


def _ranges(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, c in enumerate(cores):
        if start is None:
            start = c
        if i + 1 == len(cores) or cores[i + 1] != c + 1:
            parts.append(f"{start}-{c}" if c > start else str(c))
            start = None
    return ",".join(parts)
