"""Routing to target replicas: admission, placement on the live target with the fewest requests,
and resubmission of every in-flight request when a target's stream breaks.

The gateway keeps each request's prompt and every token a target committed for it. When a
stream breaks, the request continues elsewhere as prompt + those tokens with the remaining
budget, so the client sees neither a duplicate nor a gap.
"""
import asyncio
import contextlib


from pearl_runtime.errors import InvalidRequest
from pearl_runtime.rpc.status import Overloaded, Unavailable

from gateway.connection import Incompatible, TargetConnection
from gateway.flight import Flight
from gateway.job import LENGTH, STOP, Job, TargetInfo
from pearl_runtime.log import get_logger

log = get_logger(__name__)


class TargetRouter:
    """Admission, placement on the live target with the fewest requests, and failover."""

    def __init__(self, addresses: list[str], *, coalesce_s: float = 0.002, max_in_flight: int = 1024,
                 park_timeout_s: float = 30.0, max_resubmits: int = 5, tokenizer_hash: str = "",
                 redial_s: tuple[float, float] = (0.05, 5.0)):
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

    @contextlib.asynccontextmanager
    async def open(self, job: Job):
        """Admit `job` and yield its Flight; leaving early cancels it on its target."""
        flight = self.admit(job)
        try:
            yield flight
        finally:
            self.release(flight)

    def admit(self, job: Job) -> Flight:
        if job.request_id in self._flights:
            raise InvalidRequest("request_id", f"{job.request_id!r} is already in flight")
        if len(self._flights) >= self._max_in_flight:
            raise Overloaded(f"{len(self._flights)} requests in flight, the gateway's limit; retry later")
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
        for flight in list(self._parked.values()):
            self._unpark(flight)
            self._place(flight)

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
        live = [t for t in self.targets if t.live]
        if not live:
            self._parked[flight.request_id] = flight
            flight.park_timer = asyncio.get_running_loop().call_later(
                self._park_timeout_s, self._expire, flight)
            return
        min(live, key=lambda t: len(t.flights)).submit(flight)

    def _expire(self, flight: Flight) -> None:
        if self._parked.pop(flight.request_id, None) is not None:
            flight.fail(Unavailable(f"no target came up within {self._park_timeout_s:g} s"))

    def _unpark(self, flight: Flight) -> None:
        if self._parked.pop(flight.request_id, None) is not None and flight.park_timer:
            flight.park_timer.cancel()
