"""pearl_runtime.client.Client: the blocking client, against a real gateway over fake targets."""
import asyncio

from pearl_runtime.client import Client
from tests.gateway.fake_target import FakeTarget, expected_tokens
from tests.gateway.harness import gateway_over, run


def test_sync_client_generates_and_lists_models(tokenizer_dir):
    async def body():
        fake = FakeTarget(step_s=0.005, mode="pearl")
        async with gateway_over(tokenizer_dir, fake) as (gw, _):
            def blocking():                 # its own loop, on a thread: the gateway's loop keeps running
                deltas = []
                with Client(gw.address) as c:
                    out = c.generate(token_ids=[1, 2, 3], max_tokens=6, timeout_s=10,
                                     on_delta=lambda text, ids: deltas.extend(ids))
                    return out, deltas, c.list_models()
            return await asyncio.to_thread(blocking)
    out, deltas, models = run(body())
    assert out.token_ids == deltas == expected_tokens(3, 6)
    assert out.finish_reason == "length" and out.stats.new_tokens == 6 and out.stats.mode == "pearl"
    assert models == ["tiny"]


def test_importing_the_client_does_not_import_torch_or_the_gateway():
    import subprocess
    import sys
    code = "import sys, pearl_runtime.client; print('torch' in sys.modules, 'gateway' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
