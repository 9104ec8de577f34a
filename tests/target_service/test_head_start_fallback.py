"""A draft that predates early parts answers a head-start round with its whole batch: the
target judges it as fresh tokens, turns the head start off (logged) and stays lossless."""
import asyncio

import torch

from pearl_runtime.pb import draft_pb2
from pearl_runtime.config import EngineConfig
from pearl_runtime.rpc import tensors
from target_service.server import TargetService
from tests.services.procs import reference_greedy
from tests.target_service.drive import generate


class OldDraftLink:
    """Connected; answers every Round with one whole batch that proposes nothing (-1)."""
    connected, generation = True, 1
    info = draft_pb2.HelloReply(accepted=True)

    def __init__(self):
        self.rounds, self.rests = [], 0

    async def exchange(self, rnd):
        self.rounds.append((rnd.early, rnd.gamma))
        ids = [a.seq_id for a in rnd.adds] or self.ids
        self.ids = ids
        return draft_pb2.DraftBatch(round_id=rnd.round_id, seq_ids=ids,
                                    tokens=tensors.encode(torch.full((len(ids), rnd.gamma), -1, dtype=torch.int32)))

    async def rest(self, rnd):
        self.rests += 1
        raise AssertionError("rest() after a whole batch")


def test_old_draft_turns_head_start_off(llama_dir):
    prompt, n = [5, 6, 7, 8], 6
    ref = reference_greedy(llama_dir, [prompt], [n])[0]

    async def main():
        service = TargetService(EngineConfig(model=str(llama_dir), num_blocks=64), mode="pearl", gamma=4)
        service.link = link = OldDraftLink()
        return service, link, await generate(service, prompt, n)

    service, link, got = asyncio.run(main())
    assert got == ref
    assert link.rounds[0] == (0, 4)                # the prompt's round: no head start
    assert link.rounds[1] == (2, 6)                # the next asked for a head start of 2
    assert all(early == 0 for early, _ in link.rounds[2:]) and service.head_start == 0
    assert link.rests == 0 and service.stats.head_start_rounds == 0
