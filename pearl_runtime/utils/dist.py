"""Tensor-parallel group state: rank, size and the collectives the layers need.

Layers read rank and size once, when they are built, and keep them: a process may hold a
TP=1 model beside its TP group's rank 0 (tests, a draft next to a target), so nothing
reads the group state at forward time."""
from contextlib import contextmanager

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


@contextmanager
def tp_scope(rank: int, size: int):
    """Build a rank's model under this group state; the previous state comes back after."""
    old = _tp_rank, _tp_size
    set_tp(rank, size)
    try:
        yield
    finally:
        set_tp(*old)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor, parts: int) -> torch.Tensor:
    """Concatenate each rank's shard of the last dimension (vocab-parallel logits)."""
    out = [torch.empty_like(x) for _ in range(parts)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=-1)


def min_over_ranks(n: int) -> int:
    """The smallest `n` over the group (a size every rank can afford, e.g. KV blocks)."""
    if _tp_size == 1:
        return n
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([n], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
