"""Which slice of a weight each tensor-parallel rank holds, for any TP size (3, 6, 7 included).

A rank's slice is a list of *slots* along the split dimension, each `unit` rows wide (one
row for MLP features, `head_dim` rows for attention heads). A slot holds a block of the
checkpoint or a zero *padding* block. Padding is inert: a padded MLP feature has zero
gate/up rows and a zero down_proj column; a padded head has zero q/k/v rows (and bias) and a
zero o_proj column, so its query is 0, its value is 0 and its output column adds nothing.

Heads (`shard_heads`). Every rank gets the same number of query slots and KV slots, and its
query slot j reads KV slot j // (query slots / KV slots): the uniform GQA layout every
attention backend expects. With H query heads, K KV heads, group g = H // K and TP size T:

- K >= T: KV heads are padded to a multiple of T and dealt out in contiguous runs of
  ceil(K / T), each followed by its g query heads. T | K: no padding (the Megatron layout).
  H=8, K=2, T=2 -> rank 0: kv [0], q [0 1 2 3]; rank 1: kv [1], q [4 5 6 7]
  H=6, K=3, T=2 -> rank 0: kv [0 1], q [0..3]; rank 1: kv [2 pad], q [4 5 pad pad]
- K < T: each rank holds one KV head, replicated on the ranks that share it (the first
  T % K heads get one rank more); a KV head's g query heads are cut into contiguous runs of
  ceil(g / (T // K)) over its ranks, short runs padded.
  H=4, K=2, T=3 -> rank 0: kv [0], q [0 1]; rank 1: kv [0], q [pad pad]; rank 2: kv [1], q [2 3]
  H=6, K=2, T=4 -> kv [0] q [0 1] | kv [0] q [2 pad] | kv [1] q [3 4] | kv [1] q [5 pad]
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    size: int                     # checkpoint rows along the split dimension
    sources: tuple                # checkpoint block index of each local slot; None: zero padding
    unit: int = 1                 # rows per block

    @property
    def local_size(self) -> int:
        return len(self.sources) * self.unit

    def take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of a full checkpoint tensor `t` along `dim`, padding zero-filled."""
        if t.shape[dim] != self.size:
            raise RuntimeError(f"size {t.shape[dim]} along dim {dim}, expected {self.size}")
        shape = list(t.shape)
        shape[dim] = self.local_size
        out = t.new_zeros(shape)
        for dst, src, n in _runs(self.sources):
            out.narrow(dim, dst * self.unit, n * self.unit).copy_(t.narrow(dim, src * self.unit, n * self.unit))
        return out


def _runs(sources):
    """(local slot, checkpoint block, length) of each run of consecutive real blocks."""
    runs = []
    for j, s in enumerate(sources):
        if s is None:
            continue
        if runs and runs[-1][1] + runs[-1][2] == s and runs[-1][0] + runs[-1][2] == j:
            runs[-1][2] += 1
        else:
            runs.append([j, s, 1])
    return runs


def split_evenly(size: int, tp: int, rank: int) -> Shard:
    """Contiguous slices of ceil(size / tp) rows; the last rank(s) padded."""
    per = -(-size // tp)
    return Shard(size, tuple(i if i < size else None for i in range(rank * per, (rank + 1) * per)))


def shard_heads(num_heads: int, num_kv_heads: int, head_dim: int, tp: int, rank: int) -> tuple[Shard, Shard]:
    """(query heads, KV heads) of `rank`, laid out as the module docstring describes."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp:
        per = -(-num_kv_heads // tp)
        kv = [k if k < num_kv_heads else None for k in range(rank * per, (rank + 1) * per)]
        q = [None if k is None else k * group + i for k in kv for i in range(group)]
    else:
        base, extra = divmod(tp, num_kv_heads)
        starts = [k * base + min(k, extra) for k in range(num_kv_heads + 1)]
        k = max(i for i in range(num_kv_heads) if starts[i] <= rank)
        per = -(-group // base)
        first = (rank - starts[k]) * per
        kv = [k]
        q = [k * group + j if j < group else None for j in range(first, first + per)]
    return Shard(num_heads * head_dim, tuple(q), head_dim), Shard(num_kv_heads * head_dim, tuple(kv), head_dim)
