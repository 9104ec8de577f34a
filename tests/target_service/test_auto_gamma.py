"""Auto gamma: each mode takes the gamma with the most expected tokens per ms by its round
model (PEARL: gamma draft steps about as long as one verify; sd, where they take turns: a cheap
draft earns a longer gamma), pricing each gamma's verify at its own query length; both stay
under --max-gamma."""
import asyncio
from types import SimpleNamespace

import pytest

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.step_timer import VerifyCost
from pearl_runtime.spec.round_model import head_start_for, pearl_gamma, pearl_mean_query, project, sd_gamma
from target_service.draft_link import TransportSplit
from target_service.rounds import TargetService
from target_service.server import TargetServicer


def test_pearl_gamma_balances_draft_and_verify_when_the_verify_is_flat():
    assert pearl_gamma(6.9, 1.0, 16, alpha=0.9) == 7
    assert pearl_gamma(25.0, 1.0, 16, alpha=0.9) == 16    # capped
    assert pearl_gamma(1.0, 5.0, 16) == 1                 # a draft slower than the target


# a 72B TP=2 target on H200 (session 5): flat at batch 1, compute-bound at batch 32
COST = VerifyCost({2: {1: 22.0, 32: 29.0}, 4: {1: 22.0, 32: 29.0}, 8: {1: 22.5, 32: 46.0},
                   16: {1: 22.5, 32: 60.0}, 32: {1: 23.0, 32: 90.0}})


def verify(batch):
    return lambda g: COST.scale(batch, g)


def test_verify_cost_prices_gamma_at_its_query_length():
    t_v = verify(32)
    assert t_v(3) == 29.0 and t_v(7) == 46.0 and t_v(15) == 60.0
    assert t_v(16) == 90.0                  # 17 tokens a sequence fill no smaller bucket
    assert t_v(40) == 90.0 and verify(1)(0) == 22.0   # outside the table: its ends
    # a PEARL batch's mean query lands between token buckets: linear there
    mean = lambda g: COST.scale(32, g, interpolate=True)
    assert mean(15) == 60.0 and mean(16) == pytest.approx(60.0 + 30.0 / 16) and mean(11) == pytest.approx(53.0)
    assert verify(20)(1) == 29.0           # batch 20 runs in the 32 bucket
    assert COST.scale(32, 15) == 60.0 and VerifyCost().scale(32, 15) == 1.0   # no table: flat


def test_gamma_stays_short_when_the_verify_is_compute_bound():
    mean = lambda b: (lambda g: COST.scale(b, g, interpolate=True))   # as the tuner prices PEARL
    flat = [pearl_gamma(mean(1), 1.8, 31, alpha=0.9), sd_gamma(verify(1), 1.8, 31, alpha=0.9)]
    bound = [pearl_gamma(mean(32), 1.8, 31, alpha=0.9), sd_gamma(verify(32), 1.8, 31, alpha=0.9)]
    assert bound == [7, 3]
    assert flat[0] > 10 and flat[1] > 4     # at batch 1 a longer verify costs nothing
    # priced flat at the 4-token time (the rule before query lengths), batch 32 would run
    # 17-token verifies
    assert pearl_gamma(29.0, 1.8, 31, alpha=0.9) == 16


def test_pearl_prices_its_verify_at_the_mean_query():
    """Pre-verify sequences feed w + 1 tokens, post-verify ones gamma: a packed verify costs
    their mean. On the 72B batch-8 table of an H200 run (flat to 12 tokens, then rising),
    priced at gamma + 1 for every sequence auto gamma took 11 (2.94x over ar measured), at the
    mean it takes 13 (14 measured 3.45x in an earlier run)."""
    assert pearl_mean_query(0.0, 14, 7) == 8.0 and pearl_mean_query(1.0, 14, 7) == 14.0
    assert 8.0 < pearl_mean_query(0.9, 14, 7) < 14.0
    bs8 = VerifyCost({2: {8: 22.41}, 4: {8: 23.15}, 8: {8: 24.69}, 12: {8: 26.04}, 16: {8: 29.52},
                      24: {8: 36.47}})
    t_v = lambda g: bs8.scale(8, g, interpolate=True)
    assert pearl_gamma(t_v, 1.89, 31, alpha=0.9) == 13
    at_gamma_plus_one = max(range(1, 32), key=lambda g: project(1.0, 1.89, t_v(g), 0.0, 0.9, g, head_start_for(g))
                            ["pearl_tokens_per_round"] / project(1.0, 1.89, t_v(g), 0.0, 0.9, g, head_start_for(g))
                            ["pearl_round_ms"])
    assert at_gamma_plus_one < 13


def test_sd_gamma_grows_as_the_draft_gets_cheaper():
    assert sd_gamma(6.9, 1.0, 16) == 5             # 7B verify, 0.5B draft step
    assert sd_gamma(25.0, 1.0, 16) == 9            # 32B verify: a cheap draft earns more tokens
    assert sd_gamma(6.9, 1.0, 16, alpha=0.95) > sd_gamma(6.9, 1.0, 16, alpha=0.6)
    assert sd_gamma(6.9, 10.0, 16) == 1            # a draft slower than the target
    assert sd_gamma(25.0, 0.01, 3, alpha=1.0) == 3


@pytest.mark.parametrize("mode,expect", [("pearl", {1: 15, 16: 11}), ("sd", {1: 9, 16: 6})])
def test_service_picks_gamma_per_batch_by_mode(llama_dir, mode, expect):
    service = TargetService(EngineConfig(model=str(llama_dir), num_blocks=64), mode=mode, gamma=None)
    service.policy.tuner.verify_cost = VerifyCost({32: {1: 25.0, 16: 30.0}})
    service.link = SimpleNamespace(info=SimpleNamespace(step_batch_sizes=[1, 16], step_ms=[1.0, 2.5], draft_model="draft"), connected=True,
                                  split=TransportSplit(), generation=1, tokens_in=None)
    service._build_round([])   # a new draft: the start picks come from its handshake
    assert service.policy.tuner.picks == expect
    assert service.policy.gamma_for(1) == expect[1] and service.policy.gamma_for(9) == expect[16]
    metrics = asyncio.run(TargetServicer(service).Metrics(None, None))   # what `pearl bench` records
    assert dict(metrics.gamma_by_batch) == expect
    assert sorted((v.batch, v.query, v.ms) for v in metrics.verify_times) == [(1, 32, 25.0), (16, 32, 30.0)]


def test_max_gamma_must_be_positive(llama_dir):
    with pytest.raises(ValueError, match="max_gamma"):
        TargetService(EngineConfig(model=str(llama_dir), num_blocks=64), mode="pearl", max_gamma=0)
