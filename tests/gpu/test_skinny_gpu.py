"""The Triton skinny-linear kernel against the torch ops it replaces (layers/skinny.py): fp32
to float tolerance, bf16 within a small multiple of the torch path's own rounding error
(both measured against a float64 evaluation of the same inputs)."""
import itertools

import pytest
import torch

from pearl_runtime.layers import skinny as S

pytestmark = pytest.mark.gpu

OPS = [("norm_linear", S.norm_linear, S.reference_norm_linear),
       ("linear_add", S.linear_add, S.reference_linear_add),
       ("norm_gate_up", S.norm_gate_up, S.reference_norm_gate_up)]
CONFIGS = [None, dict(block_n=2, block_k=128, num_warps=4), dict(block_n=1, block_k=2048, num_warps=8)]


def _args(name, N, K, dtype):
    """One input row (the kernel's only shape) and the op's weights."""
    d = dict(dtype=dtype, device="cuda")
    x = torch.randn(1, K, **d)
    g = torch.rand(K, **d) + 0.5
    if name == "norm_linear":
        return x, g, 1e-6, torch.randn(N, K, **d) / K**0.5, torch.randn(N, **d)
    if name == "linear_add":
        return x, torch.randn(N, K, **d) / K**0.5, torch.randn(1, N, **d)
    return x, g, 1e-6, torch.randn(2 * N, K, **d) / K**0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "small-tiles", "wide-tiles"])
def test_kernel_matches_torch_ops(dtype, config):
    torch.manual_seed(0)
    for (name, kern, ref), (N, K) in itertools.product(OPS, ((40, 72), (1152, 896), (333, 1000), (4608, 3584))):
        args = _args(name, N, K, dtype)
        got, want = kern(*args, config=config), ref(*args)
        label = f"{name} {dtype} N={N} K={K} config={config}"
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=label)
            continue
        exact = ref(*[a.double() if torch.is_tensor(a) else a for a in args])
        e_kernel = (got.double() - exact).abs().max().item()
        e_torch = (want.double() - exact).abs().max().item()
        assert e_kernel <= 3 * e_torch + 1e-3, f"{label}: kernel error {e_kernel:.2e}, torch error {e_torch:.2e}"
