"""Process plumbing shared by the services: the event loop, a grpc.aio server, serving until a signal."""
import asyncio
import errno
import inspect
import signal
import socket

import grpc

from pearl_runtime.errors import PearlError, UsageError
from pearl_runtime.log import get_logger
from pearl_runtime.rpc.auth import interceptors as auth_interceptors
from pearl_runtime.rpc.status import abort_with, status_of


def run_async(main) -> None:
    """Run a coroutine on uvloop where available (logged either way)."""
    try:
        import uvloop
        uvloop.run(main)
    except ImportError:
        get_logger(__name__).warning("uvloop not installed; using the default asyncio loop")
        asyncio.run(main)


GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 512 * 2**20),
    ("grpc.max_receive_message_length", 512 * 2**20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),   # servers accept the pings above
    ("grpc.keepalive_permit_without_calls", 1),
]


# gRPC sets SO_REUSEPORT by default: on Linux a second server on a held port then binds and
# silently shares its connections. Off, the second one fails at start.
SO_REUSEPORT = 0


def bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:   # gRPC's "Failed to bind", without the cause
        bound = 0
    if not bound:
        raise UsageError(f"cannot listen on {address}: port {port} is in use or the host is not local")
    return bound


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Fail at start, naming the port and its flag (the key), when another process holds one
    of `ports` (0: any free port, skipped). Binds the way gRPC does (SO_REUSEADDR), then lets go."""
    if SO_REUSEPORT:
        return
    for flag, port in ports.items():
        if not port:
            continue
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(addr)
        except socket.gaierror as e:
            raise UsageError(f"cannot resolve host {host!r}: {e.strerror}") from e
        except OSError as e:
            cause = "is in use by another process" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror}"
            raise UsageError(f"port {port} on {host} ({flag}) {cause}") from e


def host_id() -> str:
    return socket.gethostname()


async def serve_until_signal(coro) -> None:
    """Run a service coroutine until it ends or SIGINT/SIGTERM arrives, then cancel it."""
    task = asyncio.ensure_future(coro)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.wait([task, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


# readiness answers NOT_SERVING this long before the port closes, so the gateway's watch and
# the probes see the service leave before its calls start failing
STOPPING_WINDOW_S = 0.5


async def stop_serving(server: grpc.aio.Server, health, grace_s: float = 1.0, drained=None,
                       drain_timeout_s: float = 0.0) -> None:
    """Shutdown in order: readiness NOT_SERVING, a moment for watchers to see it, the drain
    (until `drained()` holds or `drain_timeout_s` passed: the work in flight finishes), then
    stop (what a closed stream leaves behind, its caller resubmits elsewhere)."""
    await health.stopping()
    await asyncio.sleep(STOPPING_WINDOW_S)
    if drained is not None:
        await drain(drained, drain_timeout_s)
    await server.stop(grace_s)
    await health.close_plain_port()


async def drain(drained, timeout_s: float, poll_s: float = 0.05) -> bool:
    """Wait until `drained()` or `timeout_s`; logged either way. True when drained."""
    log = get_logger(__name__)
    loop = asyncio.get_running_loop()
    start = loop.time()
    if not drained():
        log.info("draining: in-flight work finishes before the port closes", timeout_s=timeout_s)
    while not drained():
        if loop.time() - start >= timeout_s:
            log.warning("drain timeout: stopping with work in flight (its callers resubmit it)",
                        timeout_s=timeout_s)
            return False
        await asyncio.sleep(poll_s)
    log.info("drained", seconds=round(loop.time() - start, 3))
    return True


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one place a servicer's exceptions become statuses: a domain error (PearlError)
    gets its code from rpc/status.py and its message; anything else is logged with its
    traceback here and reaches the client as INTERNAL without one."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, method), handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _streaming(handler.stream_stream, method), handler.request_deserializer,
                handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(
            _unary(handler.stream_unary, method), handler.request_deserializer, handler.response_serializer)


def _unary(behavior, method: str):
    async def call(request, context):
        try:
            return await behavior(request, context)
        except Exception as e:
            await _abort(context, e, method)
    return call


def _streaming(behavior, method: str):
    if not inspect.isasyncgenfunction(behavior):   # it writes with context.write (grpc's health Watch)
        return _unary(behavior, method)

    async def call(request, context):
        try:
            async for message in behavior(request, context):
                yield message
        except Exception as e:
            await _abort(context, e, method)
    return call


async def _abort(context, error: Exception, method: str):
    if isinstance(error, PearlError):
        code, message = status_of(error)
    elif _is_abort(error):
        raise error   # the servicer already chose its status
    else:
        get_logger(__name__).exception("unexpected error in a call", method=method)
        code, message = grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(error).__name__} (logged)"
    await abort_with(context, code, message)


def _is_abort(error: Exception) -> bool:
    return isinstance(error, grpc.aio.AbortError)


def new_server(auth_token: str | None = None) -> grpc.aio.Server:
    """`auth_token`: every call but health and reflection must present it (rpc/auth.py)."""
    return grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", SO_REUSEPORT)],
                           interceptors=[*auth_interceptors(auth_token), ErrorInterceptor()])
