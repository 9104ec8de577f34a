"""The host side of a CUDA-graph step, on the CPU: `pack_inputs` lays a ragged step out the
way the graph's buffer views (`GraphRunner._buffers`) read it."""
import numpy as np
import torch

from pearl_runtime.engine.cuda_graph import GraphRunner, pack_inputs
from pearl_runtime.engine.step import StepInput

SCRATCH, MAX_BLOCKS = 999, 6


def test_pack_inputs_matches_the_graph_buffer_views():
    b, t = 4, 8
    # three sequences: a decode (1 token), a verify (3) and a 2-token catch-up
    q_lens, ctx_lens = [1, 3, 2], [10, 7, 20]
    ids = [11, 21, 22, 23, 31, 32]
    positions = [9, 4, 5, 6, 18, 19]
    slots = [109, 204, 205, 206, 318, 319]
    tables = [[1, 2, -1], [4, -1, -1], [7, 8, 9]]
    step = StepInput(ids=ids, positions=positions, slots=slots, q_lens=q_lens, ctx_lens=ctx_lens,
                     cu_seqlens_q=[0, 1, 4, 6], block_tables=tables, logit_rows=[0, 1, 2, 3, 5])
    runner = GraphRunner(None, torch.device("cpu"), 16, SCRATCH, MAX_BLOCKS, max_batch=b, q_buckets=(1, 2, 4))
    buf = runner._buffers(b, t)
    h64, h32 = np.full(buf["i64"].numel(), -7), np.full(buf["i32"].numel(), -7, dtype=np.int32)
    n_rows = pack_inputs(step, b, t, MAX_BLOCKS, SCRATCH, h64, h32)
    buf["i64"].copy_(torch.from_numpy(h64))
    buf["i32"].copy_(torch.from_numpy(h32))

    # tokens packed as the step lays them out; the rows past them are padding
    assert buf["ids"][:6].tolist() == ids and buf["positions"][:6].tolist() == positions
    assert buf["slots"][:6].tolist() == slots
    assert (buf["ids"][6:] == 0).all() and (buf["slots"][6:] == SCRATCH).all()
    assert n_rows == 5 and buf["rows"][:n_rows].tolist() == [0, 1, 2, 3, 5]
    # the fourth sequence of the batch bucket has no queries
    assert buf["cu"].tolist() == [0, 1, 4, 6, 6]
    assert buf["q_lens"].tolist() == q_lens + [0] and buf["ctx_lens"].tolist() == ctx_lens + [0]
    expect = torch.zeros(b, MAX_BLOCKS, dtype=torch.int32)
    for i, tb in enumerate(tables):
        expect[i, :3] = torch.tensor([max(x, 0) for x in tb])
    assert torch.equal(buf["tables"], expect)


def test_packing_again_clears_the_last_step():
    """A smaller step after a larger one leaves no stale tokens, slots or tables behind."""
    b, t = 2, 4
    big = StepInput(ids=[1, 2, 3, 4], positions=[0, 1, 0, 1], slots=[16, 17, 32, 33], q_lens=[2, 2],
                    ctx_lens=[2, 2], cu_seqlens_q=[0, 2, 4], block_tables=[[1], [2]], logit_rows=[1, 3])
    small = StepInput(ids=[5], positions=[2], slots=[18], q_lens=[1], ctx_lens=[3], cu_seqlens_q=[0, 1],
                      block_tables=[[1]], logit_rows=[0])
    runner = GraphRunner(None, torch.device("cpu"), 16, SCRATCH, MAX_BLOCKS, max_batch=b, q_buckets=(2,))
    buf = runner._buffers(b, t)
    h64, h32 = np.zeros(buf["i64"].numel(), dtype=np.int64), np.zeros(buf["i32"].numel(), dtype=np.int32)
    pack_inputs(big, b, t, MAX_BLOCKS, SCRATCH, h64, h32)
    pack_inputs(small, b, t, MAX_BLOCKS, SCRATCH, h64, h32)
    buf["i64"].copy_(torch.from_numpy(h64))
    buf["i32"].copy_(torch.from_numpy(h32))
    assert buf["ids"].tolist() == [5, 0, 0, 0] and buf["slots"].tolist() == [18, SCRATCH, SCRATCH, SCRATCH]
    assert buf["cu"].tolist() == [0, 1, 1] and buf["q_lens"].tolist() == [1, 0] and buf["tables"][1].sum() == 0


def test_token_buckets_hold_ragged_steps_without_per_sequence_padding():
    """A verify where 3 of 8 sequences feed 9 tokens and 5 feed 1 (32 tokens) runs in a
    48-row graph, not the 8 x 16 = 128 rows of a per-sequence padded layout."""
    runner = GraphRunner(None, torch.device("cpu"), 16, SCRATCH, MAX_BLOCKS, max_batch=8,
                         q_buckets=(1, 2, 4, 8, 16, 32))
    assert runner.token_buckets[8] == [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert runner.token_buckets[1] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    runner.graphs = {(b, t): None for b in runner.batch_buckets for t in runner.token_buckets[b]}
    step = StepInput(ids=[0] * 32, positions=[0] * 32, slots=[0] * 32, q_lens=[9, 9, 9, 1, 1, 1, 1, 1],
                     ctx_lens=[50] * 8, cu_seqlens_q=[0, 9, 18, 27, 28, 29, 30, 31, 32],
                     block_tables=[[0]] * 8, logit_rows=list(range(32)))
    assert runner.bucket(step) == (8, 32)
    step.q_lens[3] = 2   # 33 tokens
    step.ids = [0] * 33
    assert runner.bucket(step) == (8, 48)
    assert runner.key(5, 7) == (8, 8) and runner.key(9, 9) is None   # past the largest batch
    # the t == b graphs are sized for decode steps: a 2-token query goes one bucket up
    assert runner.key(5, 6, longest=2) == (8, 12)
    step.q_lens[0] = 33   # a query longer than any graph holds
    assert runner.bucket(step) is None
