"""RoundBounds: each bound refuses with InvalidRequest naming its field; a target's ordinary
rounds (the largest gamma, many sequences, verdicts) pass."""
import pytest

from draft_service.round_bounds import MAX_GAMMA, RoundBounds
from pearl_runtime.errors import InvalidRequest
from pearl_runtime.pb import draft_pb2
from pearl_runtime.rpc import tensors

VOCAB = 100
BOUNDS = RoundBounds(VOCAB, max_seqs=8, max_add_tokens=50)


def _round(gamma=4, early=0, adds=(), removes=(), verdicts=None, dtype="int64"):
    rnd = draft_pb2.Round(round_id=1, gamma=gamma, early=early, removes=list(removes),
                          adds=[draft_pb2.SeqAdd(seq_id=s, token_ids=ids) for s, ids in adds])
    if verdicts is not None:
        rnd.verdicts.CopyFrom(tensors.encode_ints(verdicts, dtype))
    return rnd


def test_ordinary_rounds_pass():
    BOUNDS.check(_round(gamma=MAX_GAMMA, early=2, adds=[(s, [0, VOCAB - 1]) for s in range(8)],
                        removes=range(8), verdicts=[[s, 2, VOCAB - 1, -1] for s in range(8)]))
    BOUNDS.check(_round(gamma=0))
    BOUNDS.check(_round(verdicts=[[1, 1, 0]], dtype="int32"))


@pytest.mark.parametrize("rnd,field", [
    (_round(gamma=10**6), "round.gamma"),
    (_round(gamma=MAX_GAMMA + 1), "round.gamma"),
    (_round(gamma=4, early=5), "round.early"),
    (_round(adds=[(s, [1]) for s in range(9)]), "round.adds"),
    (_round(removes=range(9)), "round.removes"),
    (_round(adds=[(1, [])]), "round.adds.token_ids"),
    (_round(adds=[(1, [1] * 51)]), "round.adds.token_ids"),
    (_round(adds=[(1, [1, VOCAB])]), "round.adds.token_ids"),
    (_round(adds=[(1, [-1, 2])]), "round.adds.token_ids"),
    (_round(verdicts=[[1, 2, VOCAB, -1]]), "round.verdicts"),
    (_round(verdicts=[[1, 0, 3, -1]]), "round.verdicts"),
    (_round(verdicts=[[1, 2, 3, -1]] * 9), "round.verdicts"),
    (_round(verdicts=[[1, 2]]), "round.verdicts"),
])
def test_out_of_bounds_is_refused_naming_the_field(rnd, field):
    with pytest.raises(InvalidRequest) as err:
        BOUNDS.check(rnd)
    assert err.value.field == field


def test_verdict_bytes_that_do_not_match_their_shape_are_refused():
    rnd = _round(verdicts=[[1, 2, 3, -1]])
    rnd.verdicts.shape[:] = [4, 4]
    with pytest.raises(InvalidRequest, match="bytes"):
        BOUNDS.check(rnd)
    rnd.verdicts.dtype = "float32"
    with pytest.raises(InvalidRequest, match="int32 or int64"):
        BOUNDS.check(rnd)
