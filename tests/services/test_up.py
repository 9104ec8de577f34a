"""`pearl up`'s stack waits until the target reports a live draft stream, so the first
request already speculates (a fixed pause lost that race on a cold machine)."""
import asyncio
from argparse import Namespace

from pearl_runtime.client import generate
from pearl_runtime.bench.measure import read_metrics
from pearl_runtime.bench.run import free_base_port
from pearl_runtime.launch import Stack


def test_up_waits_for_the_draft_and_the_first_request_speculates(llama_dir, draft_factory, tmp_path):
    args = Namespace(model=str(llama_dir), draft_model=str(draft_factory(llama_dir, "perturbed")), mode="pearl",
                     gamma="4", device="cpu", base_port=free_base_port(), log_level="warning",
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
