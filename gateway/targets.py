"""The gateway's targets: routing to replicas, one connection per replica, one flight per request.

TargetRouter admits requests, places each on the ready target with the fewest requests, and
resubmits every in-flight request when a target's stream breaks. The gateway keeps each
request's prompt and every token a target committed for it; when a stream breaks, the request
continues elsewhere as prompt + those tokens with the remaining budget, so the client sees
neither a duplicate nor a gap.

TargetConnection is one target replica: Info at connect, then one long-lived Serve stream that
carries coalesced submissions and cancels one way and committed tokens the other; re-dialed
with backoff. A target is ready while its stream is live and its grpc health says SERVING
(gateway/target_health.py); new requests go only to ready targets, requests already on a target
that turns NOT_SERVING (draining) finish there.

Flight is one request in flight: its job, every token a target committed for it, its update queue.
"""
import asyncio
import contextlib
import dataclasses
import random
import time
import uuid
from collections.abc import Callable

import grpc

from pearl_runtime.log import get_logger
from pearl_runtime.pb import target_pb2, target_pb2_grpc
from pearl_runtime.rpc.server import GRPC_OPTIONS
from pearl_runtime.rpc.status import Overloaded, Unavailable

from gateway import wire
from gateway.target_health import TargetHealth
from gateway.job import LENGTH, STOP, Job, Progress, TargetInfo

log = get_logger(__name__)
STARTUP_GRACE_S = 30.0   # a target never seen up is "being waited for" (info) this long, then "unreachable"


class Flight:
    """One request in flight; iterate it for its Progress until the one that finishes it."""

    def __init__(self, job: Job):
        self.job = job
        self.received: list[int] = []   # every committed token, from whichever target
        self.forwards = 0               # reported by the current target (cumulative there)
        self.forwards_before = 0        # spent on targets that since failed
        self.target: "TargetConnection | None" = None
        self.resubmits = 0
        self.done = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._stashed: BaseException | None = None
        self._exhausted = False
        self.park_timer: asyncio.TimerHandle | None = None

    @property
    def request_id(self) -> str:
        return self.job.request_id

    def continuation(self) -> tuple[list[int], int]:
        """What a target must run: prompt + tokens already committed, and the budget left."""
        return list(self.job.prompt_ids) + self.received, self.job.params.max_tokens - len(self.received)

    def deliver(self, token_ids: list[int], finish: str | None, forwards: int, mode: str) -> None:
        # recorded on arrival, not on consumption: a resubmission must include queued tokens too
        self.received.extend(token_ids)
        self.forwards = forwards
        self.done = self.done or finish is not None
        self._queue.put_nowait(Progress(token_ids, finish, self.forwards_before + forwards, mode))

    def fail(self, exc: BaseException) -> None:
        self.done = True
        self._queue.put_nowait(exc)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Progress:
        """The next Progress, merged with any already queued behind it (one client message)."""
        if self._stashed is not None:
            raise self._stashed
        if self._exhausted:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        while item.finish_reason is None and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if isinstance(nxt, BaseException):
                self._stashed = nxt
                break
            item = Progress(item.token_ids + nxt.token_ids, nxt.finish_reason, nxt.target_forwards, nxt.mode)
        self._exhausted = item.finish_reason is not None
        return item


class Incompatible(Exception):
    """A target that serves another model or tokenizer than the gateway's."""


