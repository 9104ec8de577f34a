"""Admission control at the gateway: past --max-concurrent-requests a new call is refused
RESOURCE_EXHAUSTED at once, with gRPC's retry pushback, counted in metrics; the admitted
calls are untouched."""
import asyncio

import grpc

from pearl_runtime.client import generate
from pearl_runtime.rpc.status import RETRY_PUSHBACK_KEY
from tests.gateway.fake_target import FakeTarget
from tests.gateway.harness import gateway_over, run


def test_calls_past_the_limit_are_refused_with_a_retry_hint(tokenizer_dir):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(step_s=0.02), max_in_flight=2) as (gw, _):
            slow = [asyncio.create_task(generate(gw.address, token_ids=[5, 6], max_tokens=40, ignore_eos=True,
                                                 timeout_s=30)) for _ in range(2)]
            while len(gw.router._flights) < 2:
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                await generate(gw.address, token_ids=[5, 6], max_tokens=4, timeout_s=10)
                raise AssertionError("a third call was admitted past the limit of 2")
            except grpc.aio.AioRpcError as e:
                refused = e
            assert loop.time() - t0 < 1.0
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry" in refused.details()
            assert dict(refused.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY) == "1000"
            done = await asyncio.gather(*slow)
            assert all(len(d.token_ids) == 40 for d in done)
            refusals = gw.metrics.registry.get_sample_value(
                "pearl:request_failure_total", {"model_name": "tiny", "code": "RESOURCE_EXHAUSTED"})
            assert refusals == 1
            out = await generate(gw.address, token_ids=[5, 6], max_tokens=4, timeout_s=10)   # room again
            assert len(out.token_ids) == 4
    run(body())
