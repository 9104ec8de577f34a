"""CUDA graphs for the small steps: the draft's decode and the target's verify.

A graph is captured per (batch bucket B, query bucket Q). Sequence i of a step occupies
slot rows [i*Q, i*Q + q_len_i); the rest of a slot, and whole unused slots, are padding
whose K/V go to a scratch block the block manager never hands out. Only the decoder body
is captured; picking logit rows and the LM head run eagerly (their size varies).
"""
import logging
import time

import numpy as np
import torch

from pearl_runtime.utils.context import AttnContext, set_context

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


class GraphRunner:
    RING = 4   # pinned staging buffers per graph

    def __init__(self, model, device, block_size: int, scratch_slot: int, max_blocks_per_seq: int,
                 max_batch: int, q_buckets: tuple[int, ...]):
        self.model, self.device = model, device
        self.block_size, self.scratch_slot = block_size, scratch_slot
        self.batch_buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self.q_buckets = sorted(q_buckets)
        self.max_blocks = max_blocks_per_seq
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.pool = None
        self.hits = 0   # replays, for logs and tests
        self.staging: dict[tuple[int, int], list] = {}
        self.turns: dict[tuple[int, int], int] = {}

    def _buffers(self, b: int, q: int) -> dict:
        """Device inputs of one graph, as views of two flat tensors (int64 and int32) so one
        step's inputs arrive in two copies from pinned memory."""
        dev, n = self.device, b * q
        i64 = torch.zeros(5 * n, dtype=torch.int64, device=dev)   # ids|positions|slots|rows|fed
        i32 = torch.zeros(2 * b + b * self.max_blocks, dtype=torch.int32, device=dev)
        i64[2 * n:3 * n] = self.scratch_slot
        return {"i64": i64, "i32": i32, "ids": i64[:n], "positions": i64[n:2 * n], "slots": i64[2 * n:3 * n],
                "rows": i64[3 * n:4 * n], "fed": i64[4 * n:], "cu": torch.arange(b + 1, dtype=torch.int32, device=dev) * q,
                "q_lens": i32[:b], "ctx_lens": i32[b:2 * b], "tables": i32[2 * b:].view(b, self.max_blocks)}

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

    def _context(self, buf: dict, b: int, q: int) -> AttnContext:
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
        for q in reversed(self.q_buckets):
            for b in reversed(self.batch_buckets):
                buf = self._buffers(b, q)
                set_context(self._context(buf, b, q))
                try:
                    self.model(buf["ids"], buf["positions"])          # warm up (autotune, allocations)
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream):
                        buf["hidden"] = self.model(buf["ids"], buf["positions"])
                finally:
                    set_context(None)
                self.pool = graph.pool()
                self.graphs[(b, q)] = (graph, buf)
        torch.cuda.synchronize(self.device)
        used = (torch.cuda.memory_reserved(self.device) - reserved_before) / 2**20
        log.info("cuda graphs: captured %d (batch %s x query %s) in %.1f s, %.0f MiB",
                 len(self.graphs), self.batch_buckets, self.q_buckets, time.perf_counter() - start, used)

    def bucket(self, step) -> tuple[int, int] | None:
        n, qmax = len(step.q_lens), max(step.q_lens)
        if len(step.block_tables[0]) > self.max_blocks:
            return None
        b = next((x for x in self.batch_buckets if x >= n), None)
        q = next((x for x in self.q_buckets if x >= qmax), None)
        if b is None or q is None or (b, q) not in self.graphs:
            return None
        return b, q

    @torch.inference_mode()
    def run(self, step, key: tuple[int, int], device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay; returns hidden states of the step's logit rows. `device_ids` (on the
        device) replaces step.ids."""
        b, q = key
        self.hits += 1
        graph, buf = self.graphs[key]
        pin64, pin32, done = self._staging(key, buf)
        rows = pack_inputs(step, b, q, self.max_blocks, self.scratch_slot, pin64.numpy(), pin32.numpy())
        buf["i64"].copy_(pin64, non_blocking=True)
        buf["i32"].copy_(pin32, non_blocking=True)
        done.record()
        if device_ids is not None:
            buf["ids"].index_copy_(0, buf["fed"][:len(step.ids)], device_ids)
        graph.replay()
        return buf["hidden"].index_select(0, buf["rows"][:rows])


def pack_inputs(step, b: int, q: int, max_blocks: int, scratch_slot: int, h64: np.ndarray, h32: np.ndarray) -> int:
    """Lay one step's inputs out as a (b, q) graph reads them, into the host twins of its two
    flat buffers. int64: ids | positions | slots | logit rows | fed rows, b*q each; int32:
    q_lens | ctx_lens (b each) | block tables (b x max_blocks). Packed token r of sequence i
    goes to padded row i*q + (r - start_i); padding keeps id 0 and writes to the scratch slot.
    Returns the number of logit rows."""
    n, fed, m = len(step.q_lens), len(step.ids), b * q
    q_lens = np.asarray(step.q_lens, dtype=np.int64)
    starts = np.asarray(step.cu_seqlens_q[:-1], dtype=np.int64)
    padded = np.repeat(np.arange(n), q_lens) * q + np.arange(fed) - np.repeat(starts, q_lens)
    rows = padded[np.asarray(step.logit_rows, dtype=np.int64)]
    h64[:3 * m] = 0
    h64[2 * m:3 * m] = scratch_slot
    h64[padded], h64[m + padded], h64[2 * m + padded] = step.ids, step.positions, step.slots
    h64[3 * m:3 * m + len(rows)] = rows
    h64[4 * m:4 * m + fed] = padded
    h32[:] = 0
    h32[:n], h32[b:b + n] = step.q_lens, step.ctx_lens
    width = len(step.block_tables[0])
    h32[2 * b:].reshape(b, max_blocks)[:n, :width] = np.maximum(np.asarray(step.block_tables, dtype=np.int32), 0)
    return len(rows)
