"""Auto gamma: PEARL balances gamma draft steps against one verify; sd, where they take turns,
takes the gamma with the most expected tokens per ms; both stay under --max-gamma."""
from types import SimpleNamespace

import pytest

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.step_timer import balanced_gamma, sd_gamma
from target_service.server import TargetService


def test_balanced_gamma():
    assert balanced_gamma(6.9, 1.0, 16) == 7
    assert balanced_gamma(25.0, 1.0, 16) == 16     # capped
    assert balanced_gamma(1.0, 5.0, 16) == 1


def test_sd_gamma_grows_as_the_draft_gets_cheaper():
    assert sd_gamma(6.9, 1.0, 16) == 5             # 7B verify, 0.5B draft step
    assert sd_gamma(25.0, 1.0, 16) == 9            # 32B verify: a cheap draft earns more tokens
    assert sd_gamma(6.9, 1.0, 16, alpha=0.95) > sd_gamma(6.9, 1.0, 16, alpha=0.6)
    assert sd_gamma(6.9, 10.0, 16) == 1            # a draft slower than the target
    assert sd_gamma(25.0, 0.01, 3, alpha=1.0) == 3


@pytest.mark.parametrize("mode,expect", [("pearl", {1: 16, 16: 12}), ("sd", {1: 9, 16: 6})])
def test_service_picks_gamma_per_batch_by_mode(llama_dir, mode, expect):
    service = TargetService(EngineConfig(model=str(llama_dir), num_blocks=64), mode=mode, gamma=None)
    service.verify_ms = {1: 25.0, 16: 30.0}
    service.link = SimpleNamespace(info=SimpleNamespace(step_batch_sizes=[1, 16], step_ms=[1.0, 2.5]))
    service._auto_gamma()
    assert service.tuner.picks == expect
    assert service._gamma_for(1) == expect[1] and service._gamma_for(9) == expect[16]


def test_max_gamma_must_be_positive(llama_dir):
    with pytest.raises(ValueError, match="max_gamma"):
        TargetService(EngineConfig(model=str(llama_dir), num_blocks=64), mode="pearl", max_gamma=0)
