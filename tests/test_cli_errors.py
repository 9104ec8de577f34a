"""A user's error at the command line is one stderr line naming the cause and exit 2, no traceback
(issue #26): bad model directories, a port in use, an unreachable gateway or its refusal, an MPS
share refused. --debug (or PEARL_LOG_LEVEL=debug) brings the traceback back."""
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("PEARL_")}, "PYTHONUNBUFFERED": "1"}


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(*args), cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def assert_one_line(done, *names: str) -> str:
    """Exit 2, one or two non-empty stderr lines naming each of `names`, no traceback."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert 1 <= len(lines) <= 2 and "Traceback" not in done.stderr, done.stderr
    for name in names:
        assert name in done.stderr, (name, done.stderr)
    return done.stderr


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good")
    make_tiny_model(path)
    return path


def _broken(good: Path, tmp_path: Path, how: str) -> Path:
    path = tmp_path / how
    if how == "missing":
        return path
    shutil.copytree(good, path)
    config = path / "config.json"
    if how == "no-config":
        config.unlink()
    elif how == "corrupt-config":
        config.write_text('{"architectures": ["LlamaForCausalLM"], ')
    elif how == "gpt2":
        config.write_text(json.dumps({**json.loads(config.read_text()), "architectures": ["GPT2LMHeadModel"]}))
    elif how == "no-weights":
        for f in path.glob("*.safetensors"):
            f.unlink()
    elif how == "no-tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (path / f).unlink(missing_ok=True)
    return path


WHAT = {"missing": "does not exist", "no-config": "no config.json", "corrupt-config": "not valid JSON",
        "gpt2": "GPT2LMHeadModel", "no-weights": "safetensors", "no-tokenizer": "tokenizer"}


TARGET_CASES = [("target", how) for how in WHAT]
DRAFT_CASES = [("draft", "no-weights"), ("draft", "gpt2")]
UP_CASES = [("up", "missing"), ("up", "no-tokenizer")]


def _command(kind: str, model: Path) -> list[str]:
    if kind == "target":   # `pearl target` execs `python -m target_service`: both paths at once
        return ["pearl_runtime.cli", "target", "--model", str(model), "--device", "cpu", "--port", "0"]
    if kind == "draft":
        return ["draft_service", "--model", str(model), "--device", "cpu", "--port", "0"]
    return ["pearl_runtime.cli", "up", "--model", str(model), "--mode", "ar", "--base-port", str(_closed_port())]


@pytest.fixture(scope="module")
def model_dir_runs(good_model, tmp_path_factory) -> dict:
    """Every bad-model-directory command, run side by side (each spends its seconds importing torch)."""
    procs = {}
    for kind, how in TARGET_CASES + DRAFT_CASES + UP_CASES:
        model = _broken(good_model, tmp_path_factory.mktemp(f"{kind}-{how}"), how)
        procs[kind, how] = model, subprocess.Popen(_argv(*_command(kind, model)), cwd=ROOT, env=ENV, text=True,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = {}
    for key, (model, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        runs[key] = model, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return runs


@pytest.mark.parametrize("kind,how", TARGET_CASES + DRAFT_CASES + UP_CASES)
def test_model_dir_problems(model_dir_runs, kind, how):
    model, done = model_dir_runs[kind, how]
    assert_one_line(done, str(model), WHAT[how], f"pearl {kind}: error:")


@pytest.mark.parametrize("how", ["missing", "no-tokenizer", "corrupt-tokenizer"])
def test_gateway_tokenizer_problems(good_model, tmp_path, how):
    model = _broken(good_model, tmp_path, "missing" if how == "missing" else "no-tokenizer")
    if how == "corrupt-tokenizer":
        (model / "tokenizer.json").write_text("{not json")
    done = _run("gateway", "--model", str(model), "--port", "0", "--targets", "127.0.0.1:1")
    assert_one_line(done, str(model), "pearl gateway: error:")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def held_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_port_in_use_gateway(good_model, held_port):
    done = _run("gateway", "--model", str(good_model), "--port", str(held_port), "--targets", "127.0.0.1:1")
    assert_one_line(done, f"port {held_port}", "in use", "--port")


def test_port_in_use_target(good_model, held_port):
    done = _run("target_service", "--model", str(good_model), "--device", "cpu", "--mode", "ar",
                "--port", "0", "--metrics-port", str(held_port))
    assert_one_line(done, f"port {held_port}", "in use", "--metrics-port")


def test_grpc_server_refuses_a_held_port():
    """gRPC's default SO_REUSEPORT let a second server share a port silently; ours fail to bind."""
    from pearl_runtime.errors import UsageError
    from pearl_runtime.rpc.server import bind, new_server

    async def scenario():
        first, second = new_server(), new_server()
        port = bind(first, "127.0.0.1", 0)
        await first.start()
        try:
            with pytest.raises(UsageError, match=f"127.0.0.1:{port}"):
                bind(second, "127.0.0.1", port)
        finally:
            await first.stop(None)
    asyncio.run(scenario())


