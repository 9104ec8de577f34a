"""The one place where domain errors become gRPC status codes (and relayed codes become errors)."""
from typing import NoReturn

import grpc

from pearl_runtime.errors import InvalidRequest, ModelLoadError, OutOfBlocks, PearlError


class Overloaded(PearlError):
    """A bounded queue is full; the client may retry later."""


class Unavailable(PearlError):
    """No service instance can take the work right now."""


class Relayed(PearlError):
    """A status another service sent us (e.g. SeqUpdate.error) that we pass on unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


_CODES: list[tuple[type[PearlError], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OutOfBlocks, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
]

_BY_INT = {c.value[0]: c for c in grpc.StatusCode}


def status_of(exc: PearlError) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for a domain error."""
    if isinstance(exc, Relayed):
        return exc.code, str(exc)
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, str(exc)


def code_to_int(code: grpc.StatusCode) -> int:
    """The wire form of a code (proto fields such as SeqUpdate.error_code carry ints)."""
    return code.value[0]


def code_from_int(value: int) -> grpc.StatusCode:
    return _BY_INT.get(value, grpc.StatusCode.UNKNOWN)


# gRPC's retry pushback: a client with a retry policy waits this long before retrying a refusal
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
RETRY_PUSHBACK_MS = 1000


async def abort(context: grpc.aio.ServicerContext, exc: PearlError) -> NoReturn:
    await abort_with(context, *status_of(exc))


async def abort_with(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with `code`; a RESOURCE_EXHAUSTED (a full queue) carries the retry pushback."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(RETRY_PUSHBACK_MS)),))
    await context.abort(code, message)
