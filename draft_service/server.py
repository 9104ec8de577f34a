"""The Draft gRPC service: one Speculate stream per target, strictly one round in, one out."""
import asyncio
import time
from collections import Counter
from functools import partial

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter as PromCounter, Gauge, Histogram

from pearl_runtime import gc_pauses, tracing
from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import load_tokenizer
from pearl_runtime.errors import InvalidRequest
from pearl_runtime.engine.step_timer import measure_step_ms
from pearl_runtime.log import get_logger
from pearl_runtime.metrics_http import serve_metrics
from pearl_runtime.pb import draft_pb2, draft_pb2_grpc
from pearl_runtime.rpc.health import Health
from pearl_runtime.rpc.identity import PROTOCOL_VERSION, tokenizer_hash
from pearl_runtime.rpc.ipc import TokenExport
from pearl_runtime.rpc.round_datagrams import RoundInbox, datagram_host
from pearl_runtime.rpc.security import serving_credentials
from pearl_runtime.rpc.server import bind, new_server, stop_serving
from draft_service.drafter import Mirror
from draft_service.round_bounds import RoundBounds
from draft_service.rounds import RoundRunner

log = get_logger(__name__)

SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["Draft"].full_name
MAX_DEVICE_GAMMA = 64   # columns of a stream's device token buffer: longer rounds go inline
ROUND_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03, 0.06, 0.125, 0.25, 0.5, 1.0, 2.5)


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


class DraftMetrics:
    """The draft's Prometheus series: its target streams, sequences and rounds."""

    def __init__(self, registry: CollectorRegistry):
        self.streams = Gauge("pearl:draft_streams", "target streams connected", registry=registry)
        self.sequences = Gauge("pearl:draft_sequences", "sequences mirrored for the targets", registry=registry)
        self.rounds = PromCounter("pearl:draft_rounds", "rounds drafted", ("path",), registry=registry)
        self.round_seconds = Histogram("pearl:draft_round_duration_seconds", "a round's drafting time",
                                       buckets=ROUND_BUCKETS, registry=registry)
        self.refused = PromCounter("pearl:draft_refused_handshakes", "handshakes refused, by reason",
                                   ("reason",), registry=registry)


