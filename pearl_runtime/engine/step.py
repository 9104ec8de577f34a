"""What one forward step feeds the model, as plain data (no tensors, no model)."""
from dataclasses import dataclass


@dataclass
class StepInput:
    """One forward's inputs as plain lists: cheap to build, to broadcast to TP ranks, and to
    copy into CUDA-graph buffers."""
    ids: list[int]
    positions: list[int]
    slots: list[int]              # cache slot of every fed token
    q_lens: list[int]
    ctx_lens: list[int]
    cu_seqlens_q: list[int]
    block_tables: list[list[int]]
    logit_rows: list[int]         # which fed positions need logits
