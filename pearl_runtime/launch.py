"""Start draft, target and gateway as processes, wait until they serve, stop them together.

The one launcher: `pearl up`, `pearl bench`, the tests and the probes use it. A service is a
process (`python -m target_service ...`), as in compose: the runtime never imports a service.
"""
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time

import grpc

from pearl_runtime.log import get_logger

log = get_logger(__name__)

DRAFT_WAIT_S = 60.0   # how long start() waits for the target's draft link
MODULES = {"draft": "draft_service", "target": "target_service", "gateway": "gateway"}


def new_auth_token() -> str:
    """A fresh secret for one stack's run."""
    return secrets.token_urlsafe(32)


def service_argv(what: str, argv: list[str]) -> list[str]:
    """The command line that runs one service."""
    return [sys.executable, "-m", MODULES[what], *argv]


class ServiceProcess:
    """One service as a child process in its own session (stopped as a group, so a TP group's
    workers go with it). `log_path`: its output is appended there instead of this terminal."""

    def __init__(self, kind: str, argv: list[str], env: dict[str, str] | None = None, log_path=None, cwd=None):
        self.kind, self.argv, self.env, self.log_path, self.cwd = kind, list(argv), env, log_path, cwd
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "ServiceProcess":
        self.starts += 1
        out = None
        if self.log_path is not None:
            out = open(self.log_path, "a")
            out.write(f"--- start {self.starts}: {' '.join(service_argv(self.kind, self.argv))}\n")
            out.flush()
        self.proc = subprocess.Popen(service_argv(self.kind, self.argv), env=self.env, cwd=self.cwd, stdout=out,
                                     stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        if out is not None:
            out.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_serving(self, address: str, deadline: float, service: str = "") -> None:
        """Until `address` reports `service` SERVING on grpc.health.v1 (the overall service by
        default: weights loaded, graphs captured, for a gateway a ready target). Raises
        RuntimeError if the process exits first, TimeoutError past `deadline` (time.time())."""
        from pearl_runtime.rpc.health import check
        while True:
            if not self.alive():
                rc = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"the {self.kind} at {address} exited (rc {rc}) during start-up")
            status = asyncio.run(check(address, service, timeout_s=1.0))
            if status == "SERVING":
                return
            if time.time() > deadline:
                raise TimeoutError(f"the {self.kind} at {address} is {status}, not SERVING")
            time.sleep(0.1)

    def send(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Signal the whole group, reap the process (SIGKILL after timeout_s), then kill
        anything left in the group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.send(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
        self.send(signal.SIGKILL)


class Stack:
    """draft + target + gateway as child processes; stopped together. `env`: extra environment
    per service ("draft", "target", "gateway"), e.g. CUDA MPS settings; `log_dir`: each
    service's output goes to <log_dir>/<service>.log instead of this terminal. Optional
    attributes of `args`: dtype, target_device, draft_device, target_argv, draft_argv
    (extra engine flags), start_timeout_s, draft_wait_s (0: do not wait for the draft link),
    auth_token (every hop requires it: `pearl up` makes one a run, new_auth_token())."""

    def __init__(self, args, env: dict | None = None, log_dir=None):
        self.args, self.procs, self.env, self.log_dir = args, [], env or {}, log_dir
        self.target_address = self.draft_address = None

    def start(self) -> str:
        """Start the services (the embedded default model where args name none); the gateway's address."""
        from pearl_runtime.models.default_model import default_draft, default_model
        a = self.args
        model = a.model or default_model()
        draft_model = None if a.mode == "ar" else (getattr(a, "draft_model", None) or default_draft(model))
        common = ["--log-level", a.log_level] + (["--dtype", a.dtype] if getattr(a, "dtype", None) else [])
        devices = {w: getattr(a, f"{w}_device", None) or a.device for w in ("target", "draft")}
        d, t, g = a.base_port, a.base_port + 1, a.base_port + 2
        metrics = {w: [] for w in ("draft", "target", "gateway")}
        if getattr(a, "metrics_port", 0):   # each service its own port, in the order of the gRPC ones
            for i, w in enumerate(metrics):
                metrics[w] = ["--metrics-port", str(a.metrics_port + i)]
        self.target_address, self.draft_address = f"127.0.0.1:{t}", f"127.0.0.1:{d}"
        if a.mode != "ar":
            self._spawn("draft", ["--model", draft_model, "--port", str(d), "--device", devices["draft"]] + common
                        + metrics["draft"] + list(getattr(a, "draft_argv", [])))
        self._spawn("target", ["--model", model, "--port", str(t), "--mode", a.mode, "--gamma", str(a.gamma),
                               "--draft", f"127.0.0.1:{d}", "--device", devices["target"]] + common
                    + metrics["target"] + list(getattr(a, "target_argv", [])))
        self._spawn("gateway", ["--model", model, "--port", str(g), "--targets", f"127.0.0.1:{t}",
                                "--log-level", a.log_level] + metrics["gateway"])
        address = f"127.0.0.1:{g}"
        self._wait_ready(address, draft_port=d if a.mode != "ar" else None,
                         timeout_s=getattr(a, "start_timeout_s", 300))
        return address

    @property
    def auth_token(self) -> str | None:
        return getattr(self.args, "auth_token", None)

    def child_env(self, what: str) -> dict[str, str]:
        """The service's environment: ours plus its extra; an extra None unsets a variable. The
        token goes by the environment, never the command line (`ps` and the logs show that), and
        only the stack's own: one inherited from this shell would lock out the stack's callers."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.update({"PEARL_AUTH_TOKEN": self.auth_token}, **self.env.get(what, {}))   # a write: the child reads it
        return {k: v for k, v in env.items() if v is not None}

    def _spawn(self, what: str, argv: list[str]) -> None:
        log_path = os.path.join(self.log_dir, f"{what}.log") if self.log_dir is not None else None
        self.procs.append(ServiceProcess(what, argv, self.child_env(what), log_path).start())

    def _wait_ready(self, address: str, draft_port: int | None, timeout_s: float = 300) -> None:
        """Until the gateway is SERVING (it is once a target is), then the draft link."""
        from pearl_runtime.rpc.health import check
        deadline = time.time() + timeout_s
        while (status := asyncio.run(check(address, timeout_s=1.0))) != "SERVING":
            self._check_alive()
            if time.time() > deadline:
                self.stop()
                raise SystemExit(f"services not ready after {timeout_s}s (the gateway is {status})")
            time.sleep(0.2)
        wait_s = getattr(self.args, "draft_wait_s", DRAFT_WAIT_S)
        if draft_port and wait_s > 0:
            self._wait_draft(wait_s)

    def _check_alive(self) -> None:
        if any(not p.alive() for p in self.procs):
            self.stop()
            raise SystemExit("a service exited during start-up (see its log above)")

    def _wait_draft(self, timeout_s: float) -> None:
        """Until the target reports a live draft stream, so the first request already speculates
        (a fixed pause can lose that race on a cold machine)."""
        from pearl_runtime.bench.measure import read_metrics
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            self._check_alive()
            try:
                if asyncio.run(read_metrics(self.target_address, timeout_s=2,
                                            auth_token=self.auth_token)).draft_connected:
                    return
            except (grpc.RpcError, TimeoutError):   # not answering yet: ask again
                pass
            time.sleep(0.2)
        print(f"warning: the target has no draft after {timeout_s:.0f}s; it serves ar until the draft "
              "connects (see the draft's and the target's logs)", file=sys.stderr, flush=True)

    def stop(self) -> None:
        # callers first (gateway, target, draft): a service never sees what it calls go away
        # under it, so a clean exit logs no broken streams
        for p in reversed(self.procs):
            p.stop()
