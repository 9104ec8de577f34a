"""The Target gRPC service: a thin servicer over the round loop (target_service/rounds.py),
with standard health, reflection and Prometheus metrics around it."""
import asyncio
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from pearl_runtime import gc_pauses, tracing
from pearl_runtime.config import EngineConfig
from pearl_runtime.log import get_logger
from pearl_runtime.metrics_http import serve_metrics
from pearl_runtime.pb import target_pb2, target_pb2_grpc
from pearl_runtime.rpc.health import Health
from pearl_runtime.rpc.security import Dialer, serving_credentials
from pearl_runtime.rpc.server import bind, new_server, stop_serving
from pearl_runtime.rpc.status import Unavailable
from pearl_runtime.spec.round_model import HEAD_START_QUORUM
from target_service.rounds import TargetService
from target_service.streams import GatewayStream
from target_service.stats import TargetCollector, metrics_message

log = get_logger(__name__)

SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["Target"].full_name
# the hung-round watchdog: a round running HUNG_SLOWDOWN times the mean round, and at least
# HUNG_FLOOR_S (a first shape's kernel compile, a long prefill), is hung
HUNG_SLOWDOWN = 100.0
HUNG_FLOOR_S = 30.0
HUNG = object()       # put on a stream's queue: end that Serve call, its requests go elsewhere


class TargetServicer(target_pb2_grpc.TargetServicer):
    """Converts and delegates. `service` is None while the engine loads (calls: UNAVAILABLE)."""

    def __init__(self, service: TargetService | None = None, model_name: str = ""):
        self.service = service
        self.streams: dict[int, GatewayStream] = {}   # the Serve calls open now, by id
        self.model_name = model_name   # what Info reports: --served-model-name, else the directory's name

    def _ready(self) -> TargetService:
        if self.service is None:
            raise Unavailable("the target is starting (loading weights, capturing graphs)")
        return self.service

    async def Info(self, request, context):
        s = self._ready()
        return target_pb2.ModelInfo(model=self.model_name or s.cfg.model, vocab_size=s.core.runner.model_cfg.vocab_size,
                                    max_model_len=s.core.max_model_len, eos_token_ids=list(s.core.eos_ids),
                                    tokenizer_hash=s.tok_hash, mode=s.policy.shown_mode(s.last_path),
                                    draft_connected=s.link is not None and s.link.connected,
                                    draft_address=s.link.address if s.link is not None else "")

    async def Metrics(self, request, context):
        return metrics_message(self._ready())

    async def Serve(self, request_iterator, context):
        service, stream = self._ready(), GatewayStream()

        async def read():
            try:
                async for msg in request_iterator:
                    kind = msg.WhichOneof("kind")
                    if kind == "submit":
                        for item in msg.submit.items:
                            service.submit(stream, item)
                    elif kind == "cancel":
                        for rid in msg.cancel.request_ids:
                            service.cancel(stream, rid)
            finally:
                stream.out.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        self.streams[id(stream)] = stream
        try:
            while (msg := await stream.out.get()) is not None:
                if msg is HUNG:
                    raise Unavailable("the target's round is hung; its requests go to another target")
                yield msg
        finally:
            self.streams.pop(id(stream), None)
            reader.cancel()
            service.drop_stream(stream)   # the gateway went away: free its sequences


def hung_after_s(service: TargetService, floor_s: float = HUNG_FLOOR_S) -> float:
    """How long a round may run before the watchdog calls it hung."""
    rounds = service.stats.rounds
    mean_s = service.stats.round_ms / rounds / 1e3 if rounds else 0.0
    return max(floor_s, HUNG_SLOWDOWN * mean_s)


async def watch_steps(service: TargetService, health: Health, servicer: "TargetServicer",
                      hung_after=hung_after_s, poll_s: float = 1.0) -> None:
    """The hung-round watchdog. Past `hung_after(service)` seconds in one round: NOT_SERVING,
    and every Serve call ends UNAVAILABLE, so the gateway resubmits its requests elsewhere
    (the hung round's results, if it ever ends, go nowhere: its streams are gone). SERVING
    again once the loop moves."""
    stuck_at = None           # last_step_at of the round called hung
    while True:
        started, limit = service.last_step_at, hung_after(service)
        if stuck_at is not None:
            if started != stuck_at:
                stuck_at = None
                log.warning("round loop moving again: SERVING")
                await health.set_ready(True)
        elif started is not None and time.monotonic() - started > limit:
            stuck_at = started
            log.error("round hung: NOT_SERVING, handing its requests back to the gateways",
                      seconds=round(time.monotonic() - started, 1), limit_s=round(limit, 1),
                      streams=len(servicer.streams))
            await health.set_ready(False, f"a round has run for over {limit:.0f} s")
            for stream in list(servicer.streams.values()):
                stream.out.put_nowait(HUNG)
        await asyncio.sleep(poll_s)


