"""Which attention backend an engine runs: chosen once at start, and logged."""
import torch

from pearl_runtime.attention.base import AttentionBackend
from pearl_runtime.log import get_logger

log = get_logger(__name__)


def select_backend(name: str, device: torch.device, block_size: int) -> AttentionBackend:
    from pearl_runtime.attention.reference import ReferenceBackend
    backends = {"reference": ReferenceBackend}
    if device.type == "cuda":
        from pearl_runtime.attention.gpu import GPU_BACKENDS
        backends.update(GPU_BACKENDS)
    # flash-attn's paged kernel takes pages of a multiple of 256 tokens
    flash_ok = "flash-attn" in backends and block_size % 256 == 0
    if name == "auto":
        if device.type != "cuda":
            name = "reference"
        elif flash_ok:
            name = "flash-attn"
        else:
            name = "triton"
            if "flash-attn" in backends:
                log.info("flash-attn is installed but needs --block-size a multiple of 256 (got %d): using triton",
                         block_size)
    if name == "flash-attn" and not flash_ok and "flash-attn" in backends:
        raise ValueError(f"flash-attn needs a KV block size that is a multiple of 256, got {block_size}")
    if name not in backends:
        raise ValueError(f"attention backend {name!r} is not available here; available: {sorted(backends)}")
    backend = backends[name]()
    log.info("attention backend: %s", backend.name)
    return backend
