"""Opt-in looks at the draft's rounds inside the running service: a torch profile
(RoundProfiler, PEARL_PROFILE_ROUNDS) and phase timestamps (RoundClock, PEARL_ROUND_TIMES).

`PEARL_PROFILE_ROUNDS=N` in the draft's environment: after a warm-up, N rounds run under
torch.profiler and the kernel table goes to the log with the rounds' wall time and their GPU
kernel time. A draft round through the services costs more than the same round in-process
(scripts/gpu_draft_profile.py), and this shows where, in the run that pays it.
"""
import time

from torch.profiler import ProfilerActivity, profile

from pearl_runtime import envs
from pearl_runtime import gc_pauses
from pearl_runtime.log import get_logger

log = get_logger(__name__)


class RoundProfiler:
    WARMUP = 20   # rounds before profiling: graph warm-up, autotuning, first allocations

    def __init__(self, rounds: int, cuda: bool):
        self.rounds, self.cuda = rounds, cuda
        self.seen = 0
        self.prof = None
        self.started = 0.0
        self.wall_s = 0.0
        self.report: str | None = None   # set once the profiled rounds are done

    @classmethod
    def from_env(cls, cuda: bool) -> "RoundProfiler | None":
        rounds = envs.get("PEARL_PROFILE_ROUNDS")
        if rounds <= 0:
            return None
        log.info("draft round profile on: %d rounds after %d warm-up rounds", rounds, cls.WARMUP)
        return cls(rounds, cuda)

    def begin(self) -> None:
        """At the start of a round (on the forward thread)."""
        self.seen += 1
        if self.report is not None or self.seen <= self.WARMUP:
            return
        if self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()
        self.started = time.perf_counter()

    def end(self) -> None:
        """At the end of a round, after its tokens reached the host."""
        if self.prof is None or self.report is not None:
            return
        self.wall_s += time.perf_counter() - self.started
        if self.seen < self.WARMUP + self.rounds:
            return
        self.prof.__exit__(None, None, None)
        averages = self.prof.key_averages()
        kernels_us = sum(e.self_device_time_total for e in averages if e.device_type.name == "CUDA")
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        self.report = (f"draft round profile: {self.rounds} rounds, {self.wall_s / self.rounds * 1e3:.3f} ms a round "
                       f"wall, {kernels_us / self.rounds / 1e3:.3f} ms a round of GPU kernels\n"
                       + averages.table(sort_by=sort, row_limit=25, max_name_column_width=70))
        self.prof = None
        log.info("%s", self.report)


class RoundClock:
    """`PEARL_ROUND_TIMES=N` in the draft's environment: the phases of its rounds, averaged
    and logged every N rounds, in ms. queue: from the round's arrival on the stream to its
    start (the event loop's turn, or the hop to the forward thread); apply: decode and apply
    the verdicts; draft: the draft steps, their device sync included; encode: the DraftBatch.
    Timestamps only, so it costs next to nothing, unlike the profiler. The draft's reported
    draft_ms is apply + draft + encode; queue is the draft's share of what the target counts
    as transport (a draft round ran ~1.1 ms longer in the service than in-process,
    and this is where to look). gc: the garbage collector's ms a round over
    the same rounds, wherever it struck (a round-long stall every few dozen rounds reads as
    a steady per-round cost in the means)."""
    PHASES = ("queue", "apply", "draft", "encode")

    def __init__(self, every: int):
        self.every = every
        self.sums = dict.fromkeys(self.PHASES, 0.0)
        self.rounds = 0
        self.last: dict[str, float] | None = None   # the means last logged
        self.gc = gc_pauses.watch()
        self.gc.take()

    @classmethod
    def from_env(cls) -> "RoundClock | None":
        every = envs.get("PEARL_ROUND_TIMES")
        return cls(every) if every > 0 else None

    def add(self, received: float, start: float, applied: float, drafted: float, encoded: float) -> None:
        """time.monotonic() stamps of one round."""
        for phase, (a, b) in zip(self.PHASES, ((received, start), (start, applied), (applied, drafted),
                                               (drafted, encoded))):
            self.sums[phase] += (b - a) * 1e3
        self.rounds += 1
        if self.rounds == self.every:
            collections, gc_ms = self.gc.take()
            self.last = {k: v / self.rounds for k, v in self.sums.items()} | {"gc": gc_ms / self.rounds}
            log.info("draft round times (ms, mean of %d rounds): %s (%d collections)", self.rounds,
                     " ".join(f"{k} {v:.3f}" for k, v in self.last.items()), collections)
            self.sums = dict.fromkeys(self.PHASES, 0.0)
            self.rounds = 0
