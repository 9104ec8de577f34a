"""Rejoin: new sequences join the draft at once; ones the draft takes back whole come a token
budget a round (one at least), the budget doubling after quick rounds and halving after slow."""
from dataclasses import dataclass, field

from target_service import rejoin as rejoin_module


class Rejoin(rejoin_module.Rejoin):
    START_TOKENS = 256     # round numbers for the arithmetic below; the rule is the module's


@dataclass
class _Seq:
    seq_id: int
    n: int

    def __len__(self):
        return self.n


@dataclass
class _Req:
    seq: _Seq
    on_draft: bool = False
    extra: dict = field(default_factory=dict)


def _reqs(lengths):
    return [_Req(_Seq(i, n)) for i, n in enumerate(lengths)]


def _join(rejoin, reqs, round_id):
    adds = rejoin.adds(reqs, round_id)
    for r in adds:
        r.on_draft = True
    return [r.seq.seq_id for r in adds]


def test_a_new_draft_takes_running_sequences_back_by_the_budget():
    reqs = _reqs([100, 100, 100, 300, 200])
    rejoin = Rejoin()
    rejoin.all_back(r.seq.seq_id for r in reqs)
    assert _join(rejoin, reqs, 1) == [0, 1]                 # 200 of 256; 300 more would pass it
    rejoin.observe(1, draft_ms=10.0)                        # quick: 512 next
    assert _join(rejoin, reqs, 2) == [2, 3]                 # 100 + 300 <= 512; 200 more would pass it
    rejoin.observe(2, draft_ms=900.0)                       # slow: back to 256
    assert rejoin.budget == Rejoin.START_TOKENS
    assert _join(rejoin, reqs, 3) == [4] and not rejoin.waiting


def test_one_rejoins_however_long_and_new_requests_never_wait():
    reqs = _reqs([5000, 5000])
    rejoin = Rejoin()
    rejoin.all_back([0, 1])
    fresh = _Req(_Seq(7, 40))                               # admitted after the draft came back
    assert _join(rejoin, reqs + [fresh], 1) == [0, 7]
    assert _join(rejoin, reqs, 2) == [1]


def test_a_round_that_never_came_back_is_forgotten():
    reqs = _reqs([100, 100])
    rejoin = Rejoin()
    rejoin.all_back([0, 1])
    _join(rejoin, reqs[:1], 1)
    _join(rejoin, reqs[1:], 2)
    rejoin.observe(2, draft_ms=1.0)
    assert rejoin.spent == {} and rejoin.budget == 2 * Rejoin.START_TOKENS


def test_a_draft_within_the_targets_forward_is_quick_however_long():
    """A CPU pair: a rejoining round's draft takes 700 ms beside a 1000 ms verify; that holds
    the round up little, so the budget grows; past the verify it shrinks."""
    reqs = _reqs([100] * 8)
    rejoin = Rejoin()
    rejoin.all_back(r.seq.seq_id for r in reqs)
    _join(rejoin, reqs, 1)
    rejoin.observe(1, draft_ms=700.0, verify_ms=1000.0)
    assert rejoin.budget == 2 * Rejoin.START_TOKENS
    _join(rejoin, reqs, 2)
    rejoin.observe(2, draft_ms=1200.0, verify_ms=1000.0)
    assert rejoin.budget == Rejoin.START_TOKENS
