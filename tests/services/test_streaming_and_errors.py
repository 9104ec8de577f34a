"""Streaming, bad input and failures through real processes: gateway -> target -> draft."""
import asyncio
import random
import shutil
import signal
import sys
import time
from unittest import mock

import grpc
import pytest

from pearl_runtime import launch
from pearl_runtime.client import generate
from pearl_runtime.pb import common_pb2, target_pb2, target_pb2_grpc
from pearl_runtime.rpc.server import GRPC_OPTIONS
from tests.services.procs import (START_TIMEOUT_S, reference_greedy, run, stop_all, target_metrics,
                                  wait_handshakes)
from tests.tiny_models import assert_same_tokens

CONTEXT = 1024          # the tiny models' max_position_embeddings


@pytest.fixture(scope="module")
def reference(service_models):
    """reference(prompts, max_tokens) -> target-only greedy completions (in-process engine)."""
    target, _ = service_models
    return lambda prompts, max_tokens: reference_greedy(target, prompts, max_tokens)


@pytest.fixture(scope="module")
def pearl_stack(cluster):
    return cluster.stack("copy", "pearl")


def prompts_of(lens, seed):
    rng = random.Random(seed)
    return [[rng.randrange(448) for _ in range(n)] for n in lens]


async def timed_generate(address, **kw):
    """generate() recording the arrival time of every delta; returns (completion, deltas, t0, t_end)."""
    deltas = []
    t0 = time.perf_counter()
    done = await generate(address, on_delta=lambda text, ids: deltas.append((time.perf_counter(), text, ids)), **kw)
    return done, deltas, t0, time.perf_counter()


# -- streaming -----------------------------------------------------------------------------
def test_deltas_concatenate_to_the_final_text_and_stream_early(pearl_stack, service_models, reference):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(service_models[0]))
    prompt = "Once upon a time there was a little robot named Pixel."
    ids = tok.encode(prompt)
    done, deltas, t0, t_end = run(timed_generate(pearl_stack.gateway.address, prompt=prompt, max_tokens=400,
                                                 ignore_eos=True))
    assert done.finish_reason == "length" and done.stats.new_tokens == 400
    assert "".join(text for _, text, _ in deltas) == done.text
    assert [t for _, _, d in deltas for t in d] == done.token_ids
    assert done.token_ids == reference([ids], [400])[0]
    assert done.text == tok.decode(done.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    # streamed, not buffered: many deltas, the first one well before the end of generation
    assert len(deltas) >= 400 / 8
    first = deltas[0][0]
    assert first - t0 < 0.5 * (t_end - t0), (first - t0, t_end - t0)
    assert done.stats.time_to_first_token_ms < 0.5 * done.stats.total_ms
    assert all(a[0] <= b[0] for a, b in zip(deltas, deltas[1:]))


# -- field rules through the real gateway ----------------------------------------------------
OK_PROMPT = [5, 6, 7, 8, 9]
BAD_REQUESTS = {
    "empty token prompt": (dict(token_ids=[]), "prompt"),
    "empty text prompt": (dict(prompt=""), "prompt"),
    "max_tokens 0": (dict(token_ids=OK_PROMPT, max_tokens=0), "max_tokens"),
    "max_tokens -3": (dict(token_ids=OK_PROMPT, max_tokens=-3), "max_tokens"),
    "max_tokens above the window": (dict(token_ids=OK_PROMPT, max_tokens=CONTEXT), "max_tokens"),
    "max_tokens above the window left": (dict(token_ids=[1] * 1000, max_tokens=25), "max_tokens"),
    "temperature < 0": (dict(token_ids=OK_PROMPT, temperature=-0.5), "temperature"),
    "top_p 0": (dict(token_ids=OK_PROMPT, top_p=0.0), "top_p"),
    "top_p 1.5": (dict(token_ids=OK_PROMPT, top_p=1.5), "top_p"),
    "unknown model": (dict(token_ids=OK_PROMPT, model="no-such-model"), "model"),
    "prompt as long as the context": (dict(token_ids=[1] * CONTEXT, max_tokens=1), "prompt"),
    "prompt longer than the context": (dict(token_ids=[1] * (CONTEXT + 500)), "prompt"),
    "token id outside the vocabulary": (dict(token_ids=[1, 2, 10**6]), "prompt"),
}


def test_every_field_rule_is_invalid_argument_naming_the_field(pearl_stack):
    address = pearl_stack.gateway.address

    async def attempt(kw):
        try:
            await generate(address, timeout_s=30, **kw)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        return None, "accepted"

    async def all_cases():
        return {name: await attempt(kw) for name, (kw, _) in BAD_REQUESTS.items()}

    results = run(all_cases())
    wrong = {name: res for name, res in results.items()
             if res[0] != grpc.StatusCode.INVALID_ARGUMENT or BAD_REQUESTS[name][1] not in res[1]}
    assert not wrong, f"cases not answered INVALID_ARGUMENT naming the field: {wrong}"
    # nothing crashed or hung: the same stack still serves a valid request
    done = run(generate(address, token_ids=OK_PROMPT, max_tokens=4, ignore_eos=True))
    assert done.stats.new_tokens == 4 and pearl_stack.target.alive() and pearl_stack.gateway.alive()


# -- cancel on the Target.Serve stream itself ------------------------------------------------
def submission(rid, prompt, max_tokens):
    return target_pb2.Submission(request_id=rid, prompt_ids=prompt, params=common_pb2.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True, temperature=0.0))


