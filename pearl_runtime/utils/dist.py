"""Tensor-parallel group state: rank, size and the two collectives the layers need."""
import torch
import torch.distributed as dist

_tp_rank = 0
_tp_size = 1


def set_tp(rank: int, size: int) -> None:
    global _tp_rank, _tp_size
    _tp_rank, _tp_size = rank, size


def tp_rank() -> int:
    return _tp_rank


def tp_size() -> int:
    return _tp_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp_size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's shard of the last dimension (vocab-parallel logits)."""
    if _tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