class TargetConnection:
    """One target: Info at connect, then a Serve stream; re-dials with backoff when it breaks."""

    def __init__(self, address: str, router: "TargetRouter", coalesce_s: float,
                 redial_s: tuple[float, float], info_timeout_s: float = 5.0):
        self.address = address
        self.info: TargetInfo | None = None
        self.live = False
        self.flights: dict[str, Flight] = {}
        self._router = router
        self._coalesce_s = coalesce_s
        self._redial_s = redial_s
        self._info_timeout_s = info_timeout_s
        self._submits: list[Flight] = []
        self._cancels: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._down_reported = False
        self._ever_up = False
        self._waiting_logged = False
        self._started_at = 0.0
        self.health = TargetHealth(address, lambda: router.readiness_changed(self), redial_s)

    @property
    def ready(self) -> bool:
        """New requests may be placed here."""
        return self.live and self.health.admits

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._task = asyncio.create_task(self._run(), name=f"target {self.address}")
        self.health.start()

    async def close(self) -> None:
        await self.health.close()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, flight: Flight) -> None:
        flight.target = self
        self.flights[flight.request_id] = flight
        self._submits.append(flight)
        self._wake.set()

    def cancel(self, flight: Flight) -> None:
        if self.flights.pop(flight.request_id, None) is None:
            return
        if flight in self._submits:
            self._submits.remove(flight)        # never sent, nothing to tell the target
        else:
            self._cancels.append(flight.request_id)
            self._wake.set()

    async def _run(self) -> None:
        delay = self._redial_s[0]
        while True:
            channel = grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS)
            try:
                stub = target_pb2_grpc.TargetStub(channel)
                info = wire.info_from_proto(
                    await stub.Info(target_pb2.InfoRequest(), timeout=self._info_timeout_s))
                self._router.check_compatible(info)
                # no deadline: the stream lives as long as the target; keepalive notices a dead peer
                call = stub.Serve()
                self.info, self.live, self._down_reported, self._ever_up = info, True, False, True
                delay = self._redial_s[0]
                log.info("target up", target=self.address, model=info.model, mode=info.mode)
                self._router.target_up(self)
                await self._pump(call)
                log.warning("target closed its stream", target=self.address)
            except grpc.aio.AioRpcError as e:
                self._report_down(e)
            except Incompatible as e:
                log.error("target refused", target=self.address, reason=str(e))
                delay = self._redial_s[1]
            except Exception:
                log.exception("target stream failed", target=self.address)
            finally:
                self._drop_all()
                await channel.close(grace=None)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._redial_s[1])

    def _report_down(self, e: grpc.aio.AioRpcError) -> None:
        """One warning per outage; the re-dials that follow are debug noise. A target that was
        never up, within its start-up grace, is only being waited for: `pearl up` and compose
        start the gateway beside the target, which listens seconds later."""
        if not self._ever_up and time.monotonic() - self._started_at < STARTUP_GRACE_S:
            if not self._waiting_logged:
                log.info("waiting for target", target=self.address, code=e.code().name)
                self._waiting_logged = True
            return
        emit = log.debug if self._down_reported and not self.live else log.warning
        self._down_reported = True
        emit("target stream broke" if self.live else "target unreachable",
             target=self.address, code=e.code().name, details=e.details())

    def _drop_all(self) -> None:
        was_live, self.live = self.live, False
        orphans = list(self.flights.values())
        self.flights.clear()
        self._submits.clear()
        self._cancels.clear()
        if orphans:
            self._router.target_down(self, orphans)
        if was_live:
            self._router.readiness_changed(self)

    async def _pump(self, call) -> None:
        reader = asyncio.create_task(self._read(call))
        writer = asyncio.create_task(self._write(call))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()       # re-raise whatever ended the stream
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            call.cancel()

    async def _read(self, call) -> None:
        while (out := await call.read()) is not grpc.aio.EOF:
            for msg in out.tokens.updates:
                self._dispatch(wire.update_from_proto(msg))

    def _dispatch(self, u: wire.Update) -> None:
        flight = self.flights.get(u.request_id)
        if flight is None:
            return                  # cancelled or already finished here
        if u.error is not None:
            del self.flights[u.request_id]
            flight.fail(u.error)
            return
        if u.finish_reason is not None:
            del self.flights[u.request_id]
        flight.deliver(u.token_ids, u.finish_reason, u.target_forwards, u.path or self.info.mode)

    async def _write(self, call) -> None:
        while True:
            await self._wake.wait()
            if self._submits and self._coalesce_s > 0:
                await asyncio.sleep(self._coalesce_s)   # let concurrent arrivals join this batch
            self._wake.clear()
            submits, self._submits = self._submits, []
            cancels, self._cancels = self._cancels, []
            if submits:
                items = [wire.submission(f.job, *f.continuation()) for f in submits]
                await call.write(target_pb2.TargetIn(submit=target_pb2.SubmitBatch(items=items)))
            if cancels:
                await call.write(target_pb2.TargetIn(cancel=target_pb2.CancelBatch(request_ids=cancels)))


