"""Process plumbing shared by the services: the event loop, a grpc.aio server, serving until a signal."""
import asyncio
import inspect
import signal
import socket

import grpc

from pearl_runtime.errors import PearlError
from pearl_runtime.log import get_logger
from pearl_runtime.rpc.status import status_of


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


def bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot bind {host}:{port}")
    return bound


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


async def stop_serving(server: grpc.aio.Server, health, grace_s: float = 1.0) -> None:
    """Shutdown in order: readiness NOT_SERVING, a moment for watchers to see it, then stop."""
    await health.stopping()
    await asyncio.sleep(STOPPING_WINDOW_S)
    await server.stop(grace_s)
    await health.close_plain_port()


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
    await context.abort(code, message)


def _is_abort(error: Exception) -> bool:
    return isinstance(error, grpc.aio.AbortError)


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(options=GRPC_OPTIONS, interceptors=[ErrorInterceptor()])
