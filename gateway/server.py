"""The Gateway gRPC service: validate, route to a target, stream text deltas, then final stats."""
import asyncio
import contextlib
import dataclasses
import inspect
import signal
import uuid
from dataclasses import dataclass

import grpc
import structlog
from prometheus_client import CollectorRegistry

from pearl_runtime.pb import gateway_pb2, gateway_pb2_grpc
from pearl_runtime import gc_pauses, tracing
from pearl_runtime.errors import InvalidRequest, PearlError
from pearl_runtime.rpc.identity import tokenizer_hash
from pearl_runtime.rpc.security import Dialer, serving_credentials
from pearl_runtime.log import setup as setup_logging
from pearl_runtime.rpc.server import bind, run_async
from pearl_runtime.metrics_http import MetricsEndpoint, serve_metrics
from pearl_runtime.rpc.health import Health
from pearl_runtime.rpc.status import abort
from pearl_runtime.validation import check_request_id

from gateway import wire
from gateway.generation import Delta, Generation
from gateway.http import HttpFront, OpenAIFront, serve_http
from gateway.kserve import add_kserve_servicer
from gateway.metrics import GatewayMetrics
from gateway.readiness import GATEWAY_SERVICE, Readiness
from gateway.resolver import GetAddrInfo, Resolver, parse_targets
from gateway.targets import RETIRE_GRACE_S, TargetRouter
from gateway.tokenizer import GatewayTokenizer
from gateway.public_port import Undecodable, add_gateway_servicer, public_server
from pearl_runtime.log import get_logger

log = get_logger(__name__)
STOPPING_WINDOW_S = 0.5     # on SIGTERM, readiness answers NOT_SERVING this long before the port closes


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """pearl.v1.Gateway: converts its messages to and from gateway/generation.py's path."""

    def __init__(self, generation: Generation):
        self._generation = generation
        self._router = generation.router

    async def Generate(self, request, context):
        meta = dict(context.invocation_metadata() or ())
        try:
            request_id, refused = _request_id(request, meta), None
        except InvalidRequest as e:   # answered below, under an id of our own
            request_id, refused = uuid.uuid4().hex, e
        # grpc aio runs each RPC in a fresh context, so the binding ends with this call
        structlog.contextvars.bind_contextvars(request_id=request_id)
        await context.send_initial_metadata((("x-request-id", request_id),))
        if refused is not None:
            self._generation.refused(refused)
            await abort(context, refused)

        def ended() -> str:     # why a call left early: its deadline, else the client's cancel
            left = context.time_remaining()
            return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"

        try:
            req = dataclasses.replace(wire.request_from_proto(request), request_id=request_id)
            async with contextlib.aclosing(self._generation.stream(req, meta.get("traceparent", ""),
                                                                   ended)) as outs:
                async for out in outs:
                    yield (wire.delta(request_id, out.text, out.token_ids) if isinstance(out, Delta)
                           else wire.final(request_id, out.text, out.finish_reason, out.stats))
        except PearlError as e:
            await abort(context, e)

    async def ListModels(self, request, context):
        try:
            info = self._router.ready_info()
        except PearlError as e:
            await abort(context, e)
        return gateway_pb2.ListModelsResponse(models=[info.model])


def _request_id(request, meta: dict) -> str:
    """The client's id (the x-request-id header, else the field), checked before anything
    echoes it; "" when it gave none. An undecodable request is refused here."""
    if isinstance(request, Undecodable):
        raise InvalidRequest("request", f"is not a {request.message_type} (its bytes do not decode)")
    if header := meta.get("x-request-id"):
        return check_request_id(header, "x-request-id")
    return check_request_id(request.request_id) or uuid.uuid4().hex


@dataclass
class RunningGateway:
    server: grpc.aio.Server
    router: TargetRouter
    host: str
    port: int
    readiness: Readiness
    metrics: GatewayMetrics
    resolver: Resolver
    metrics_endpoint: MetricsEndpoint | None = None     # None: /metrics off
    http: HttpFront | None = None                       # None: the OpenAI HTTP front off

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint else None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self, grace_s: float | None = 1.0, window_s: float = 0.0) -> None:
        """Readiness NOT_SERVING first, then `window_s` for probes and balancers to see it while
        the port still answers, then stop serving (in-flight calls get `grace_s`)."""
        await self.readiness.stopping()
        await asyncio.sleep(window_s)
        await self.server.stop(grace_s)
        if self.http:
            await self.http.close()
        await self.readiness.health.close_plain_port()
        await self.resolver.close()
        await self.router.close()
        if self.metrics_endpoint:
            self.metrics_endpoint.close()


