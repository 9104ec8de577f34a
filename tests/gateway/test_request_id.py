"""The request id across hops: the client's x-request-id (or request_id, or a fresh one) is the
target's Submission.request_id, comes back in the initial metadata and tags every log line."""
import asyncio

import grpc
import structlog

from pearl_runtime.client import Request, request_to_proto
from pearl_runtime.pb import gateway_pb2_grpc
from tests.gateway.fake_target import FakeTarget, expected_tokens
from tests.gateway.harness import gateway_over, run

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def _call(address: str, metadata=(), request_id: str = "", max_tokens: int = 4):
    """(x-request-id from the initial metadata, tokens received)."""
    async with grpc.aio.insecure_channel(address) as ch:
        req = request_to_proto(Request(request_id=request_id, token_ids=(1, 2), max_tokens=max_tokens))
        call = gateway_pb2_grpc.GatewayStub(ch).Generate(req, metadata=metadata, timeout=10)
        echoed = dict(await call.initial_metadata()).get("x-request-id")
        ids = [t async for msg in call if msg.HasField("delta") for t in msg.delta.token_ids]
    return echoed, ids


def test_client_request_id_and_traceparent_reach_the_target(tokenizer_dir):
    async def body():
        fake = FakeTarget()
        async with gateway_over(tokenizer_dir, fake) as (gw, _):
            echoed, ids = await _call(gw.address, (("x-request-id", "req-42"), ("traceparent", TRACEPARENT)),
                                      request_id="ignored-when-the-header-is-set")
        assert echoed == "req-42" and ids == expected_tokens(2, 4)
        (sub,), = fake.batches
        assert sub.request_id == "req-42" and sub.traceparent == TRACEPARENT

    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        run(body())
    by_event = {e["event"]: e for e in logs if e.get("request_id") == "req-42"}
    assert by_event["request accepted"]["prompt_tokens"] == 2
    assert by_event["request accepted"]["target"].startswith("127.0.0.1:")
    assert by_event["request finished"]["finish"] == "length" and by_event["request finished"]["new_tokens"] == 4
    assert "ms" in by_event["request finished"]


def test_request_id_field_then_a_fresh_id(tokenizer_dir):
    async def body():
        fake = FakeTarget()
        async with gateway_over(tokenizer_dir, fake) as (gw, _):
            from_field, _ = await _call(gw.address, request_id="from-field")
            fresh_a, _ = await _call(gw.address)
            fresh_b, _ = await _call(gw.address)
        assert from_field == "from-field"
        assert len(fresh_a) == 32 and int(fresh_a, 16) >= 0 and fresh_a != fresh_b
        assert [b[0].request_id for b in fake.batches] == ["from-field", fresh_a, fresh_b]
        assert all(b[0].traceparent == "" for b in fake.batches)
    run(body())


def test_a_reused_id_in_flight_twice_keeps_the_jobs_apart(tokenizer_dir):
    async def body():
        fake = FakeTarget(step_s=0.01)
        async with gateway_over(tokenizer_dir, fake) as (gw, _):
            same = (("x-request-id", "dup"),)
            results = await asyncio.gather(_call(gw.address, same, max_tokens=10),
                                           _call(gw.address, same, max_tokens=10))
        assert results == [("dup", expected_tokens(2, 10))] * 2
        submitted = [s.request_id for b in fake.batches for s in b]
        assert len(set(submitted)) == 2 and "dup" in submitted
        assert all(rid.startswith("dup") for rid in submitted)
    run(body())


def test_a_request_id_no_header_can_hold_is_invalid_argument(tokenizer_dir):
    """Printable but not ASCII: refused by name before anything echoes it in the initial metadata
    (which would fail the call INTERNAL), and the gateway serves the next request."""
    async def body():
        fake = FakeTarget()
        async with gateway_over(tokenizer_dir, fake) as (gw, _):
            for rid in ("r\u00e9q-\u4e2d", "tab\there"):
                try:
                    await _call(gw.address, request_id=rid)
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in e.details(), e
                else:
                    raise AssertionError(f"{rid!r} was accepted")
            _, ids = await _call(gw.address, request_id="plain-ascii")
        assert ids == expected_tokens(2, 4)
        assert [b[0].request_id for b in fake.batches] == ["plain-ascii"]
    run(body())
