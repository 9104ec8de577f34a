"""Attention layer: rotary, the new K/V into this layer's cache, then the backend attends."""
import torch
from torch import nn

from pearl_runtime.utils.context import get_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)   # bound by the model runner
        self.backend = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """q, k before rotary: the backend rotates them and stores k, v in one go."""
        ctx = get_context()
        q = self.backend.rope_store(q, k, v, *rope, self.k_cache, self.v_cache, ctx)
        return self.backend.attend(q, self.k_cache, self.v_cache, ctx, self.scale)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention alone, for a q already rotated whose k and v are already in the cache."""
        return self.backend.attend(q, self.k_cache, self.v_cache, get_context(), self.scale)
