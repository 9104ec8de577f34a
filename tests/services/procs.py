"""Real multi-process service stacks on loopback: `python -m draft_service|target_service|gateway`
as child processes (each its own process group, killed as a group on teardown).

    cluster.stacks(("copy", "pearl"), ("copy", "sd"), (None, "ar"))   # started in parallel
    stack = cluster.stack("copy", "pearl")       # cached: one stack per (pair, mode) per session
    stack.gateway.address, stack.target.address, stack.draft.address

Pairs are drafts derived from one tiny Llama target (tests/tiny_models.py): "copy" (identical
weights), "perturbed" (noisy copy), "unrelated" (another seed, same tokenizer). Drafts log at
info level so a fixture can see the target's handshake ("target connected"); targets and
gateways log at warning. Each service's output goes to a log file shown when start-up fails.
"""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from pearl_runtime import launch

ROOT = Path(__file__).resolve().parents[2]      # the repository: services run from here

GAMMA = 4
KV_CACHE_GB = "0.05"
START_TIMEOUT_S = 90.0
# targets and gateways log at warning; set PEARL_TEST_LOG_LEVEL=info (or debug) to see more
LOG_LEVEL = os.environ.get("PEARL_TEST_LOG_LEVEL", "warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service(launch.ServiceProcess):
    """One service child process on a fixed loopback port, its output in a log file."""

    def __init__(self, kind: str, args: list[str], log_dir: Path, name: str, log_level: str = LOG_LEVEL,
                 port: int | None = None):
        self.name = name
        self.port = port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEARL_")}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PEARL_LOG_FORMAT="console")   # key=value lines
        super().__init__(kind, [*args, "--port", str(self.port), "--log-level", log_level], env=env,
                         log_path=log_dir / f"{name}.log", cwd=ROOT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def check_alive(self) -> None:
        if not self.alive():
            rc = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{self.name} exited (rc {rc}) during start-up; log:\n{self.log_tail()}")

    def wait_ready(self, deadline: float) -> None:
        """Until it reports SERVING on grpc.health.v1 (the log's tail in the error if not)."""
        try:
            self.wait_serving(self.address, deadline)
        except (RuntimeError, TimeoutError) as e:
            raise type(e)(f"{self.name}: {e}; log:\n{self.log_tail()}") from None

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 10.0) -> None:
        self.stop(sig, timeout_s)

    def count(self, text: str) -> int:
        return self.log().count(text)

    def wait_log(self, text: str, n: int = 1, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until `text` appears n times in this service's log (all its starts)."""
        deadline = time.time() + timeout_s
        while self.count(text) < n:
            self.check_alive()
            if time.time() > deadline:
                raise TimeoutError(f"{self.name}: {text!r} logged {self.count(text)} of {n} times; "
                                   f"log:\n{self.log_tail()}")
            time.sleep(0.05)


def wait_handshakes(draft: Service, n: int, deadline: float) -> None:
    """Until the draft has logged `n` accepted target streams in total (all its starts)."""
    draft.wait_log("target connected", n, timeout_s=max(0.0, deadline - time.time()))


@dataclass
class Stack:
    gateway: Service
    target: Service
    draft: Service | None
    mode: str
    pair: str | None
    target_model: Path


class Cluster:
    """Starts services on demand, caches stacks per (pair, mode), kills everything at the end."""

    def __init__(self, target_model: Path, drafts: dict[str, Path], log_dir: Path):
        self.target_model, self.draft_models, self.log_dir = target_model, drafts, log_dir
        self.services: list[Service] = []
        self.drafts: dict[str, Service] = {}
        self.handshakes: dict[str, int] = {}     # draft name -> target streams expected so far
        self._stacks: dict[tuple, Stack] = {}

    def engine_args(self, model) -> list[str]:
        return ["--model", str(model), "--kv-cache-gb", KV_CACHE_GB, "--threads", "1"]

    def service(self, kind, args, name, **kw) -> Service:
        svc = Service(kind, args, self.log_dir, name, **kw)
        self.services.append(svc)
        return svc

    def new_draft(self, model: Path, name: str) -> Service:
        return self.service("draft", self.engine_args(model), name,
                            log_level="debug" if LOG_LEVEL == "debug" else "info")

    def new_target(self, mode: str, draft: Service | None, name: str, model: Path | None = None,
                   gamma: int = GAMMA) -> Service:
        mode, _, variant = mode.partition(":")   # "pearl:head0": plain PEARL, no head start
        args = self.engine_args(model or self.target_model) + ["--mode", mode, "--gamma", str(gamma)]
        args += {"": [], "head0": ["--head-start", "0"], "head2": ["--head-start", "2"]}[variant]
        # an ar target gets a draft address nobody listens on: it must never dial it
        args += ["--draft", draft.address if draft else f"127.0.0.1:{free_port()}"]
        return self.service("target", args, name)

    def new_gateway(self, target: Service, name: str, model: Path | None = None) -> Service:
        return self.service("gateway", ["--model", str(model or self.target_model), "--targets", target.address],
                            name)

    def stack(self, pair: str | None, mode: str) -> Stack:
        return self.stacks((pair, mode))[0]

    def stacks(self, *specs: tuple[str | None, str]) -> list[Stack]:
        """Stacks for (pair, mode) specs, starting all missing services in parallel."""
        new: list[Stack] = []
        for pair, mode in specs:
            pair = None if mode == "ar" else pair
            if (pair, mode) in self._stacks:
                continue
            draft = None
            if pair is not None:
                if pair not in self.drafts:
                    self.drafts[pair] = self.new_draft(self.draft_models[pair], f"draft-{pair}")
                draft = self.drafts[pair]
            target = self.new_target(mode, draft, f"target-{pair}-{mode}")
            gateway = self.new_gateway(target, f"gateway-{pair}-{mode}")
            st = Stack(gateway, target, draft, mode, pair, self.target_model)
            self._stacks[(pair, mode)] = st
            new.append(st)
        self.launch([s for st in new for s in (st.draft, st.target, st.gateway) if s is not None],
                    handshakes=[st.draft for st in new if st.draft is not None])
        return [self._stacks[(None if m == "ar" else p, m)] for p, m in specs]

    def launch(self, services: list[Service], handshakes: list[Service] = ()) -> None:
        """Start services not yet running (drafts first, so targets dial a live one), wait until
        all listen, the gateways answer, and each draft in `handshakes` got one more target."""
        order = {"draft": 0, "target": 1, "gateway": 2}
        todo = sorted({id(s): s for s in services if not s.alive()}.values(), key=lambda s: order[s.kind])
        for s in todo:
            s.start()
        deadline = time.time() + START_TIMEOUT_S
        for s in todo:
            s.wait_ready(deadline)
        for d in handshakes:
            self.handshakes[d.name] = self.handshakes.get(d.name, 0) + 1
        for d in {id(d): d for d in handshakes}.values():
            wait_handshakes(d, self.handshakes[d.name], deadline)

    def stop(self) -> None:
        stop_all(self.services)


def stop_all(services: list[Service], grace_s: float = 2.0) -> None:
    """SIGTERM every process group at once, SIGKILL what is left after grace_s, reap all."""
    live = [s for s in services if s.alive()]
    for s in live:
        s.send(signal.SIGTERM)
    deadline = time.time() + grace_s
    for s in live:
        try:
            s.proc.wait(timeout=max(0.01, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for s in services:
        s.kill(signal.SIGKILL)




def run(coro, timeout_s: float = 120.0):
    """Run one async test body in a fresh event loop, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def reference_greedy(model_dir, prompts, max_tokens) -> list[list[int]]:
    """Target-only greedy completions from the in-process engine (ignore_eos).

    Runs with one torch thread: on a 2-core machine torch's default of 2 intra-op threads
    made this ~30x slower (1 s -> 30 s for 4 x 250 tokens), with service processes idle."""
    import torch

    from pearl_runtime.config import EngineConfig
    from pearl_runtime.engine.llm_engine import LLMEngine
    from pearl_runtime.sampling import SamplingParams
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eng = LLMEngine(EngineConfig(model=str(model_dir), num_blocks=1024), load_tok=False)
        return eng.generate([list(p) for p in prompts],
                            [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    finally:
        torch.set_num_threads(threads)


def target_metrics(service: Service):
    """The target's cumulative round counters (Target.Metrics)."""
    from pearl_runtime.pb import target_pb2, target_pb2_grpc
    from pearl_runtime.rpc.server import GRPC_OPTIONS
    with grpc.insecure_channel(service.address, options=GRPC_OPTIONS) as ch:
        return target_pb2_grpc.TargetStub(ch).Metrics(target_pb2.MetricsRequest(), timeout=10)
