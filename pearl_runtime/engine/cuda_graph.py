"""CUDA graphs for the small steps: the draft's decode and the target's verify.

A graph is captured per (batch bucket B, token bucket T). A step's tokens are packed as the
step lays them out (sequence after sequence, no gaps), so a graph computes T rows however
the tokens split between sequences: a verify whose sequences feed 9 and 1 tokens costs ~10
rows a sequence pair, not 2 x 16 as a per-sequence padded layout made it (at batch 32 on a
72B target, padding was most of a compute-bound verify). Rows past the step's tokens, and
sequences past its batch (no queries), are padding; their K/V go to a scratch block the
block manager never hands out. Only the decoder body is captured; picking logit rows and
the LM head run eagerly (their size varies).
"""
import time

import numpy as np
import torch

from pearl_runtime.utils.context import AttnContext, set_context
from pearl_runtime.log import get_logger

log = get_logger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


def token_buckets(b: int, q_buckets) -> list[int]:
    """The token buckets of batch bucket b: b * q for each query bucket q, and halfway
    points between them, so a ragged verify pads by at most a third."""
    full = [b * q for q in sorted(q_buckets)]
    mid = [x + x // 2 for x in full[:-1] if x // 2 >= 1]
    return sorted(set(full + mid))


class GraphRunner:
    RING = 4   # pinned staging buffers per graph

    def __init__(self, model, device, block_size: int, scratch_slot: int, max_blocks_per_seq: int,
                 max_batch: int, q_buckets: tuple[int, ...]):
        self.model, self.device = model, device
        self.block_size, self.scratch_slot = block_size, scratch_slot
        self.batch_buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self.q_buckets = sorted(q_buckets)
        self.max_q = self.q_buckets[-1]
        self.token_buckets = {b: token_buckets(b, self.q_buckets) for b in self.batch_buckets}
        self.max_blocks = max_blocks_per_seq
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.pool = None
        self.hits = 0   # replays, for logs and tests
        self.staging: dict[tuple[int, int], list] = {}
        self.turns: dict[tuple[int, int], int] = {}

    def _buffers(self, b: int, t: int) -> dict:
        """Device inputs of one graph, as views of two flat tensors (int64 and int32) so one
        step's inputs arrive in two copies from pinned memory."""
        dev = self.device
        i64 = torch.zeros(4 * t, dtype=torch.int64, device=dev)   # ids|positions|slots|rows
        i32 = torch.zeros(3 * b + 1 + b * self.max_blocks, dtype=torch.int32, device=dev)
        i64[2 * t:3 * t] = self.scratch_slot
        return {"i64": i64, "i32": i32, "ids": i64[:t], "positions": i64[t:2 * t], "slots": i64[2 * t:3 * t],
                "rows": i64[3 * t:], "cu": i32[:b + 1], "q_lens": i32[b + 1:2 * b + 1],
                "ctx_lens": i32[2 * b + 1:3 * b + 1], "tables": i32[3 * b + 1:].view(b, self.max_blocks)}

    def _staging(self, key: tuple[int, int], buf: dict) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]:
        """Pinned host twins of a graph's inputs, from a ring: the host fills the next one while
        earlier copies are still queued behind running steps (pageable copies would wait)."""
        ring = self.staging.setdefault(key, [])
        if len(ring) < self.RING:
            ring.append((torch.empty_like(buf["i64"], device="cpu").pin_memory(),
                         torch.empty_like(buf["i32"], device="cpu").pin_memory(), torch.cuda.Event()))
        turn = self.turns[key] = self.turns.get(key, -1) + 1
        h64, h32, done = ring[turn % self.RING]
        done.synchronize()   # its last copy has left it (long ago, unless the ring wrapped around)
        return h64, h32, done

    def longest_query(self, b: int, t: int) -> int:
        """The longest query one sequence may feed in graph (b, t): attention sizes its grid by
        it. The t == b graphs are decode steps (one token each), sized for that alone."""
        return 1 if t == b else min(t, self.max_q)

    def _context(self, buf: dict, b: int, t: int) -> AttnContext:
        q = self.longest_query(b, t)
        return AttnContext(q_lens=[q] * b, context_lens=[q] * b, cu_seqlens_q=buf["cu"], q_lens_t=buf["q_lens"],
                           context_lens_t=buf["ctx_lens"], slot_mapping=buf["slots"], block_tables=buf["tables"],
                           max_q_len=q, max_context_len=self.max_blocks * self.block_size)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        reserved_before = torch.cuda.memory_reserved(self.device)
        # our own capture stream: torch's default one is made once per process, on whichever
        # device captured first, and entering it switches the current device there (a test
        # process with a target on GPU 0 and a draft on GPU 1 then launched Triton on GPU 0)
        capture_stream = torch.cuda.Stream(self.device)
        keys = sorted(((b, t) for b in self.batch_buckets for t in self.token_buckets[b]), reverse=True)
        for b, t in keys:   # largest first: the pool's blocks fit every later graph
            buf = self._buffers(b, t)
            set_context(self._context(buf, b, t))
            try:
                self.model(buf["ids"], buf["positions"])          # warm up (autotune, allocations)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream):
                    buf["hidden"] = self.model(buf["ids"], buf["positions"])
            finally:
                set_context(None)
            self.pool = graph.pool()
            self.graphs[(b, t)] = (graph, buf)
        torch.cuda.synchronize(self.device)
        used = (torch.cuda.memory_reserved(self.device) - reserved_before) / 2**20
        log.info("cuda graphs: captured %d (batch %s x tokens, packed; queries up to %d a sequence) in %.1f s, "
                 "%.0f MiB", len(self.graphs), self.batch_buckets, self.max_q, time.perf_counter() - start, used)

    def key(self, batch: int, tokens: int, longest: int = 1) -> tuple[int, int] | None:
        """The graph for `batch` sequences feeding `tokens` tokens in all, none more than
        `longest`, if any holds them."""
        b = next((x for x in self.batch_buckets if x >= batch), None)
        if b is None:
            return None
        t = next((x for x in self.token_buckets[b] if x >= tokens and self.longest_query(b, x) >= longest), None)
        return None if t is None or (b, t) not in self.graphs else (b, t)

    def bucket(self, step) -> tuple[int, int] | None:
        if len(step.block_tables[0]) > self.max_blocks:
            return None
        return self.key(len(step.q_lens), len(step.ids), max(step.q_lens))

    @torch.inference_mode()
    def run(self, step, key: tuple[int, int], device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay; returns hidden states of the step's logit rows. `device_ids` (on the
        device, in the step's token order) replaces step.ids."""
        return self.replay(key, self.stage(step, key), device_ids)

    def stage(self, step, key: tuple[int, int]) -> tuple:
        """The step's inputs packed into pinned memory for graph `key`: host work only, so
        nothing reaches the device (where another process may be running) before `replay`."""
        b, t = key
        pin64, pin32, done = self._staging(key, self.graphs[key][1])
        rows = pack_inputs(step, b, t, self.max_blocks, self.scratch_slot, pin64.numpy(), pin32.numpy())
        return rows, pin64, pin32, done

    def replay(self, key: tuple[int, int], staged: tuple, device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Copy `stage`d inputs in and run graph `key`; `device_ids` replace the first ids."""
        self.hits += 1
        graph, buf = self.graphs[key]
        rows, pin64, pin32, done = staged
        buf["i64"].copy_(pin64, non_blocking=True)
        buf["i32"].copy_(pin32, non_blocking=True)
        done.record()
        if device_ids is not None:
            buf["ids"][:device_ids.shape[0]].copy_(device_ids)
        graph.replay()
        return buf["hidden"].index_select(0, buf["rows"][:rows])


def pack_inputs(step, b: int, t: int, max_blocks: int, scratch_slot: int, h64: np.ndarray, h32: np.ndarray) -> int:
    """Lay one step's inputs out as a (b, t) graph reads them, into the host twins of its two
    flat buffers. int64: ids | positions | slots | logit rows, t each, tokens packed as in the
    step; rows past them keep id 0 and write to the scratch slot. int32: cu_seqlens (b + 1;
    sequences past the step's have no queries) | q_lens | ctx_lens (b each) | block tables
    (b x max_blocks). Returns the number of logit rows."""
    n, fed = len(step.q_lens), len(step.ids)
    assert n <= b and fed <= t, f"a step of {n} sequences / {fed} tokens does not fit graph ({b}, {t})"
    h64[:3 * t] = 0
    h64[2 * t:3 * t] = scratch_slot
    h64[:fed], h64[t:t + fed], h64[2 * t:2 * t + fed] = step.ids, step.positions, step.slots
    h64[3 * t:3 * t + len(step.logit_rows)] = step.logit_rows
    h32[:] = 0
    h32[:n + 1] = step.cu_seqlens_q
    h32[n + 1:b + 1] = fed
    h32[b + 1:b + 1 + n], h32[2 * b + 1:2 * b + 1 + n] = step.q_lens, step.ctx_lens
    width = len(step.block_tables[0])
    h32[3 * b + 1:].reshape(b, max_blocks)[:n, :width] = np.maximum(np.asarray(step.block_tables, dtype=np.int32), 0)
    return len(step.logit_rows)