class TargetRouter:
    """Admission, placement on the ready target with the fewest requests, and failover.

    `on_readiness` is called whenever a target's readiness may have changed, `on_resubmit`
    once per request moved off a target that died."""

    def __init__(self, addresses: list[str], *, coalesce_s: float = 0.002, max_in_flight: int = 1024,
                 park_timeout_s: float = 30.0, max_resubmits: int = 5, tokenizer_hash: str = "",
                 redial_s: tuple[float, float] = (0.05, 5.0),
                 on_readiness: Callable[[], None] = lambda: None, on_resubmit: Callable[[], None] = lambda: None):
        if not addresses:
            raise ValueError("at least one target address is required")
        self.targets = [TargetConnection(a, self, coalesce_s, redial_s) for a in addresses]
        self._max_in_flight = max_in_flight
        self._park_timeout_s = park_timeout_s
        self._max_resubmits = max_resubmits
        self._tokenizer_hash = tokenizer_hash
        self._flights: dict[str, Flight] = {}
        self._parked: dict[str, Flight] = {}    # waiting for any target to come up
        self._info: TargetInfo | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._on_readiness = on_readiness
        self._on_resubmit = on_resubmit

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def start(self) -> None:
        for t in self.targets:
            t.start()

    async def close(self) -> None:
        self._closing = True
        for f in list(self._flights.values()):
            f.fail(Unavailable("the gateway is shutting down"))
        await asyncio.gather(*(t.close() for t in self.targets))

    async def info(self, timeout_s: float | None = None) -> TargetInfo:
        """The served model, waiting (bounded) for the first target to answer Info."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s or self._park_timeout_s)
        except TimeoutError:
            raise Unavailable(f"no target reachable at {', '.join(t.address for t in self.targets)}") from None
        return self._info

    def ready_info(self) -> TargetInfo:
        """The served model while at least one target is ready; Unavailable otherwise, at once."""
        if self._info is None or not any(t.ready for t in self.targets):
            raise Unavailable(f"no target is ready (of {', '.join(t.address for t in self.targets)})")
        return self._info

    @property
    def model(self) -> str:
        """The served model's name once a target told it, else ''."""
        return self._info.model if self._info else ""

    @contextlib.asynccontextmanager
    async def open(self, job: Job):
        """Admit `job` and yield its Flight; leaving early cancels it on its target."""
        flight = self.admit(job)
        try:
            yield flight
        finally:
            self.release(flight)

    def admit(self, job: Job) -> Flight:
        if len(self._flights) >= self._max_in_flight:
            raise Overloaded(f"{len(self._flights)} requests in flight, the gateway's limit; retry later")
        if job.request_id in self._flights:
            # ids key the flights on a target's stream, so a client's reused id gets a suffix there
            unique = f"{job.request_id}.{uuid.uuid4().hex[:8]}"
            log.info("request id already in flight; submitting under a unique id", submitted_as=unique)
            job = dataclasses.replace(job, request_id=unique)
        flight = Flight(job)
        self._flights[job.request_id] = flight
        self._place(flight)
        return flight

    def release(self, flight: Flight) -> None:
        self._flights.pop(flight.request_id, None)
        self._unpark(flight)
        if not flight.done and flight.target is not None:
            flight.target.cancel(flight)
        flight.done = True

    def check_compatible(self, info: TargetInfo) -> None:
        if self._info is not None and info.model != self._info.model:
            raise Incompatible(f"serves {info.model!r}, other targets serve {self._info.model!r}")
        if self._tokenizer_hash and info.tokenizer_hash and info.tokenizer_hash != self._tokenizer_hash:
            raise Incompatible(f"tokenizer hash {info.tokenizer_hash} != the gateway's {self._tokenizer_hash}")

    def target_up(self, conn: TargetConnection) -> None:
        if self._info is None:
            self._info = conn.info
            self._ready.set()
        self.readiness_changed(conn)

    def readiness_changed(self, conn: TargetConnection) -> None:
        if conn.ready:
            for flight in list(self._parked.values()):
                self._unpark(flight)
                self._place(flight)
        self._on_readiness()

    def target_down(self, conn: TargetConnection, orphans: list[Flight]) -> None:
        for flight in orphans:
            if flight.done or flight.request_id not in self._flights:
                continue
            flight.forwards_before += flight.forwards
            flight.forwards = 0
            flight.target = None
            flight.resubmits += 1
            if self._closing:
                flight.fail(Unavailable("the gateway is shutting down"))
            elif flight.resubmits > self._max_resubmits:
                flight.fail(Unavailable(f"lost its target {flight.resubmits} times; giving up"))
            elif (reason := self._already_finished(flight, conn.info)) is not None:
                flight.deliver([], reason, 0, conn.info.mode)
            else:
                log.info("resubmitting", request_id=flight.request_id, lost=conn.address,
                         tokens_streamed=len(flight.received))
                self._on_resubmit()
                self._place(flight)

    def _already_finished(self, flight: Flight, info: TargetInfo) -> str | None:
        """A continuation that has nothing left to generate (the target died before saying so)."""
        prompt, remaining = flight.continuation()
        if remaining <= 0 or len(prompt) >= info.max_model_len:
            return LENGTH
        p = flight.job.params
        last = flight.received[-1] if flight.received else None
        if last is not None and (last in p.stop_token_ids or (not p.ignore_eos and last in info.eos_token_ids)):
            return STOP
        return None

    def _place(self, flight: Flight) -> None:
        ready = [t for t in self.targets if t.ready]
        if not ready:
            self._parked[flight.request_id] = flight
            flight.park_timer = asyncio.get_running_loop().call_later(
                self._park_timeout_s, self._expire, flight)
            return
        min(ready, key=lambda t: len(t.flights)).submit(flight)

    def _expire(self, flight: Flight) -> None:
        if self._parked.pop(flight.request_id, None) is not None:
            flight.fail(Unavailable(f"no target came up within {self._park_timeout_s:g} s"))

    def _unpark(self, flight: Flight) -> None:
        if self._parked.pop(flight.request_id, None) is not None and flight.park_timer:
            flight.park_timer.cancel()
