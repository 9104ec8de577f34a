"""The gateway resolves each --targets name itself: one connection per address, replicas that
appear are added, replicas that vanish are retired (their requests finish or move), a failed
lookup keeps the last addresses. The lookup is injected (a name's answer the test controls);
everything else is the real gateway over fake targets."""
import asyncio
import socket

import pytest
import structlog

from gateway.resolver import Entry, parse_entry, parse_targets
from gateway.server import serve_gateway
from pearl_runtime.client import generate
from tests.gateway.fake_target import FakeTarget, expected_tokens, start_target
from tests.gateway.harness import eventually, run

NAME = "targets.test"


class FakeDNS:
    """A getaddrinfo for one name whose answer (loopback ports) the test sets; others fail."""

    def __init__(self, *ports: int):
        self.ports = list(ports)
        self.fail = False
        self.lookups = 0

    async def __call__(self, host, port, *, type=0, **_):
        self.lookups += 1
        if host != NAME or self.fail:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p)) for p in self.ports]


def _addresses(gw) -> list[str]:
    return [t.address for t in gw.router.targets]


def _ready_series(gw) -> dict[str, float]:
    fam = next(f for f in gw.metrics.registry.collect() if f.name == "pearl:gateway_target_ready")
    return {s.labels["target"]: s.value for s in fam.samples}


def test_entries_parse():
    assert parse_entry("target:50051") == Entry("target", 50051)
    assert parse_entry("[::1]:7") == Entry("::1", 7) and parse_entry("[::1]:7").text == "[::1]:7"
    assert parse_entry("10.0.0.1:1").static and parse_entry("localhost:1").static
    assert not parse_entry("target:1").static
    assert [e.text for e in parse_targets("a:1, b:2,")] == ["a:1", "b:2"]
    for bad in ("target", "target:", ":1", "t:0", "t:x", "::1:5"):
        with pytest.raises(ValueError):
            parse_entry(bad)
    with pytest.raises(ValueError, match="at least one"):
        parse_targets("")


def test_a_name_is_one_connection_per_address_and_requests_spread(tokenizer_dir):
    async def body():
        fakes = [FakeTarget(step_s=0.01), FakeTarget(step_s=0.01)]
        (sa, pa), (sb, pb) = [await start_target(f) for f in fakes]
        dns = FakeDNS(pa, pb)
        with structlog.testing.capture_logs() as logs:
            gw = await serve_gateway(targets=f"{NAME}:50051", model_dir=tokenizer_dir, getaddrinfo=dns,
                                     resolve_interval_s=0.05)
        try:
            assert _addresses(gw) == [f"127.0.0.1:{pa}", f"127.0.0.1:{pb}"]
            await eventually(lambda: all(t.ready for t in gw.router.targets))
            outs = await asyncio.gather(*(generate(gw.address, token_ids=[1] * k, max_tokens=8, timeout_s=10)
                                          for k in range(1, 7)))
            assert [o.token_ids for o in outs] == [expected_tokens(k, 8) for k in range(1, 7)]
            assert all(sum(len(b) for b in f.batches) > 0 for f in fakes)      # both served some
            assert _ready_series(gw) == {f"127.0.0.1:{pa}": 1.0, f"127.0.0.1:{pb}": 1.0}
            added = [e for e in logs if e["event"] == "target added"]
            assert [e["target"] for e in added] == _addresses(gw)
            assert all(e["dns_name"] == f"{NAME}:50051" and e["log_level"] == "info" for e in added)
        finally:
            await gw.stop(None)
            for s in (sa, sb):
                await s.stop(None)
    run(body())


def test_a_replica_that_appears_is_added_and_one_that_vanishes_is_retired(tokenizer_dir):
    async def body():
        fakes = [FakeTarget(step_s=0.02), FakeTarget(step_s=0.02)]
        (sa, pa), (sb, pb) = [await start_target(f) for f in fakes]
        a, b = f"127.0.0.1:{pa}", f"127.0.0.1:{pb}"
        dns = FakeDNS(pa)
        gw = await serve_gateway(targets=[f"{NAME}:1"], model_dir=tokenizer_dir, getaddrinfo=dns,
                                 resolve_interval_s=0.05, retire_grace_s=0.1)
        try:
            await eventually(lambda: _addresses(gw) == [a] and gw.router.targets[0].ready)
            with structlog.testing.capture_logs() as logs:
                dns.ports = [pa, pb]                                  # scaled up
                await eventually(lambda: _addresses(gw) == [a, b] and all(t.ready for t in gw.router.targets))
                # long requests on both; then `a` leaves the answer (scaled down) mid-stream
                reqs = [asyncio.create_task(generate(gw.address, token_ids=[1] * k, max_tokens=40, timeout_s=20))
                        for k in range(1, 5)]
                await eventually(lambda: all(f.sent for f in fakes) and all(
                    len(v) >= 3 for f in fakes for v in f.sent.values()))
                dns.ports = [pb]
                await eventually(lambda: _addresses(gw) == [b])
                outs = await asyncio.gather(*reqs)
                # the retire grace is shorter than the requests: what was left on `a` moved to `b`
                assert [o.token_ids for o in outs] == [expected_tokens(k, 40) for k in range(1, 5)]
                assert gw.metrics.registry.get_sample_value("pearl:gateway_resubmissions_total") >= 1
                await eventually(lambda: a not in _ready_series(gw) and not gw.router._retiring)
                before = len(fakes[0].batches)
                out = await generate(gw.address, token_ids=[2, 3], max_tokens=5, timeout_s=10)
                assert out.token_ids == expected_tokens(2, 5) and len(fakes[0].batches) == before
            events = [(e["event"], e.get("target")) for e in logs]
            assert ("target added", b) in events
            assert ("target retiring", a) in events and ("target removed", a) in events
            resolved = [e for e in logs if e["event"] == "target name resolved"]
            assert resolved[0]["added"] == [b] and resolved[-1]["removed"] == [a]
        finally:
            await gw.stop(None)
            for s in (sa, sb):
                await s.stop(None)
    run(body())


