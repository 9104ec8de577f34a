"""Scaled targets: two real target processes behind one DNS name, as `docker compose up --scale
target=2` or a Kubernetes headless Service give them. The gateway resolves the name itself,
keeps one connection per address, spreads requests over both, and when one is stopped mid-stream
(SIGKILL, or SIGTERM) its requests move to the other with outputs == the ar reference, token for
token; once the name's answer drops the stopped one, its replica (and metrics series) goes.

Both targets listen on the same port, on 127.0.0.2 and 127.0.0.3 (all of 127/8 is loopback on
Linux). The name `targets.test` cannot go into /etc/hosts here, so the gateway runs as
`python -m gateway`'s own main() under a driver that swaps only the name lookup: it answers the
name with the addresses listed in a file the test rewrites (each through the real getaddrinfo),
everything else (flags, resolver, connections, health watches, failover, /metrics) is the real
gateway process."""
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pearl_runtime.client import generate
from tests.services.procs import START_TIMEOUT_S, Service, free_port, reference_greedy, stop_all

NAME = "targets.test"
HOSTS = ("127.0.0.2", "127.0.0.3")

# the gateway's main() with one injected name lookup; argv[1] is the answer file
DRIVER = r"""
import asyncio, functools, json, socket, sys
answer_file = sys.argv.pop(1)
import gateway.__main__ as cli
import gateway.server as server

async def lookup(host, port, *, type=0, **kw):
    loop = asyncio.get_running_loop()
    if host != %r:
        return await loop.getaddrinfo(host, port, type=type, **kw)
    with open(answer_file) as f:
        ips = json.load(f)
    if not ips:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return [info for ip in ips for info in await loop.getaddrinfo(ip, port, type=type)]

server.serve_gateway = functools.partial(server.serve_gateway, getaddrinfo=lookup)
cli.main()
""" % NAME


