"""The reliability benchmark's stack: draft, target and gateway as processes on free loopback
ports (pearl_runtime/launch.py's ServiceProcess), each restartable alone, plus what the
scenarios read from them: readiness, Target.Metrics, /metrics gauges, RSS per process group."""
import asyncio
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

import pearl_runtime
from pearl_runtime.launch import ServiceProcess
from pearl_runtime.pb import target_pb2, target_pb2_grpc
from pearl_runtime.rpc.health import check
from pearl_runtime.rpc.server import GRPC_OPTIONS

# the services run from the tree this process imported pearl_runtime from (a --rev snapshot or the checkout)
ROOT = Path(pearl_runtime.__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service(ServiceProcess):
    """One service on a fixed loopback port (kept across restarts), its output in a log file."""

    def __init__(self, kind: str, argv: list[str], log_dir: Path, log_level: str, metrics: bool = False):
        self.port = free_port()
        self.metrics_port = free_port() if metrics else 0
        argv = [*argv, "--port", str(self.port), "--log-level", log_level]
        if metrics:
            argv += ["--metrics-port", str(self.metrics_port)]
        # one torch thread each: the machine has few cores and three services share them
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEARL_")}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PEARL_LOG_FORMAT="console")
        super().__init__(kind, argv, env=env, log_path=log_dir / f"{kind}.log", cwd=ROOT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_lines(self, *needles: str) -> list[str]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [line for line in text.splitlines() if any(n in line for n in needles)]

    def rss_mb(self) -> float | None:
        """VmRSS summed over the process group (a TP group's workers count too); None if down."""
        if not self.alive():
            return None
        total_kb = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.getpgid(int(pid)) != self.proc.pid:
                    continue
                with open(f"/proc/{pid}/status") as f:
                    total_kb += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            except (OSError, StopIteration):
                continue
        return round(total_kb / 1024, 1)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


async def wait_serving(svc: Service, timeout_s: float = 180.0, poll_s: float = 0.02) -> float:
    """Until `svc` reports SERVING; returns time.time() at the first SERVING answer."""
    deadline = time.time() + timeout_s
    while (status := await check(svc.address, timeout_s=1.0)) != "SERVING":
        if not svc.alive():
            raise RuntimeError(f"the {svc.kind} exited (rc {svc.proc.returncode}); see {svc.log_path}")
        if time.time() > deadline:
            raise TimeoutError(f"the {svc.kind} is {status} after {timeout_s:.0f} s; see {svc.log_path}")
        await asyncio.sleep(poll_s)
    return time.time()


async def target_metrics(target: Service, timeout_s: float = 5.0) -> target_pb2.TargetMetrics:
    async with grpc.aio.insecure_channel(target.address, options=GRPC_OPTIONS) as ch:
        return await target_pb2_grpc.TargetStub(ch).Metrics(target_pb2.MetricsRequest(), timeout=timeout_s)


def scrape(svc: Service, names: tuple[str, ...]) -> dict[str, float]:
    """The named gauges/counters from the service's Prometheus /metrics (summed over labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {n: 0.0 for n in names}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


class Stack:
    """draft -> target (pearl) -> gateway. Each service keeps its port, so a restarted one is
    found where its callers dial."""

    def __init__(self, model: str, draft_model: str, log_dir: Path, log_level: str = "warning",
                 engine_args: tuple[str, ...] = ("--threads", "1", "--kv-cache-gb", "0.5")):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.draft = Service("draft", ["--model", draft_model, "--device", "cpu", *engine_args], log_dir,
                             "info")    # info: its "target connected" lines time the re-dials
        self.target = Service("target", ["--model", model, "--device", "cpu", "--mode", "pearl",
                                         "--draft", self.draft.address, *engine_args], log_dir, log_level,
                              metrics=True)
        self.gateway = Service("gateway", ["--model", model, "--targets", self.target.address], log_dir,
                               log_level, metrics=True)

    @property
    def services(self) -> list[Service]:
        return [self.draft, self.target, self.gateway]

    async def start(self, timeout_s: float = 300.0) -> None:
        for svc in self.services:    # the draft first, so the target's first dial finds it
            svc.start()
        for svc in self.services:
            await wait_serving(svc, timeout_s)
        await self.wait_link(timeout_s=60)

    async def wait_link(self, timeout_s: float = 30.0, poll_s: float = 0.02) -> float:
        """Until the target reports a live draft stream; returns the time it first did."""
        deadline = time.time() + timeout_s
        while True:
            try:
                if (await target_metrics(self.target, timeout_s=2)).draft_connected:
                    return time.time()
            except grpc.aio.AioRpcError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"no draft link after {timeout_s:.0f} s")
            await asyncio.sleep(poll_s)

    def alive(self) -> dict[str, bool]:
        return {s.kind: s.alive() for s in self.services}

    def rss_mb(self) -> dict[str, float | None]:
        return {s.kind: s.rss_mb() for s in self.services}

    def stop(self) -> None:
        for s in self.services:
            if s.alive():
                s.send(signal.SIGTERM)
        for s in self.services:
            s.stop(timeout_s=5)
