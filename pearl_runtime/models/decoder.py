"""One decoder-only transformer for Llama, Qwen2 and Qwen3, parameterized by the config
(qkv bias for Qwen2, per-head q/k RMSNorm for Qwen3, tied or untied head)."""
import torch
from torch import nn

from pearl_runtime.config import ModelConfig
from pearl_runtime.layers.attention import Attention
from pearl_runtime.layers import skinny
from pearl_runtime.layers.fp8 import skinny_weight
from pearl_runtime.layers.fused import ops
from pearl_runtime.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from pearl_runtime.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pearl_runtime.layers.norm import RMSNorm
from pearl_runtime.layers.partition import shard_heads
from pearl_runtime.layers.rotary import RotaryEmbedding
from pearl_runtime.utils.context import get_context
from pearl_runtime.utils.dist import tp_rank, tp_size


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # this rank's heads, zero-padded where the TP size does not divide them
        q_heads, kv_heads = shard_heads(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, tp_size(), tp_rank())
        self.num_heads, self.num_kv_heads = len(q_heads.sources), len(kv_heads.sources)
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, q_heads, kv_heads, bias=cfg.qkv_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, shard=q_heads)
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self._attend(rope, self.qkv_proj(x)))

    def forward_skinny(self, ops, rope, h, norm: RMSNorm):
        """h + attention(norm(h)) with the norm and the residual add folded into the linears,
        and where the ops have it, rotary and the K/V store into the qkv projection."""
        if ops.norm_qkv_rope is not None and skinny.fits_qkv_rope(self.head_dim, self.q_norm is not None):
            attn = self.attn
            w, scale = skinny_weight(self.qkv_proj)
            q = ops.norm_qkv_rope(h, norm.weight, norm.eps, w, self.qkv_proj.bias, *rope, attn.k_cache, attn.v_cache,
                                  get_context().slot_mapping, self.num_heads, self.num_kv_heads, scale=scale)
            return self.o_proj.forward_add(ops, attn.attend(q).flatten(1), h)
        w, scale = skinny_weight(self.qkv_proj)
        qkv = ops.norm_linear(h, norm.weight, norm.eps, w, self.qkv_proj.bias, scale=scale)
        return self.o_proj.forward_add(ops, self._attend(rope, qkv), h)

    def _attend(self, rope, qkv: torch.Tensor) -> torch.Tensor:
        """Attention over the fused q/k/v projection; returns the heads' outputs flattened."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.attn(q, k, v, rope).flatten(1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))

    def forward_skinny(self, ops, h, norm: RMSNorm):
        """h + mlp(norm(h)): norm, both projections and SiLU in one kernel, the add in the next."""
        w, scale = skinny_weight(self.gate_up_proj)
        a = ops.norm_gate_up(h, norm.weight, norm.eps, w, scale=scale)
        return self.down_proj.forward_add(ops, a, h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, rope, x, residual):
        """x: the previous layer's output, residual: the stream before it (None at layer 0);
        each residual add is fused into the norm that follows it."""
        h, residual = (self.input_layernorm(x), x) if residual is None else self.input_layernorm(x, residual)
        h = self.self_attn(rope, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def forward_skinny(self, ops, rope, h):
        """The same layer for a step of a few tokens: h is the residual stream itself."""
        h = self.self_attn.forward_skinny(ops, rope, h, self.input_layernorm)
        return self.mlp.forward_skinny(ops, h, self.post_attention_layernorm)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.skinny_ops = None   # set by the model runner: steps of <= skinny_rows tokens take it
        self.skinny_rows = 1

    def forward(self, ids, positions):
        x, residual = self.embed_tokens(ids), None
        rope = self.rotary.cos_sin(positions, x.dtype)
        if self.skinny_ops is not None and x.shape[0] <= self.skinny_rows:
            for layer in self.layers:
                x = layer.forward_skinny(self.skinny_ops, rope, x)
            return self.norm(x)
        for layer in self.layers:
            x, residual = layer(rope, x, residual)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    # checkpoint name fragment -> (our parameter fragment, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(ids, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        ops, head = self.model.skinny_ops, self.lm_head
        if head.fp8 is not None and ops is not None and hidden.shape[0] <= self.model.skinny_rows and head.tp == 1:
            w8, scale = head.fp8   # half the bytes of the bf16 head
            return ops.norm_linear(hidden.contiguous(), None, 0.0, w8, None, scale=scale)
        return head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
