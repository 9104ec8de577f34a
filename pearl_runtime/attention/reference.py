"""Reference attention in plain torch: gathers each sequence's blocks and runs SDPA.
Runs anywhere; it is the ground truth the GPU backends are checked against."""
import torch
import torch.nn.functional as F

from pearl_runtime.attention.base import AttentionBackend


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def attend(self, q, k_cache, v_cache, ctx, scale):
        out = torch.empty_like(q)
        block_size = k_cache.shape[1]
        group = q.shape[1] // k_cache.shape[2]
        start = 0
        for i, (q_len, ctx_len) in enumerate(zip(ctx.q_lens, ctx.context_lens)):
            n_blocks = -(-ctx_len // block_size)
            blocks = ctx.block_tables[i, :n_blocks].long()
            k = k_cache[blocks].flatten(0, 1)[:ctx_len]   # [ctx, Hkv, D]
            v = v_cache[blocks].flatten(0, 1)[:ctx_len]
            if group > 1:
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            qi = q[start:start + q_len].transpose(0, 1)   # [H, q, D]
            # query j sits at absolute position ctx_len - q_len + j
            qpos = torch.arange(ctx_len - q_len, ctx_len, device=q.device).unsqueeze(1)
            mask = torch.arange(ctx_len, device=q.device).unsqueeze(0) <= qpos
            o = F.scaled_dot_product_attention(qi, k.transpose(0, 1), v.transpose(0, 1),
                                               attn_mask=mask, scale=scale)
            out[start:start + q_len] = o.transpose(0, 1)
            start += q_len
        return out
