"""Process plumbing shared by the services: the event loop, a grpc.aio server, serving until a signal."""
import asyncio
import signal
import socket

import grpc

from pearl_runtime.log import get_logger


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


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(options=GRPC_OPTIONS)


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
