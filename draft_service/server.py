"""The Draft gRPC service: one Speculate stream per target, strictly one round in, one out."""
import asyncio
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import torch

from pearl_runtime.pb import draft_pb2, draft_pb2_grpc
from pearl_runtime import gc_pauses
from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import load_tokenizer
from pearl_runtime.engine.step_timer import measure_step_ms
from pearl_runtime.rpc import params as wire_params
from pearl_runtime.rpc import tensors
from pearl_runtime.rpc.identity import tokenizer_hash
from pearl_runtime.rpc.ipc import TokenExport
from pearl_runtime.rpc.round_datagrams import RoundInbox
from pearl_runtime.rpc.server import bind, new_server
from draft_service.drafter import Drafter, Mirror
from draft_service.round_profile import RoundClock, RoundProfiler
from pearl_runtime.log import get_logger

log = get_logger(__name__)

MAX_DEVICE_GAMMA = 64   # columns of a stream's device token buffer: longer rounds go inline


class AheadRounds:
    """One stream's rounds that came by datagram ahead of the stream's copy
    (pearl_runtime/rpc/round_datagrams.py): what each drafted, until the stream's copy asks."""

    def __init__(self):
        self.claimed = 0   # the highest round id taken by either copy: each round runs once
        self.ready: dict[int, draft_pb2.DraftBatch | Exception] = {}

    def claim(self, round_id: int) -> bool:
        """A datagram's round is new: after every round either copy has started."""
        if round_id <= self.claimed:
            return False
        self.claimed = round_id
        return True


