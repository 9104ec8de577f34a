"""The skinny decoder path (norm, SiLU and residual add folded into the linears, one-token
steps) computes the same model as the layer-by-layer path. CPU runs its torch reference
ops; tests/gpu/test_skinny_gpu.py checks the Triton kernel against those ops."""
from collections import Counter
from functools import partial

import pytest
import torch

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.layers import skinny
from pearl_runtime.sampling import SamplingParams
from tests.tiny_models import assert_same_tokens, hf_greedy, hf_logits, load_hf

PROMPTS = [[7], list(range(100, 117)), [(i * 37) % 451 for i in range(40)]]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


class CountingOps(skinny.SkinnyOps):
    """The reference ops, counting calls, so a test can tell which path ran."""

    def __init__(self):
        self.calls = 0
        self.by_op = Counter()

        def counted(fn):
            def call(*a, **kw):
                self.calls += 1
                self.by_op[fn.__name__.removeprefix("reference_")] += 1
                return fn(*a, **kw)
            return call
        super().__init__("counting reference", counted(skinny.reference_norm_linear),
                         counted(skinny.reference_linear_add), counted(skinny.reference_norm_gate_up),
                         counted(skinny.reference_norm_qkv_rope))


def engine(model_dir, skinny_linears: str, tp: int = 1) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), block_size=8, num_blocks=64, tp_size=tp,
                                  skinny_linears=skinny_linears), load_tok=False)


def logits_of(eng, tokens, n_logits):
    seq = Sequence(tokens)
    eng.blocks.allocate(seq)
    try:
        return eng.runner.run([seq], num_logits=[n_logits])
    finally:
        eng.blocks.free_seq(seq)


def test_skinny_logits_equal_layer_path(any_model_dir):
    plain, folded = engine(any_model_dir, "off"), engine(any_model_dir, "reference")
    assert plain.runner.model.model.skinny_ops is None
    ops = CountingOps()
    folded.runner.model.model.skinny_ops = ops
    for tok in (5, 77, 300):
        a, b = logits_of(plain, [tok], 1), logits_of(folded, [tok], 1)
        assert ops.calls > 0, "a one-token step did not take the skinny path"
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        ops.calls = 0
    # two tokens (a draft's catch-up after a fully accepted round) take it too, on small models
    assert folded.runner.model.model.skinny_rows == 2
    a, b = logits_of(plain, [5, 77], 2), logits_of(folded, [5, 77], 2)
    assert ops.calls > 0, "a two-token step did not take the skinny path"
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    ops.calls = 0
    # a longer step (a prefill, a verify, a batch) keeps the layer path
    logits_of(folded, list(range(skinny.MAX_ROWS + 1)), 1)
    assert ops.calls == 0, "a step of more than MAX_ROWS tokens took the skinny path"


def test_skinny_greedy_matches_transformers(any_model_dir):
    """One sequence at a time, so every decode step is a one-row step on the skinny path."""
    eng = engine(any_model_dir, "reference")
    ops = CountingOps()
    eng.runner.model.model.skinny_ops = ops
    hf = load_hf(any_model_dir)
    for p in PROMPTS:
        o = eng.generate([p], GREEDY)[0]
        assert ops.calls >= 4 * (GREEDY.max_tokens - 1), "decode steps did not take the skinny path"
        assert_same_tokens(o, hf_greedy(hf, p, GREEDY.max_tokens), partial(hf_logits, hf), p, label="skinny: ")


def test_rotary_folds_into_qkv_unless_heads_are_normed(any_model_dir):
    """Rotary and the K/V store ride in the qkv kernel, except for Qwen3, whose per-head q/k
    norms sit between the projection and the rotation: that one keeps the separate path."""
    eng = engine(any_model_dir, "reference")
    ops = CountingOps()
    eng.runner.model.model.skinny_ops = ops
    logits_of(eng, [5], 1)
    layers = eng.runner.model_cfg.num_layers
    if eng.runner.model_cfg.qk_norm:
        assert ops.by_op == {"norm_linear": layers, "linear_add": 2 * layers, "norm_gate_up": layers}
    else:
        assert ops.by_op == {"norm_qkv_rope": layers, "linear_add": 2 * layers, "norm_gate_up": layers}


def test_skinny_with_tensor_parallel_matches_tp1(qwen2_dir):
    """TP=2 and the padded TP=3: the row-parallel add happens after the all-reduce."""
    ref = [engine(qwen2_dir, "off").generate([p], GREEDY)[0] for p in PROMPTS]
    for tp in (2, 3):
        eng = engine(qwen2_dir, "reference", tp=tp)
        try:
            assert [eng.generate([p], GREEDY)[0] for p in PROMPTS] == ref, f"TP={tp} with skinny linears"
        finally:
            eng.runner.close()


def test_skinny_choice_is_validated():
    with pytest.raises(ValueError, match="skinny_linears"):
        EngineConfig(model="x", skinny_linears="fast")


def test_two_row_steps_are_for_small_models(monkeypatch):
    monkeypatch.delenv("PEARL_SKINNY_ROWS", raising=False)
    assert skinny.rows_for(896) == 2                             # Qwen2.5-0.5B
    assert skinny.rows_for(1536) == skinny.rows_for(3584) == 1   # Qwen2.5-1.5B, 7B: cuBLAS won at two rows
    monkeypatch.setenv("PEARL_SKINNY_ROWS", "1")
    assert skinny.rows_for(896) == 1
    monkeypatch.setenv("PEARL_SKINNY_ROWS", "3")
    with pytest.raises(ValueError, match="PEARL_SKINNY_ROWS"):
        skinny.rows_for(896)
