"""The gateway's targets: admission, placement on the ready replica with the fewest requests, failover.

TargetRouter admits requests, places each on the ready target with the fewest requests, and
resubmits every in-flight request when a target's stream breaks (gateway/flight.py keeps what a
resubmission needs). It holds one TargetConnection per target address (gateway/connection.py);
the resolver (gateway/resolver.py) adds and removes addresses as each --targets name resolves.
"""
import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections.abc import Callable
from pathlib import PurePath

from pearl_runtime.log import get_logger
from pearl_runtime.rpc.status import Overloaded, Unavailable

from pearl_runtime.rpc.security import PLAINTEXT, Dialer
from gateway.connection import STARTUP_GRACE_S, Incompatible, TargetConnection  # noqa: F401  (re-exported)
from gateway.flight import Flight
from gateway.job import LENGTH, STOP, Job, TargetInfo

log = get_logger(__name__)
RETIRE_GRACE_S = 30.0   # a replica gone from DNS finishes its requests this long, then the rest move


def public_model_name(reported: str, served_model_name: str | None = None) -> str:
    """The model name clients see: --served-model-name, else what the targets report, a path
    shortened to its directory's name (a target without --served-model-name reports its --model)."""
    if served_model_name:
        return served_model_name
    if "/" in reported or os.sep in reported:
        return PurePath(reported.rstrip("/" + os.sep)).name or reported
    return reported


# first and longest wait between dials of a target that is down: a dial to a stopped port fails
# at once, so short retries are cheap, and a restarted target gets traffic within ~0.5 s of
# its readiness
REDIAL_S = (0.05, 0.5)


class TargetRouter:
    """Admission, placement on the ready target with the fewest requests, and failover.

    `on_readiness` is called whenever a target's readiness may have changed, `on_resubmit`
    once per request moved off a target that died."""

    def __init__(self, addresses: list[str] = (), *, coalesce_s: float = 0.002, max_in_flight: int = 1024,
                 park_timeout_s: float = 30.0, max_resubmits: int = 5, tokenizer_hash: str = "",
                 redial_s: tuple[float, float] = REDIAL_S, retire_grace_s: float = RETIRE_GRACE_S,
                 sources: list[str] | None = None, served_model_name: str | None = None,
                 on_readiness: Callable[[], None] = lambda: None, on_resubmit: Callable[[], None] = lambda: None,
                 dialer: Dialer = PLAINTEXT):
        self.served_model_name = served_model_name or None
        self.dialer = dialer     # TLS and token of the hop to every target
        self._coalesce_s = coalesce_s
        self._redial_s = redial_s
        self._retire_grace_s = retire_grace_s
        self.sources = list(sources or addresses)     # what --targets named: for messages
        self.targets: list[TargetConnection] = []     # one per address; the list object is shared
        self._retiring: set[TargetConnection] = set()
        self._started = False
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
        for a in addresses:
            self.add(a)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def start(self) -> None:
        self._started = True
        for t in self.targets:
            t.start()

    async def close(self) -> None:
        self._closing = True
        for f in list(self._flights.values()):
            f.fail(Unavailable("the gateway is shutting down"))
        await asyncio.gather(*(t.close() for t in [*self.targets, *self._retiring]))

    @property
    def addresses(self) -> list[str]:
        return [t.address for t in self.targets]

    def add(self, address: str) -> TargetConnection:
        """One more replica (a connection and its health watch), started if the router is."""
        conn = TargetConnection(address, self, self._coalesce_s, self._redial_s, dialer=self.dialer)
        self.targets.append(conn)
        if self._started:
            conn.start()
        self._on_readiness()
        return conn

    def remove(self, address: str) -> None:
        """Retire the replica at `address`: no new requests; its requests finish there within the
        retire grace, then it closes and what is left is resubmitted to the others."""
        conn = next((t for t in self.targets if t.address == address), None)
        if conn is None:
            return
        self.targets.remove(conn)
        self._retiring.add(conn)
        conn.retire(self._retire_grace_s, self._retired)
        self._on_readiness()

    def _retired(self, conn: TargetConnection) -> None:
        self._retiring.discard(conn)
        self._on_readiness()

    async def info(self, timeout_s: float | None = None) -> TargetInfo:
        """The served model, waiting (bounded) for the first target to answer Info."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s or self._park_timeout_s)
        except TimeoutError:
            raise Unavailable(f"no target reachable at {self._where()}") from None
        return self._public(self._info)

    def ready_info(self) -> TargetInfo:
        """The served model while at least one target is ready; Unavailable otherwise, at once."""
        if self._info is None or not any(t.ready for t in self.targets):
            raise Unavailable(f"no target is ready (of {self._where()})")
        return self._public(self._info)

    def _public(self, info: TargetInfo) -> TargetInfo:
        """`info` as clients see it: the model under its served name (never a path)."""
        return dataclasses.replace(info, model=public_model_name(info.model, self.served_model_name))

    def _where(self) -> str:
        shown = self.addresses if self.addresses != self.sources else []
        return ", ".join(self.sources) + (f" ({', '.join(shown)})" if shown else "")

    @property
    def model(self) -> str:
        """The served model's name (as clients see it) once a target told it, else --served-model-name or ''."""
        return public_model_name(self._info.model, self.served_model_name) if self._info else \
            (self.served_model_name or "")

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