def test_a_retired_replica_finishes_its_requests_within_the_grace(tokenizer_dir):
    async def body():
        fake = FakeTarget(step_s=0.01)
        other = FakeTarget(step_s=0.01)
        (sa, pa), (sb, pb) = await start_target(fake), await start_target(other)
        dns = FakeDNS(pa)
        gw = await serve_gateway(targets=[f"{NAME}:1"], model_dir=tokenizer_dir, getaddrinfo=dns,
                                 resolve_interval_s=0.05, retire_grace_s=10.0)
        try:
            await eventually(lambda: gw.router.targets and gw.router.targets[0].ready)
            req = asyncio.create_task(generate(gw.address, token_ids=[1, 2], max_tokens=30, timeout_s=20))
            await eventually(lambda: fake.sent and len(next(iter(fake.sent.values()))) >= 2)
            dns.ports = [pb]
            out = await req
            assert out.token_ids == expected_tokens(2, 30)
            assert gw.metrics.registry.get_sample_value("pearl:gateway_resubmissions_total") == 0
            assert not other.batches                       # it drained where it was
            await eventually(lambda: not gw.router._retiring)
        finally:
            await gw.stop(None)
            for s in (sa, sb):
                await s.stop(None)
    run(body())


def test_a_failed_lookup_keeps_the_replicas(tokenizer_dir):
    async def body():
        fake = FakeTarget()
        server, port = await start_target(fake)
        dns = FakeDNS(port)
        gw = await serve_gateway(targets=f"{NAME}:1", model_dir=tokenizer_dir, getaddrinfo=dns,
                                 resolve_interval_s=0.02)
        try:
            await eventually(lambda: gw.router.targets and gw.router.targets[0].ready)
            with structlog.testing.capture_logs() as logs:
                dns.fail = True
                n = dns.lookups
                await eventually(lambda: dns.lookups >= n + 3)
                assert _addresses(gw) == [f"127.0.0.1:{port}"]
                out = await generate(gw.address, token_ids=[1], max_tokens=3, timeout_s=10)
                assert out.token_ids == expected_tokens(1, 3)
                dns.fail = False
                await eventually(lambda: any(e["event"] == "target name resolves again" for e in logs))
            warnings = [e for e in logs if e["log_level"] == "warning"]
            assert [e["event"] for e in warnings] == ["cannot resolve target name; keeping its last addresses"]
        finally:
            await gw.stop(None)
            await server.stop(None)
    run(body())


def test_a_literal_address_is_never_looked_up(tokenizer_dir):
    async def body():
        fake = FakeTarget()
        server, port = await start_target(fake)
        dns = FakeDNS()
        gw = await serve_gateway(targets=f"127.0.0.1:{port}", model_dir=tokenizer_dir, getaddrinfo=dns,
                                 resolve_interval_s=0.01)
        try:
            await asyncio.sleep(0.1)
            assert dns.lookups == 0 and _addresses(gw) == [f"127.0.0.1:{port}"]
            assert gw.resolver._task is None
        finally:
            await gw.stop(None)
            await server.stop(None)
    run(body())


def test_a_name_nobody_answers_yet_parks_then_serves(tokenizer_dir):
    """Compose may start the gateway before any target has a DNS record."""
    async def body():
        fake = FakeTarget()
        server, port = await start_target(fake)
        dns = FakeDNS()
        dns.fail = True
        gw = await serve_gateway(targets=f"{NAME}:1", model_dir=tokenizer_dir, getaddrinfo=dns,
                                 resolve_interval_s=0.05)
        try:
            assert _addresses(gw) == []
            req = asyncio.create_task(generate(gw.address, token_ids=[4], max_tokens=3, timeout_s=10))
            await asyncio.sleep(0.1)
            dns.fail, dns.ports = False, [port]
            assert (await req).token_ids == expected_tokens(1, 3)
        finally:
            await gw.stop(None)
            await server.stop(None)
    run(body())