def test_cancel_of_unknown_request_is_harmless_and_a_real_cancel_stops_it(pearl_stack, reference):
    prompts = prompts_of([12, 30], seed=5)
    want = reference(prompts[1:], [20])[0]

    async def body():
        async with grpc.aio.insecure_channel(pearl_stack.target.address, options=GRPC_OPTIONS) as ch:
            call = target_pb2_grpc.TargetStub(ch).Serve()
            await call.write(target_pb2.TargetIn(cancel=target_pb2.CancelBatch(request_ids=["no-such-id", ""])))
            # a long request, cancelled after its first tokens
            await call.write(target_pb2.TargetIn(submit=target_pb2.SubmitBatch(
                items=[submission("long", prompts[0], 900)])))
            got = {"long": [], "short": []}
            finished, cancelled_at = {}, None
            while "short" not in finished:
                out = await asyncio.wait_for(call.read(), 60)
                assert out is not grpc.aio.EOF, "the target closed the stream"
                for u in out.tokens.updates:
                    assert not u.error, u.error
                    got[u.request_id] += list(u.token_ids)
                    if u.finish_reason:
                        finished[u.request_id] = u.finish_reason
                if got["long"] and cancelled_at is None:
                    cancelled_at = len(got["long"])
                    await call.write(target_pb2.TargetIn(cancel=target_pb2.CancelBatch(
                        request_ids=["long", "never-submitted"])))
                    await call.write(target_pb2.TargetIn(submit=target_pb2.SubmitBatch(
                        items=[submission("short", prompts[1], 20)])))
            # the stream serves on: a cancel of the same unknown id again, then one more request
            await call.write(target_pb2.TargetIn(cancel=target_pb2.CancelBatch(request_ids=["no-such-id"])))
            await call.write(target_pb2.TargetIn(submit=target_pb2.SubmitBatch(
                items=[submission("again", prompts[1], 20)])))
            again = []
            while True:
                out = await asyncio.wait_for(call.read(), 60)
                assert out is not grpc.aio.EOF
                upd = [u for u in out.tokens.updates if u.request_id == "again"]
                for u in upd:
                    again += list(u.token_ids)
                if any(u.finish_reason for u in upd):
                    break
            await call.done_writing()
            return got, finished, again

    got, finished, again = run(body())
    assert got["short"] == want and again == want
    assert finished["short"] == common_pb2.FINISH_REASON_LENGTH
    assert "long" not in finished and len(got["long"]) < 900     # it stopped: cancelled, not finished


# -- a draft the target must refuse ------------------------------------------------------------
@pytest.fixture(scope="module")
def mismatched_stacks(cluster, service_models, tiny_model_factory, tmp_path_factory):
    """Two pearl stacks whose drafts the target must refuse: one with another vocabulary size
    (same tokenizer), one with another tokenizer (one extra token, same vocabulary size)."""
    from transformers import AutoTokenizer
    target, _ = service_models
    other_vocab = tiny_model_factory("llama", seed=3, vocab=576)
    other_tok = tmp_path_factory.mktemp("draft-other-tokenizer")
    shutil.copytree(target, other_tok, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(other_tok))
    tok.add_tokens(["<|not-in-the-target|>"])
    tok.save_pretrained(str(other_tok))

    stacks = {}
    for name, model in (("vocab", other_vocab), ("tokenizer", other_tok)):
        d = cluster.new_draft(model, f"draft-mismatch-{name}")
        t = cluster.new_target("pearl", d, f"target-mismatch-{name}")
        g = cluster.new_gateway(t, f"gateway-mismatch-{name}")
        stacks[name] = (d, t, g)
    cluster.launch([s for trio in stacks.values() for s in trio])
    return stacks


