"""Nothing heavy on the gateway's event loop, through real processes: an oversized request is
refused at once, a long prompt tokenizes on a thread, and another stream keeps streaming."""
import asyncio
import time

import grpc
import pytest

from gateway.public_port import MAX_REQUEST_BYTES
from pearl_runtime import validation as rules
from pearl_runtime.client import generate
from pearl_runtime.pb import gateway_pb2
from pearl_runtime.rpc.server import GRPC_OPTIONS
from tests.services.procs import run


@pytest.fixture(scope="module")
def gateway(cluster) -> str:
    return cluster.stack("copy", "pearl").gateway.address


async def refused(address: str, **kw) -> tuple[grpc.aio.AioRpcError, float]:
    """The error a request gets and how long it took, over a channel that sends any size."""
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as ch:
        t = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await generate(address, channel=ch, timeout_s=30, **kw)
        return e.value, time.perf_counter() - t


def test_big_prompts_are_refused_while_another_stream_streams(gateway):
    async def body():
        arrivals: list[float] = []
        stream = asyncio.create_task(generate(gateway, token_ids=[5, 6, 7, 8], max_tokens=900, ignore_eos=True,
                                              on_delta=lambda text, ids: arrivals.append(time.perf_counter())))
        while len(arrivals) < 5:
            await asyncio.sleep(0.01)
        # past the public port's message limit: gRPC refuses it before any Python reads it
        huge, huge_s = await refused(gateway, prompt="a" * (16 * 2**20))
        # inside the limits, but a long tokenization (then too long for the window)
        t0 = time.perf_counter()
        long, long_s = await refused(gateway, prompt="a" * (rules.MAX_TEXT_BYTES - 16))
        t1 = time.perf_counter()
        done = await stream
        return huge, huge_s, long, long_s, [t for t in arrivals if t0 <= t <= t1], done

    huge, huge_s, long, long_s, during, done = run(body())
    assert huge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and huge_s < 1.0, (huge, huge_s)
    assert long.code() == grpc.StatusCode.INVALID_ARGUMENT and long.details().startswith("prompt: "), long
    assert len(long.details()) < 200
    # the other stream's deltas kept arriving while the long prompt tokenized
    assert len(during) >= 3, (len(during), long_s)
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert max(gaps) < 0.5 * long_s, (max(gaps), long_s)
    assert done.finish_reason == "length" and done.stats.new_tokens == 900


@pytest.mark.parametrize("field", ["request_id", "model"])
def test_a_megabyte_field_is_refused_naming_it_with_a_short_message(gateway, field):
    e, seconds = run(refused(gateway, token_ids=[5, 6, 7], max_tokens=2, **{field: "x" * 2**20}))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith(f"{field}: ") and len(e.details()) < 200, e.details()[:300]
    assert seconds < 1.0


def test_the_message_limit_is_the_documented_one(gateway):
    e, _ = run(refused(gateway, token_ids=[300] * (MAX_REQUEST_BYTES // 2 + 8)))   # 2 bytes an id on the wire
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_undecodable_request_is_invalid_argument(gateway):
    async def body():
        async with grpc.aio.insecure_channel(gateway) as ch:
            call = ch.unary_stream("/pearl.v1.Gateway/Generate", request_serializer=lambda b: b,
                                   response_deserializer=gateway_pb2.GenerateResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in call(b"\xff\xff\xff\xff", timeout=10):
                    pass
            return e.value

    e = run(body())
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GenerateRequest" in e.details() and "Unexpected" not in e.details()
