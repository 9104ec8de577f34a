"""Measure one forward step per batch size by replaying the captured CUDA graphs on dummy
inputs (writes go to the scratch block). Auto gamma balances a PEARL round with these."""
import time

import torch


@torch.inference_mode()
def measure_step_ms(runner, query_len: int, context_len: int = 256, repeats: int = 10) -> dict[int, float]:
    graphs = runner.graphs
    if graphs is None:
        return {}
    q = next((x for x in graphs.q_buckets if x >= query_len), None)
    if q is None:
        return {}
    if getattr(runner, "tp_size", 1) > 1:
        # a TP rank's graph holds all-reduces: replayed on rank 0 alone it would pair them with
        # whatever the workers wait in (their next step's broadcast), so step the whole group
        return _measure_group(runner, graphs, query_len, context_len, repeats)
    out = {}
    for b in graphs.batch_buckets:
        graph, buf = graphs.graphs[(b, q)]
        buf["slots"].fill_(runner.scratch_slot)
        buf["tables"].zero_()
        buf["q_lens"].fill_(query_len)
        buf["ctx_lens"].fill_(context_len)
        hidden = buf["hidden"][::q]   # one row per sequence: the LM head's share of a step
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
    from pearl_runtime.engine.model_runner import StepInput
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


def balanced_gamma(target_ms: float, draft_ms: float, max_gamma: int) -> int:
    """PEARL: gamma draft steps should take as long as one verify, so the overlapped round
    wastes neither side."""
    return max(1, min(max_gamma, round(target_ms / max(draft_ms, 1e-6))))


SD_PRIOR_ALPHA = 0.8   # acceptance assumed before any is measured


def sd_tokens_per_ms(gamma: int, target_ms: float, draft_ms: float, alpha: float) -> float:
    """sd's expected tokens per ms: sum(alpha^i, i <= g) / (g * draft + verify)."""
    return sum(alpha ** i for i in range(gamma + 1)) / (gamma * draft_ms + target_ms)


def sd_gamma(target_ms: float, draft_ms: float, max_gamma: int, alpha: float = SD_PRIOR_ALPHA) -> int:
    """sd: draft and verify take turns, so the best gamma maximizes expected tokens per ms; a
    cheap draft earns a longer gamma."""
    return max(range(1, max_gamma + 1), key=lambda g: sd_tokens_per_ms(g, target_ms, draft_ms, alpha))
