"""The attention interface: store the new K/V in the paged cache, attend over the context."""

import torch

from pearl_runtime.layers.fused import ops
from pearl_runtime.utils.context import AttnContext
from pearl_runtime.log import get_logger

log = get_logger(__name__)


class AttentionBackend:
    name = "base"

    def rope_store(self, q, k, v, cos, sin, k_cache, v_cache, ctx: AttnContext) -> torch.Tensor:
        """Rotate q and k, store k and v in the cache; returns the rotated q. A backend may
        do all of it in one kernel; this is the reference order of the pieces."""
        q, k = ops.rotate(q, k, cos, sin)
        self.store_kv(k, v, k_cache, v_cache, ctx)
        return q

    def store_kv(self, k, v, k_cache, v_cache, ctx: AttnContext) -> None:
        """k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]."""
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        flat_k.index_copy_(0, ctx.slot_mapping, k)
        flat_v.index_copy_(0, ctx.slot_mapping, v)

    def attend(self, q, k_cache, v_cache, ctx: AttnContext, scale: float) -> torch.Tensor:
        """q: [T, H, D] -> [T, H, D]. Query j of sequence i sees context positions
        <= context_len_i - q_len_i + j (causal within the new tokens)."""
        raise NotImplementedError
