"""Where a head-start round (a Round with an early part) is drafted: on the event loop when the
drafter is free (the early part is sent, then the rest drafted right there), the rest on the
forward thread when the drafter was taken in between, or the whole round on the forward thread
when it is taken from the start. Every path sends the same two batches, the early one first."""
import asyncio
import queue
import threading

import grpc
import pytest

from pearl_runtime.pb import common_pb2, draft_pb2, draft_pb2_grpc
from pearl_runtime.config import EngineConfig
from pearl_runtime.rpc import tensors
from pearl_runtime.rpc.identity import PROTOCOL_VERSION
from tests.draft_service.servicer_context import StreamContext

PROMPT = [5, 6, 7, 8, 9]
EARLY, GAMMA = 2, 6


@pytest.fixture
def servicer(llama_dir, monkeypatch):
    from draft_service.server import DraftServicer
    monkeypatch.delenv("PEARL_PROFILE_ROUNDS", raising=False)
    s = DraftServicer(EngineConfig(model=str(llama_dir), num_blocks=64))
    yield s
    s.close()


def _round() -> draft_pb2.ToDraft:
    rnd = draft_pb2.Round(round_id=1, gamma=GAMMA, early=EARLY)
    rnd.adds.add(seq_id=1, token_ids=PROMPT, params=common_pb2.SamplingParams(max_tokens=100))
    return draft_pb2.ToDraft(round=rnd)


def _hello(servicer) -> draft_pb2.ToDraft:
    return draft_pb2.ToDraft(hello=draft_pb2.Hello(target_id="t", tokenizer_hash=servicer.tok_hash, protocol_version=PROTOCOL_VERSION,
                                                   vocab_size=servicer.drafter.vocab_size))


async def _one_round(servicer, taken: str | None):
    """Drive Speculate directly. taken: when the drafter is held by someone else ('start': from
    before the round, 'middle': once the early part is out), released 50 ms later."""
    loop = asyncio.get_running_loop()

    async def requests():
        yield _hello(servicer)
        yield _round()

    stream = servicer.Speculate(requests(), StreamContext())
    assert (await anext(stream)).hello.accepted
    if taken == "start":
        servicer.runner.lock.acquire()
        loop.call_later(0.05, servicer.runner.lock.release)
    early = (await anext(stream)).batch
    if taken == "middle":
        servicer.runner.lock.acquire()
        loop.call_later(0.05, servicer.runner.lock.release)
    whole = (await anext(stream)).batch
    await stream.aclose()
    return early, whole


@pytest.mark.parametrize("taken,path", [(None, "event loop"),
                                        ("middle", "early part on the event loop, rest on the forward thread"),
                                        ("start", "forward thread")])
def test_each_path_sends_the_early_part_then_the_whole_batch(servicer, taken, path):
    from draft_service.round_profile import RoundClock
    servicer.runner.clock = RoundClock(1)   # every path stamps the round's arrival for PEARL_ROUND_TIMES
    early, whole = asyncio.run(_one_round(servicer, taken))
    assert servicer.head_paths == {path: 1}
    # a round held back 50 ms by a busy drafter shows it as queueing
    assert servicer.runner.clock.last["queue"] >= (40.0 if taken == "start" else 0.0)
    assert early.early and not whole.early and early.round_id == whole.round_id == 1
    # stamped for the target's transport split, on every path: the round's arrival, then each send
    assert 0 < early.received_at == whole.received_at <= early.sent_at <= whole.sent_at
    toks = tensors.decode_ints(whole.tokens)
    assert tensors.decode_ints(early.tokens) == [row[:EARLY] for row in toks]
    assert len(toks[0]) == GAMMA and all(t >= 0 for t in toks[0])
    # the same tokens whichever path drafted them (a fresh mirror, greedy)
    _, ref = asyncio.run(_one_round(servicer, None))
    assert tensors.decode_ints(ref.tokens) == toks


def test_the_early_part_reaches_the_target_before_the_rest_is_drafted(servicer):
    """Over real gRPC: the rest of the round is held back until the client holds the early part
    (the rest runs on the draft's event loop, so an early part still queued there would never
    arrive and the round would time out)."""
    got_early = threading.Event()
    real_parts = servicer.drafter.parts

    def parts(*args, **kw):
        it = real_parts(*args, **kw)
        yield next(it)
        assert got_early.wait(10), "the early part did not arrive before the rest was drafted"
        yield next(it)

    servicer.drafter.parts = parts
    ready = queue.Queue()

    def serve():
        loop = asyncio.new_event_loop()

        async def main():
            server = grpc.aio.server()
            draft_pb2_grpc.add_DraftServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            ready.put((loop, asyncio.current_task(), port))
            await server.wait_for_termination()

        try:
            loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    loop, task, port = ready.get(timeout=30)
    out = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = draft_pb2_grpc.DraftStub(ch).Speculate(iter([_hello(servicer), _round()]), timeout=30)
            for msg in call:
                out.append(msg)
                if msg.WhichOneof("kind") == "batch" and msg.batch.early:
                    got_early.set()
                if len(out) == 3:
                    break
            call.cancel()
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout=10)
    assert [m.WhichOneof("kind") for m in out] == ["hello", "batch", "batch"]
    assert out[1].batch.early and not out[2].batch.early
    assert servicer.head_paths == {"event loop": 1}


def test_the_draft_refuses_another_protocol_version_naming_both(servicer):
    """Target and draft roll out independently: a Hello of another Speculate protocol version
    is refused with a reason naming both versions; the same version is accepted."""
    from pearl_runtime.rpc.identity import PROTOCOL_VERSION
    hello = _hello(servicer).hello
    reply = servicer._hello(hello)
    assert reply.accepted and reply.protocol_version == PROTOCOL_VERSION
    hello.protocol_version = PROTOCOL_VERSION + 1
    refused = servicer._hello(hello)
    assert not refused.accepted
    assert f"v{PROTOCOL_VERSION + 1}" in refused.reason and f"v{PROTOCOL_VERSION}" in refused.reason
