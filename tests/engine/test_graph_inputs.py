"""The host side of a CUDA-graph step, on the CPU: `pack_inputs` lays a ragged step out the
way the graph's buffer views (`GraphRunner._buffers`) read it."""
import numpy as np
import torch

from pearl_runtime.engine.cuda_graph import GraphRunner, pack_inputs
from pearl_runtime.engine.model_runner import StepInput

SCRATCH, MAX_BLOCKS = 999, 6


def test_pack_inputs_matches_the_graph_buffer_views():
    b, q = 4, 4
    # three sequences: a decode (1 token), a verify (3) and a 2-token catch-up
    q_lens, ctx_lens = [1, 3, 2], [10, 7, 20]
    ids = [11, 21, 22, 23, 31, 32]
    positions = [9, 4, 5, 6, 18, 19]
    slots = [109, 204, 205, 206, 318, 319]
    tables = [[1, 2, -1], [4, -1, -1], [7, 8, 9]]
    step = StepInput(ids=ids, positions=positions, slots=slots, q_lens=q_lens, ctx_lens=ctx_lens,
                     cu_seqlens_q=[0, 1, 4, 6], block_tables=tables, logit_rows=[0, 1, 2, 3, 5])
    runner = GraphRunner(None, torch.device("cpu"), 16, SCRATCH, MAX_BLOCKS, max_batch=b, q_buckets=(q,))
    buf = runner._buffers(b, q)
    h64, h32 = np.full(buf["i64"].numel(), -7), np.full(buf["i32"].numel(), -7, dtype=np.int32)
    n_rows = pack_inputs(step, b, q, MAX_BLOCKS, SCRATCH, h64, h32)
    buf["i64"].copy_(torch.from_numpy(h64))
    buf["i32"].copy_(torch.from_numpy(h32))

    padded = [0, 4, 5, 6, 8, 9]                      # sequence i starts at row i * q
    assert buf["ids"][padded].tolist() == ids and buf["positions"][padded].tolist() == positions
    assert buf["slots"][padded].tolist() == slots
    pad = [r for r in range(b * q) if r not in padded]
    assert (buf["ids"][pad] == 0).all() and (buf["slots"][pad] == SCRATCH).all()
    assert n_rows == 5 and buf["rows"][:n_rows].tolist() == [0, 4, 5, 6, 9]
    assert buf["fed"][:len(ids)].tolist() == padded
    assert buf["q_lens"].tolist() == q_lens + [0] and buf["ctx_lens"].tolist() == ctx_lens + [0]
    expect = torch.zeros(b, MAX_BLOCKS, dtype=torch.int32)
    for i, t in enumerate(tables):
        expect[i, :3] = torch.tensor([max(x, 0) for x in t])
    assert torch.equal(buf["tables"], expect)


def test_packing_again_clears_the_last_step():
    """A smaller step after a larger one leaves no stale tokens, slots or tables behind."""
    b, q = 2, 2
    big = StepInput(ids=[1, 2, 3, 4], positions=[0, 1, 0, 1], slots=[16, 17, 32, 33], q_lens=[2, 2],
                    ctx_lens=[2, 2], cu_seqlens_q=[0, 2, 4], block_tables=[[1], [2]], logit_rows=[1, 3])
    small = StepInput(ids=[5], positions=[2], slots=[18], q_lens=[1], ctx_lens=[3], cu_seqlens_q=[0, 1],
                      block_tables=[[1]], logit_rows=[0])
    runner = GraphRunner(None, torch.device("cpu"), 16, SCRATCH, MAX_BLOCKS, max_batch=b, q_buckets=(q,))
    buf = runner._buffers(b, q)
    h64, h32 = np.zeros(buf["i64"].numel(), dtype=np.int64), np.zeros(buf["i32"].numel(), dtype=np.int32)
    pack_inputs(big, b, q, MAX_BLOCKS, SCRATCH, h64, h32)
    pack_inputs(small, b, q, MAX_BLOCKS, SCRATCH, h64, h32)
    buf["i64"].copy_(torch.from_numpy(h64))
    buf["i32"].copy_(torch.from_numpy(h32))
    assert buf["ids"].tolist() == [5, 0, 0, 0] and buf["slots"].tolist() == [18, SCRATCH, SCRATCH, SCRATCH]
    assert buf["q_lens"].tolist() == [1, 0] and buf["tables"][1].sum() == 0
