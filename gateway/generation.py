"""One generation below the protocol adapters: a domain Request validated, tokenized, routed to a
target, detokenized with its stop strings, and measured. pearl.v1, KServe v2 and the OpenAI
HTTP front each convert their messages to a Request and these events back, nothing more."""
import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import structlog

from pearl_runtime import tracing
from pearl_runtime.errors import InvalidRequest, PearlError
from pearl_runtime.log import get_logger
from pearl_runtime.rpc.status import status_of

from gateway import validation
from gateway.detokenizer import Detokenizer
from gateway.job import STOP_STRING, Request, Stats
from gateway.metrics import GatewayMetrics
from gateway.targets import TargetRouter

log = get_logger(__name__)


@dataclass(frozen=True)
class Delta:
    """New text (possibly empty while a multi-byte character is incomplete) and its tokens."""
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Final:
    text: str                       # the whole completion, stop string excluded
    finish_reason: str | None       # stop | length | stop_string | cancelled
    stats: Stats                    # prompt_tokens and new_tokens are the usage counts


def new_request_id() -> str:
    return uuid.uuid4().hex


class Generation:
    """The gateway's one way to serve a Request; every front shares one instance."""

    def __init__(self, router: TargetRouter, tokenizer, metrics: GatewayMetrics):
        self.router = router
        self.tokenizer = tokenizer
        self._metrics = metrics
        # one thread: a tokenizer is not shared across threads, and the loop stays free
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-tokenize")

    async def stream(self, req: Request, traceparent: str = "",
                     ended: Callable[[], str] = lambda: "CANCELLED") -> AsyncIterator[Delta | Final]:
        """Deltas, then one Final. PearlErrors propagate (counted and logged here) for the caller
        to answer in its protocol. `ended`: the failure code to count when the caller stops
        early (a cancel, a deadline); a finished request ignores it. Close the iterator (or
        leave it by an exception) and the request is cancelled on its target."""
        request_id = req.request_id or new_request_id()
        req = dataclasses.replace(req, request_id=request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        measured = self._metrics.request(self.router.model)
        # the request's span; its traceparent goes on to the target (the client's when tracing is off)
        span = tracing.start("gateway.request", traceparent or None, request_id=request_id)
        try:
            async for out in self._run(req, span.traceparent or traceparent, measured):
                yield out
        except PearlError as e:
            self._count_failure(measured, e)
            raise
        except Exception:
            measured.failed(grpc.StatusCode.INTERNAL.name)
            raise
        finally:    # after a finish, a no-op
            span.end()
            measured.failed(ended())

    def refused(self, error: PearlError) -> None:
        """A request refused before it could be read as a Request (an unreadable id, ...)."""
        self._count_failure(self._metrics.request(self.router.model), error)

    async def _run(self, req: Request, traceparent: str, measured) -> AsyncIterator[Delta | Final]:
        t0 = time.perf_counter()
        info = await self.router.info()
        params = validation.check(req, info)   # sizes first: nothing below reads an unbounded field
        prompt = await asyncio.get_running_loop().run_in_executor(
            self._tokenize, validation.tokenize, req, self.tokenizer)
        job = dataclasses.replace(validation.job(req, params, prompt, info), traceparent=traceparent)
        measured.accepted(len(job.prompt_ids))

        detok = Detokenizer(self.tokenizer, job.stop)
        ttft_ms, new_tokens, forwards, paths, reason = 0.0, 0, 0, [], None
        async with self.router.open(job) as flight:
            log.info("request accepted", prompt_tokens=len(job.prompt_ids),
                     target=flight.target.address if flight.target else "parked: no ready target")
            async for p in flight:
                if not new_tokens and p.token_ids:
                    ttft_ms = (time.perf_counter() - t0) * 1e3
                new_tokens += len(p.token_ids)
                forwards = p.target_forwards
                if p.mode and p.mode not in paths:
                    paths.append(p.mode)    # e.g. pearl, then ar while the draft was down
                text = detok.push(p.token_ids)
                if p.finish_reason is not None:
                    text += detok.finish()
                if text or p.token_ids:
                    yield Delta(text, list(p.token_ids))
                    measured.streamed(len(p.token_ids))
                if detok.stopped:
                    reason = STOP_STRING
                    break           # leaving `open` cancels the request on its target
                reason = p.finish_reason

        total_ms = (time.perf_counter() - t0) * 1e3
        stats = Stats.measure(len(job.prompt_ids), new_tokens, forwards, ttft_ms, total_ms,
                              "+".join(paths) or info.mode)
        log.info("request finished", finish=reason, new_tokens=new_tokens, target_forwards=forwards,
                 ms=round(total_ms, 1))
        measured.finished(reason)
        yield Final(detok.text, reason, stats)

    @staticmethod
    def _count_failure(measured, error: PearlError) -> None:
        code = status_of(error)[0]
        measured.failed(code.name)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            log.info("request rejected", reason=str(error))
        else:
            log.warning("request failed", code=code.name, reason=str(error))


# sampling fields as JSON clients send them (KServe's sampling_parameters, OpenAI's body)
_NUMBER_FIELDS = ("temperature", "top_p")
_INT_FIELDS = ("top_k", "max_tokens", "seed")


def sampling_from_json(fields: dict, where: str) -> dict:
    """Request keyword arguments from JSON sampling fields (temperature, top_p, top_k,
    max_tokens, seed, stop, ignore_eos), type-checked; errors name the field as `where`.name
    (`where` "": the name alone).
    The ranges are checked later, by the one validation every request goes through."""
    out = {}
    for name, value in fields.items():
        if value is None:
            continue
        field = f"{where}.{name}" if where else name
        if name in _NUMBER_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(field, f"must be a number, not {type(value).__name__}")
            out[name] = float(value)
        elif name in _INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(field, f"must be an integer, not {type(value).__name__}")
            out[name] = value
        elif name == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise InvalidRequest(field, "must be a string or a list of strings")
            out[name] = tuple(stops)
        elif name == "ignore_eos":
            if not isinstance(value, bool):
                raise InvalidRequest(field, f"must be true or false, not {type(value).__name__}")
            out[name] = value
        else:
            raise InvalidRequest(field, "is not a sampling parameter this server knows")
    return out


def renamed(error: InvalidRequest, names: dict[str, str]) -> InvalidRequest:
    """`error` with its field spelled as a front's client knows it (params.temperature is
    sampling_parameters.temperature to a KServe client); unlisted fields stay as they are."""
    for ours, theirs in names.items():
        if error.field == ours or error.field.startswith((ours + ".", ours + "[")):
            field = theirs + error.field[len(ours):]
            return InvalidRequest(field, str(error)[len(error.field) + 2:])
    return error
