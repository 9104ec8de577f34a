"""The target and an absent, late or stalled draft: a WARNING and a metric while it cannot be
reached, speculation back within ~1 s of a (re)started draft's readiness, and a stalled draft
(SIGSTOP) cut off by the round watchdog so requests finish in ar, == the ar reference."""
import asyncio
import signal
import time

import pytest

from pearl_runtime.client import generate
from pearl_runtime.rpc.health import check
from tests.services.procs import free_port, reference_greedy, target_metrics


def _info(target):
    import grpc

    from pearl_runtime.pb import target_pb2, target_pb2_grpc
    with grpc.insecure_channel(target.address) as ch:
        return target_pb2_grpc.TargetStub(ch).Info(target_pb2.InfoRequest(), timeout=10)


def _until(predicate, what: str, timeout_s: float = 30.0, poll_s: float = 0.02) -> float:
    """Seconds until `predicate()` holds."""
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < timeout_s, f"timed out waiting for {what}"
        time.sleep(poll_s)
    return time.time() - t0


@pytest.fixture
def lonely(cluster):
    """A pearl target (and its gateway) whose draft port has nobody yet."""
    draft_port = free_port()
    target = cluster.service("target", cluster.engine_args(cluster.target_model) + [
        "--mode", "pearl", "--gamma", "3", "--draft", f"127.0.0.1:{draft_port}"], "target-lonely")
    gateway = cluster.service("gateway", ["--model", str(cluster.target_model), "--targets", target.address],
                              "gateway-lonely")
    cluster.launch([target, gateway])
    return target, gateway, draft_port


def test_an_absent_draft_is_warned_and_counted_then_used_within_a_second_of_readiness(cluster, lonely):
    target, gateway, draft_port = lonely
    target.wait_log("draft unreachable; serving ar", timeout_s=10)       # at the default level (warning)
    line = next(l for l in target.log().splitlines() if "draft unreachable" in l)
    assert f"127.0.0.1:{draft_port}" in line and "retry_s=" in line
    time.sleep(2.0)
    assert target.count("draft unreachable") == 1, "the warning repeats at a low rate, not per dial"
    assert not target_metrics(target).draft_connected
    info = _info(target)
    assert not info.draft_connected and info.draft_address == f"127.0.0.1:{draft_port}"

    draft = cluster.service("draft", cluster.engine_args(cluster.draft_models["copy"]), "draft-late",
                            port=draft_port)
    draft.start()
    _until(lambda: asyncio.run(check(draft.address, timeout_s=1)) == "SERVING", "the draft SERVING", 120)
    took = _until(lambda: target_metrics(target).draft_connected, "the target's link up", 10)
    assert took < 2.0, f"speculation back {took:.2f} s after the draft's readiness"
    prompt = [4, 8, 15, 16]
    out = asyncio.run(generate(gateway.address, token_ids=prompt, max_tokens=48, ignore_eos=True, timeout_s=60))
    assert out.token_ids == reference_greedy(cluster.target_model, [prompt], [48])[0]
    assert target_metrics(target).speculative_rounds > 0
    assert _info(target).draft_connected


def test_a_stalled_draft_is_cut_off_by_the_watchdog_and_requests_finish_in_ar(cluster, lonely):
    target, gateway, draft_port = lonely
    draft = cluster.service("draft", cluster.engine_args(cluster.draft_models["copy"]), "draft-stalls",
                            port=draft_port)
    cluster.launch([draft])
    _until(lambda: target_metrics(target).draft_connected, "the target's link up", 10)
    prompts = [[6, 2, 9 + i] for i in range(4)]
    seen = []

    def on_delta(_text, ids):
        seen.extend(ids)
        if len(seen) >= 40 and not on_delta.stopped:
            on_delta.stopped = True
            draft.send(signal.SIGSTOP)          # alive, holding its streams, answering nothing
    on_delta.stopped = False

    async def all_of():
        return await asyncio.gather(*(generate(gateway.address, token_ids=p, max_tokens=300, ignore_eos=True,
                                               on_delta=on_delta, timeout_s=60) for p in prompts))
    try:
        t0 = time.time()
        outs = asyncio.run(all_of())
        took = time.time() - t0
    finally:
        draft.send(signal.SIGCONT)
    assert on_delta.stopped
    assert [o.token_ids for o in outs] == reference_greedy(cluster.target_model, prompts, [300] * 4)
    assert took < 30, f"{took:.1f} s: the watchdog should cut a stalled draft off in seconds, not a minute"
    assert "draft link lost; falling back to ar" in target.log()


def test_a_restarted_draft_takes_running_sequences_back_a_budget_at_a_time(cluster):
    """kill -9 the draft, restart it once 24 long sequences run: the target takes them back over
    several rounds (target_service/rejoin.py: one sequence, then a doubling budget), verifying the rest
    without drafts meanwhile; speculation resumes within 2 s of the draft's readiness and every
    output == ar."""
    import threading

    draft = cluster.service("draft", cluster.engine_args(cluster.draft_models["copy"]), "draft-rejoin",
                            log_level="info")
    target = cluster.service("target", cluster.engine_args(cluster.target_model) + [
        "--mode", "pearl", "--gamma", "3", "--draft", draft.address], "target-rejoin", log_level="info")
    gateway = cluster.service("gateway", ["--model", str(cluster.target_model), "--targets", target.address],
                              "gateway-rejoin")
    cluster.launch([draft, target, gateway], handshakes=[draft])
    # 24 sequences of 60 + 900 tokens: enough ar decode to outlast a draft's restart, which
    # takes seconds on a loaded host
    prompts = [list(range(10 + i, 70 + i)) for i in range(24)]
    seen, times = [], {}
    base = target_metrics(target).speculative_rounds
    draft.kill()   # down before the requests come, back once they run: they hold KV when it answers
    # idle, no round reads the stream: the channel's state tells the target its draft is gone
    _until(lambda: not target_metrics(target).draft_connected, "the idle target to see its draft gone", 5)
    assert "draft link lost; falling back to ar" in target.log()

    def restart():
        draft.start()
        _until(lambda: asyncio.run(check(draft.address, timeout_s=1)) == "SERVING", "the draft SERVING", 120)
        times["ready"] = time.time()
        _until(lambda: target_metrics(target).speculative_rounds > base, "a speculative round", 30)
        times["speculating"] = time.time()

    watcher = threading.Thread(target=restart)

    def on_delta(_text, ids):
        if not seen:   # the first token: the requests hold KV, the draft comes back
            watcher.start()
        seen.extend(ids)

    async def all_of():
        return await asyncio.gather(*(generate(gateway.address, token_ids=p, max_tokens=900, ignore_eos=True,
                                               on_delta=on_delta, timeout_s=180) for p in prompts))
    outs = asyncio.run(all_of())
    watcher.join(60)
    assert [o.token_ids for o in outs] == reference_greedy(cluster.target_model, prompts, [900] * len(prompts))
    assert "speculating" in times, f"no speculative round after the restart; target log:\n{target.log_tail(60)}"
    took = times["speculating"] - times["ready"]
    assert took < 2.0, f"speculation back {took:.2f} s after the draft's readiness"
    back = [line for line in target.log().splitlines() if "every sequence back on the draft" in line]
    assert back and any(f"rounds={n}" in back[-1] for n in range(2, 20)), back