def _loopback_aliases_work() -> bool:
    try:
        for host in HOSTS:
            with socket.socket() as s:
                s.bind((host, 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _loopback_aliases_work(), reason="127.0.0.2/.3 are not loopback here")


class HostService(Service):
    """A service bound to one loopback alias."""

    def __init__(self, *args, host: str = "127.0.0.1", **kw):
        super().__init__(*args, **kw)
        self.host = host
        self.argv += ["--host", host]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class DrivenGateway(Service):
    """`python -c DRIVER answers.json <gateway flags>`: the gateway's main() with the lookup swapped."""

    def __init__(self, answers: Path, *args, **kw):
        super().__init__("gateway", *args, **kw)
        self.answers = answers

    def answer(self, *hosts: str) -> None:
        tmp = self.answers.with_suffix(".tmp")
        tmp.write_text(json.dumps(list(hosts)))
        tmp.replace(self.answers)       # atomic: the driver never reads half a file

    def start(self):
        self.starts += 1
        argv = [sys.executable, "-c", DRIVER, str(self.answers), *self.argv]
        with open(self.log_path, "a") as out:
            out.write(f"--- start {self.starts}: driven gateway {' '.join(self.argv)}\n")
            out.flush()
            self.proc = subprocess.Popen(argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self


def _scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: list(f.samples) for f in text_string_to_metric_families(text)}


def _ready_by_target(port: int) -> dict[str, float]:
    return {s.labels["target"]: s.value for s in _scrape(port).get("pearl:gateway_target_ready", [])}


def _resubmissions(port: int) -> float:
    return sum(s.value for s in _scrape(port).get("pearl:gateway_resubmissions", []) if s.name.endswith("_total"))


def _committed(target: HostService) -> int:
    import grpc

    from pearl_runtime.pb import target_pb2, target_pb2_grpc
    with grpc.insecure_channel(target.address) as ch:
        return target_pb2_grpc.TargetStub(ch).Metrics(target_pb2.MetricsRequest(), timeout=10).committed_tokens


def _until(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def scaled(llama_dir, tmp_path):
    """Two ar targets behind `targets.test:PORT` and a gateway resolving it every 0.2 s."""
    port = free_port()
    # a short drain: a SIGTERM'd replica hands its unfinished requests back (tests/services/test_drain.py
    # shows the full drain)
    engine = ["--model", str(llama_dir), "--mode", "ar", "--kv-cache-gb", "0.05", "--threads", "1",
              "--drain-timeout", "0.2"]
    targets = [HostService("target", engine + ["--draft", f"127.0.0.1:{free_port()}"], tmp_path, f"target-{i}",
                           port=port, host=host) for i, host in enumerate(HOSTS)]
    metrics_port = free_port()
    gateway = DrivenGateway(tmp_path / "answers.json",
                            ["--model", str(llama_dir), "--targets", f"{NAME}:{port}", "--resolve-interval", "0.2",
                             "--metrics-port", str(metrics_port)], tmp_path, "gateway", log_level="info")
    gateway.metrics_port = metrics_port
    gateway.answer(*HOSTS)
    services = [*targets, gateway]
    try:
        for s in services:
            s.start()
        deadline = time.time() + START_TIMEOUT_S
        for s in services:
            s.wait_ready(deadline)
        want = {t.address: 1.0 for t in targets}
        _until(lambda: _ready_by_target(metrics_port) == want, "both replicas ready at the gateway")
        yield gateway, targets
    finally:
        stop_all(services)


def test_the_gateway_spreads_over_both_replicas_of_one_name(scaled, llama_dir):
    gateway, targets = scaled
    prompts = [[5 + i, 17, 33 + i, 2] for i in range(6)]
    outs = asyncio.run(_generate_all(gateway.address, prompts, 24))
    assert [o.token_ids for o in outs] == reference_greedy(llama_dir, prompts, [24] * len(prompts))
    committed = [_committed(t) for t in targets]
    assert all(c > 0 for c in committed) and sum(committed) == 24 * len(prompts), committed
    log = gateway.log()
    for t in targets:
        assert f"target={t.address}" in log and "target added" in log    # logged with the name
    assert f"dns_name={NAME}:{targets[0].port}" in log


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_stopping_one_replica_moves_its_requests_to_the_other(scaled, llama_dir, sig):
    gateway, targets = scaled
    prompts = [[9 + i, 4, 21 + 2 * i] for i in range(6)]
    max_tokens = 1000   # ~1.5 s of ar at 6 sequences: far past the victim's 0.2 s drain
    seen: list[int] = []
    stopped: list = []

    def on_delta(text, ids):
        seen.extend(ids)
        if len(seen) >= 60 and not stopped:
            # the replica serving requests now (the gateway may have sent one coalesced batch to
            # either): a stopped idle replica would hand nothing back
            stopped.append(max(targets, key=_committed))
            stopped[0].send(sig)            # mid-stream: its requests have tokens out already

    outs = asyncio.run(_generate_all(gateway.address, prompts, max_tokens, on_delta))
    assert stopped, "the requests finished before the stop"
    victim = stopped[0]
    survivor = next(t for t in targets if t is not victim)
    assert [o.token_ids for o in outs] == reference_greedy(llama_dir, prompts, [max_tokens] * len(prompts))
    assert all(o.finish_reason == "length" for o in outs)
    assert _resubmissions(gateway.metrics_port) >= 1, f"{victim.log()[-4000:]}\n{gateway.log()[-4000:]}"
    victim.proc.wait(timeout=30)
    assert "resubmitting" in gateway.log()
    # the name's answer loses the stopped replica (as compose's DNS does): the gateway drops it
    gateway.answer(survivor.host)
    _until(lambda: _ready_by_target(gateway.metrics_port) == {survivor.address: 1.0}, "the stopped replica removed")
    assert "target removed" in gateway.log()
    out = asyncio.run(generate(gateway.address, token_ids=[3, 1, 4], max_tokens=8, ignore_eos=True, timeout_s=60))
    assert out.token_ids == reference_greedy(llama_dir, [[3, 1, 4]], [8])[0]


async def _generate_all(address, prompts, max_tokens, on_delta=None):
    return await asyncio.gather(*(generate(address, token_ids=p, max_tokens=max_tokens, ignore_eos=True,
                                           on_delta=on_delta, timeout_s=120) for p in prompts))
