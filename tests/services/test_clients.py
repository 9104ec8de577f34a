"""Existing clients against a real stack (draft + PEARL target + `python -m gateway --http-port`):
tritonclient over KServe v2 and the openai package over HTTP get the text pearl.v1 Generate gets
for the same greedy request."""
import pytest

from pearl_runtime.client import generate
from tests.gateway.test_kserve import tritonclient_program
from tests.services.procs import free_port, run

openai = pytest.importorskip("openai")


def test_tritonclient_and_openai_equal_pearl_generate(cluster):
    stack = cluster.stack("copy", "pearl")
    http_port = free_port()
    gateway = cluster.service("gateway", ["--model", str(cluster.target_model), "--targets", stack.target.address,
                                          "--http-port", str(http_port)], "gateway-clients")
    cluster.launch([gateway])
    model = stack.target_model.name

    ours = run(generate(gateway.address, "Hello", temperature=0.0, max_tokens=12))
    seen = run(tritonclient_program(gateway.address, model))
    assert seen["live"] and seen["ready"] and seen["infer"]["text"] == ours.text
    assert "".join(seen["stream"]["chunks"]) == ours.text
    assert "sampling_parameters.top_k" in seen["stream_bad"]["error"]
    assert "".join(seen["stream_after_bad"]["chunks"]) == ours.text

    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0)
    whole = oa.completions.create(model=model, prompt="Hello", temperature=0, max_tokens=12)
    chunks = oa.completions.create(model=model, prompt="Hello", temperature=0, max_tokens=12, stream=True)
    assert whole.choices[0].text == ours.text == "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.usage.completion_tokens == ours.stats.new_tokens
    assert whole.usage.prompt_tokens == ours.stats.prompt_tokens

    chat = [("user", "Hi there")]
    ours_chat = run(generate(gateway.address, chat=chat, temperature=0.0, max_tokens=12))
    reply = oa.chat.completions.create(model=model, messages=[{"role": r, "content": c} for r, c in chat],
                                       temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == ours_chat.text
