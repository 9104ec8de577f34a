"""Per-forward attention metadata, set by the model runner and read by attention layers.

Every forward is a ragged batch: sequence i feeds `q_lens[i]` new tokens on top of
`context_lens[i] - q_lens[i]` tokens already in its paged KV. Prefill, decode and the
k-token verify step are all this one shape.
"""
import threading
from dataclasses import dataclass

import torch


@dataclass
class AttnContext:
    q_lens: list[int]
    context_lens: list[int]
    cu_seqlens_q: torch.Tensor      # [n+1] int32: where each sequence's queries start
    q_lens_t: torch.Tensor          # [n] int32: real queries (a CUDA-graph slot may hold more)
    context_lens_t: torch.Tensor    # [n] int32
    slot_mapping: torch.Tensor      # [total_q] int64: cache slot of every new token
    block_tables: torch.Tensor      # [n, max_blocks] int32, -1 padded
    max_q_len: int
    max_context_len: int


# thread-local: a test process may run a draft and a target forward at the same time
_local = threading.local()


def set_context(ctx: AttnContext | None) -> None:
    _local.ctx = ctx


def get_context() -> AttnContext:
    ctx = getattr(_local, "ctx", None)
    assert ctx is not None, "attention called outside a model-runner forward"
    return ctx
