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

    def _buffers(self, b: int, q: int) -> dict:
        dev = self.device
        return {"ids": torch.zeros(b * q, dtype=torch.int64, device=dev),
                "positions": torch.zeros(b * q, dtype=torch.int64, device=dev),
                "slots": torch.full((b * q,), self.scratch_slot, dtype=torch.int64, device=dev),
                "cu": torch.arange(b + 1, dtype=torch.int32, device=dev) * q,
                "q_lens": torch.zeros(b, dtype=torch.int32, device=dev),
                "ctx_lens": torch.zeros(b, dtype=torch.int32, device=dev),
                "tables": torch.zeros(b, self.max_blocks, dtype=torch.int32, device=dev)}

    def _context(self, buf: dict, b: int, q: int) -> AttnContext:
        return AttnContext(q_lens=[q] * b, context_lens=[q] * b, cu_seqlens_q=buf["cu"], q_lens_t=buf["q_lens"],
                           context_lens_t=buf["ctx_lens"], slot_mapping=buf["slots"], block_tables=buf["tables"],
                           max_q_len=q, max_context_len=self.max_blocks * self.block_size)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        reserved_before = torch.cuda.memory_reserved(self.device)
        for q in reversed(self.q_buckets):
            for b in reversed(self.batch_buckets):
                buf = self._buffers(b, q)
                set_context(self._context(buf, b, q))
                try:
                    self.model(buf["ids"], buf["positions"])          # warm up (autotune, allocations)
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool):
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
        n = len(step.q_lens)
        q_lens = np.asarray(step.q_lens, dtype=np.int64)
        starts = np.asarray(step.cu_seqlens_q[:-1], dtype=np.int64)
        # packed row r of sequence i lands in padded row i*q + (r - start_i)
        seq_of = np.repeat(np.arange(n), q_lens)
        padded = seq_of * q + np.arange(len(step.ids)) - np.repeat(starts, q_lens)
        ids = np.zeros(b * q, dtype=np.int64)
        pos = np.zeros(b * q, dtype=np.int64)
        slots = np.full(b * q, self.scratch_slot, dtype=np.int64)
        ids[padded], pos[padded], slots[padded] = step.ids, step.positions, step.slots
        tables = np.zeros((b, self.max_blocks), dtype=np.int32)
        width = len(step.block_tables[0])
        tables[:n, :width] = np.maximum(np.asarray(step.block_tables, dtype=np.int32), 0)
        lens = np.zeros((2, b), dtype=np.int32)
        lens[0, :n], lens[1, :n] = step.q_lens, step.ctx_lens
        for name, host in (("ids", ids), ("positions", pos), ("slots", slots), ("tables", tables),
                           ("q_lens", lens[0]), ("ctx_lens", lens[1])):
            buf[name].copy_(torch.from_numpy(host), non_blocking=True)
        if device_ids is not None:
            buf["ids"][torch.from_numpy(padded).to(self.device, non_blocking=True)] = device_ids
        graph.replay()
        rows = padded[np.asarray(step.logit_rows, dtype=np.int64)]
        return buf["hidden"][torch.from_numpy(rows).to(self.device, non_blocking=True)]
