"""Which PEARL rounds wait for a head start: those where at least the quorum (default three
quarters) of the batch is in pre-verify; the flag is validated where it is read."""
from types import SimpleNamespace

import pytest

from target_service.__main__ import _quorum
from pearl_runtime.config import EngineConfig
from target_service.server import HEAD_START_QUORUM, TargetService


class DecodingSeq:
    """A sequence past its prompt: everything but the last token is in the cache."""
    num_kv = 9

    def __len__(self):
        return 10


def _batch(pre: int, post: int):
    return ([SimpleNamespace(pending=[], seq=DecodingSeq()) for _ in range(pre)]
            + [SimpleNamespace(pending=[7], seq=_with_pending()) for _ in range(post)])


def _with_pending():
    seq = DecodingSeq()
    seq.num_kv = 8   # the pending token is in the sequence, not yet in the cache
    return seq


def test_quorum_decides_which_rounds_wait(llama_dir):
    cfg = EngineConfig(model=str(llama_dir), num_blocks=64)
    default = TargetService(cfg, mode="pearl", gamma=6, head_start=3)
    half = TargetService(cfg, mode="pearl", gamma=6, head_start=3, head_start_quorum=0.5)
    assert default.head_start_quorum == HEAD_START_QUORUM == 0.75
    assert default._head_start(_batch(4, 4)) == 0 and half._head_start(_batch(4, 4)) == 3
    assert default._head_start(_batch(6, 2)) == 3 and default._head_start(_batch(5, 3)) == 0
    assert default._head_start(_batch(1, 0)) == 3          # a sequence alone: every pre-verify round
    with pytest.raises(ValueError, match="head_start_quorum"):
        TargetService(cfg, mode="pearl", head_start_quorum=0.0)


@pytest.mark.parametrize("text", ["0", "1.5", "half", ""])
def test_quorum_flag_names_itself_when_wrong(text):
    with pytest.raises(SystemExit, match="--head-start-quorum"):
        _quorum(text)
    assert _quorum("0.5") == 0.5 and _quorum("1") == 1.0