@pytest.mark.parametrize("kind,reason", [("vocab", "vocabulary size mismatch"), ("tokenizer", "tokenizer mismatch")])
def test_mismatched_draft_is_refused_and_the_target_serves_ar(mismatched_stacks, reference, kind, reason):
    draft, target, gateway = mismatched_stacks[kind]
    target.wait_log("draft refused the handshake", timeout_s=30)
    draft.wait_log("refused target", timeout_s=30)
    assert reason in target.log() and reason in draft.log()
    assert "target connected" not in draft.log()

    prompts = prompts_of([3, 50, 120, 9], seed=11)
    max_tokens = [30, 12, 25, 40]

    async def body():
        return await asyncio.gather(*(generate(gateway.address, token_ids=p, max_tokens=m, ignore_eos=True)
                                      for p, m in zip(prompts, max_tokens)))
    done = run(body())
    for c, ref in zip(done, reference(prompts, max_tokens)):
        assert c.token_ids == ref
        assert c.stats.target_forwards == c.stats.new_tokens        # autoregressive: one token a forward
        assert c.stats.mode == "ar"                                  # the path taken, not the configured mode
    m = target_metrics(target)
    assert m.speculative_rounds == 0 and m.drafted_tokens == 0 and m.path == "ar" and m.rounds > 0
    assert draft.alive() and target.alive()


# -- the draft dies mid-run and comes back ------------------------------------------------------
@pytest.fixture
def restart_stack(cluster):
    d = cluster.new_draft(cluster.draft_models["copy"], "draft-restart")
    t = cluster.new_target("pearl", d, "target-restart")
    g = cluster.new_gateway(t, "gateway-restart")
    cluster.launch([d, t, g], handshakes=[d])
    yield cluster, d, t, g
    stop_all([g, t, d])


class Recorder:
    """Arrival time and size of every delta, per request."""

    def __init__(self, n):
        self.deltas = [[] for _ in range(n)]
        self.first = asyncio.Event()

    def cb(self, i):
        def on_delta(text, ids):
            self.deltas[i].append((time.time(), len(ids)))
            self.first.set()
        return on_delta

    def tokens_per_delta(self, since: float) -> tuple[float, int]:
        sizes = [n for d in self.deltas for t, n in d if t >= since and n]
        return sum(sizes) / max(1, len(sizes)), len(sizes)


def start_all(address, prompts, max_tokens, rec=None, timeout_s=120):
    return [asyncio.create_task(generate(address, token_ids=p, max_tokens=m, ignore_eos=True, timeout_s=timeout_s,
                                         on_delta=rec.cb(i) if rec else None))
            for i, (p, m) in enumerate(zip(prompts, max_tokens))]


# gRPC's SO_REUSEPORT, which the services turn off (a second one on a held port fails at start),
# opted into for the two drafts of step 3 alone: both sockets must set it to share a port
REUSEPORT_DRAFT = ("from pearl_runtime import log; log.quiet_native_stderr(); import draft_service.__main__ as d; "
                   "from pearl_runtime.rpc import server; server.SO_REUSEPORT = 1; d.main()")


def start_sharing_port(draft) -> None:
    with mock.patch.object(launch, "service_argv", lambda _, argv: [sys.executable, "-c", REUSEPORT_DRAFT, *argv]):
        draft.start()


