"""The Grafana dashboard: importable JSON whose PromQL queries only metrics the services export."""
import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "pearl-serve.json"

# Every series family the gateway, target and draft export (histograms by their family name).
EXPORTED = {
    "pearl:time_to_first_token_seconds", "pearl:inter_token_latency_seconds", "pearl:e2e_request_latency_seconds",
    "pearl:prompt_tokens_total", "pearl:generation_tokens_total", "pearl:request_success_total",
    "pearl:request_failure_total", "pearl:gateway_requests_in_flight", "pearl:gateway_resubmissions_total",
    "pearl:gateway_target_ready",
    "pearl:num_requests_running", "pearl:num_requests_waiting", "pearl:kv_cache_usage_perc",
    "pearl:prefix_cache_queries_total", "pearl:prefix_cache_hits_total", "pearl:spec_decode_num_drafts_total",
    "pearl:spec_decode_num_draft_tokens_total", "pearl:spec_decode_num_accepted_tokens_total",
    "pearl:spec_decode_num_accepted_tokens_per_pos_total", "pearl:round_duration_seconds", "pearl:spec_gamma",
    "pearl:draft_link_up", "pearl:draft_reconnects_total", "pearl:rounds_without_draft_total",
    "pearl:draft_streams", "pearl:draft_round_duration_seconds",
}
HISTOGRAMS = {"pearl:time_to_first_token_seconds", "pearl:inter_token_latency_seconds",
              "pearl:e2e_request_latency_seconds", "pearl:round_duration_seconds", "pearl:draft_round_duration_seconds"}

_METRIC = re.compile(r"(?<![a-zA-Z0-9_:])pearl:[a-zA-Z0-9_:]+")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')   # label values may hold anything; never read names there


def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard_queries(path=DASHBOARD) -> list[str]:
    """Every PromQL expression in the dashboard: the panels' targets and the template variables'."""
    dash = json.loads(Path(path).read_text())
    exprs = [t["expr"] for p in _panels(dash["panels"]) for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query.get("query", "") if isinstance(query, dict) else query or "")
    return [e for e in exprs if e]


def dashboard_metric_names(path=DASHBOARD) -> set[str]:
    """The series names the dashboard's PromQL queries, as exposed (a histogram's `_bucket`, ...)."""
    return {name for expr in dashboard_queries(path) for name in _METRIC.findall(_QUOTED.sub('""', expr))}


def family(name: str) -> str:
    """A series name's metric family: a histogram's `_bucket` / `_sum` / `_count` stripped."""
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base if base in HISTOGRAMS else name


def test_dashboard_is_importable_with_a_prometheus_input():
    dash = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    assert "model_name" in [v["name"] for v in dash["templating"]["list"]]
    assert dash["uid"] and dash["title"]


def test_every_panel_queries_prometheus():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in _panels(dash["panels"]) if p["type"] != "row"]
    assert {p["type"] for p in panels} <= {"timeseries", "stat"}
    assert len({p["id"] for p in _panels(dash["panels"])}) == len(list(_panels(dash["panels"])))
    for p in panels:
        assert p["targets"] and all(t["expr"] and t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"]), \
            p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), (p["title"], t["expr"])


def test_dashboard_queries_only_exported_metrics():
    names = dashboard_metric_names()
    assert {family(n) for n in names} <= EXPORTED, {family(n) for n in names} - EXPORTED
    # a histogram is queried through its buckets, never by its bare family name
    assert not names & HISTOGRAMS
    # the required panels' inputs are all there
    assert {"pearl:generation_tokens_total", "pearl:time_to_first_token_seconds_bucket",
            "pearl:inter_token_latency_seconds_bucket", "pearl:e2e_request_latency_seconds_bucket",
            "pearl:spec_decode_num_accepted_tokens_per_pos_total", "pearl:spec_decode_num_drafts_total",
            "pearl:spec_gamma", "pearl:draft_link_up", "pearl:draft_reconnects_total", "pearl:kv_cache_usage_perc",
            "pearl:num_requests_running", "pearl:num_requests_waiting", "pearl:round_duration_seconds_bucket",
            "pearl:gateway_requests_in_flight", "pearl:gateway_target_ready"} <= names


def test_metric_names_read_robustly(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"panels": [{"type": "row", "panels": [{"type": "stat", "targets": [
        {"expr": 'sum(rate(pearl:a_total{x="pearl:not_a_metric"}[5m])) / ignoring(p) pearl:b:c'}]}]}],
        "templating": {"list": [{"query": "label_values(pearl:d_bucket, le)"}]}}))
    assert dashboard_metric_names(path) == {"pearl:a_total", "pearl:b:c", "pearl:d_bucket"}
