"""An opt-in profile of the draft's rounds inside the running service.

`PEARL_PROFILE_ROUNDS=N` in the draft's environment: after a warm-up, N rounds run under
torch.profiler and the kernel table goes to the log with the rounds' wall time and their GPU
kernel time. A draft round through the services costs more than the same round in-process
(scripts/gpu_draft_profile.py), and this shows where, in the run that pays it.
"""
import logging
import os
import time

from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)


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
        rounds = int(os.environ.get("PEARL_PROFILE_ROUNDS", "0") or 0)
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
