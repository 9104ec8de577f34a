"""`pearl health`: exit 0 only when SERVING, 1 otherwise (never 2, which Docker reserves)."""
import asyncio
import socket
import subprocess
import sys

import grpc
import pytest

from pearl_runtime.rpc.health import Health


async def _pearl_health(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pearl_runtime.cli", "health", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_exit_codes_follow_readiness():
    async def scenario():
        server = grpc.aio.server()
        health = Health("pearl.v1.Target")
        health.add_to(server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            assert (await _pearl_health(address))[:2] == (1, "NOT_SERVING\n")
            assert (await _pearl_health(address, "--service", "liveness"))[:2] == (0, "SERVING\n")
            await health.set_ready(True)
            assert (await _pearl_health(address))[:2] == (0, "SERVING\n")
            assert (await _pearl_health(address, "--service", "pearl.v1.Target"))[:2] == (0, "SERVING\n")
            assert (await _pearl_health(address, "--service", "pearl.v1.Nope"))[:2] == (1, "UNKNOWN_SERVICE\n")
        finally:
            await server.stop(None)
        code, out, _ = await _pearl_health(f"127.0.0.1:{_closed_port()}", "--timeout", "2")
        assert (code, out) == (1, "UNREACHABLE\n")
    asyncio.run(scenario())


@pytest.mark.parametrize("args", [(), ("127.0.0.1:1", "--timeout", "soon"), ("127.0.0.1:1", "--nope")])
def test_bad_usage_exits_1_with_one_line(args):
    code, out, err = asyncio.run(_pearl_health(*args))
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "error" in err
