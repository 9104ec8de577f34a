"""Python's cyclic garbage collector, kept off the serving path.

A full (generation 2) collection walks every live object. Once torch, transformers and grpc
are loaded that is hundreds of thousands of objects, and a started GPU service holds more: a
full collection then takes a visible share of a round, and one can land inside a round. `freeze()` moves everything alive after
start-up (modules, the model's Python objects, CUDA graphs) out of the collector's reach, so a
later collection walks only what serving allocated since. `PEARL_GC_FREEZE=0` leaves the
collector as Python sets it (to measure the difference).

`GcPauses` times every collection through gc.callbacks and logs the long ones, so a stall
that is the collector's can be told from one that is not.
"""
import gc
import time
from pearl_runtime import envs
from pearl_runtime.log import get_logger

log = get_logger(__name__)

SLOW_MS = 5.0   # a collection at least this long is logged


def freeze() -> int:
    """Collect once, then freeze what is left (the caller has finished starting up). Returns
    the number of objects frozen, 0 when PEARL_GC_FREEZE=0."""
    if not envs.get("PEARL_GC_FREEZE"):
        log.info("gc: start-up objects not frozen (PEARL_GC_FREEZE=0)")
        return 0
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("gc: froze %d start-up objects; collections skip them", frozen)
    return frozen


class GcPauses:
    """Collections and their ms since the last take(), from gc.callbacks."""

    def __init__(self, slow_ms: float = SLOW_MS):
        self.slow_ms = slow_ms
        self.count = 0
        self.ms = 0.0
        self._start: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        if self._start is None:
            return
        ms = (time.perf_counter() - self._start) * 1e3
        self._start = None
        self.count += 1
        self.ms += ms
        if ms >= self.slow_ms:
            log.info("gc pause %.1f ms (generation %d, %d objects freed)", ms, info["generation"],
                     info["collected"])

    def take(self) -> tuple[int, float]:
        out = (self.count, self.ms)
        self.count, self.ms = 0, 0.0
        return out


_pauses: GcPauses | None = None


def watch() -> GcPauses:
    """The process's one GcPauses, registered on first use."""
    global _pauses
    if _pauses is None:
        _pauses = GcPauses()
        gc.callbacks.append(_pauses)
    return _pauses


def freeze_and_watch() -> GcPauses:
    """What a service calls once it has started: freeze, then watch."""
    freeze()
    return watch()