def test_generate_unreachable_names_address_and_status():
    address = f"127.0.0.1:{_closed_port()}"
    done = _run("pearl_runtime.cli", "generate", "--address", address, "hi")
    assert_one_line(done, address, "UNAVAILABLE", "pearl generate: error:")


def test_generate_refused_request_is_one_line(tmp_path):
    from tests.gateway.fake_target import FakeTarget
    from tests.gateway.harness import gateway_over
    from tests.tiny_models import make_tokenizer
    make_tokenizer(tmp_path)

    async def scenario():
        async with gateway_over(tmp_path, FakeTarget()) as (gw, _):
            proc = await asyncio.create_subprocess_exec(
                *_argv("pearl_runtime.cli", "generate", "--address", gw.address, "--max-tokens", "100000", "hi"),
                cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())
    done = asyncio.run(scenario())
    assert_one_line(done, "INVALID_ARGUMENT", "max_tokens")


@pytest.mark.parametrize("command", ["up", "bench"])
def test_bad_mps_shares(command):
    done = _run("pearl_runtime.cli", command, "--mps", "--mps-shares", "80")
    assert_one_line(done, "--mps-shares", "'80'")


def test_mps_control_missing(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    done = _run("pearl_runtime.cli", "up", "--mps", env={**ENV, "PATH": str(bare)})
    assert_one_line(done, "nvidia-cuda-mps-control", "PATH")


def test_mps_control_failing(tmp_path):
    fake = tmp_path / "bin" / "nvidia-cuda-mps-control"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'cannot start the daemon' >&2\nexit 3\n")
    fake.chmod(0o755)
    done = _run("pearl_runtime.cli", "up", "--mps", env={**ENV, "PATH": f"{fake.parent}:{ENV['PATH']}"})
    assert_one_line(done, "rc 3", "cannot start the daemon")


def test_debug_brings_the_traceback_back(tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    done = _run("pearl_runtime.cli", "generate", "--debug", "--address", address, "hi")
    assert done.returncode == 2 and "Traceback" in done.stderr and "UNAVAILABLE" in done.stderr, done.stderr
    done = _run("gateway", "--model", str(tmp_path / "nope"), "--port", "0", "--targets", "127.0.0.1:1",
                env={**ENV, "PEARL_LOG_LEVEL": "debug"})
    assert done.returncode == 2 and "Traceback" in done.stderr and "ModelLoadError" in done.stderr, done.stderr


@pytest.mark.parametrize("flags, names", [
    (["--gamma", "100"], ["--gamma 100", "64"]),
    (["--mode", "auto", "--max-gamma", "50"], ["--max-gamma 50", "64"]),
    (["--mode", "sd", "--gamma", "65"], ["--gamma 65", "64"]),
])
def test_target_refuses_rounds_longer_than_a_draft_takes(good_model, flags, names):
    """A gamma the draft would refuse (more than 64 draft steps a round, head start counted) stops
    the target before it loads anything."""
    assert_one_line(_run("target_service", "--model", str(good_model), "--draft", "127.0.0.1:1", *flags), *names)


@pytest.mark.parametrize("flag, value", [("--gamma", "0"), ("--gamma", "x"), ("--head-start", "-2"),
                                         ("--head-start-quorum", "2")])
def test_target_flag_values_are_usage_errors(good_model, flag, value):
    done = _run("target_service", "--model", str(good_model), flag, value)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"pearl target: error: argument {flag}: wants"), done.stderr
