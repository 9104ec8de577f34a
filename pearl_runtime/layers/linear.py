"""Tensor-parallel linear layers. Each owns a `weight_loader` that takes the full
checkpoint tensor and keeps its rank's shard, so loading needs no per-model code."""
import torch
import torch.nn.functional as F
from torch import nn

from pearl_runtime.utils.dist import all_reduce, tp_rank, tp_size


def _shard(t: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    size = t.shape[dim] // parts
    return t.narrow(dim, index * size, size)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    # copy_ would broadcast a wrongly shaped checkpoint tensor (e.g. [1, n]) without a word
    if dst.shape != src.shape:
        raise RuntimeError(f"shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src)


class ReplicatedLinear(nn.Module):
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
    """Output features split over ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        assert out_features % tp_size() == 0, (out_features, tp_size())
        super().__init__(in_features, out_features // tp_size(), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        _copy(param.data, _shard(loaded, 0, tp_rank(), tp_size()))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stored as one (gate+up, q+k+v)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def shard_offset(self, shard_id: int) -> tuple[int, int]:
        n = tp_size()
        return sum(self.output_sizes[:shard_id]) // n, self.output_sizes[shard_id] // n

    def weight_loader(self, param, loaded, shard_id=None):
        offset, size = self.shard_offset(shard_id)
        _copy(param.data.narrow(0, offset, size), _shard(loaded, 0, tp_rank(), tp_size()))


class QKVParallelLinear(MergedColumnParallelLinear):
    SHARD_IDS = {"q": 0, "k": 1, "v": 2}

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim,
                                       num_kv_heads * head_dim], bias)

    def weight_loader(self, param, loaded, shard_id=None):
        super().weight_loader(param, loaded, self.SHARD_IDS[shard_id])


class RowParallelLinear(ReplicatedLinear):
    """Input features split over ranks; partial outputs summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        assert in_features % tp_size() == 0, (in_features, tp_size())
        super().__init__(in_features // tp_size(), out_features, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 2:
            loaded = _shard(loaded, 1, tp_rank(), tp_size())
        _copy(param.data, loaded)

    def forward(self, x):
        # bias is added once, after the reduction
        y = all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
