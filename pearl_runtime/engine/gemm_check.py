"""A start-up check that the GEMMs this model runs give right answers on this device.

Seen on one GPU model (torch 2.11, CUDA 13): under CUDA MPS with some SM shares (60%, 75%, 80% of
132 SMs) cuBLAS bf16 GEMMs of decoder shapes return NaN or garbage, while 50%, 90% and 100%
are right. A service started there would stream wrong tokens without a single error, so it
refuses to start instead (`benchmarks/probes/gpu_mps_check.py` maps the shares of a machine)."""
import os

import torch
from pearl_runtime.log import get_logger

log = get_logger(__name__)

ROWS = (1, 16, 1024)   # decode, verify and prefill sized inputs


class GemmCheckError(RuntimeError):
    pass


@torch.inference_mode()
def check_gemms(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int]], tol: float = 0.05) -> None:
    """Multiply random inputs by random [k, n] weights in `dtype` and compare with float64."""
    gen = torch.Generator(device=device).manual_seed(0)
    for k, n in shapes:
        w = torch.randn(k, n, device=device, generator=gen)
        for m in ROWS:
            x = torch.randn(m, k, device=device, generator=gen)
            ref = x.double() @ w.double()
            got = (x.to(dtype) @ w.to(dtype)).double()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            if not err < tol:   # NaN fails too
                share = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
                where = f" under CUDA MPS with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={share}" if share else ""
                raise GemmCheckError(
                    f"{dtype} GEMM [{m}x{k}] @ [{k}x{n}] on {device}{where} is wrong (relative error {err:.3g}); "
                    f"this device gives wrong results for this model's matrix shapes"
                    + ("; pick another MPS share (see benchmarks/probes/gpu_mps_check.py)" if share else ""))
    log.info("GEMM check passed on %s (%s, %d shapes x %d row counts)", device, dtype, len(shapes), len(ROWS))


def needs_check() -> bool:
    """Where a known bad case can occur: an MPS client with a limited SM share."""
    return "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" in os.environ
