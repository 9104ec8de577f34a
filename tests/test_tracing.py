"""Tracing: one trace across three processes when on; a cheap no-op when off."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("opentelemetry.sdk")

from tests.otlp_receiver import otlp_receiver  # noqa: E402

from pearl_runtime import tracing  # noqa: E402

# One hop: parent on the traceparent given as argv[2], print this span's for the next hop.
HOP = textwrap.dedent('''
    import sys
    from pearl_runtime import log
    log.quiet_native_stderr()
    log.setup(sys.argv[1], "info", "json")
    from pearl_runtime import tracing
    assert tracing.setup(sys.argv[1])
    if sys.argv[1] == "draft":   # a span that outlives a block, as a request's life on a service
        handle = tracing.start("draft.round", traceparent=sys.argv[2], gamma=4)
        print(handle.traceparent)
        handle.end()
    else:
        with tracing.span(f"{sys.argv[1]}.request", traceparent=sys.argv[2] or None, role=sys.argv[1]) as s:
            s.set("tokens", 7)
            with tracing.span("inner"):   # the current span is its parent
                pass
            print(s.traceparent)
    tracing.shutdown()
''')


def _hop(role: str, traceparent: str, endpoint: str) -> str:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    proc = subprocess.run([sys.executable, "-c", HOP, role, traceparent], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert '"tracing on"' in proc.stderr
    return proc.stdout.strip()


@pytest.mark.timeout(120)
def test_one_trace_across_three_services():
    with otlp_receiver() as receiver:
        gateway = _hop("gateway", "", receiver.endpoint)
        target = _hop("target", gateway, receiver.endpoint)
        draft = _hop("draft", target, receiver.endpoint)
        spans = receiver.wait_for(5)
    by_name = {s.name: s for s in spans}
    assert len(spans) == 5 and len(by_name) == 4   # an "inner" span on the gateway and the target
    assert {s.trace_id for s in spans} == {gateway.split("-")[1]}
    assert {s.service for s in spans} == {"pearl-gateway", "pearl-target", "pearl-draft"}
    g, t, d = by_name["gateway.request"], by_name["target.request"], by_name["draft.round"]
    assert g.parent_span_id == "" and t.parent_span_id == g.span_id and d.parent_span_id == t.span_id
    assert (g.span_id, t.span_id, d.span_id) == tuple(tp.split("-")[2] for tp in (gateway, target, draft))
    assert t.attributes == {"role": "target", "tokens": 7} and d.attributes == {"gamma": 4}
    assert {s.parent_span_id for s in spans if s.name == "inner"} == {g.span_id, t.span_id}


def test_off_without_endpoint(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.setup("target") is False
    assert tracing._provider is None
    with tracing.span("x", traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", k=1) as s:
        s.set("a", 1)
        assert s.traceparent == ""
    handle = tracing.start("y")
    assert handle.traceparent == ""
    handle.end()
    tracing.shutdown()
