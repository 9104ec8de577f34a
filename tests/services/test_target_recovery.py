"""A target killed -9 and restarted: the gateway routes to it again within ~1 s of its
readiness, and its output equals the ar reference."""
import asyncio
import signal
import time

from pearl_runtime.client import generate
from pearl_runtime.rpc.health import check
from tests.services.procs import free_port, reference_greedy


def test_the_gateway_resumes_on_a_restarted_target_within_a_second_of_its_readiness(cluster):
    target = cluster.service("target", cluster.engine_args(cluster.target_model) + [
        "--mode", "ar", "--draft", f"127.0.0.1:{free_port()}"], "target-restarts")
    gateway = cluster.service("gateway", ["--model", str(cluster.target_model), "--targets", target.address],
                              "gateway-restarts")
    cluster.launch([target, gateway])
    target.kill(signal.SIGKILL)
    deadline = time.time() + 10
    while asyncio.run(check(gateway.address, timeout_s=1)) == "SERVING":   # it notices the loss
        assert time.time() < deadline, "the gateway still SERVING 10 s after its only target died"
        time.sleep(0.05)
    target.start()
    while asyncio.run(check(target.address, timeout_s=1)) != "SERVING":
        assert time.time() < deadline + 120, "the restarted target never became ready"
        time.sleep(0.02)
    ready_at = time.time()
    while asyncio.run(check(gateway.address, timeout_s=1)) != "SERVING":
        assert time.time() - ready_at < 10, "the gateway never resumed"
        time.sleep(0.02)
    resumed = time.time() - ready_at
    assert resumed < 2.0, f"the gateway resumed {resumed:.2f} s after the target's readiness"
    prompt = [11, 7, 3]
    out = asyncio.run(generate(gateway.address, token_ids=prompt, max_tokens=32, ignore_eos=True, timeout_s=60))
    assert out.token_ids == reference_greedy(cluster.target_model, [prompt], [32])[0]
