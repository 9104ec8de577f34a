"""One logging set-up for every process: structlog over stdlib, JSON or console lines.

Every module logs through `get_logger(__name__)`; loggers of libraries (grpc, asyncio, torch,
transformers) go through the same formatter, so no line escapes the format. Fields bound
with structlog's contextvars (the service name, set here) appear on every line. Native code
(gRPC core, torch's C++, tqdm bars) writes to stderr by itself: `quiet_native_stderr()`,
called before those libraries load, turns that off.
"""
import importlib.util
import logging
import os
import sys
import threading

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


# Read by native code when the library loads, so set before its import; an operator's own
# value wins. gRPC core (absl) prints even INFO lines unless told otherwise, and its errors
# surface as Python exceptions anyway.
_NATIVE_QUIET = {
    "GRPC_VERBOSITY": "NONE",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",   # hub downloads and transformers' shard loading
    "TQDM_DISABLE": "1",                   # any other tqdm bar
}
_quieted: bool | None = None   # None: quiet_native_stderr() not called; False: called after grpc loaded


def quiet_native_stderr() -> None:
    """Stop native libraries writing raw lines to stderr. Call first thing in a process's
    `__main__`, before grpc, torch or transformers is imported (GRPC_VERBOSITY is read only
    when grpc's C core loads)."""
    global _quieted
    _quieted = "grpc" not in sys.modules
    for name, value in _NATIVE_QUIET.items():
        os.environ.setdefault(name, value)


def setup(service: str, level: str | None = None, fmt: str | None = None) -> None:
    """Configure this process's logging: every record, ours or a library's, one line on
    stderr in the chosen format, with level, logger, timestamp and service."""
    level = (level or envs.get("PEARL_LOG_LEVEL") or "info").upper()
    fmt = resolve_format(fmt)
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, _ServiceField(service), structlog.stdlib.ExtraAdder(),
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
    _route_transformers()   # first: importing it sets its own level
    # chatty libraries stay at warning unless we are debugging
    for name in ("asyncio", "grpc", "urllib3", "filelock", "torch", "transformers", "httpx"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    logging.captureWarnings(True)
    _log_uncaught()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    log = get_logger(__name__)
    native = {name: os.environ.get(name) for name in _NATIVE_QUIET}
    if not _quieted:
        log.warning("gRPC core may write raw stderr lines: log.quiet_native_stderr() "
                    + ("ran after grpc was imported" if _quieted is False else "was not called"))
    log.debug("logging", format=fmt, level=level, **native)


class _ServiceField:
    """The service on every record, also from threads, whose contextvars start empty."""

    def __init__(self, service: str):
        self.service = service

    def __call__(self, logger, name, event_dict):
        event_dict.setdefault("service", self.service)
        return event_dict


def _route_transformers() -> None:
    """transformers gives its loggers their own stderr handler and stops propagation; send its
    records through ours instead."""
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.utils import logging as hf_logging
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def _log_uncaught() -> None:
    """Uncaught exceptions (main thread, other threads, unraisable ones in __del__ and
    finalizers) become one error event with the traceback in a field, not raw stderr lines."""
    log = logging.getLogger("pearl_runtime.uncaught")

    def excepthook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            return log.info("interrupted")
        log.critical("uncaught exception", exc_info=(kind, value, tb))

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        log.error("uncaught exception in thread", exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
                  extra={"thread_name": args.thread.name if args.thread else None})

    def unraisablehook(u):
        log.error("unraisable exception", exc_info=(u.exc_type, u.exc_value, u.exc_traceback),
                  extra={"context": repr(u.object), "detail": u.err_msg})

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook


def _keep(logger, name, event_dict):
    return event_dict