async def serve_gateway(host: str = "127.0.0.1", port: int = 0, targets: list[str] | str = (),
                        model_dir: str | None = None, *, tokenizer=None, coalesce_ms: float = 2.0,
                        max_in_flight: int = 1024, park_timeout_s: float = 30.0,
                        max_resubmits: int = 5, tls_cert: str | None = None, tls_key: str | None = None,
                        auth_token: str | None = None, tls_client_ca: str | None = None,
                        target_tls_ca: str | None = None, target_tls_cert: str | None = None,
                        target_tls_key: str | None = None, target_auth_token: str | None = None,
                        metrics_port: int = 0,
                        resolve_interval_s: float = 5.0, served_model_name: str | None = None,
                        health_port: int = 0, retire_grace_s: float = RETIRE_GRACE_S,
                        http_port: int | None = None, getaddrinfo: GetAddrInfo | None = None) -> RunningGateway:
    """Start a gateway over `targets` (HOST:PORT each, or one comma-separated string; a HOST
    that is a DNS name stands for every address it resolves to, re-resolved every
    `resolve_interval_s`); port 0 picks a free one. The tokenizer comes from `model_dir` (the
    target's model directory; tokenizers + Jinja2, no transformers or torch) unless given.
    `served_model_name`: the model name clients see (default: what the targets report).
    `metrics_port`: serve /metrics on `host` there (0: off). `http_port`: the OpenAI-compatible
    HTTP front there (0: a free port; None: off). `getaddrinfo`: the name lookup
    (default: the event loop's)."""
    entries = parse_targets(targets)
    if tokenizer is None:
        if model_dir is None:
            raise ValueError("model_dir (or tokenizer) is required for tokenization")
        tokenizer = GatewayTokenizer.from_dir(model_dir)
    credentials = serving_credentials(tls_cert, tls_key, tls_client_ca)
    # the targets' token defaults to the gateway's own: one secret serves a whole stack
    dialer = Dialer(target_tls_ca, target_tls_cert, target_tls_key, target_auth_token or auth_token)
    metrics = GatewayMetrics(CollectorRegistry(), served_model_name or None)
    health = Health(GATEWAY_SERVICE)
    readiness = Readiness(health, metrics)
    router = TargetRouter(coalesce_s=coalesce_ms / 1e3, max_in_flight=max_in_flight,
                          park_timeout_s=park_timeout_s, max_resubmits=max_resubmits,
                          tokenizer_hash=tokenizer_hash(tokenizer), retire_grace_s=retire_grace_s,
                          sources=[e.text for e in entries], served_model_name=served_model_name,
                          on_readiness=readiness.changed, on_resubmit=metrics.resubmitted, dialer=dialer)
    resolver = Resolver(entries, router, resolve_interval_s, getaddrinfo)
    server = public_server(auth_token)
    generation = Generation(router, tokenizer, metrics)     # the one path every front below calls
    add_gateway_servicer(GatewayServicer(generation), server)
    add_kserve_servicer(generation, health, server)
    health.add_to(server)
    port = bind(server, host, port, credentials)
    bound_metrics = serve_metrics(metrics.registry, host, metrics_port)
    await router.start()
    await resolver.start()
    readiness.watch(router.targets)
    gc_pauses.freeze_and_watch()   # the start-up heap out of the collector's walks
    await server.start()
    await health.open_plain_port(host, health_port)
    http = None if http_port is None else \
        await serve_http(OpenAIFront(generation, health, metrics.registry, auth_token), host, http_port)
    log.info("gateway listening", address=f"{host}:{port}", targets=router.sources, replicas=router.addresses,
             tls=bool(tls_cert), auth=bool(auth_token))
    if host not in ("127.0.0.1", "localhost", "::1") and not (tls_cert and auth_token):
        log.warning("gateway reachable beyond loopback without TLS and a bearer token", host=host)
    return RunningGateway(server, router, host, port, readiness, metrics, resolver, bound_metrics, http)


_SERVE_ARGS = set(inspect.signature(serve_gateway).parameters) - {"getaddrinfo"}


def run(args=None, /, **kwargs) -> None:
    """Blocking entry point for `pearl gateway`: serve until SIGINT/SIGTERM.

    Takes an argparse Namespace and/or keyword arguments named like serve_gateway's
    (host, port, targets, model_dir, coalesce_ms, max_in_flight, park_timeout_s,
    max_resubmits, tls_cert, tls_key, auth_token, metrics_port, resolve_interval_s,
    served_model_name, tokenizer: one already loaded) plus log_level; other Namespace
    attributes are ignored."""
    opts = {**(vars(args) if args is not None else {}), **kwargs}
    setup_logging("gateway", opts.get("log_level"), opts.get("log_format"))
    tracing.setup("gateway")
    run_async(_serve_until_signal({k: v for k, v in opts.items() if k in _SERVE_ARGS and v is not None},
                                  opts.get("drain_timeout_s", 30.0)))


async def _serve_until_signal(opts: dict, drain_timeout_s: float) -> None:
    gateway = await serve_gateway(**opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway stopping")
    # no new calls from here; the streams in flight get the drain timeout to finish
    await gateway.stop(grace_s=drain_timeout_s, window_s=STOPPING_WINDOW_S)
    tracing.shutdown()
