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


def _running(metrics_port: int) -> float:
    """The target's pearl:num_requests_running, read as Prometheus would."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "pearl:num_requests_running")


def test_a_closed_openai_stream_cancels_its_request_on_the_target(cluster):
    """The openai client closes its stream after the first chunk: the real target's running count
    drops to 0 and it logs the cancel (not a finish after 900 tokens)."""
    import time

    metrics_port, http_port = free_port(), free_port()
    target = cluster.service("target", cluster.engine_args(cluster.target_model) + [
        "--mode", "ar", "--metrics-port", str(metrics_port)], "target-openai-cancel", log_level="info")
    gateway = cluster.service("gateway", ["--model", str(cluster.target_model), "--targets", target.address,
                                          "--http-port", str(http_port)], "gateway-openai-cancel")
    cluster.launch([target, gateway])
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0)
    stream = oa.completions.create(model=cluster.target_model.name, prompt="Hello", temperature=0, max_tokens=900,
                                   stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            break
    assert _running(metrics_port) == 1
    stream.close()
    deadline = time.time() + 10
    while _running(metrics_port) != 0:
        assert time.time() < deadline, "the target still runs the request its client closed"
        time.sleep(0.05)
    log = target.log()
    assert "request cancelled" in log and "new_tokens=900" not in log, target.log_tail()
