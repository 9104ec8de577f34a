"""One target's readiness as its grpc.health.v1 Watch stream reports it, on its own channel.

A target without grpc health (UNIMPLEMENTED, or the pearl service unknown to its health) is an
older one: it is admitted on its connection state alone, and the log says so once.
"""
import asyncio
import contextlib
import random
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pearl_runtime.log import get_logger
from pearl_runtime.rpc.security import PLAINTEXT, Dialer

log = get_logger(__name__)
TARGET_SERVICE = "pearl.v1.Target"
_NAME = health_pb2.HealthCheckResponse.ServingStatus.Name


class TargetHealth:
    """`status`: the last health status name, or UNREACHABLE; `legacy`: the target has no health."""

    def __init__(self, address: str, on_change: Callable[[], None], redial_s: tuple[float, float],
                 dialer: Dialer = PLAINTEXT):
        """dialer: the Serve stream's, so the watch goes over the same TLS (it needs no token)."""
        self.address = address
        self._dialer = dialer
        self.status = "UNKNOWN"
        self.legacy = False
        self._on_change = on_change
        self._redial_s = redial_s
        self._task: asyncio.Task | None = None

    @property
    def admits(self) -> bool:
        """New requests may go to this target (given a live Serve stream)."""
        return self.legacy or self.status == "SERVING"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"health {self.address}")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = self._redial_s[0]
        while True:
            channel = self._dialer.channel(self.address)
            try:
                # no deadline: the stream lives as long as the target; keepalive notices a dead peer
                call = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service=TARGET_SERVICE))
                async for reply in call:
                    delay = self._redial_s[0]
                    status = _NAME(reply.status)
                    self._set(status, legacy=status == "SERVICE_UNKNOWN")
                self._set("UNREACHABLE", legacy=False)      # the target ended the stream: it is going away
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._set("UNIMPLEMENTED", legacy=True)
                    delay = self._redial_s[1]               # ask again now and then: it may be upgraded
                elif e.code() == grpc.StatusCode.UNAVAILABLE:
                    self._set("UNREACHABLE", legacy=False)
                else:       # a health service that answers, but not the watch: never ready
                    self._set(e.code().name, legacy=False, details=e.details())
            finally:
                await channel.close(grace=None)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._redial_s[1])

    def _set(self, status: str, legacy: bool, details: str = "") -> None:
        if (status, legacy) == (self.status, self.legacy):
            return
        was_legacy, self.status, self.legacy = self.legacy, status, legacy
        if legacy and not was_legacy:
            log.warning("target has no grpc health; routing by its connection state", target=self.address,
                        health=status)
        elif details:
            log.warning("target health watch failed", target=self.address, code=status, details=details)
        elif not legacy:
            emit = log.debug if status == "UNREACHABLE" else log.info
            emit("target health", target=self.address, status=status, path="grpc.health.v1 Watch")
        self._on_change()
