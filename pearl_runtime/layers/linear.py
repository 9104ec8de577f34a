"""Tensor-parallel linear layers. Each owns a `weight_loader` that takes the full
checkpoint tensor and keeps its rank's shard, so loading needs no per-model code. Sizes
that the TP size does not divide are padded with zero rows (see layers/partition.py)."""
import torch
import torch.nn.functional as F
from torch import nn

from pearl_runtime.layers.fp8 import skinny_weight
from pearl_runtime.layers.partition import Shard, split_evenly
from pearl_runtime.utils.dist import all_reduce, tp_rank, tp_size


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    # copy_ would broadcast a wrongly shaped checkpoint tensor (e.g. [1, n]) without a word
    if dst.shape != src.shape:
        raise RuntimeError(f"shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src)


class ReplicatedLinear(nn.Module):
    fp8 = None   # (fp8 weight, row scales) once layers/fp8.py has rounded it

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        _copy(param.data, loaded)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(ReplicatedLinear):
    """Output features split over ranks; no communication. Several projections may be
    stored as one (q+k+v, gate+up): each is split on its own and loaded by its shard id."""

    def __init__(self, in_features: int, shards: list[Shard], bias: bool = False):
        self.shards = shards
        super().__init__(in_features, sum(s.local_size for s in shards), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        i = shard_id or 0
        offset = sum(s.local_size for s in self.shards[:i])
        part = self.shards[i]
        _copy(param.data.narrow(0, offset, part.local_size), part.take(loaded, 0))


class MergedColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        super().__init__(in_features, [split_evenly(n, tp_size(), tp_rank()) for n in output_sizes], bias)


class QKVParallelLinear(ColumnParallelLinear):
    SHARD_IDS = {"q": 0, "k": 1, "v": 2}

    def __init__(self, hidden_size: int, q_heads: Shard, kv_heads: Shard, bias: bool):
        super().__init__(hidden_size, [q_heads, kv_heads, kv_heads], bias)

    def weight_loader(self, param, loaded, shard_id=None):
        super().weight_loader(param, loaded, self.SHARD_IDS[shard_id])


class RowParallelLinear(ReplicatedLinear):
    """Input features split over ranks; partial outputs summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, shard: Shard | None = None):
        self.shard = shard or split_evenly(in_features, tp_size(), tp_rank())
        self.tp = tp_size()
        super().__init__(self.shard.local_size, out_features, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 2:
            loaded = self.shard.take(loaded, 1)
        _copy(param.data, loaded)

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.tp > 1:
            y = all_reduce(y)
        # bias is added once, after the reduction
        return y if self.bias is None else y + self.bias

    def forward_add(self, ops, x, residual):
        """residual + self(x); on one rank the add rides in the linear's epilogue."""
        if self.tp == 1 and self.bias is None:
            w, scale = skinny_weight(self)
            return ops.linear_add(x, w, residual, scale=scale)
        return self(x) + residual
