"""The draft's round runner: apply a Round to a target's mirror, draft gamma tokens for every
sequence, hand back DraftBatches (an early part first when the round asks for one).

One model serves many target streams, so drafts run one at a time under one lock: on the
event loop itself when the drafter is free (the target waits for this batch, and a hop to a
thread and back costs more than the round's host work), else on the forward thread.

Fair among streams: each has at most one round in at a time (one in, one out), the forward
thread takes its rounds in arrival order, and the event loop drafts inline only while none
waits there, so a stream that sends its next round the moment it has an answer cannot keep
another's waiting round behind it. Round sizes are bounded (round_bounds.py), so a turn is
bounded too."""
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pearl_runtime.config import EngineConfig
from pearl_runtime.pb import draft_pb2
from pearl_runtime.rpc import params as wire_params
from pearl_runtime.rpc import tensors
from pearl_runtime.rpc.ipc import TokenExport
from draft_service.drafter import Drafter, Mirror
from draft_service.round_profile import RoundClock, RoundProfiler


class RoundRunner:
    def __init__(self, cfg: EngineConfig):
        self.drafter = Drafter(cfg)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-forward")
        self.lock = threading.Lock()   # held by whoever drafts or releases a mirror
        self.queued = 0                # rounds waiting for the forward thread: inline waits behind them
        self.profiler = RoundProfiler.from_env(cuda=self.drafter.runner.device.type == "cuda")
        self.clock = RoundClock.from_env()

    def parts(self, mirror: Mirror, rnd: draft_pb2.Round, received: float | None = None,
              export: TokenExport | None = None):
        """The round's DraftBatches, as they exist: the early one when the round asks for one
        (0 < early < gamma), then the whole one. The first `next` applies the round.
        `received`: when it came off the stream (time.monotonic); `export`: the stream's
        device token buffer, if any."""
        start = time.monotonic()
        adds = [(a.seq_id, list(a.token_ids), wire_params.from_proto(a.params)) for a in rnd.adds]
        verdicts = tensors.decode_ints(rnd.verdicts) if not tensors.is_empty(rnd.verdicts) else []
        self.drafter.apply(mirror, adds, list(rnd.removes), verdicts)
        applied = time.monotonic()
        has_early = 0 < rnd.early < rnd.gamma
        on_device = (export is not None and rnd.device_tokens and not has_early
                     and export.fits(len(mirror.seqs), rnd.gamma))
        parts = self.drafter.parts(mirror, rnd.gamma, rnd.early, on_device=on_device)
        if has_early:
            yield draft_batch(rnd.round_id, next(parts), start, received, early=True)
        result = next(parts)
        drafted = time.monotonic()
        batch = draft_batch(rnd.round_id, result, start, received, export=export)
        if result.device_tokens is not None and self.drafter.last_device_ms is not None:
            # the host is done before the device: report the device time of the last such round
            # (one round late), which is what auto gamma and the bench's split read as the draft's
            batch.draft_ms = max(batch.draft_ms, self.drafter.last_device_ms)
        if self.clock is not None and received is not None:
            self.clock.add(received, start, applied, drafted, time.monotonic())
        yield batch

    def whole(self, mirror: Mirror, rnd: draft_pb2.Round, on_early=None, received: float | None = None,
              export: TokenExport | None = None) -> draft_pb2.DraftBatch:
        """Run the round to its end; `on_early(batch)` gets the early part mid-round (it runs on
        the calling thread). Profiled when PEARL_PROFILE_ROUNDS asks."""
        if self.profiler is not None:
            self.profiler.begin()
        try:
            parts = self.parts(mirror, rnd, received, export)
            if on_early is not None and 0 < rnd.early < rnd.gamma:
                on_early(next(parts))
            return next(parts)
        finally:
            if self.profiler is not None:
                self.profiler.end()

    def try_inline(self, fn, *args):
        """fn(*args) right here on the event loop when the drafter is free; None when it is busy
        (use `on_thread`). The profiler stays on the forward thread, where it starts and stops."""
        if self.profiler is not None or self.queued or not self.lock.acquire(blocking=False):
            return None
        try:
            return fn(*args)
        finally:
            self.lock.release()

    def on_thread(self, fn, *args) -> asyncio.Future:
        """fn(*args) on the forward thread, under the lock, after the rounds queued before it."""
        self.queued += 1   # counted on the event loop only, so no lock
        fut = asyncio.get_running_loop().run_in_executor(self.executor, self._locked, fn, *args)
        fut.add_done_callback(self._dequeued)
        return fut

    def _dequeued(self, _fut) -> None:
        self.queued -= 1

    def release(self, mirror: Mirror) -> None:
        """Free a gone target's mirror on the forward thread (a cancelled stream cannot await)."""
        self.executor.submit(self._locked, self.drafter.close, mirror)

    def _locked(self, fn, *args):
        with self.lock:
            return fn(*args)

    def close(self) -> None:
        """Release the engine once the forward thread is done (a TP group leaves its group)."""
        self.executor.shutdown(wait=True)
        self.drafter.runner.close()


def draft_batch(round_id: int, result, start: float, received: float | None = None,
                early: bool = False, export: TokenExport | None = None) -> draft_pb2.DraftBatch:
    if result.device_tokens is not None:   # sent as soon as the device has its write queued
        tokens = export.publish(result.device_tokens)
    else:
        tokens = tensors.encode(result.tokens)
    batch = draft_pb2.DraftBatch(round_id=round_id, seq_ids=result.seq_ids, tokens=tokens,
                                 early=early, received_at=received or 0.0)
    if result.probs is not None:
        batch.probs.CopyFrom(tensors.encode(result.probs))
    batch.draft_ms = (time.monotonic() - start) * 1e3
    return batch
