"""What an operator sees of the three services as real processes: standard health (readiness
and liveness) and `pearl health`, reflection, Prometheus metrics that agree with the streams,
JSON logs with one request id across the three, and OpenTelemetry spans under one trace.

One stack serves the module: gateway started first (so it is seen NOT_SERVING with no target),
then draft and target, every service with --log-format json, a metrics port and an OTLP
endpoint (the in-process receiver, when the otel extra is installed)."""
import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from pearl_runtime.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from pearl_runtime.rpc.health import check
from tests.services.procs import Service, free_port, reference_greedy, stop_all

ROOT = Path(__file__).resolve().parents[2]
N_REQUESTS = 4
MAX_TOKENS = 12
NAMES = {"gateway": "pearl.v1.Gateway", "target": "pearl.v1.Target", "draft": "pearl.v1.Draft"}


class Watch:
    """Every status a Health.Watch stream reports, from as early as the port answers."""

    def __init__(self, address: str, service: str = ""):
        self.seen: list[str] = []
        # re-dial every 20 ms (gRPC's default backoff starts at 1 s): connected as the port opens
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
            ("grpc.max_reconnect_backoff_ms", 20)])
        self.call = health_pb2_grpc.HealthStub(self.channel).Watch(
            health_pb2.HealthCheckRequest(service=service), wait_for_ready=True)
        import threading
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for reply in self.call:
                self.seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError:
            pass

    def close(self):
        self.call.cancel()
        self.channel.close()


def _wait_status(address: str, want: str, service: str = "", timeout_s: float = 90.0) -> None:
    deadline = time.time() + timeout_s
    while (status := asyncio.run(check(address, service, timeout_s=1.0))) != want:
        assert time.time() < deadline, f"{address} {service!r} stayed {status}, wanted {want}"
        time.sleep(0.05)


