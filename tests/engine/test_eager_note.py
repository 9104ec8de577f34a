"""A step that misses the CUDA-graph buckets says so once per shape class (batch and longest
query, rounded up to powers of 2): the log line that tells an operator a verify ran eagerly."""
import logging
from types import SimpleNamespace

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.sampling import SamplingParams


def test_eager_steps_are_named_once_per_shape(llama_dir, caplog):
    eng = LLMEngine(EngineConfig(model=str(llama_dir), block_size=8, num_blocks=48), load_tok=False)
    eng.runner.graphs = SimpleNamespace(bucket=lambda step: None)   # as if every step missed the buckets
    with caplog.at_level(logging.INFO, logger="pearl_runtime.engine.model_runner"):
        eng.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=6, ignore_eos=True))
    notes = [r.getMessage() for r in caplog.records if "eager step outside the graph buckets" in r.getMessage()]
    # the 5-token prefill and the 1-token decode steps: two classes, each named once
    assert notes == ["eager step outside the graph buckets: batch 1, longest query 5",
                     "eager step outside the graph buckets: batch 1, longest query 1"]


def test_a_class_that_keeps_missing_the_graphs_is_counted(llama_dir, caplog):
    eng = LLMEngine(EngineConfig(model=str(llama_dir), block_size=8, num_blocks=48), load_tok=False)
    eng.runner.graphs = SimpleNamespace(bucket=lambda step: None)
    with caplog.at_level(logging.INFO, logger="pearl_runtime.engine.model_runner"):
        eng.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=12, ignore_eos=True))
    notes = [r.getMessage() for r in caplog.records if "eager steps of" in r.getMessage()]
    assert notes == ["eager steps of batch <= 1, longest query <= 1: 10 so far"]
