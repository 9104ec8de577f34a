"""The draft runs a plain round on its event loop only while nothing else holds the drafter
(the forward thread may be drafting an early-part round or releasing a mirror)."""
from pearl_runtime.pb import common_pb2, draft_pb2
from pearl_runtime.config import EngineConfig


def test_inline_round_only_when_the_drafter_is_free(llama_dir, monkeypatch):
    from draft_service.drafter import Mirror
    from draft_service.server import DraftServicer
    monkeypatch.delenv("PEARL_PROFILE_ROUNDS", raising=False)
    servicer = DraftServicer(EngineConfig(model=str(llama_dir), num_blocks=64))
    mirror = Mirror()
    rnd = draft_pb2.Round(round_id=1, gamma=3)
    rnd.adds.add(seq_id=1, token_ids=[5, 6, 7, 8], params=common_pb2.SamplingParams(max_tokens=100))
    with servicer.runner.lock:   # the forward thread is busy: the round must go there, untouched here
        assert servicer.runner.try_inline(servicer.runner.whole, mirror, rnd) is None
    assert not mirror.seqs
    batch = servicer.runner.try_inline(servicer.runner.whole, mirror, rnd)
    assert batch.round_id == 1 and list(batch.seq_ids) == [1] and list(batch.tokens.shape) == [1, 3]
    assert not servicer.runner.lock.locked()
    servicer.close()
