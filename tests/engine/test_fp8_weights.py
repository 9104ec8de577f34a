"""fp8 draft weights (layers/fp8.py): the rounding is exact to dequantize, every path of the
engine computes the same fp8-rounded model, and a draft with them keeps sd and PEARL lossless.
tests/gpu/test_skinny_gpu.py checks the Triton kernels on fp8 weights."""
import asyncio
import logging

import pytest
import torch

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.layers import fp8, skinny
from target_service.rounds import TargetService
from tests.engine.test_skinny import CountingOps, logits_of
from tests.target_service.drive import draft_server, generate, linked
from tests.services.procs import reference_greedy


def test_rows_round_to_fp8_with_power_of_two_scales():
    torch.manual_seed(0)
    w = torch.randn(64, 96, dtype=torch.bfloat16) * torch.logspace(-4, 2, 64).to(torch.bfloat16)[:, None]
    w[3] = 0
    w8, scale = fp8.quantize_rows(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale), "scales must be powers of two"
    assert scale[3] == 1 and not w8[3].float().any()
    assert w8.float().abs().max() <= fp8.FP8_MAX
    exact = w8.float() * scale[:, None]
    assert torch.equal(exact.to(torch.bfloat16).float(), exact), "fp8 x scale must be exact in bf16"
    rel = ((exact - w.float()).abs() / w.float().abs().clamp_min(1e-30))[w != 0]
    assert rel.max() <= 2 ** -4 + 1e-6, f"e4m3 rounds to 3 mantissa bits; worst relative error {rel.max():.3g}"
    assert torch.equal(skinny.dequantize(w8, scale, torch.bfloat16).float(), exact)


def _engine(model_dir, skinny_linears: str, fp8_weights: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), block_size=8, num_blocks=64, skinny_linears=skinny_linears,
                                  fp8_weights=fp8_weights), load_tok=False)


def test_fp8_model_is_one_model_on_every_path(any_model_dir):
    """The fp8 copies the skinny ops read and the dequantized weights the layer path reads give
    the same logits, the LM head's fp8 copy included; and they are not the bf16 model's."""
    plain, folded = _engine(any_model_dir, "off", "on"), _engine(any_model_dir, "reference", "on")
    original = _engine(any_model_dir, "off", "off")
    model = folded.runner.model
    linears = [model.lm_head] + [m for layer in model.model.layers for m in (
        layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    assert all(m.fp8 is not None and m.fp8[0].dtype == torch.float8_e4m3fn for m in linears)
    assert original.runner.model.lm_head.fp8 is None
    ops = CountingOps()
    model.model.skinny_ops = ops
    for tokens in ([5], [5, 77]):   # a decode step and a draft's two-token catch-up
        a, b = logits_of(plain, tokens, len(tokens)), logits_of(folded, tokens, len(tokens))
        assert ops.by_op["norm_linear"] > 0 and ops.calls > 0, "the step did not take the skinny path"
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a, logits_of(original, tokens, len(tokens)), rtol=1e-6, atol=1e-6), \
            "fp8 rounding left the logits unchanged: the weights were not rounded"
        ops.calls, ops.by_op = 0, type(ops.by_op)()
    # the head's fp8 copy is read on one-row steps: a norm_linear call beyond the layers' own
    n_layers = len(model.model.layers)
    logits_of(folded, [9], 1)
    qkv_calls = 0 if ops.by_op["norm_qkv_rope"] else n_layers
    assert ops.by_op["norm_linear"] == qkv_calls + 1


def test_fp8_auto_stays_off_without_the_triton_kernels(llama_dir, caplog):
    with caplog.at_level(logging.INFO, logger="pearl_runtime.engine.model_runner"):
        eng = _engine(llama_dir, "auto", "auto")
    assert eng.runner.model.lm_head.fp8 is None
    assert any("fp8_weights=auto -> off" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="fp8_weights"):
        EngineConfig(model=str(llama_dir), fp8_weights="yes")


@pytest.mark.parametrize("mode", ["sd", "pearl"])
def test_fp8_draft_keeps_speculation_lossless(llama_dir, draft_factory, mode):
    """The draft's tokens change with its fp8 weights; the output does not."""
    prompt, n = [(i * 37) % 451 for i in range(20)], 40
    ref = reference_greedy(llama_dir, [prompt], [n])[0]

    async def main():
        async with draft_server(draft_factory(llama_dir, "perturbed"), fp8_weights="on") as (draft, address):
            assert draft.drafter.runner.model.lm_head.fp8 is not None
            service = TargetService(EngineConfig(model=str(llama_dir), num_blocks=256), mode=mode,
                                    draft_address=address, gamma=3)
            async with linked(service):
                return await generate(service, prompt, n), service

    got, service = asyncio.run(main())
    assert got == ref
    assert service.stats.speculative_rounds > 0 and service.stats.accepted_tokens > 0
