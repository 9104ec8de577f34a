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
any work, but they spend power. `--keep-awake auto` turns them on for a service on a GPU and
off on CPU, where the cores run the model and CI machines are small. `on` and `off` force it.
"""
import contextlib
import os
import signal
import subprocess
import sys

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


def wanted(choice: str, device: str) -> bool:
    if choice not in CHOICES:
        raise SystemExit(f"--keep-awake wants one of {', '.join(CHOICES)}, got {choice!r}")
    return choice == "on" or (choice == "auto" and device.startswith("cuda"))


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


def for_service(choice: str, device: str):
    """A context manager: spinners while the service runs when `choice` asks for them on `device`."""
    if wanted(choice, device):
        return KeepAwake()
    log.info("keep-awake off: idle cores may sleep, and waking one adds to each gRPC hop",
             choice=choice, device=device)
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
