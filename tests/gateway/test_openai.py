"""The OpenAI-compatible HTTP front, through the real `openai` package: the texts of the same
greedy request equal pearl.v1 Generate's; usage counts; errors in OpenAI's shape; auth; a
closed stream cancels its request on the target."""
import asyncio

import aiohttp
import pytest

from pearl_runtime import client
from tests.gateway.fake_target import FakeTarget
from tests.gateway.harness import gateway_over, run

openai = pytest.importorskip("openai")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def api(gw, token: str = "none"):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key=token, max_retries=0)


async def streamed(stream, chat: bool):
    texts, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts.append((c.delta.content or "") if chat else c.text)
            finish = c.finish_reason or finish
    return "".join(texts), finish, usage


def test_completions_and_chat_equal_pearl_generate(tokenizer_dir):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(), http_port=0) as (gw, _):
            oa = api(gw)
            ours = await client.generate(gw.address, "Hello", temperature=0.0, max_tokens=12)
            ours_chat = await client.generate(gw.address, chat=[(m["role"], m["content"]) for m in CHAT],
                                              temperature=0.0, max_tokens=12)
            whole = await oa.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=12)
            stream = await oa.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True})
            s_text, s_finish, s_usage = await streamed(stream, chat=False)
            chat = await oa.chat.completions.create(model="tiny", messages=CHAT, temperature=0,
                                                    max_completion_tokens=12)
            c_stream = await oa.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=12,
                                                        stream=True)
            c_text, c_finish, c_usage = await streamed(c_stream, chat=True)
            models = await oa.models.list()
            return ours, ours_chat, whole, (s_text, s_finish, s_usage), chat, (c_text, c_finish, c_usage), models
    ours, ours_chat, whole, s, chat, c, models = run(body(), timeout_s=60)
    assert ours.text and whole.choices[0].text == ours.text == s[0]
    assert whole.choices[0].finish_reason == s[1] == "length"
    for usage in (whole.usage, s[2]):
        assert (usage.prompt_tokens, usage.completion_tokens) == (ours.stats.prompt_tokens, 12)
        assert usage.total_tokens == ours.stats.prompt_tokens + 12
    assert chat.choices[0].message.content == ours_chat.text == c[0]
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == ours_chat.stats.prompt_tokens and chat.usage.completion_tokens == 12
    assert c[2] is None         # usage in a stream only when asked for
    assert [m.id for m in models.data] == ["tiny"]


def test_errors_are_openai_error_json(tokenizer_dir):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(), http_port=0, auth_token="s3cret") as (gw, _):
            oa, errors = api(gw, "s3cret"), []
            for call in (lambda: oa.completions.create(model="tiny", prompt="Hi", n=2),
                         lambda: oa.completions.create(model="tiny", prompt="Hi", temperature=-1),
                         lambda: oa.chat.completions.create(model="tiny", messages=CHAT, top_p="x"),
                         lambda: oa.completions.create(model="other", prompt="Hi"),
                         lambda: oa.completions.create(model="tiny", prompt="Hi", stream=True, max_tokens=10**6),
                         lambda: api(gw, "wrong").completions.create(model="tiny", prompt="Hi")):
                with pytest.raises(openai.APIStatusError) as e:
                    await call()
                errors.append((e.value.status_code, e.value.body))
            async with aiohttp.ClientSession() as http:     # health and metrics need no token
                async with http.get(f"http://127.0.0.1:{gw.http_port}/health") as r:
                    health = r.status
                async with http.get(f"http://127.0.0.1:{gw.http_port}/metrics") as r:
                    metrics = await r.text()
            return errors, health, metrics
    errors, health, metrics = run(body(), timeout_s=60)
    statuses = [s for s, _ in errors]
    assert statuses == [400, 400, 400, 404, 400, 401]
    params = [b.get("param") for _, b in errors]
    assert params[:5] == ["n", "temperature", "top_p", "model", "max_tokens"]
    assert errors[5][1]["code"] == "invalid_api_key"
    assert health == 200 and "pearl:request_failure" in metrics


def test_health_is_503_until_a_target_is_ready(tokenizer_dir):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(serving=False), http_port=0, ready=False) as (gw, _):
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{gw.http_port}/health") as r:
                    return r.status
    assert run(body()) == 503


def test_a_closed_stream_cancels_the_request_on_its_target(tokenizer_dir):
    async def body():
        fake = FakeTarget(step_s=0.02)
        async with gateway_over(tokenizer_dir, fake, http_port=0) as (gw, _):
            oa = api(gw)
            stream = await oa.completions.create(model="tiny", prompt="Hello", max_tokens=200, stream=True,
                                                 extra_body={"ignore_eos": True},
                                                 extra_headers={"x-request-id": "to-close"})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    break
            running = len(gw.router.targets[0].flights)
            await stream.close()
            for _ in range(100):
                if "to-close" in fake.cancels:
                    break
                await asyncio.sleep(0.02)
            return running, len(gw.router.targets[0].flights), fake.cancels
    running, after, cancels = run(body(), timeout_s=60)
    assert running == 1 and after == 0 and "to-close" in cancels