class DraftServicer(draft_pb2_grpc.DraftServicer):
    def __init__(self, cfg: EngineConfig, round_host: str | None = "127.0.0.1"):
        """round_host: where to open the Round datagram port (the gRPC port's host); None: no port."""
        self.model = cfg.model
        self.tok_hash = tokenizer_hash(load_tokenizer(cfg.model))
        self.drafter = Drafter(cfg)
        # one model, many target streams: forwards run one at a time, on this thread when a
        # round must go on beside the event loop (an early part), else on the loop itself
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-forward")
        # whoever drafts or releases a mirror holds this: the forward thread, or the event loop
        # when it runs a round itself (`_inline_round`), so the two never overlap
        self.lock = threading.Lock()
        self.streams = 0
        self.closing = False
        self.head_paths = Counter()   # head-start rounds by where they were drafted
        self.round_paths = Counter()  # rounds by the copy that started them: "stream" or "datagram"
        self.round_host = round_host
        self.inbox: RoundInbox | None = None
        self.profiler = RoundProfiler.from_env(cuda=self.drafter.runner.device.type == "cuda")
        self.clock = RoundClock.from_env()
        self.step_ms = measure_step_ms(self.drafter.runner, query_len=1)
        if self.step_ms:
            log.info("draft step time by batch size (ms)", **{f"bs{b}": round(t, 3) for b, t in self.step_ms.items()})

    def close(self) -> None:
        """Release the engine once the forward thread is done (a TP group leaves its group)."""
        self.closing = True
        self.executor.shutdown(wait=True)
        self.drafter.runner.close()

    def _hello(self, hello: draft_pb2.Hello) -> draft_pb2.HelloReply:
        reply = draft_pb2.HelloReply(accepted=True, draft_model=self.model, tokenizer_hash=self.tok_hash,
                                     verdict_keep=True,
                                     vocab_size=self.drafter.vocab_size, step_batch_sizes=list(self.step_ms),
                                     step_ms=list(self.step_ms.values()))
        if hello.tokenizer_hash != self.tok_hash:
            reply.accepted = False
            reply.reason = (f"tokenizer mismatch: target {hello.tokenizer_hash}, draft {self.tok_hash} "
                            f"({self.model}); draft and target must share a tokenizer")
        elif hello.vocab_size != self.drafter.vocab_size:
            reply.accepted = False
            reply.reason = (f"vocabulary size mismatch: target {hello.vocab_size}, "
                            f"draft {self.drafter.vocab_size}")
        return reply

    def _remeasure_steps(self) -> None:
        """Time the step again as a target connects and keep, per batch size, the lower of this
        and the earlier readings. On a shared GPU the start-time reading can overlap the
        target's own start-up (graph capture, verify timing) and read double (seen: 1.29
        against 0.55 ms at bs 1), and auto gamma then ran the whole benchmark at 3; sharing
        only ever adds time, so the lowest reading is the cleanest."""
        again = measure_step_ms(self.drafter.runner, query_len=1)
        lowered = {b: (round(self.step_ms[b], 3), round(t, 3)) for b, t in again.items()
                   if b in self.step_ms and t < 0.9 * self.step_ms[b]}
        self.step_ms = {b: min(t, again.get(b, t)) for b, t in self.step_ms.items()}
        if lowered:
            log.warning("draft step re-timed at connect came out lower: an earlier reading shared the GPU",
                        **{f"bs{b}": f"{old} -> {new} ms" for b, (old, new) in lowered.items()})

    def _export(self, hello: draft_pb2.Hello) -> TokenExport | None:
        """A device buffer for this stream's sd draft tokens, when the target asks and the
        drafter chains its steps on the device (one process, not a TP group)."""
        if not hello.device_tokens or not self.drafter.runner.chains_on_device:
            return None
        runner = self.drafter.runner
        export = TokenExport(runner.device, rows=runner.cfg.max_num_seqs, cols=MAX_DEVICE_GAMMA)
        log.info("draft tokens of sd rounds can stay on the device", target=hello.target_id,
                 device=str(runner.device), generation=export.generation)
        return export

    async def _datagrams(self, hello: draft_pb2.Hello, reply: draft_pb2.HelloReply, mirror: Mirror,
                         export: TokenExport | None, ahead: AheadRounds) -> bytes | None:
        """A key on this service's Round datagram port for the stream (in the reply), when the
        target asks: a datagram's round is drafted on arrival (`_ahead_round`)."""
        if not hello.round_datagrams or self.round_host is None:
            return None
        if self.inbox is None:
            try:
                self.inbox = await RoundInbox.open(self.round_host)
            except OSError as e:
                log.warning("no Round datagram port; rounds come by the stream alone", error=str(e)[:200])
                self.round_host = None
                return None
            log.info("Round datagram port open", host=self.round_host, port=self.inbox.port)
        key = self.inbox.register(partial(self._ahead_round, mirror, export, ahead))
        reply.round_port, reply.round_key = self.inbox.port, key
        return key

    def _ahead_round(self, mirror: Mirror, export: TokenExport | None, ahead: AheadRounds,
                     rnd: draft_pb2.Round, arrived: float) -> None:
        """A Round by datagram, on the event loop: drafted now, unless the stream's copy came
        first, it asks for an early part, or the drafter is busy with another stream (then
        the stream's copy runs it, as without datagrams)."""
        if 0 < rnd.early < rnd.gamma or not ahead.claim(rnd.round_id):
            return
        try:
            batch = self._inline_round(mirror, rnd, arrived, export)
        except Exception as e:   # raised where the stream's copy asks for the batch
            ahead.ready[rnd.round_id] = e
            return
        if batch is None:
            ahead.claimed = rnd.round_id - 1
            return
        ahead.ready[rnd.round_id] = batch
        self._round_path("datagram")

    def _round_path(self, name: str) -> None:
        self.round_paths[name] += 1
        if self.round_paths[name] in (1, 100, 10000):
            log.info("rounds started by", copy=name, rounds=self.round_paths[name])

    def _locked(self, fn, *args):
        with self.lock:
            return fn(*args)

    def _inline(self, fn, *args):
        """fn(*args) right here on the event loop when the drafter is free: the hop to the
        forward thread and back costs ~0.15 ms a round on a 2-core CPU, and nothing else can
        use the loop meanwhile (the target waits for this batch; other targets' rounds would
        wait for the drafter anyway). None: it is busy, use the thread. The profiler stays on
        the forward thread, where it starts and stops."""
        if self.profiler is not None or not self.lock.acquire(blocking=False):
            return None
        try:
            return fn(*args)
        finally:
            self.lock.release()

    def _inline_round(self, mirror: Mirror, rnd: draft_pb2.Round, received: float | None = None,
                      export: TokenExport | None = None) -> draft_pb2.DraftBatch | None:
        """A round without an early part, on the event loop (`_inline`)."""
        return self._inline(self._round, mirror, rnd, None, received, export)

    def _head_path(self, name: str) -> None:
        self.head_paths[name] += 1
        if self.head_paths[name] in (1, 10, 100, 1000, 10000):
            log.info("head-start round path", path=name, rounds=self.head_paths[name])

    def _round(self, mirror: Mirror, rnd: draft_pb2.Round, on_early=None,
               received: float | None = None, export: TokenExport | None = None) -> draft_pb2.DraftBatch:
        """`received`: when the round came off the stream (time.monotonic), for RoundClock and
        the batch's received_at. `export`: the stream's device token buffer, if any."""
        if self.profiler is None:
            return self._timed_round(mirror, rnd, on_early, received, export)
        self.profiler.begin()
        try:
            return self._timed_round(mirror, rnd, on_early, received, export)
        finally:
            self.profiler.end()

    def _timed_round(self, mirror: Mirror, rnd: draft_pb2.Round, on_early=None,
                     received: float | None = None, export: TokenExport | None = None) -> draft_pb2.DraftBatch:
        parts = self._parts(mirror, rnd, received, export)
        if on_early is not None and 0 < rnd.early < rnd.gamma:   # runs on the forward thread, mid-round
            on_early(next(parts))
        return next(parts)

    def _parts(self, mirror: Mirror, rnd: draft_pb2.Round, received: float | None = None,
               export: TokenExport | None = None):
        """The round's DraftBatches, as they exist: the early one when the round asks for one
        (0 < early < gamma), then the whole one. The first `next` applies the round."""
        start = time.monotonic()
        adds = [(a.seq_id, list(a.token_ids), wire_params.from_proto(a.params)) for a in rnd.adds]
        verdicts = tensors.decode_ints(rnd.verdicts) if not tensors.is_empty(rnd.verdicts) else []
        self.drafter.apply(mirror, adds, list(rnd.removes), verdicts)
        applied = time.monotonic()
        on_device = (export is not None and rnd.device_tokens and not 0 < rnd.early < rnd.gamma
                     and export.fits(len(mirror.seqs), rnd.gamma))
        parts = self.drafter.parts(mirror, rnd.gamma, rnd.early, on_device=on_device)
        if 0 < rnd.early < rnd.gamma:
            yield _batch(rnd.round_id, next(parts), start, received, early=True)
        result = next(parts)
        drafted = time.monotonic()
        batch = _batch(rnd.round_id, result, start, received, export=export)
        if result.device_tokens is not None and self.drafter.last_device_ms is not None:
            # the host is done before the device: report the device time of the last such round
            # (one round late), which is what auto gamma and the bench's split read as the draft's
            batch.draft_ms = max(batch.draft_ms, self.drafter.last_device_ms)
        if self.clock is not None and received is not None:
            self.clock.add(received, start, applied, drafted, time.monotonic())
        yield batch

    async def Speculate(self, request_iterator, context: grpc.aio.ServicerContext):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Speculate must open with a Hello")
        if self.step_ms:
            await asyncio.get_running_loop().run_in_executor(self.executor, self._locked, self._remeasure_steps)
        reply = self._hello(first.hello)
        export = self._export(first.hello) if reply.accepted else None
        if export is not None:
            reply.ipc_buffers.append(export.describe())
        mirror, ahead = Mirror(), AheadRounds()
        key = await self._datagrams(first.hello, reply, mirror, export, ahead) if reply.accepted else None
        yield draft_pb2.FromDraft(hello=reply)
        if not reply.accepted:
            log.warning("refused target", target=first.hello.target_id, reason=reply.reason)
            return
        self.streams += 1
        log.info("target connected", target=first.hello.target_id, streams=self.streams)
        loop = asyncio.get_running_loop()
        try:
            async for msg in request_iterator:
                received = time.monotonic()
                if msg.WhichOneof("kind") != "round":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a Round after the Hello")
                if (done := ahead.ready.pop(msg.round.round_id, None)) is not None:   # its datagram came first
                    if isinstance(done, Exception):
                        raise done
                    yield _sent(done)
                    continue
                ahead.claimed = max(ahead.claimed, msg.round.round_id)   # a late datagram of it is ignored
                self._round_path("stream")
                if 0 < msg.round.early < msg.round.gamma:
                    # the early part goes out while the rest of the round is still drafting
                    parts = self._parts(mirror, msg.round, received, export)
                    if (head := self._inline(next, parts)) is not None:
                        # grpc resumes this generator once the early part is on its way, and
                        # the rest is drafted here too: two thread hops fewer, and no fight
                        # for the GIL between the send and the drafting
                        yield _sent(head)
                        if (batch := self._inline(next, parts)) is not None:
                            self._head_path("event loop")
                        else:   # the drafter was taken meanwhile (another target, a release)
                            self._head_path("early part on the event loop, rest on the forward thread")
                            batch = await loop.run_in_executor(self.executor, self._locked, next, parts)
                    else:   # the whole round on the thread, which hands the early part back
                        self._head_path("forward thread")
                        # a bare future, not a queue and a task to read it: one loop step fewer
                        head = loop.create_future()
                        send = partial(loop.call_soon_threadsafe, _resolve, head)
                        work = loop.run_in_executor(self.executor, self._locked, self._round, mirror, msg.round,
                                                    send, received)
                        await asyncio.wait({head, work}, return_when=asyncio.FIRST_COMPLETED)
                        if not head.done() and work.exception() is not None:
                            head.cancel()   # the round failed before its early part: raise its error
                            await work
                        yield _sent(await head)
                        batch = await work
                elif (batch := self._inline_round(mirror, msg.round, received, export)) is None:
                    batch = await loop.run_in_executor(self.executor, self._locked, self._round, mirror, msg.round,
                                                       None, received, export)
                yield _sent(batch)
        finally:
            # a dead target's stream ends in cancellation, and an await here would be cancelled
            # too (the mirror would leak its KV blocks): hand the release to the forward thread
            if not self.closing:   # else the engine goes away whole, with every mirror's blocks
                self.executor.submit(self._locked, self.drafter.close, mirror)
            if export is not None:
                export.close()
            if key is not None:
                self.inbox.unregister(key)
            self.streams -= 1
            log.info("target disconnected", target=first.hello.target_id, streams=self.streams)


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():   # the stream may be gone (cancelled) by the time the early part exists
        fut.set_result(value)


def _batch(round_id: int, result, start: float, received: float | None = None,
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


def _sent(batch: draft_pb2.DraftBatch) -> draft_pb2.FromDraft:
    """The batch as it goes onto the stream, stamped for the target's transport split."""
    batch.sent_at = time.monotonic()
    return draft_pb2.FromDraft(batch=batch)


async def serve(cfg: EngineConfig, host: str = "127.0.0.1", port: int = 50052, ready=None) -> None:
    if cfg.device == "cpu":
        torch.set_num_threads(max(1, int(cfg.extra.get("threads", 1))))
    servicer = DraftServicer(cfg, round_host=host)
    server = new_server()
    draft_pb2_grpc.add_DraftServicer_to_server(servicer, server)
    bound = bind(server, host, port)
    gc_pauses.settle()   # the start-up heap out of the collector's walks
    await server.start()
    log.info("draft serving", address=f"{host}:{bound}", model=cfg.model)
    if ready:
        ready(bound)
    try:
        await server.wait_for_termination()
    finally:
        try:
            await server.stop(grace=1)   # raises CancelledError when serve() itself was cancelled
        finally:
            servicer.close()
            if servicer.inbox is not None:
                servicer.inbox.close()
