"""Auto gamma stays inside the captured verify graphs: a verify judges up to gamma + 1 tokens a
sequence, and one past the largest query bucket runs eagerly (and its first new shape waits
for Triton to compile: a 72B run's gamma 16 verify of 17 tokens took 65 ms against 33)."""
from types import SimpleNamespace

import target_service.rounds as ts
from pearl_runtime.config import EngineConfig


def _service(monkeypatch, llama_dir, q_buckets):
    class GraphedCore(ts.Verifier):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.runner.graphs = SimpleNamespace(q_buckets=q_buckets)   # as if captured on a GPU
    monkeypatch.setattr(ts, "Verifier", GraphedCore)
    return ts.TargetService(EngineConfig(model=str(llama_dir), block_size=8, num_blocks=48), mode="pearl",
                            gamma=4, max_gamma=16)


def test_max_gamma_is_lowered_to_the_largest_query_bucket(monkeypatch, llama_dir):
    s = _service(monkeypatch, llama_dir, (1, 2, 4, 8))
    assert s.policy.max_gamma == 7 and s.policy.tuner.max_gamma == 7


def test_max_gamma_stays_when_the_buckets_hold_it(monkeypatch, llama_dir):
    s = _service(monkeypatch, llama_dir, (1, 2, 4, 8, 16, 32))
    assert s.policy.max_gamma == 16 and s.policy.tuner.max_gamma == 16
