"""SIGTERM drains: readiness NOT_SERVING at once, the requests in flight finish (== the ar
reference), then the process exits 0. A target's drain, then a gateway's."""
import asyncio
import signal
import time

from pearl_runtime.client import generate
from pearl_runtime.rpc.health import check
from tests.services.procs import free_port, reference_greedy

PROMPTS = [[7 + i, 3, 19 + i] for i in range(8)]
MAX_TOKENS = 600


async def _streams_with_stop(address, victim, sig_after_tokens=40):
    """8 greedy streams; `victim` gets SIGTERM once every stream has tokens out. Returns the
    completions and the readiness `victim` reported right after the signal."""
    seen = {i: 0 for i in range(len(PROMPTS))}
    sent = asyncio.Event()
    readiness = []

    async def one(i):
        def on_delta(_text, ids):
            seen[i] += len(ids)
        return await generate(address, token_ids=PROMPTS[i], max_tokens=MAX_TOKENS, ignore_eos=True,
                              on_delta=on_delta, timeout_s=120)

    async def stopper():
        while min(seen.values()) < sig_after_tokens:
            await asyncio.sleep(0.01)
        victim.send(signal.SIGTERM)
        sent.set()
        await asyncio.sleep(0.3)
        readiness.append(await check(victim.address, timeout_s=2))

    outs, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(len(PROMPTS)))), stopper())
    assert sent.is_set()
    return outs, readiness[0]


def _ar_stack(cluster, name, *target_flags):
    target = cluster.service("target", cluster.engine_args(cluster.target_model) + [
        "--mode", "ar", "--draft", f"127.0.0.1:{free_port()}", *target_flags], f"target-{name}", log_level="info")
    gateway = cluster.service("gateway", ["--model", str(cluster.target_model), "--targets", target.address],
                              f"gateway-{name}", log_level="info")
    cluster.launch([target, gateway])
    return target, gateway


def test_sigterm_on_a_target_lets_its_8_streams_finish_then_exits_0(cluster):
    target, gateway = _ar_stack(cluster, "drain")
    outs, readiness = asyncio.run(_streams_with_stop(gateway.address, target))
    assert readiness == "NOT_SERVING"     # while it drains
    assert [o.token_ids for o in outs] == reference_greedy(cluster.target_model, PROMPTS, [MAX_TOKENS] * 8)
    assert all(o.finish_reason == "length" for o in outs)
    assert target.proc.wait(timeout=30) == 0
    log = target.log()
    assert "draining" in log and "drained" in log and "drain timeout" not in log
    assert "resubmitting" not in gateway.log()      # every request finished where it was


def test_sigterm_on_the_gateway_lets_its_streams_finish_then_exits_0(cluster):
    _target, gateway = _ar_stack(cluster, "gw-drain")
    t0 = time.time()
    outs, readiness = asyncio.run(_streams_with_stop(gateway.address, gateway))
    assert readiness in ("NOT_SERVING", "UNREACHABLE")
    assert [o.token_ids for o in outs] == reference_greedy(cluster.target_model, PROMPTS, [MAX_TOKENS] * 8)
    assert gateway.proc.wait(timeout=30) == 0
    assert time.time() - t0 < 60
