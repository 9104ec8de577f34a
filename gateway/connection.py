"""TargetConnection: one target replica (one resolved address).

Info at connect, then one long-lived Serve stream that carries coalesced submissions and cancels
one way and committed tokens the other; re-dialed with backoff. A target is ready while its stream
is live and its grpc health says SERVING (gateway/target_health.py); new requests go only to ready
targets, requests already on a target that turns NOT_SERVING (draining) finish there.

A replica whose address left its name's DNS answer is retired: no new requests, the ones on it
finish there within a grace, then it closes and whatever is left is resubmitted elsewhere (as
when a target dies).
"""
import asyncio
import contextlib
import random
import time
from collections.abc import Callable

import grpc

from pearl_runtime.log import get_logger
from pearl_runtime.pb import target_pb2, target_pb2_grpc
from pearl_runtime.rpc.security import PLAINTEXT, Dialer

from gateway import wire
from gateway.flight import Flight
from gateway.job import TargetInfo
from gateway.target_health import TargetHealth

log = get_logger(__name__)
STARTUP_GRACE_S = 30.0   # a target never seen up is "being waited for" (info) this long, then "unreachable"


class Incompatible(Exception):
    """A target that serves another model or tokenizer than the gateway's."""


INCOMPATIBLE_RETRY_S = 30.0


class TargetConnection:
    """One target: Info at connect, then a Serve stream; re-dials with backoff when it breaks."""

    # router: the TargetRouter that owns it (gateway/targets.py imports this module, not back)
    def __init__(self, address: str, router, coalesce_s: float,
                 redial_s: tuple[float, float], info_timeout_s: float = 5.0, dialer: Dialer = PLAINTEXT):
        self.address = address
        self._dialer = dialer
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
        self.retiring = False
        self._retire_task: asyncio.Task | None = None
        self.health = TargetHealth(address, lambda: router.readiness_changed(self), redial_s, dialer)

    @property
    def ready(self) -> bool:
        """New requests may be placed here."""
        return self.live and self.health.admits and not self.retiring

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._task = asyncio.create_task(self._run(), name=f"target {self.address}")
        self.health.start()

    def retire(self, grace_s: float, on_closed: Callable[["TargetConnection"], None]) -> None:
        """No new requests from now; close once the ones here finished or `grace_s` passed
        (closing hands what is left back to the router, which resubmits it), then `on_closed`."""
        self.retiring = True
        self._retire_task = asyncio.create_task(self._retire(grace_s, on_closed), name=f"retire {self.address}")

    async def _retire(self, grace_s: float, on_closed) -> None:
        deadline = time.monotonic() + grace_s
        while self.flights and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = len(self.flights)
        await self.close()
        log.info("target removed", target=self.address, resubmitted=left)
        on_closed(self)

    async def close(self) -> None:
        if self._retire_task and self._retire_task is not asyncio.current_task():
            self._retire_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retire_task
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
            channel = self._dialer.channel(self.address)
            try:
                stub = target_pb2_grpc.TargetStub(channel)
                token = self._dialer.metadata
                info = wire.info_from_proto(
                    await stub.Info(target_pb2.InfoRequest(), timeout=self._info_timeout_s, metadata=token))
                self._router.check_compatible(info)
                # no deadline: the stream lives as long as the target; keepalive notices a dead peer
                call = stub.Serve(metadata=token)
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
                delay = INCOMPATIBLE_RETRY_S      # it will not change by itself soon
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

