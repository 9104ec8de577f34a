"""Process plumbing shared by the services: logging, the event loop, a grpc.aio server."""
import asyncio
import logging
import os
import socket

import grpc
import structlog


def setup_logging(service: str, level: str | None = None) -> None:
    level = (level or os.environ.get("PEARL_LOG_LEVEL", "info")).upper()
    logging.basicConfig(level=level, format="%(message)s")
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.stdlib.LoggerFactory(),
    )
    structlog.contextvars.bind_contextvars(service=service)


def run_async(main) -> None:
    """Run a coroutine on uvloop where available (logged either way)."""
    try:
        import uvloop
        uvloop.run(main)
    except ImportError:
        structlog.get_logger().warning("uvloop not installed; using the default asyncio loop")
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