def test_draft_killed_mid_run_falls_back_to_ar_then_pearl_resumes(restart_stack, reference):
    """1. requests A1 run; the draft is SIGKILLed mid-run: the target falls back to ar (B,
    sent while it is down, takes one forward per token) and A1's output is unchanged.
    2. the draft restarts on the same port: the target re-dials, PEARL resumes (C).
    3. a second draft process listens on the same port (SO_REUSEPORT: REUSEPORT_DRAFT) and
    the running one is killed while the target is idle; A2 is sent: its first rounds are ar,
    the target re-dials, re-syncs the replacement with A2's sequences mid-generation, and A2
    continues speculatively. (Before the fix in DraftLink.exchange, the write on the dead
    idle stream raised InvalidStateError, which killed the target's round loop: A2 hung.)"""
    cluster, draft, target, gateway = restart_stack
    address = gateway.address
    lens = dict(a1=[4, 40, 100, 7], b=[6, 60, 15], c=[10, 80, 33, 2], a2=[5, 70, 21, 3])
    maxes = dict(a1=[900, 700, 800, 850], b=[24, 16, 30], c=[40, 32, 48, 36], a2=[1000, 900, 950, 1010])
    prompts = {k: prompts_of(n, seed=20 + i) for i, (k, n) in enumerate(lens.items())}
    refs = {k: reference(prompts[k], maxes[k]) for k in lens}
    a1_rec, a2_rec = Recorder(4), Recorder(4)
    marks = {}

    async def body():
        # 1. kill mid-run
        a1 = start_all(address, prompts["a1"], maxes["a1"], a1_rec)
        await asyncio.wait_for(a1_rec.first.wait(), 30)
        await asyncio.sleep(0.2)                                   # a few speculative rounds
        draft.kill(signal.SIGKILL)
        marks["kill"] = time.time()
        while "falling back to ar" not in target.log():
            assert time.time() < marks["kill"] + 30, target.log_tail()
            await asyncio.sleep(0.02)
        b = await asyncio.gather(*start_all(address, prompts["b"], maxes["b"]))
        assert not draft.alive()
        # 2. restart on the same port (sharing it with the spare of step 3)
        start_sharing_port(draft)
        await asyncio.to_thread(draft.wait_ready, time.time() + START_TIMEOUT_S)
        await asyncio.to_thread(wait_handshakes, draft, 2, time.time() + 30)
        c = await asyncio.gather(*start_all(address, prompts["c"], maxes["c"]))
        a1 = await asyncio.gather(*a1)
        # 3. the draft dies while the target is idle; a replacement already listens on the port
        spare = cluster.new_draft(cluster.draft_models["copy"], "draft-restart-spare")
        spare.port = draft.port
        spare.argv[spare.argv.index("--port") + 1] = str(draft.port)
        start_sharing_port(spare)
        # not wait_ready: the port answers already (the running draft)
        await asyncio.to_thread(spare.wait_log, "draft serving")
        draft.kill(signal.SIGKILL)
        await asyncio.sleep(0.3)              # the target's idle stream to the draft is now finished
        a2 = start_all(address, prompts["a2"], maxes["a2"], a2_rec, timeout_s=60)
        await asyncio.to_thread(wait_handshakes, spare, 1, time.time() + 30)
        marks["swapped"] = time.time()
        a2 = await asyncio.gather(*a2)
        marks["a2_done"] = time.time()
        return a1, b, c, a2, spare

    try:
        a1, b, c, a2, spare = run(body(), timeout_s=280)
    finally:
        stop_all([s for s in cluster.services if s.name == "draft-restart-spare"])
    for name, done in dict(a1=a1, b=b, c=c, a2=a2).items():
        for i, (got, ref) in enumerate(zip(done, refs[name])):
            assert_same_tokens(got.token_ids, ref, label=f"{name}[{i}]: ")
            assert got.finish_reason == "length"
    for got in b:
        assert got.stats.target_forwards == got.stats.new_tokens    # draft down: ar, one token per forward
        assert got.stats.mode == "ar"
    assert any("ar" in got.stats.mode.split("+") and "pearl" in got.stats.mode.split("+") for got in a1), \
        [got.stats.mode for got in a1]                               # across the kill: both paths
    c_total = sum(x.stats.new_tokens for x in c) / sum(x.stats.target_forwards for x in c)
    a2_after = a2_rec.tokens_per_delta(marks["swapped"] + 0.05)
    a2_before = a2_rec.tokens_per_delta(0.0)
    print(f"\nA1 mean accepted (across the kill) {[round(x.stats.mean_accepted_tokens, 2) for x in a1]}; "
          f"B {[x.stats.mean_accepted_tokens for x in b]}; C total {c_total:.2f} (after the restart); "
          f"A2 tokens per delta: all {a2_before[0]:.2f}, after the swap {a2_after[0]:.2f} over {a2_after[1]} deltas "
          f"({marks['a2_done'] - marks['swapped']:.2f} s)")
    assert c_total > 2, f"PEARL did not resume after the restart: {c_total:.2f} tokens per target forward"
    assert a2_after[1] >= 20, "A2 finished before the replacement draft took over: the test proves nothing"
    assert a2_after[0] > 2, f"A2 did not resume speculation after the swap: {a2_after[0]:.2f} tokens per delta"
    assert draft.starts == 2 and draft.count("target connected") == 2
    assert spare.count("target connected") == 1 and target.alive() and gateway.alive()
    assert target_metrics(target).path == "pearl"
    assert target.count("draft link lost") >= 2          # the mid-run kill and the idle one