def _scrape(port: int) -> dict[str, list]:
    """name -> samples, from a real HTTP GET of /metrics parsed by prometheus_client (a labelled
    series with no samples yet is there by its name, with none)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name + ("_total" if family.type == "counter" else ""), [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _total(samples: dict, name: str, **labels) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def otlp():
    pytest.importorskip("opentelemetry.sdk")
    from tests.otlp_receiver import otlp_receiver
    with otlp_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def stack(service_models, tmp_path_factory, request):
    target_model, drafts = service_models
    logs = tmp_path_factory.mktemp("operate-logs")
    otlp = request.getfixturevalue("otlp") if _has_otel() else None
    ports = {k: free_port() for k in ("gateway", "target", "draft")}
    metrics = {k: free_port() for k in ports}
    engine = ["--kv-cache-gb", "0.05", "--threads", "1"]

    def service(kind, args):
        svc = Service(kind, args + ["--log-format", "json", "--metrics-port", str(metrics[kind])], logs, kind,
                      log_level="info", port=ports[kind])
        if otlp is not None:
            svc.env.update(OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint, OTEL_BSP_SCHEDULE_DELAY="200")
        return svc

    gateway = service("gateway", ["--model", str(target_model), "--targets", f"127.0.0.1:{ports['target']}"])
    draft = service("draft", ["--model", str(drafts["copy"])] + engine)
    target = service("target", ["--model", str(target_model), "--mode", "pearl", "--gamma", "4",
                                "--draft", f"127.0.0.1:{ports['draft']}"] + engine)
    services = {"gateway": gateway, "draft": draft, "target": target}
    early = {}
    try:
        gateway.start()
        _wait_status(gateway.address, "NOT_SERVING")            # up, but no target yet
        early["gateway"] = asyncio.run(check(gateway.address))
        early["gateway_liveness"] = asyncio.run(check(gateway.address, "liveness"))
        early["gateway_cli"] = _pearl_health(gateway.address).returncode
        draft.start()
        target.start()
        watches = {k: Watch(services[k].address) for k in ("draft", "target")}
        for k in ("draft", "target", "gateway"):
            services[k].wait_ready(time.time() + 120)
        draft.wait_log("target connected")
        time.sleep(0.3)
        for w in watches.values():
            w.close()
        early["watched"] = {k: list(w.seen) for k, w in watches.items()}
        yield services, metrics, early, otlp, target_model
    finally:
        stop_all(list(services.values()))


def _has_otel() -> bool:
    try:
        import opentelemetry.sdk  # noqa: F401
        return True
    except ImportError:
        return False


def _pearl_health(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pearl_runtime.cli", "health", address, *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def _generate(address: str, prompt_ids: list[int], request_id: str | None = None, traceparent: str | None = None):
    metadata = [(k, v) for k, v in (("x-request-id", request_id), ("traceparent", traceparent)) if v]
    with grpc.insecure_channel(address) as ch:
        req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenPrompt(ids=prompt_ids),
                                          params=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        tokens = []
        for msg in gateway_pb2_grpc.GatewayStub(ch).Generate(req, metadata=metadata, timeout=60):
            if msg.WhichOneof("kind") == "delta":
                tokens += list(msg.delta.token_ids)
        return tokens


def test_readiness_before_and_after_the_target_is_ready_on_all_three(stack):
    services, _, early, _, _ = stack
    assert early["gateway"] == "NOT_SERVING" and early["gateway_liveness"] == "SERVING"
    assert early["gateway_cli"] == 1
    for kind in ("draft", "target"):
        seen = early["watched"][kind]
        assert seen and seen[-1] == "SERVING", (kind, seen)
        assert seen[0] == "NOT_SERVING", f"the {kind} answered SERVING before it loaded: {seen}"
    for kind, svc in services.items():
        assert asyncio.run(check(svc.address)) == "SERVING"
        assert asyncio.run(check(svc.address, NAMES[kind])) == "SERVING"
        assert asyncio.run(check(svc.address, "liveness")) == "SERVING"
        ok = _pearl_health(svc.address)
        assert ok.returncode == 0 and ok.stdout.strip() == "SERVING", ok
        assert _pearl_health(svc.address, "--service", "liveness").returncode == 0
    unreachable = _pearl_health(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert unreachable.returncode == 1, unreachable


def test_reflection_lists_the_services_on_all_three(stack):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    services = stack[0]
    for kind, svc in services.items():
        with grpc.insecure_channel(svc.address) as ch:
            names = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert {NAMES[kind], "grpc.health.v1.Health"} <= names, (kind, names)


def test_metrics_agree_with_what_the_streams_carried(stack):
    services, metrics, _, _, target_model = stack
    gateway = services["gateway"]
    before = _scrape(metrics["gateway"])
    prompts = [[3 + i, 17, 29, 41 + i] for i in range(N_REQUESTS)]
    streamed = [_generate(gateway.address, p) for p in prompts]
    assert streamed == reference_greedy(target_model, prompts, [MAX_TOKENS] * N_REQUESTS)   # lossless
    g, t, d = (_scrape(metrics[k]) for k in ("gateway", "target", "draft"))
    tokens = sum(map(len, streamed))
    assert _total(g, "pearl:generation_tokens_total") - _total(before, "pearl:generation_tokens_total") == tokens
    assert (_total(g, "pearl:time_to_first_token_seconds_count")
            - _total(before, "pearl:time_to_first_token_seconds_count")) == N_REQUESTS
    assert _total(g, "pearl:request_success_total") - _total(before, "pearl:request_success_total") == N_REQUESTS
    drafted = _total(t, "pearl:spec_decode_num_draft_tokens_total")
    accepted = _total(t, "pearl:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= drafted
    per_pos = sorted((int(s.labels["position"]), s.value) for s in t["pearl:spec_decode_num_accepted_tokens_per_pos_total"])
    counts = [v for _, v in per_pos]
    assert counts == sorted(counts, reverse=True) and sum(counts) == accepted, per_pos
    assert [k for k, _ in per_pos] == list(range(1, len(per_pos) + 1))
    assert _total(t, "pearl:spec_decode_num_drafts_total") >= counts[0]
    assert _total(t, "pearl:draft_link_up") == 1
    assert _total(t, "pearl:round_duration_seconds_count", mode="pearl") > 0
    assert _total(d, "pearl:draft_streams") == 1 and _total(d, "pearl:draft_rounds_total") > 0
    # the dashboard queries only what the services export
    from tests.test_dashboard import dashboard_metric_names
    exported = set(g) | set(t) | set(d)
    families = {n.rsplit("_", 1)[0] for n in exported if n.endswith(("_bucket", "_sum", "_count"))}
    missing = {n for n in dashboard_metric_names(ROOT / "deploy/grafana/pearl-serve.json")
               if n not in exported and n not in families}
    assert not missing, f"the dashboard queries series no service exports: {sorted(missing)}"


def test_json_logs_carry_one_request_id_across_the_three(stack):
    services = stack[0]
    rid = f"op-{uuid.uuid4().hex[:12]}"
    _generate(services["gateway"].address, [5, 9, 13, 21], request_id=rid)
    time.sleep(0.3)
    for kind, svc in services.items():
        lines = [ln for ln in svc.log().splitlines() if ln and not ln.startswith("--- start")]
        assert lines, kind
        for ln in lines:
            try:
                event = json.loads(ln)
            except ValueError:
                raise AssertionError(f"{kind} wrote a line that is not JSON: {ln!r}") from None
            assert {"event", "level", "timestamp", "service"} <= set(event), (kind, event)
        assert any(json.loads(ln).get("request_id") == rid for ln in lines), f"{rid} not in the {kind}'s lines"


def test_spans_of_one_request_from_all_three_share_a_trace(stack):
    services, _, _, otlp, _ = stack
    if otlp is None:
        pytest.skip("the otel extra is not installed")
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    _generate(services["gateway"].address, [7, 11, 19, 23], traceparent=traceparent)
    deadline = time.time() + 20
    while time.time() < deadline:
        names = {s.service for s in otlp.spans if s.trace_id == trace_id}
        if {"pearl-gateway", "pearl-target", "pearl-draft"} <= names:
            break
        time.sleep(0.2)
    assert {"pearl-gateway", "pearl-target", "pearl-draft"} <= names, [
        (s.service, s.name) for s in otlp.spans if s.trace_id == trace_id]


def test_sigterm_flips_readiness_before_the_process_exits(stack):
    """Last in the module: it stops the draft (the target serves on without it)."""
    services = stack[0]
    draft = services["draft"]
    draft.send(signal.SIGTERM)
    seen = []
    deadline = time.time() + 15
    while draft.alive() and time.time() < deadline:
        seen.append(asyncio.run(check(draft.address, timeout_s=0.5)))
        time.sleep(0.02)
    assert "NOT_SERVING" in seen, seen
    assert seen.index("NOT_SERVING") < len(seen) and "SERVING" not in seen[seen.index("NOT_SERVING"):], seen
    assert asyncio.run(check(services["target"].address)) == "SERVING"   # ar without its draft
