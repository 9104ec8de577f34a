"""A head-start round in a batch that mixes pre-verify and post-verify sequences: only the
pre-verify ones judge the early tokens, so no sequence's verify grows past gamma tokens; a
post-verify sequence carries at most gamma - 1 pending tokens into the next round, and the
draft drops what it drafted past them (verdict keep = 0), so its mirror stays the target's
sequence (tests/draft_service/test_drafter_paths.py checks the draft's side). Greedy output
equals target-only output."""
import asyncio

import torch

from pearl_runtime.pb import common_pb2, draft_pb2, target_pb2
from pearl_runtime.config import EngineConfig
from pearl_runtime.rpc import tensors
from target_service.rounds import GatewayStream, TargetService
from tests.services.procs import reference_greedy

GAMMA, EARLY = 6, 3


class ScriptedDraft:
    """Proposes each sequence's true greedy continuation from the position the target's
    verdict names (committed + pending), wrong at fixed pseudo-random positions (about 1 in 7), so
    acceptance is high but not total and the batch mixes pre- and post-verify sequences.
    Early part, then the whole round, as the draft service sends them."""
    connected, generation = True, 1

    def __init__(self, prompts, refs):
        self.info = draft_pb2.HelloReply(accepted=True)
        self.full = {tuple(p): p + r for p, r in zip(prompts, refs)}
        self.seqs, self.at, self.verdicts = {}, {}, []
        self.pending_round = None

    def _propose(self, sid, n):
        full, pos = self.seqs[sid], self.at[sid]
        out = []
        for p in range(pos, pos + n):
            tok = full[p] if p < len(full) else 0
            wrong = tok - 1 if tok > 0 else tok + 1
            out.append(wrong if (p * 2654435761 + sid * 40503) % 4099 % 7 == 0 else tok)
        return out

    async def exchange(self, rnd):
        for a in rnd.adds:
            self.seqs[a.seq_id] = self.full[tuple(a.token_ids)]
            self.at[a.seq_id] = len(a.token_ids)
        rows = tensors.decode_ints(rnd.verdicts) if not tensors.is_empty(rnd.verdicts) else []
        self.verdicts += rows
        for sid, num, *_ in rows:
            self.at[sid] = num
        ids = sorted(self.seqs)
        tokens = torch.tensor([self._propose(sid, rnd.gamma) for sid in ids], dtype=torch.int32)
        self.pending_round = draft_pb2.DraftBatch(round_id=rnd.round_id, seq_ids=ids, tokens=tensors.encode(tokens))
        if 0 < rnd.early < rnd.gamma:
            return draft_pb2.DraftBatch(round_id=rnd.round_id, seq_ids=ids, early=True,
                                        tokens=tensors.encode(tokens[:, :rnd.early].contiguous()))
        return self.pending_round

    async def rest(self, rnd):
        return self.pending_round


def run_mixed(llama_dir):
    prompts = [[5 + i, 6, 7, 8 + 2 * i] for i in range(6)]
    n = 60
    refs = reference_greedy(llama_dir, prompts, [n] * len(prompts))

    async def main():
        # head starts at half the batch in pre-verify (the default asks three quarters), so the
        # rounds that mix pre- and post-verify sequences, the case under test, come often
        service = TargetService(EngineConfig(model=str(llama_dir), num_blocks=256), mode="pearl", gamma=GAMMA,
                                head_start=EARLY, head_start_quorum=0.5)
        service.link = link = ScriptedDraft(prompts, refs)
        queries, mixed, batch = [], 0, []
        forward, attach, schedule = service.core.forward, service.core.attach, service.core.schedule

        def spy_forward(reqs):
            if all(r.seq.num_kv > 0 for r in reqs):   # no prompt in this forward
                queries.append(max(len(r.pending) + 1 for r in reqs))
            return forward(reqs)

        def spy_schedule():
            batch[:] = schedule()
            return batch

        def spy_attach(reqs, drafts):   # called in head-start rounds only
            nonlocal mixed
            mixed += any(r.pending for r in batch) and any(not r.pending for r in batch)
            return attach(reqs, drafts)
        service.core.forward, service.core.attach, service.core.schedule = spy_forward, spy_attach, spy_schedule
        streams = {}
        for i, p in enumerate(prompts):
            streams[f"r{i}"] = s = GatewayStream()
            service.submit(s, target_pb2.Submission(request_id=f"r{i}", prompt_ids=p,
                                                    params=common_pb2.SamplingParams(max_tokens=n, ignore_eos=True)))
        got = {k: [] for k in streams}
        while any(len(v) < n for v in got.values()):
            service._drain_inbox()
            await service.round()
            for k, s in streams.items():
                while not s.out.empty():
                    got[k] += [t for u in s.out.get_nowait().tokens.updates for t in u.token_ids]
        return service, link, queries, mixed, got

    service, link, queries, mixed, got = asyncio.run(main())
    for i, ref in enumerate(refs):
        assert got[f"r{i}"] == ref, f"request {i}"
    return service, link, queries, mixed


def test_mixed_head_start_rounds_keep_queries_within_gamma(llama_dir):
    service, link, queries, mixed = run_mixed(llama_dir)
    assert max(queries) <= GAMMA, f"a verify fed {max(queries)} tokens a sequence (gamma {GAMMA})"
    assert service.stats.head_start_rounds > 0, "no head-start round ran"
    assert mixed > 0, "no head-start round mixed pre- and post-verify sequences"
    assert any(row[3] == 0 for row in link.verdicts), "no pending was trimmed: the test did not reach the case"
    s = service.stats
    assert s.accepted_tokens / s.drafted_tokens > 0.5, "acceptance fell: proposals and verdicts drifted apart"
