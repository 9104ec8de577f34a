"""The gateway's readiness: SERVING while at least one target is ready, NOT_SERVING once stopping."""
import asyncio
import contextlib

from pearl_runtime.rpc.health import Health

from gateway.metrics import GatewayMetrics

GATEWAY_SERVICE = "pearl.v1.Gateway"


class Readiness:
    """Follows the targets' readiness into grpc health and the target-ready gauge.

    `changed()` is the router's synchronous hook; the health update is async, so one task
    applies the latest state after each change."""

    def __init__(self, health: Health, metrics: GatewayMetrics):
        self.health = health
        self._metrics = metrics
        self._targets: list = []         # the router's list: replicas come and go in it
        self._shown: set[str] = set()     # addresses with a target-ready series
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    def changed(self) -> None:
        self._changed.set()

    def watch(self, targets: list) -> None:
        self._targets = targets
        self._task = asyncio.create_task(self._run(), name="gateway readiness")
        self._changed.set()

    async def stopping(self) -> None:
        """Shutdown begun: readiness NOT_SERVING for good, before the server stops."""
        if self._task:      # no later target change may flip it back
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.health.stopping()

    async def _run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            for t in self._targets:
                self._metrics.target_ready(t.address, t.ready)
            now = {t.address for t in self._targets}
            for gone in self._shown - now:
                self._metrics.target_gone(gone)
            self._shown = now
            await self.health.set_ready(any(t.ready for t in self._targets), "no ready target")
