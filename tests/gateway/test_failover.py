"""A target dies mid-stream: the gateway resubmits prompt + streamed tokens; the client sees no seam."""
import asyncio

import grpc
import pytest

from pearl_runtime.client import generate
from gateway.server import serve_gateway
from tests.gateway.fake_target import FakeTarget, expected_tokens, start_target
from tests.gateway.harness import gateway_over, run


def _kill_after(n_tokens: int, server: grpc.aio.Server, seen: list[int]):
    """An on_delta callback that stops `server` abruptly once the client saw n_tokens."""
    killed = []

    def on_delta(text, ids):
        seen.extend(ids)
        if len(seen) >= n_tokens and not killed:
            killed.append(asyncio.create_task(server.stop(None)))
    return on_delta


def test_target_death_mid_stream_resubmits_to_another_target(tokenizer_dir, tokenizer):
    async def body():
        a, b = FakeTarget(step_s=0.01), FakeTarget(step_s=0.01)
        async with gateway_over(tokenizer_dir, a, b) as (gw, targets):
            prompt, total, seen = [1, 2, 3], 40, []
            out = await generate(gw.address, token_ids=prompt, max_tokens=total, timeout_s=20,
                                 on_delta=_kill_after(10, targets[0][0], seen))
        assert gw.metrics.registry.get_sample_value("pearl:gateway_resubmissions_total") == 1
        want = expected_tokens(len(prompt), total)
        assert out.token_ids == seen == want                      # no duplicate, no gap
        assert out.text == tokenizer.decode(want, skip_special_tokens=True)
        assert out.finish_reason == "length"
        (resub,), = b.batches                                      # one resubmission, to b
        k = len(resub.prompt_ids) - len(prompt)
        assert k >= 10 and list(resub.prompt_ids) == prompt + want[:k]
        assert resub.params.max_tokens == total - k
        assert a.sent[resub.request_id] [:k] == want[:k]
        assert out.stats.target_forwards == total                 # a's forwards + b's
        assert out.stats.new_tokens == total
    run(body())


def test_many_requests_move_together_and_all_complete(tokenizer_dir):
    async def body():
        a, b = FakeTarget(step_s=0.01), FakeTarget(step_s=0.01)
        async with gateway_over(tokenizer_dir, a, b) as (gw, targets):
            prompts = [[1] * k for k in range(1, 9)]
            seen: list[int] = []
            kill = _kill_after(60, targets[0][0], seen)     # one callback: stop the server once
            tasks = [asyncio.create_task(generate(gw.address, token_ids=p, max_tokens=30, timeout_s=20,
                                                  on_delta=kill))
                     for p in prompts]
            outs = await asyncio.gather(*tasks)
        for p, out in zip(prompts, outs):
            assert out.token_ids == expected_tokens(len(p), 30)
        assert sum(len(batch) for batch in b.batches) == 8   # half placed on b, half moved there
    run(body())


def test_the_same_target_takes_the_request_back_when_it_returns(tokenizer_dir):
    async def body():
        first = FakeTarget(step_s=0.01)
        server, port = await start_target(first)
        gw = await serve_gateway(targets=[f"127.0.0.1:{port}"], model_dir=tokenizer_dir)
        try:
            seen: list[int] = []
            call = asyncio.create_task(generate(gw.address, token_ids=[5, 6], max_tokens=30, timeout_s=20,
                                                on_delta=_kill_after(8, server, seen)))
            while len(seen) < 8:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.2)                         # down for a while: the request waits
            assert not call.done()
            second = FakeTarget(step_s=0.01)
            server2, _ = await start_target(second, port)
            out = await call
            assert out.token_ids == expected_tokens(2, 30)
            (resub,), = second.batches
            assert list(resub.prompt_ids) == [5, 6] + expected_tokens(2, 30)[:len(resub.prompt_ids) - 2]
            await server2.stop(None)
        finally:
            await gw.stop(None)
    run(body())


def test_no_target_at_all_is_unavailable_not_a_hang(tokenizer_dir):
    async def body():
        gw = await serve_gateway(targets=["127.0.0.1:1"], model_dir=tokenizer_dir, park_timeout_s=0.5)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(gw.address, prompt="hi", timeout_s=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await gw.stop(None)
    run(body())
