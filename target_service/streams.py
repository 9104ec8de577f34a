"""The gateways' Serve streams as the round loop sees them: each one's requests and outbound
queue, and a round's tokens published to them (one TokenBatch a stream a round)."""
import asyncio
from dataclasses import dataclass, field

from pearl_runtime.log import get_logger
from target_service import wire
from target_service.verifier import Request

log = get_logger(__name__)


@dataclass
class GatewayStream:
    """One gateway's Serve stream: its requests and its outbound queue."""
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    requests: dict[str, Request] = field(default_factory=dict)


def end_span(req: Request, why: str) -> None:
    if req.span is not None:
        req.span.set("finish", why)
        req.span.end()
        req.span = None


def publish(reqs: list[Request], path: str) -> None:
    """Each request's new tokens (and its end, which takes it off its stream) to its stream."""
    by_stream: dict[int, tuple[GatewayStream, list]] = {}
    for r in reqs:
        if not r.new_tokens and not r.finished and r.error is None:
            continue
        upd = wire.token_update(r, path)
        if r.finished or r.error is not None:   # an error: it failed alone (verifier._fail)
            r.sink.requests.pop(r.request_id, None)
            log.info("request finished", request_id=r.request_id, finish=r.seq.finish_reason,
                     new_tokens=r.seq.num_completion_tokens, forwards=r.forwards, error=r.error)
            end_span(r, "failed" if r.error is not None else r.seq.finish_reason)
        r.new_tokens = []
        by_stream.setdefault(id(r.sink), (r.sink, []))[1].append(upd)
    for stream, updates in by_stream.values():
        stream.out.put_nowait(wire.token_batch(updates))
