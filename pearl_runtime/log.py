"""One logging set-up for every process: structlog over stdlib, JSON or console lines.

Every module logs through `get_logger(__name__)`; loggers of libraries (grpc, asyncio, torch,
transformers) go through the same formatter, so no line escapes the format. Fields bound
with structlog's contextvars (the service name, set here) appear on every line.
"""
import logging
import os
import sys

import structlog

from pearl_runtime import envs

FORMATS = ("json", "console", "auto")


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


# LogRecord attributes an event's keys must not overwrite (logging raises on them)
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _rename_reserved(logger, name, event_dict):
    for key in [k for k in event_dict if k in _RESERVED and k != "event"]:
        event_dict[f"{key}_"] = event_dict.pop(key)
    return event_dict


def _route_to_stdlib() -> None:
    """structlog events become stdlib records (message formatted, fields as `extra`), so one
    handler formats ours and the libraries' alike, and pytest's caplog sees both."""
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.stdlib.PositionalArgumentsFormatter(),
                    _rename_reserved, structlog.stdlib.render_to_log_kwargs],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


_route_to_stdlib()


def resolve_format(fmt: str | None) -> str:
    fmt = (fmt or envs.get("PEARL_LOG_FORMAT") or "auto").lower()
    if fmt not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


def setup(service: str, level: str | None = None, fmt: str | None = None) -> None:
    """Configure this process's logging: every record, ours or a library's, one line on
    stderr in the chosen format, with level, logger, timestamp and service."""
    level = (level or envs.get("PEARL_LOG_LEVEL") or "info").upper()
    fmt = resolve_format(fmt)
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.stdlib.ExtraAdder(),
                           structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info if fmt == "json" else _keep, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # chatty libraries stay at warning unless we are debugging
    for name in ("asyncio", "grpc", "urllib3", "filelock", "torch", "transformers", "httpx"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    logging.captureWarnings(True)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    # gRPC core writes to stderr by itself; keep it at errors so its lines stay rare
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _keep(logger, name, event_dict):
    return event_dict
