"""`pearl up`'s stack waits until the target reports a live draft stream, so the first
request already speculates (a fixed pause lost that race on a cold machine)."""
import asyncio
import socket
from argparse import Namespace

from gateway.client import generate
from pearl_runtime.bench.measure import read_metrics
from pearl_runtime.cli import Stack


def _free_base_port() -> int:
    """A port p with p, p + 1 and p + 2 free (draft, target, gateway)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 2 > 65535:
            continue
        try:
            socks = []
            for p in (base, base + 1, base + 2):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no three consecutive free ports")


def test_up_waits_for_the_draft_and_the_first_request_speculates(llama_dir, draft_factory, tmp_path):
    args = Namespace(model=str(llama_dir), draft_model=str(draft_factory(llama_dir, "perturbed")), mode="pearl",
                     gamma="4", device="cpu", base_port=_free_base_port(), log_level="warning",
                     draft_argv=["--kv-cache-gb", "0.05"], target_argv=["--kv-cache-gb", "0.05"],
                     start_timeout_s=120)
    stack = Stack(args, log_dir=str(tmp_path))
    try:
        address = stack.start()
        assert asyncio.run(read_metrics(stack.target_address)).draft_connected
        done = asyncio.run(generate(address, token_ids=[5, 6, 7, 8, 9], max_tokens=12, ignore_eos=True))
        assert done.stats.mode == "pearl", done.stats.mode
    finally:
        stack.stop()
