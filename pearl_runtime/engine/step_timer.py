"""Measure one forward step per batch size by replaying the captured CUDA graphs on dummy
inputs (writes go to the scratch block), and the gamma rules auto gamma prices with them."""
import time

import torch

from pearl_runtime.bench.projection import as_function, head_start_for, pearl_mean_query, project


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


class VerifyCost:
    """A verify's time by batch bucket and query length, as measured at start.

    While decoding is bandwidth-bound, a verify of 17 tokens costs what one of 4 does; a 72B
    TP=2 verify at batch 32 is not: 29 ms at 4 query tokens, 46 at 8, 81 at 17 (when graphs
    padded each sequence to 32). So the gamma rules price each gamma at its own query length
    (gamma + 1 tokens a sequence), in the token bucket it will run in."""

    def __init__(self, table: dict[int, dict[int, float]] | None = None):
        self.table = table or {}   # query bucket -> batch bucket -> ms

    @classmethod
    def from_rows(cls, rows) -> "VerifyCost":
        """From [batch, query, ms] rows (TargetMetrics.verify_times as the bench records them)."""
        table: dict[int, dict[int, float]] = {}
        for b, q, ms in rows:
            table.setdefault(int(q), {})[int(b)] = float(ms)
        return cls(table)

    @property
    def batch_buckets(self) -> list[int]:
        return sorted({b for row in self.table.values() for b in row})

    def ms(self, batch: int, query_len: float, interpolate: bool = False) -> float | None:
        """The verify time of `batch` sequences feeding `query_len` tokens each, at the batch's
        bucket. The table is measured at the query lengths whose batches fill a token bucket,
        so a uniform verify costs the smallest measured length that holds it (the largest if
        none does). `interpolate`, for a mean over sequences that feed different counts (a
        PEARL batch): linear between the measured lengths, since the batch's total lands
        anywhere between two token buckets."""
        if not self.table:
            return None
        qs = sorted(self.table)

        def at(q: int) -> float:
            row = self.table[q]
            bs = sorted(row)
            return row[next((b for b in bs if b >= batch), bs[-1])]
        hi = next((x for x in qs if x >= query_len), None)
        if hi is None:
            return at(qs[-1])
        lo = max((x for x in qs if x <= query_len), default=hi)
        if not interpolate or lo == hi:
            return at(hi)
        return at(lo) + (at(hi) - at(lo)) * (query_len - lo) / (hi - lo)

    def scale(self, batch: int, gamma: float, interpolate: bool = False) -> float:
        """The table's verify ms at gamma + 1 tokens a sequence (1.0 without a table: every
        gamma costs the same). The tuner keeps observed verifies as ratios to it, so rounds
        run at different gammas average together and price the gammas not run."""
        ms = self.ms(batch, gamma + 1, interpolate)
        return 1.0 if ms is None else ms


def measure_verify_cost(runner, query_lens: list[int], context_len: int = 256) -> VerifyCost:
    """Replay each (batch, query) graph bucket up to `query_lens`: the table VerifyCost prices with."""
    table = {}
    for q in query_lens:
        times = measure_step_ms(runner, query_len=q, context_len=context_len, repeats=5 if q > 4 else 10)
        if times:
            table[q] = times
    return VerifyCost(table)


SD_PRIOR_ALPHA = 0.8   # acceptance assumed before any is measured


def sd_tokens_per_ms(gamma: int, target_ms, draft_ms: float, alpha: float, fixed_ms: float = 0.0) -> float:
    """sd's expected tokens per ms: sum(alpha^i, i <= g) / (fixed + g * draft + verify(g)).
    `fixed_ms`: what a round costs whatever its gamma (transport, host work, the draft's own
    per-round overhead); spread over the draft's tokens instead, it prices long gammas too
    dear (7B + 0.5B at bs 1: ~1.3 ms of a 7.8 ms round at gamma 3)."""
    return sum(alpha ** i for i in range(gamma + 1)) / (fixed_ms + gamma * draft_ms + as_function(target_ms)(gamma))


def sd_gamma(target_ms, draft_ms: float, max_gamma: int, alpha: float = SD_PRIOR_ALPHA, fixed_ms: float = 0.0) -> int:
    """sd: draft and verify take turns, so the best gamma maximizes expected tokens per ms; a
    cheap draft earns a longer gamma. `target_ms`: a verify's ms, or gamma -> ms."""
    return max(range(1, max_gamma + 1), key=lambda g: sd_tokens_per_ms(g, target_ms, draft_ms, alpha, fixed_ms))


def pearl_tokens_per_ms(gamma: int, target_ms, draft_ms: float, alpha: float, head_start: int = -1) -> float:
    """PEARL's expected tokens per ms by the round model (bench/projection.py): the round lasts
    as long as the longer of gamma draft steps and one verify, plus the head start's waits.
    The verify is priced at the mean tokens a sequence feeds (pre-verify sequences feed few),
    since graphs pack them: priced at gamma + 1 for all, a 72B batch-8 verify looked 13% dearer
    at gamma 14 than 11, and auto gamma took 11 (2.94x over ar against 3.45x at 14)."""
    w = head_start_for(gamma, head_start)
    r = project(1.0, draft_ms, as_function(target_ms)(pearl_mean_query(alpha, gamma, w) - 1), 0.0, alpha, gamma, w)
    return r["pearl_tokens_per_round"] / r["pearl_round_ms"]


def pearl_gamma(target_ms, draft_ms: float, max_gamma: int, alpha: float = SD_PRIOR_ALPHA,
                head_start: int = -1) -> int:
    """PEARL: draft and verify overlap, so the best gamma makes gamma draft steps last about one
    verify, no longer than the verify of gamma + 1 tokens it buys (the round model decides)."""
    return max(range(1, max_gamma + 1),
               key=lambda g: pearl_tokens_per_ms(g, target_ms, draft_ms, alpha, head_start))
