"""The hung-round watchdog: a target whose round stops moving (a TP rank frozen mid-collective,
as a wedged GPU or NCCL would) goes NOT_SERVING and ends its Serve streams, and the gateway
finishes every request on the other target, == the ar reference."""
import asyncio
import signal
import time
from pathlib import Path

from pearl_runtime.client import generate
from pearl_runtime.rpc.health import check
from tests.services.procs import free_port, reference_greedy


def _tp_workers(pid: int) -> list[int]:
    """The spawned TP rank processes under `pid`."""
    found = []
    children = {c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()}
    for child in children:
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            found.append(int(child))
    return found


def _wait_routable(gateway, address: str, timeout_s: float = 30.0) -> None:
    """Until the gateway has logged `address` up (its Serve stream) and SERVING (its health watch)."""
    deadline = time.time() + timeout_s
    while True:
        lines = [line for line in gateway.log().splitlines() if address in line]
        if any("target up" in line for line in lines) and \
                any("target health" in line and "SERVING" in line and "NOT_SERVING" not in line for line in lines):
            return
        assert time.time() < deadline, f"gateway never routed to {address}:\n{gateway.log_tail()}"
        time.sleep(0.05)


def test_a_hung_round_hands_its_requests_to_the_other_target(cluster):
    engine = cluster.engine_args(cluster.target_model) + ["--mode", "ar", "--draft", f"127.0.0.1:{free_port()}"]
    wedged = cluster.service("target", engine + ["--tp", "2", "--hung-round-floor", "2"], "target-wedges",
                             log_level="info")
    healthy = cluster.service("target", engine, "target-healthy")
    gateway = cluster.service("gateway", ["--model", str(cluster.target_model),
                                          "--targets", f"{wedged.address},{healthy.address}"], "gateway-wedge",
                              log_level="info")
    cluster.launch([wedged, healthy, gateway])
    for target in (wedged, healthy):   # both in the gateway's rotation, or every request goes to one
        _wait_routable(gateway, target.address)
    workers = _tp_workers(wedged.proc.pid)
    assert len(workers) == 1, workers
    prompts = [[13 + i, 5, 8] for i in range(6)]
    seen = []

    def on_delta(_text, ids):
        seen.extend(ids)
        if len(seen) >= 30 and not on_delta.frozen:
            on_delta.frozen = True
            import os
            os.kill(workers[0], signal.SIGSTOP)    # rank 1 stops: rank 0's next collective waits forever
    on_delta.frozen = False

    async def all_of():
        return await asyncio.gather(*(generate(gateway.address, token_ids=p, max_tokens=200, ignore_eos=True,
                                               on_delta=on_delta, timeout_s=90) for p in prompts))
    try:
        t0 = time.time()
        outs = asyncio.run(all_of())
        took = time.time() - t0
        assert on_delta.frozen
        assert [o.token_ids for o in outs] == reference_greedy(cluster.target_model, prompts, [200] * 6)
        assert took < 45, f"{took:.1f} s"
        assert "request admitted" in wedged.log()      # the frozen round held requests
        assert "round hung: NOT_SERVING" in wedged.log()
        assert asyncio.run(check(wedged.address, timeout_s=2)) == "NOT_SERVING"
        assert "resubmitting" in gateway.log()
    finally:
        import os
        os.kill(workers[0], signal.SIGCONT)