async def serve(cfg: EngineConfig, host: str = "127.0.0.1", port: int = 50051, mode: str = "pearl",
                draft_address: str | None = None, gamma: int | None = 4, ready=None, ar_steps: int = 4,
                max_gamma: int = 16, head_start: int = -1, head_start_quorum: float = HEAD_START_QUORUM,
                device_tokens: bool = True, round_datagrams: bool = True, metrics_port: int = 0,
                served_model_name: str | None = None, health_port: int = 0,
                drain_timeout_s: float = 30.0, max_waiting: int = 1024,
                hung_round_floor_s: float = HUNG_FLOOR_S, auth_token: str | None = None,
                tls_cert: str | None = None, tls_key: str | None = None, tls_client_ca: str | None = None,
                draft_tls_ca: str | None = None, draft_tls_cert: str | None = None,
                draft_tls_key: str | None = None, draft_auth_token: str | None = None) -> None:
    """Serve until cancelled. `auth_token`, `tls_*`: what callers must present (rpc/auth.py,
    rpc/security.py); `draft_*`: how the draft is dialed (its token defaults to `auth_token`). The port answers health (NOT_SERVING) while the engine loads;
    `ready(port)` is called once it serves. Cancelled, it drains: NOT_SERVING at once, the
    requests in flight finish within `drain_timeout_s`, then the port closes."""
    if cfg.device == "cpu":
        torch.set_num_threads(max(1, int(cfg.extra.get("threads", 1))))
    tracing.setup("target")
    model_name = served_model_name or Path(cfg.model).name or cfg.model
    credentials = serving_credentials(tls_cert, tls_key, tls_client_ca)
    draft_dialer = Dialer(draft_tls_ca, draft_tls_cert, draft_tls_key, draft_auth_token or auth_token)
    servicer, health, server = TargetServicer(model_name=model_name), Health(SERVICE_NAME), new_server(auth_token)
    target_pb2_grpc.add_TargetServicer_to_server(servicer, server)
    health.add_to(server)
    bound = bind(server, host, port, credentials)
    await server.start()
    await health.open_plain_port(host, health_port)
    log.info("target port open; loading", address=f"{host}:{bound}", model=cfg.model, mode=mode)
    service = tasks = endpoint = None
    try:
        # the engine loads on a thread, so health answers meanwhile
        service = await asyncio.get_running_loop().run_in_executor(None, lambda: TargetService(
            cfg, mode, draft_address, gamma, ar_steps=ar_steps, max_gamma=max_gamma, head_start=head_start,
            head_start_quorum=head_start_quorum, device_tokens=device_tokens, round_datagrams=round_datagrams,
            max_waiting=max_waiting))
        if service.link is not None:
            service.link.use(draft_dialer)
        registry = CollectorRegistry()
        service.collector = TargetCollector(service, registry, model_name)
        endpoint = serve_metrics(registry, host, metrics_port)
        gc_pauses.freeze_and_watch()   # the start-up heap out of the collector's walks
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(watch_steps(
            service, health, servicer, lambda svc: hung_after_s(svc, hung_round_floor_s)))]
        servicer.service = service
        await health.set_ready(True)
        log.info("target serving", address=f"{host}:{bound}", mode=mode, draft=draft_address,
                 gamma="auto" if gamma is None else gamma, model=cfg.model,
                 **({"head_start": head_start, "head_start_quorum": head_start_quorum} if mode == "pearl" else {}))
        if ready:
            ready(bound)
        await server.wait_for_termination()
    finally:
        try:
            # the round loop runs on while the requests in flight finish
            drained = None if tasks is None else (lambda: not service.core.has_work() and not service.inbox)
            # after the drain, a moment for the last TokenBatches to go out (what is lost, the gateway resubmits)
            await stop_serving(server, health, grace_s=0.2, drained=drained, drain_timeout_s=drain_timeout_s)
        finally:
            for task in tasks or ():
                task.cancel()
            if service is not None:
                service.close()
            if endpoint is not None:
                endpoint.close()
            tracing.shutdown()
