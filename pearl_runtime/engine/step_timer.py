"""Measure one forward step per batch size by replaying the captured CUDA graphs on dummy
inputs (writes go to the scratch block), and the verify-time table auto gamma prices with
(the gamma rules themselves live in pearl_runtime/spec)."""
import time

import torch

from pearl_runtime.spec.verify_cost import VerifyCost  # noqa: F401  (re-exported: what measure_verify_cost returns)


@torch.inference_mode()
def measure_step_ms(runner, query_len: int, context_len: int = 256, repeats: int = 10) -> dict[int, float]:
    graphs = runner.graphs
    if graphs is None:
        return {}
    if query_len > graphs.max_q:
        return {}
    if getattr(runner, "tp_size", 1) > 1:
        # a TP rank's graph holds all-reduces: replayed on rank 0 alone it would pair them with
        # whatever the workers wait in (their next step's broadcast), so step the whole group
        return _measure_group(runner, graphs, query_len, context_len, repeats)
    out = {}
    for b in graphs.batch_buckets:
        graph, buf = graphs.graphs[graphs.key(b, b * query_len, query_len)]
        buf["slots"].fill_(runner.scratch_slot)
        buf["tables"].zero_()
        buf["cu"].copy_(torch.arange(b + 1, device=runner.device) * query_len)
        buf["q_lens"].fill_(query_len)
        buf["ctx_lens"].fill_(context_len)
        hidden = buf["hidden"][:b * query_len:query_len]   # one row per sequence: the LM head's share
        graph.replay()
        runner.model.logits(hidden)
        torch.cuda.synchronize(runner.device)
        start = time.perf_counter()
        for _ in range(repeats):
            graph.replay()
            runner.model.logits(hidden)
        torch.cuda.synchronize(runner.device)
        out[b] = (time.perf_counter() - start) / repeats * 1e3
    return out


def _measure_group(runner, graphs, query_len: int, context_len: int, repeats: int) -> dict[int, float]:
    """Whole steps through runner.execute (which hands each rank the same StepInput), on
    dummy sequences whose tokens all write to the scratch slot; includes the step's host work."""
    from pearl_runtime.engine.step import StepInput
    blocks = -(-context_len // runner.block_size)
    out = {}
    for b in graphs.batch_buckets:
        n = b * query_len
        step = StepInput(ids=[0] * n, positions=[context_len - query_len + i for i in range(query_len)] * b,
                         slots=[runner.scratch_slot] * n, q_lens=[query_len] * b, ctx_lens=[context_len] * b,
                         cu_seqlens_q=[i * query_len for i in range(b + 1)], block_tables=[[0] * blocks] * b,
                         logit_rows=[(i + 1) * query_len - 1 for i in range(b)])
        runner.execute(step)
        torch.cuda.synchronize(runner.device)
        start = time.perf_counter()
        for _ in range(repeats):
            runner.execute(step)
        torch.cuda.synchronize(runner.device)
        out[b] = (time.perf_counter() - start) / repeats * 1e3
    return out


def measure_verify_cost(runner, query_lens: list[int], context_len: int = 256) -> VerifyCost:
    """Replay each (batch, query) graph bucket up to `query_lens`: the table VerifyCost prices with."""
    table = {}
    for q in query_lens:
        times = measure_step_ms(runner, query_len=q, context_len=context_len, repeats=5 if q > 4 else 10)
        if times:
            table[q] = times
    return VerifyCost(table)


def measure_policy_verify_cost(runner, max_gamma: int, with_ar: bool) -> VerifyCost:
    """The verify table auto gamma (and --mode auto) prices with: one query length for each token
    bucket that gamma 1..max_gamma verify in (gamma + 1 tokens a sequence; graphs pack a step's
    tokens), and one token a sequence when ar is priced too."""
    per_seq = runner.graphs.token_buckets[1]
    first = 1 if with_ar else 2
    return measure_verify_cost(runner, sorted({next(t for t in per_seq if t >= q) for q in range(first, max_gamma + 2)}))
