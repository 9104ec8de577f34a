"""Elementwise pieces of a decoder layer, compiled into single kernels on the GPU.

At batch 1 a 7B decode step is ~1000 tiny kernels if these run eagerly, and their launch
gaps cost as much as reading the weights. `enable_compile()` (called by the model runner on
CUDA) swaps in torch.compile'd versions; CPU keeps the eager ones, which are the reference.
"""

import torch
import torch.nn.functional as F
from pearl_runtime.log import get_logger

log = get_logger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(norm(x + residual), x + residual): the residual add rides along with the norm."""
    x = x + residual
    return rms_norm(x, weight, eps), x


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    def rot(x):
        a, b = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-b, a], dim=-1) * sin
    return rot(q), rot(k)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class _Ops:
    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    rotate = staticmethod(rotate)
    silu_mul = staticmethod(silu_mul)


ops = _Ops()
_compiled = False


def enable_compile() -> None:
    global _compiled
    if _compiled:
        return
    for name in ("rms_norm", "add_rms_norm", "rotate", "silu_mul"):
        setattr(ops, name, torch.compile(globals()[name], dynamic=True, fullgraph=True))
    _compiled = True
    log.info("fused elementwise ops: torch.compile")
