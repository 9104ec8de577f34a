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
from pearl_runtime.rpc.server import bind, new_server, stop_serving
from pearl_runtime.rpc.status import Unavailable
from pearl_runtime.spec.round_model import HEAD_START_QUORUM
from target_service.rounds import GatewayStream, TargetService
from target_service.stats import TargetCollector, metrics_message

log = get_logger(__name__)

SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["Target"].full_name
HUNG_STEP_S = 120.0   # a round running this long marks the target NOT_SERVING until it ends


class TargetServicer(target_pb2_grpc.TargetServicer):
    """Converts and delegates. `service` is None while the engine loads (calls: UNAVAILABLE)."""

    def __init__(self, service: TargetService | None = None, model_name: str = ""):
        self.service = service
        self.model_name = model_name   # what Info reports: --served-model-name, else the directory's name

    def _ready(self) -> TargetService:
        if self.service is None:
            raise Unavailable("the target is starting (loading weights, capturing graphs)")
        return self.service

    async def Info(self, request, context):
        s = self._ready()
        return target_pb2.ModelInfo(model=self.model_name or s.cfg.model, vocab_size=s.core.runner.model_cfg.vocab_size,
                                    max_model_len=s.core.max_model_len, eos_token_ids=list(s.core.eos_ids),
                                    tokenizer_hash=s.tok_hash, mode=s.mode)

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
        try:
            while (msg := await stream.out.get()) is not None:
                yield msg
        finally:
            reader.cancel()
            service.drop_stream(stream)   # the gateway went away: free its sequences


async def watch_steps(service: TargetService, health: Health, hung_s: float = HUNG_STEP_S) -> None:
    """Readiness follows the round loop: NOT_SERVING while one round has run past `hung_s`."""
    while True:
        started = service.last_step_at
        if started is not None and time.monotonic() - started > hung_s:
            await health.set_ready(False, f"a round has run for over {hung_s:.0f} s")
        elif not health.serving and health.reason.startswith("a round"):
            await health.set_ready(True)
        await asyncio.sleep(1.0)


async def serve(cfg: EngineConfig, host: str = "127.0.0.1", port: int = 50051, mode: str = "pearl",
                draft_address: str | None = None, gamma: int | None = 4, ready=None, ar_steps: int = 4,
                max_gamma: int = 16, head_start: int = -1, head_start_quorum: float = HEAD_START_QUORUM,
                device_tokens: bool = True, round_datagrams: bool = True, metrics_port: int = 0,
                served_model_name: str | None = None, health_port: int = 0,
                drain_timeout_s: float = 30.0, max_waiting: int = 1024) -> None:
    """Serve until cancelled. The port answers health (NOT_SERVING) while the engine loads;
    `ready(port)` is called once it serves. Cancelled, it drains: NOT_SERVING at once, the
    requests in flight finish within `drain_timeout_s`, then the port closes."""
    if cfg.device == "cpu":
        torch.set_num_threads(max(1, int(cfg.extra.get("threads", 1))))
    tracing.setup("target")
    model_name = served_model_name or Path(cfg.model).name or cfg.model
    servicer, health, server = TargetServicer(model_name=model_name), Health(SERVICE_NAME), new_server()
    target_pb2_grpc.add_TargetServicer_to_server(servicer, server)
    health.add_to(server)
    bound = bind(server, host, port)
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
        registry = CollectorRegistry()
        service.collector = TargetCollector(service, registry, model_name)
        endpoint = serve_metrics(registry, host, metrics_port)
        gc_pauses.freeze_and_watch()   # the start-up heap out of the collector's walks
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(watch_steps(service, health))]
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
