"""Bytes an autoregressive decode step must read from HBM, counted from config.json, and the
achieved bandwidth they imply.

One decode step of one sequence reads every weight once: per layer the q/k/v/o projections
(plus the q/k/v biases of Qwen2 and the q/k norms of Qwen3), gate/up/down of the MLP and two
RMSNorms; then the final norm and the LM head (vocab x hidden). The embedding table is *not*
read fully: a step gathers one row per token (`hidden` values), so only that row counts,
while the head, which multiplies the hidden state by the whole vocab x hidden matrix, counts
in full (also when it is tied to the embedding). On top come the KV cache reads: every layer
reads K and V of all earlier positions, 2 x kv_heads x head_dim values per position.
"""
from pathlib import Path

from pearl_runtime.config import DTYPES, ModelConfig


def dtype_bytes(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def weight_bytes_per_step(model_dir: str | Path, dtype: str) -> dict:
    """Parameters one decode step reads, by part, and their total in bytes."""
    c = ModelConfig.from_dir(model_dir)
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attn = h * q + 2 * h * kv + q * h
    if c.qkv_bias:
        attn += q + 2 * kv
    if c.qk_norm:
        attn += 2 * c.head_dim
    mlp = 3 * h * c.intermediate_size
    per_layer = attn + mlp + 2 * h
    parts = {"layers": c.num_layers * per_layer, "final_norm": h, "lm_head": c.vocab_size * h,
             "embedding_row": h}
    params = sum(parts.values())
    size = dtype_bytes(dtype)
    return {"params_read": params, "bytes": params * size, "by_part": parts, "dtype_bytes": size,
            "embedding_table_params": c.vocab_size * h}


def kv_bytes_per_token(model_dir: str | Path, dtype: str) -> int:
    """KV cache bytes of one position (all layers, K and V)."""
    c = ModelConfig.from_dir(model_dir)
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * dtype_bytes(dtype)


def decode_step_bytes(model_dir: str | Path, dtype: str, mean_context: float, batch: int = 1) -> dict:
    """Bytes of one decode step of `batch` sequences at `mean_context` positions each: the
    weights once, the KV of every sequence."""
    w = weight_bytes_per_step(model_dir, dtype)
    kv = kv_bytes_per_token(model_dir, dtype) * mean_context * batch
    return {"weight_bytes": w["bytes"], "kv_bytes": kv, "total_bytes": w["bytes"] + kv,
            "mean_context": mean_context, "weights": w}


def achieved_gbps(total_bytes: float, step_ms: float) -> float | None:
    return total_bytes / (step_ms / 1e3) / 1e9 if step_ms > 0 else None


def kv_cache_gb(model_dir: str | Path, dtype: str, seqs: int, tokens_per_seq: int, block_size: int = 16,
                floor_gb: float = 0.25) -> float:
    """A KV cache size that holds `seqs` sequences of `tokens_per_seq` with room to spare."""
    blocks = seqs * (-(-tokens_per_seq // block_size) + 2)
    return max(floor_gb, 1.25 * blocks * block_size * kv_bytes_per_token(model_dir, dtype) / 1e9)
