"""The start-up GEMM check passes on a right GEMM and names the shape of a wrong one."""
import pytest
import torch

from pearl_runtime.engine.gemm_check import GemmCheckError, check_gemms, needs_check


def test_right_gemms_pass():
    check_gemms(torch.device("cpu"), torch.float32, [(64, 96), (96, 64)])


def test_wrong_gemm_is_refused_with_its_shape(monkeypatch):
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "80")
    assert needs_check()
    # bf16 rounding stands in for a broken kernel: no error is below a zero tolerance
    with pytest.raises(GemmCheckError, match=r"\[1x64\] @ \[64x96\].*CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=80"):
        check_gemms(torch.device("cpu"), torch.bfloat16, [(64, 96)], tol=0.0)


def test_nan_fails(monkeypatch):
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__",
                        lambda a, b: real(a, b) * float("nan") if a.dtype == torch.float32 else real(a, b))
    with pytest.raises(GemmCheckError, match="relative error nan"):
        check_gemms(torch.device("cpu"), torch.float32, [(32, 32)])
