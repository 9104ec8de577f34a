"""Auto gamma: each mode takes the gamma with the most expected tokens per ms by its round
model (PEARL: gamma draft steps about as long as one verify; sd, where they take turns: a cheap
draft earns a longer gamma), pricing each gamma's verify at its own query length; both stay
under --max-gamma."""
import asyncio
from types import SimpleNamespace

import pytest

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.step_timer import VerifyCost, pearl_gamma, sd_gamma
from target_service.server import TargetService, TargetServicer


def test_pearl_gamma_balances_draft_and_verify_when_the_verify_is_flat():
    assert pearl_gamma(6.9, 1.0, 16, alpha=0.9) == 7
    assert pearl_gamma(25.0, 1.0, 16, alpha=0.9) == 16    # capped
    assert pearl_gamma(1.0, 5.0, 16) == 1                 # a draft slower than the target


# a 72B TP=2 target on H200 (session 5): flat at batch 1, compute-bound at batch 32
COST = VerifyCost({2: {1: 22.0, 32: 29.0}, 4: {1: 22.0, 32: 29.0}, 8: {1: 22.5, 32: 46.0},
                   16: {1: 22.5, 32: 60.0}, 32: {1: 23.0, 32: 90.0}})


def verify(batch):
    return lambda g: COST.scale(batch, g)


def test_verify_cost_prices_gamma_at_its_query_bucket():
    t_v = verify(32)
    assert t_v(3) == 29.0 and t_v(7) == 46.0 and t_v(15) == 60.0
    assert t_v(16) == 90.0                  # 17 tokens run in the 32-token bucket, padded
    assert verify(20)(1) == 29.0           # batch 20 runs in the 32 bucket
    assert COST.scale(32, 15) == 60.0 and VerifyCost().scale(32, 15) == 1.0   # no table: flat


def test_gamma_stays_out_of_a_padded_bucket_when_the_verify_is_compute_bound():
    flat = [pearl_gamma(verify(1), 1.8, 31, alpha=0.9), sd_gamma(verify(1), 1.8, 31, alpha=0.9)]
    bound = [pearl_gamma(verify(32), 1.8, 31, alpha=0.9), sd_gamma(verify(32), 1.8, 31, alpha=0.9)]
    assert bound == [15, 3]                 # gamma + 1 fills the 16 (pearl) and 4 (sd) buckets
    assert flat[0] > 10 and flat[1] > 3     # at batch 1 a longer verify costs nothing
    # priced flat at the 4-token time (the rule before), batch 32 would run 17-token verifies
    assert pearl_gamma(29.0, 1.8, 31, alpha=0.9) == 16


def test_sd_gamma_grows_as_the_draft_gets_cheaper():
    assert sd_gamma(6.9, 1.0, 16) == 5             # 7B verify, 0.5B draft step
    assert sd_gamma(25.0, 1.0, 16) == 9            # 32B verify: a cheap draft earns more tokens
    assert sd_gamma(6.9, 1.0, 16, alpha=0.95) > sd_gamma(6.9, 1.0, 16, alpha=0.6)
    assert sd_gamma(6.9, 10.0, 16) == 1            # a draft slower than the target
    assert sd_gamma(25.0, 0.01, 3, alpha=1.0) == 3


@pytest.mark.parametrize("mode,expect", [("pearl", {1: 15, 16: 11}), ("sd", {1: 9, 16: 6})])
def test_service_picks_gamma_per_batch_by_mode(llama_dir, mode, expect):
    service = TargetService(EngineConfig(model=str(llama_dir), num_blocks=64), mode=mode, gamma=None)
    service.verify_cost = service.tuner.verify_cost = VerifyCost({32: {1: 25.0, 16: 30.0}})
    service.link = SimpleNamespace(info=SimpleNamespace(step_batch_sizes=[1, 16], step_ms=[1.0, 2.5]), connected=True)
    service._auto_gamma()
    assert service.tuner.picks == expect
    assert service._gamma_for(1) == expect[1] and service._gamma_for(9) == expect[16]
    metrics = asyncio.run(TargetServicer(service).Metrics(None, None))   # what `pearl bench` records
    assert dict(metrics.gamma_by_batch) == expect
    assert sorted((v.batch, v.query, v.ms) for v in metrics.verify_times) == [(1, 32, 25.0), (16, 32, 30.0)]


def test_max_gamma_must_be_positive(llama_dir):
    with pytest.raises(ValueError, match="max_gamma"):
        TargetService(EngineConfig(model=str(llama_dir), num_blocks=64), mode="pearl", max_gamma=0)
