"""The gateway's /metrics over real HTTP agrees with what clients received."""
import asyncio
import socket
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pearl_runtime.client import generate
from tests.gateway.fake_target import FakeTarget
from tests.gateway.harness import gateway_over, run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _total(samples, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def test_metrics_count_what_clients_received(tokenizer_dir):
    async def body():
        fake = FakeTarget(step_s=0.002, tokens_per_forward=2)
        async with gateway_over(tokenizer_dir, fake, metrics_port=_free_port()) as (gw, targets):
            assert gw.metrics_port
            deltas: list[list[list[int]]] = []

            def recorder():
                mine: list[list[int]] = []
                deltas.append(mine)
                return lambda text, ids: mine.append(list(ids)) if ids else None

            budgets = [3, 7, 10, 1, 12]
            outs = await asyncio.gather(*(generate(gw.address, token_ids=[1, 2, 3], max_tokens=n, timeout_s=10,
                                                   on_delta=recorder()) for n in budgets))
            with pytest.raises(grpc.aio.AioRpcError):
                await generate(gw.address, prompt="", timeout_s=10)        # INVALID_ARGUMENT
            samples = await asyncio.to_thread(_scrape, gw.metrics_port)
            address = f"127.0.0.1:{targets[0][1]}"
            port = gw.metrics_port

        with socket.socket() as s:   # a stopped gateway frees its /metrics port (no listener left)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        n = len(budgets)
        received = sum(len(o.token_ids) for o in outs)
        assert received == sum(budgets)
        assert _total(samples, "pearl:generation_tokens_total", model_name="tiny") == received
        assert _total(samples, "pearl:prompt_tokens_total", model_name="tiny") == 3 * n
        assert _total(samples, "pearl:time_to_first_token_seconds_count", model_name="tiny") == n
        assert _total(samples, "pearl:e2e_request_latency_seconds_count", model_name="tiny") == n
        assert _total(samples, "pearl:inter_token_latency_seconds_count", model_name="tiny") == \
            sum(len(ids) for mine in deltas for ids in mine[1:])
        assert _total(samples, "pearl:request_success_total") == n
        assert _total(samples, "pearl:request_success_total", finished_reason="length") == n
        assert _total(samples, "pearl:request_failure_total", code="INVALID_ARGUMENT") == 1
        assert _total(samples, "pearl:gateway_requests_in_flight") == 0
        assert _total(samples, "pearl:gateway_target_ready", target=address) == 1
        assert _total(samples, "pearl:gateway_resubmissions_total") == 0
    run(body())


def test_metrics_are_off_by_default(tokenizer_dir):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget()) as (gw, _):
            assert gw.metrics_port is None
    run(body())
