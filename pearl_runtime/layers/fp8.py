"""fp8 weights for a draft: its one- and two-token steps read half the bytes.

A 0.5B draft's decode step reads ~1 GB of bf16 weights, and at gamma 6 its steps are a third
of an sd round, so its weight bytes are round time. Each linear of the skinny path (q/k/v, o,
gate/up, down) and the LM head is rounded to float8 e4m3 with one power-of-two scale per
output row. The scale being a power of two makes the fp8 value times its scale exact in
bf16 (and fp32), so the module's own weight is overwritten with that product: the cuBLAS
path (prefill, batched steps), the reference ops and the Triton kernels (which read the fp8
copy and scale the row sums) all compute one model, the fp8-rounded draft. Only a draft
may do this: its tokens are proposals, and the target's verify keeps every mode lossless.
Under TP each rank rounds its own shard: a row-parallel shard's rows are slices of the full
rows, so their scales (and the rounded draft) may differ from TP=1's.
"""

import torch

from pearl_runtime.layers.skinny import FP8
from pearl_runtime.log import get_logger

log = get_logger(__name__)

FP8_MAX = 448.0   # largest finite e4m3 value


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8, scale): w8 * scale[:, None] is w rounded to fp8 per row, scale a power of two
    (float32), the smallest that keeps the row's largest magnitude within fp8's range."""
    amax = w.float().abs().amax(1)
    scale = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX))), torch.ones_like(amax))
    return (w.float() / scale[:, None]).to(FP8), scale


def skinny_weight(linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the skinny kernels read for `linear`: its fp8 copy and row scales, or its weight."""
    return linear.fp8 if linear.fp8 is not None else (linear.weight, None)


@torch.no_grad()
def apply(model) -> None:
    """Round the model's skinny-path linears and LM head to fp8 (see the module docstring)."""
    linears = [model.lm_head]
    for layer in model.model.layers:
        linears += [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
    before = after = 0
    for linear in linears:
        w8, scale = quantize_rows(linear.weight)
        linear.weight.copy_((w8.float() * scale[:, None]).to(linear.weight.dtype))
        linear.fp8 = (w8, scale)
        before += linear.weight.numel() * linear.weight.element_size()
        after += w8.numel() + scale.numel() * 4
    log.info("weights: fp8 e4m3 with power-of-two row scales for %d linears and the LM head; one- and two-token "
             "steps read %.0f MB of them instead of %.0f MB", len(linears) - 1, after / 1e6, before / 1e6)