class DraftServicer(draft_pb2_grpc.DraftServicer):
    def __init__(self, cfg: EngineConfig, round_host: str | None = "127.0.0.1",
                 metrics: DraftMetrics | None = None):
        """round_host: where to open the Round datagram port (the gRPC port's host); None: no port."""
        self.model = cfg.model
        self.tok_hash = tokenizer_hash(load_tokenizer(cfg.model))
        self.runner = RoundRunner(cfg)
        self.drafter = self.runner.drafter
        self.bounds = RoundBounds(self.drafter.vocab_size)
        self.metrics = metrics or DraftMetrics(CollectorRegistry())
        self.streams = 0
        self.closing = False
        self.head_paths = Counter()   # head-start rounds by where they were drafted
        self.round_paths = Counter()  # rounds by the copy that started them: "stream" or "datagram"
        self.round_host = round_host
        self.inbox: RoundInbox | None = None
        self.step_ms = measure_step_ms(self.drafter.runner, query_len=1)
        if self.step_ms:
            log.info("draft step time by batch size (ms)", **{f"bs{b}": round(t, 3) for b, t in self.step_ms.items()})

    def close(self) -> None:
        self.closing = True
        self.runner.close()

    def _hello(self, hello: draft_pb2.Hello) -> draft_pb2.HelloReply:
        reply = draft_pb2.HelloReply(accepted=False, draft_model=self.model, tokenizer_hash=self.tok_hash,
                                     vocab_size=self.drafter.vocab_size, step_batch_sizes=list(self.step_ms),
                                     step_ms=list(self.step_ms.values()), protocol_version=PROTOCOL_VERSION)
        if hello.protocol_version != PROTOCOL_VERSION:
            reply.reason = (f"Speculate protocol mismatch: target speaks v{hello.protocol_version}, "
                            f"draft speaks v{PROTOCOL_VERSION}")
        elif hello.tokenizer_hash != self.tok_hash:
            reply.reason = (f"tokenizer mismatch: target {hello.tokenizer_hash}, draft {self.tok_hash} "
                            f"({self.model}); draft and target must share a tokenizer")
        elif hello.vocab_size != self.drafter.vocab_size:
            reply.reason = (f"vocabulary size mismatch: target {hello.vocab_size}, "
                            f"draft {self.drafter.vocab_size}")
        else:
            reply.accepted = True
        return reply

    def _remeasure_steps(self) -> None:
        """Time the step again as a target connects and keep, per batch size, the lower of this
        and the earlier readings: on a shared GPU the start-time reading can overlap the
        target's own start-up (graph capture, verify timing) and read high, and sharing only
        ever adds time, so the lowest reading is the cleanest."""
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
            self.bounds.check(rnd)
        except InvalidRequest:   # the stream's copy is refused; a datagram gets no answer
            ahead.claimed = rnd.round_id - 1
            return
        try:
            batch = self.runner.try_inline(self.runner.whole, mirror, rnd, None, arrived, export)
        except Exception as e:   # raised where the stream's copy asks for the batch
            ahead.ready[rnd.round_id] = e
            return
        if batch is None:
            ahead.claimed = rnd.round_id - 1
            return
        ahead.ready[rnd.round_id] = batch
        self._counted(mirror, batch, "datagram")

    def _counted(self, mirror: Mirror, batch: draft_pb2.DraftBatch, copy: str) -> draft_pb2.DraftBatch:
        """Count a drafted round by the copy that started it ("stream" or "datagram")."""
        self.round_paths[copy] += 1
        if self.round_paths[copy] in (1, 100, 10000):
            log.info("rounds started by", copy=copy, rounds=self.round_paths[copy])
        self.metrics.rounds.labels(copy).inc()
        self.metrics.round_seconds.observe(batch.draft_ms / 1e3)
        return batch

    def _head_path(self, name: str) -> None:
        self.head_paths[name] += 1
        if self.head_paths[name] in (1, 10, 100, 1000, 10000):
            log.info("head-start round path", path=name, rounds=self.head_paths[name])

    async def _head_start_round(self, mirror: Mirror, rnd: draft_pb2.Round, received: float, export):
        """A round with an early part: yields the early DraftBatch as soon as it exists, then
        the whole one."""
        runner = self.runner
        parts = runner.parts(mirror, rnd, received, export)
        if (head := runner.try_inline(next, parts)) is not None:
            # grpc resumes this generator once the early part is on its way, and the rest is
            # drafted here too: two thread hops fewer, and no fight for the GIL between the
            # send and the drafting
            yield head
            if (batch := runner.try_inline(next, parts)) is not None:
                self._head_path("event loop")
            else:   # the drafter was taken meanwhile (another target, a release)
                self._head_path("early part on the event loop, rest on the forward thread")
                batch = await runner.on_thread(next, parts)
            yield batch
            return
        # the whole round on the thread, which hands the early part back through a bare future
        self._head_path("forward thread")
        loop = asyncio.get_running_loop()
        head = loop.create_future()
        work = runner.on_thread(runner.whole, mirror, rnd, partial(loop.call_soon_threadsafe, _resolve, head),
                                received)
        await asyncio.wait({head, work}, return_when=asyncio.FIRST_COMPLETED)
        if not head.done() and work.exception() is not None:
            head.cancel()   # the round failed before its early part: raise its error
            await work
        yield await head
        yield await work

    async def Speculate(self, request_iterator, context: grpc.aio.ServicerContext):
        # headers at once: the target waits for them before its Hello, so a caller refused
        # before this (the token) sees that status rather than a failed write (draft_link.py)
        await context.send_initial_metadata(())
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Speculate must open with a Hello")
        hello = first.hello
        if self.step_ms:
            await self.runner.on_thread(self._remeasure_steps)
        reply = self._hello(hello)
        export = self._export(hello) if reply.accepted else None
        if export is not None:
            reply.ipc_buffers.append(export.describe())
        mirror, ahead = Mirror(), AheadRounds()
        key = await self._datagrams(hello, reply, mirror, export, ahead) if reply.accepted else None
        if not reply.accepted:   # counted and logged before the reply: the target hangs up on reading it
            self.metrics.refused.labels(next((k for k in ("protocol", "tokenizer", "vocabulary")
                                              if k in reply.reason), "other")).inc()
            log.warning("refused target", target=hello.target_id, reason=reply.reason)
            yield draft_pb2.FromDraft(hello=reply)
            return
        yield draft_pb2.FromDraft(hello=reply)
        self.streams += 1
        self.metrics.streams.set(self.streams)
        log.info("target connected", target=hello.target_id, streams=self.streams,
                 protocol_version=hello.protocol_version)
        try:
            async for msg in request_iterator:
                received = time.monotonic()
                if msg.WhichOneof("kind") != "round":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a Round after the Hello")
                rnd = msg.round
                self.bounds.check(rnd)   # INVALID_ARGUMENT, before any of it is applied
                _log_adds(rnd)
                if (done := ahead.ready.pop(rnd.round_id, None)) is not None:   # its datagram came first
                    if isinstance(done, Exception):
                        raise done
                    yield _sent(done)
                    continue
                ahead.claimed = max(ahead.claimed, rnd.round_id)   # a late datagram of it is ignored
                if 0 < rnd.early < rnd.gamma:
                    async for batch in self._head_start_round(mirror, rnd, received, export):
                        yield _sent(batch if batch.early else self._counted(mirror, batch, "stream"))
                    continue
                if (batch := self.runner.try_inline(self.runner.whole, mirror, rnd, None, received, export)) is None:
                    batch = await self.runner.on_thread(self.runner.whole, mirror, rnd, None, received, export)
                yield _sent(self._counted(mirror, batch, "stream"))
                self.metrics.sequences.set(len(mirror.seqs))
        finally:
            # a dead target's stream ends in cancellation, and an await here would be cancelled
            # too (the mirror would leak its KV blocks): hand the release to the forward thread
            if not self.closing:   # else the engine goes away whole, with every mirror's blocks
                self.runner.release(mirror)
            if export is not None:
                export.close()
            if key is not None:
                self.inbox.unregister(key)
            self.streams -= 1
            self.metrics.streams.set(self.streams)
            log.info("target disconnected", target=hello.target_id, streams=self.streams)


