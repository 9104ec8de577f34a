"""sd rounds ahead: the next Round goes out as soon as a round is judged, before its tokens are
published, and also as a UDP datagram that the draft drafts on arrival
(pearl_runtime/rpc/round_datagrams.py). Greedy output stays the target-only output whichever
copy of a round the draft takes, when datagrams are lost, and when a request is cancelled
while its next round is already out."""
import asyncio

import pytest

from pearl_runtime.pb import common_pb2, draft_pb2, target_pb2
from pearl_runtime.config import EngineConfig
from pearl_runtime.rpc import round_datagrams
from pearl_runtime.rpc.round_datagrams import RoundInbox, RoundSender
from target_service.rounds import GatewayStream, TargetService
from tests.services.procs import reference_greedy
from tests.target_service.drive import draft_server, linked, one_round
from tests.target_service.test_device_tokens import MAX_TOKENS, PROMPTS, _in_process


def hold_stream(service) -> None:
    """Delay the stream's copy of each Round: both services share this test's event loop, where
    either copy may be read first; between processes the datagram lands ~0.3 ms sooner."""
    write = service.link.call.write

    async def late(msg):
        await asyncio.sleep(0.005)
        return await write(msg)

    service.link.call.write = late


@pytest.mark.parametrize("datagrams", [True, False])
def test_rounds_ahead_are_lossless_by_either_copy(llama_dir, draft_factory, datagrams):
    refs = reference_greedy(llama_dir, PROMPTS, MAX_TOKENS)
    order = []   # ("sent", round_id) / ("published", round_id) as the target does them

    def watch(k, service, stream):
        if k == 0:
            hold_stream(service)
            send, publish = service.link.send, service._publish

            async def sent(rnd):
                order.append(("sent", rnd.round_id))
                return await send(rnd)

            def published(reqs):
                order.append(("published", service.stats.rounds + 1))
                publish(reqs)

            service.link.send, service._publish = sent, published

    got, service, _, draft = asyncio.run(_in_process(llama_dir, draft_factory(llama_dir, "perturbed"), True, watch,
                                                     round_datagrams=datagrams))
    assert got == refs
    assert service.token_paths["device"] > 5, service.token_paths
    speculative = service.stats.speculative_rounds
    assert sum(draft.round_paths.values()) == speculative
    if datagrams:
        # every Round fits a datagram here (short prompts), none is lost on loopback, and the
        # stream's copy is held back: the first round (sent before the hook) may go either way
        assert draft.round_paths["datagram"] >= speculative - 1, draft.round_paths
    else:
        assert "datagram" not in draft.round_paths and draft.round_paths["stream"] == speculative
    # round k + 1 went out before round k's tokens were published (all rounds here speculate:
    # the k-th publish is round id k)
    sent_at = {rid: i for i, (what, rid) in enumerate(order) if what == "sent"}
    published = [(i, rid) for i, (what, rid) in enumerate(order) if what == "published"]
    ahead = [rid for i, rid in published if rid + 1 in sent_at and sent_at[rid + 1] < i]
    assert len(ahead) >= len(published) - 2, order   # all but the last round(s) of the run


def test_lost_datagrams_leave_the_round_to_the_stream(llama_dir, draft_factory, monkeypatch):
    refs = reference_greedy(llama_dir, PROMPTS, MAX_TOKENS)
    send = RoundSender.send
    count = iter(range(10**6))

    def lossy(self, rnd):   # every other datagram never leaves
        return send(self, rnd) if next(count) % 2 else False

    monkeypatch.setattr(RoundSender, "send", lossy)
    got, service, _, draft = asyncio.run(_in_process(llama_dir, draft_factory(llama_dir, "perturbed"), True,
                                                     lambda k, service, _: k == 0 and hold_stream(service)))
    assert got == refs
    assert draft.round_paths["datagram"] > 2 and draft.round_paths["stream"] > 2, draft.round_paths


def test_a_request_cancelled_while_its_round_is_ahead(llama_dir, draft_factory):
    """Cancelled after its next Round went out: that round verifies the others without it, the
    draft forgets it at the round after, and everything else finishes with the target-only
    output."""
    prompts, max_tokens = PROMPTS[:3], MAX_TOKENS[:3]
    refs = reference_greedy(llama_dir, prompts, max_tokens)

    async def main():
        async with draft_server(draft_factory(llama_dir, "perturbed")) as (draft, address):
            service = TargetService(EngineConfig(model=str(llama_dir), num_blocks=256), mode="sd",
                                    draft_address=address, gamma=3)
            async with linked(service):
                stream = GatewayStream()
                for i, (p, n) in enumerate(zip(prompts, max_tokens)):
                    service.submit(stream, target_pb2.Submission(request_id=str(i), prompt_ids=p,
                                   params=common_pb2.SamplingParams(max_tokens=n, ignore_eos=True)))
                got, finished, rounds, cancelled_ahead = {str(i): [] for i in range(3)}, set(), 0, None
                async with asyncio.timeout(120):
                    while finished != {"0", "2"} or service._ahead is not None:
                        if rounds == 3:
                            assert service._ahead is not None   # request 1's next round is out
                            cancelled_ahead = service._ahead[1].round_id
                            service.cancel(stream, "1")
                        finished.update(await one_round(service, stream, got))
                        rounds += 1
            return got, service, draft, cancelled_ahead

    got, service, draft, cancelled_ahead = asyncio.run(main())
    assert got["0"] == refs[0] and got["2"] == refs[2]
    assert 0 < len(got["1"]) < len(refs[1]) and got["1"] == refs[1][:len(got["1"])]
    assert cancelled_ahead is not None and service.link.connected is False   # marked down at the end
    assert service.stats.speculative_rounds == service.stats.rounds   # the link never dropped mid-run


def test_inbox_routes_datagrams_by_key_and_ignores_strangers():
    async def main():
        inbox = await RoundInbox.open("127.0.0.1")
        got = []
        key = inbox.register(lambda rnd, arrived: got.append((rnd.round_id, rnd.gamma)))
        other = inbox.register(lambda rnd, arrived: got.append(("other", rnd.round_id)))
        try:
            RoundSender("127.0.0.1", inbox.port, key).send(draft_pb2.Round(round_id=7, gamma=5))
            RoundSender("127.0.0.1", inbox.port, b"stranger").send(draft_pb2.Round(round_id=8))
            junk = RoundSender("127.0.0.1", inbox.port, key)
            junk.sock.send(key + b"\xff\xff not a Round")
            inbox.unregister(other)
            RoundSender("127.0.0.1", inbox.port, other).send(draft_pb2.Round(round_id=9))
            big = draft_pb2.Round(round_id=10)
            big.adds.add(seq_id=1, token_ids=list(range(round_datagrams.MAX_DATAGRAM)))
            assert not RoundSender("127.0.0.1", inbox.port, key).send(big)   # too big: the stream only
            RoundSender("localhost", inbox.port, key).send(draft_pb2.Round(round_id=11, gamma=2))
            async with asyncio.timeout(5):
                while len(got) < 2:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            return got
        finally:
            inbox.close()

    assert asyncio.run(main()) == [(7, 5), (11, 2)]


def test_a_datagram_after_its_rounds_stream_copy_is_ignored():
    from draft_service.server import AheadRounds
    ahead = AheadRounds()
    assert ahead.claim(4) and not ahead.claim(4) and not ahead.claim(3) and ahead.claim(5)
