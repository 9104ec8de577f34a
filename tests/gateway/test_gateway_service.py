"""The gateway end to end over real gRPC, in front of fake targets."""
import asyncio
import time

import grpc
import pytest

from pearl_runtime.client import generate, list_models
from pearl_runtime.rpc.server import GRPC_OPTIONS
from tests.gateway.fake_target import POISON, FakeTarget, expected_tokens
from tests.gateway.harness import eventually, gateway_over, run


def test_streams_deltas_before_the_end_then_final_stats(tokenizer_dir, tokenizer):
    async def body():
        fake = FakeTarget(step_s=0.03, tokens_per_forward=3, mode="pearl")
        async with gateway_over(tokenizer_dir, fake) as (gw, _):
            arrivals, texts = [], []

            def on_delta(text, ids):
                arrivals.append(time.perf_counter())
                texts.append(text)

            prompt = "Hello world"
            out = await generate(gw.address, prompt, max_tokens=12, on_delta=on_delta, timeout_s=10)
            end = time.perf_counter()
            n = len(tokenizer.encode(prompt))
            assert out.token_ids == expected_tokens(n, 12)
            assert out.text == "".join(texts) == tokenizer.decode(out.token_ids, skip_special_tokens=True)
            assert out.finish_reason == "length"
            assert len(arrivals) >= 3 and end - arrivals[0] > 0.05     # the first delta came early
            s = out.stats
            assert (s.prompt_tokens, s.new_tokens, s.target_forwards, s.mode) == (n, 12, 4, "pearl")
            assert s.mean_accepted_tokens == pytest.approx(3.0)
            assert 0 < s.time_to_first_token_ms < s.total_ms
            assert s.tokens_per_s == pytest.approx(12 / (s.total_ms / 1e3), rel=1e-3)
            assert await list_models(gw.address) == ["tiny"]
    run(body())


def test_concurrent_requests_are_coalesced_into_one_submit_batch(tokenizer_dir):
    async def body():
        fake = FakeTarget(step_s=0.005)
        async with gateway_over(tokenizer_dir, fake, coalesce_ms=300) as (gw, _):
            async with grpc.aio.insecure_channel(gw.address, options=GRPC_OPTIONS) as ch:
                prompts = [list(range(1, k + 2)) for k in range(6)]
                outs = await asyncio.gather(*(generate(gw.address, token_ids=p, max_tokens=5, channel=ch)
                                              for p in prompts))
        assert [len(b) for b in fake.batches] == [6]
        for p, out in zip(prompts, outs):
            assert out.token_ids == expected_tokens(len(p), 5)
    run(body())


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt=""), "prompt"),
    (dict(chat=[]), "prompt.chat.messages"),
    (dict(prompt="hi", max_tokens=0), "params.max_tokens"),
    (dict(prompt="hi", max_tokens=10_000), "params.max_tokens"),
    (dict(prompt="hi", temperature=-1.0), "params.temperature"),
    (dict(prompt="hi", top_p=0.0), "params.top_p"),
    (dict(prompt="hi", model="gpt-5"), "model"),
    (dict(token_ids=[1, 99999]), "prompt.tokens.ids"),
    (dict(token_ids=[1] * 300), "prompt"),
])
def test_bad_request_is_invalid_argument_naming_the_field(tokenizer_dir, kwargs, field):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(max_model_len=256)) as (gw, _):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(gw.address, timeout_s=10, **kwargs)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith(f"{field}: ")
    run(body())


def test_target_refusal_keeps_its_status_code(tokenizer_dir):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget()) as (gw, _):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(gw.address, token_ids=[POISON, 1, 2], timeout_s=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "KV cache is full" in e.value.details()
            assert gw.router.in_flight == 0
    run(body())


def test_stop_string_cuts_the_text_and_cancels_on_the_target(tokenizer_dir, tokenizer):
    async def body():
        fake = FakeTarget(step_s=0.005)
        async with gateway_over(tokenizer_dir, fake) as (gw, _):
            prompt = [40] * 5
            want = tokenizer.decode(expected_tokens(5, 30))
            stop = want[8:11]
            out = await generate(gw.address, token_ids=prompt, max_tokens=30, stop=[stop],
                                 request_id="r-stop", timeout_s=10)
            assert out.finish_reason == "stop_string"
            assert out.text == want[:8]
            assert len(out.token_ids) < 30
            await eventually(lambda: "r-stop" in fake.cancels)
    run(body())


def test_deadline_cancels_the_request_on_the_target(tokenizer_dir):
    async def body():
        fake = FakeTarget(step_s=0.05)
        async with gateway_over(tokenizer_dir, fake) as (gw, _):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(gw.address, token_ids=[1, 2], max_tokens=100, request_id="r-late", timeout_s=0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await eventually(lambda: "r-late" in fake.cancels)
            await eventually(lambda: gw.router.in_flight == 0)
    run(body())


def test_past_the_in_flight_bound_is_resource_exhausted(tokenizer_dir):
    async def body():
        fake = FakeTarget(step_s=0.02)
        async with gateway_over(tokenizer_dir, fake, max_in_flight=2) as (gw, _):
            first = [asyncio.create_task(generate(gw.address, token_ids=[1], max_tokens=20, timeout_s=10))
                     for _ in range(2)]
            await eventually(lambda: gw.router.in_flight == 2)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(gw.address, token_ids=[1], max_tokens=20, timeout_s=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for out in await asyncio.gather(*first):
                assert out.token_ids == expected_tokens(1, 20)
    run(body())


def test_stop_token_ids_reach_the_target(tokenizer_dir):
    async def body():
        fake = FakeTarget()
        async with gateway_over(tokenizer_dir, fake) as (gw, _):
            out = await generate(gw.address, token_ids=[1, 2], max_tokens=50, stop_token_ids=[6], timeout_s=10)
            assert out.token_ids == [2, 3, 4, 5, 6] and out.finish_reason == "stop"
            assert list(fake.batches[0][0].stop_token_ids) == [6]
    run(body())