def _log_adds(rnd: draft_pb2.Round) -> None:
    """One line per sequence a target hands over, under the request's id (and trace)."""
    for add in rnd.adds:
        with tracing.span("draft.sequence", add.traceparent or None, request_id=add.request_id):
            log.info("sequence added", request_id=add.request_id, seq_id=add.seq_id, tokens=len(add.token_ids))


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():   # the stream may be gone (cancelled) by the time the early part exists
        fut.set_result(value)


def _sent(batch: draft_pb2.DraftBatch) -> draft_pb2.FromDraft:
    """The batch as it goes onto the stream, stamped for the target's transport split."""
    batch.sent_at = time.monotonic()
    return draft_pb2.FromDraft(batch=batch)


async def serve(cfg: EngineConfig, host: str = "127.0.0.1", port: int = 50052, ready=None,
                metrics_port: int = 0, health_port: int = 0, auth_token: str | None = None,
                tls_cert: str | None = None, tls_key: str | None = None, tls_client_ca: str | None = None) -> None:
    """Serve until cancelled. The port answers health (NOT_SERVING) while the engine loads
    and its steps are timed; `ready(port)` is called once it serves. `auth_token`, `tls_*`:
    what callers must present; with either, Round datagrams are off (round_datagrams.py)."""
    if cfg.device == "cpu":
        torch.set_num_threads(max(1, int(cfg.extra.get("threads", 1))))
    tracing.setup("draft")
    credentials = serving_credentials(tls_cert, tls_key, tls_client_ca)
    health, server, registry = Health(SERVICE_NAME), new_server(auth_token), CollectorRegistry()
    servicer = endpoint = None
    health.add_to(server)
    loading = _Loading()
    draft_pb2_grpc.add_DraftServicer_to_server(loading, server)
    bound = bind(server, host, port, credentials)
    await server.start()
    await health.open_plain_port(host, health_port)
    log.info("draft port open; loading", address=f"{host}:{bound}", model=cfg.model)
    try:
        servicer = await asyncio.get_running_loop().run_in_executor(
            None, lambda: DraftServicer(cfg, round_host=datagram_host(host, auth_token, credentials),
                                        metrics=DraftMetrics(registry)))
        loading.servicer = servicer
        endpoint = serve_metrics(registry, host, metrics_port)
        gc_pauses.freeze_and_watch()   # the start-up heap out of the collector's walks
        await health.set_ready(True)
        log.info("draft serving", address=f"{host}:{bound}", model=cfg.model)
        if ready:
            ready(bound)
        await server.wait_for_termination()
    finally:
        try:
            await stop_serving(server, health)   # raises CancelledError when serve() itself was cancelled
        finally:
            if servicer is not None:
                servicer.close()
                if servicer.inbox is not None:
                    servicer.inbox.close()
            if endpoint is not None:
                endpoint.close()
            tracing.shutdown()


class _Loading(draft_pb2_grpc.DraftServicer):
    """The Draft service while the engine loads: UNAVAILABLE, then the real servicer's."""
    servicer: DraftServicer | None = None

    async def Speculate(self, request_iterator, context):
        if self.servicer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the draft is starting (loading weights, timing steps)")
        async for msg in self.servicer.Speculate(request_iterator, context):
            yield msg
