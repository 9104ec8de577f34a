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


def _args(name, N, K, dtype, rows=1):
    """`rows` input rows (the kernel takes one or two) and the op's weights."""
    d = dict(dtype=dtype, device="cuda")
    x = torch.randn(rows, K, **d)
    g = torch.rand(K, **d) + 0.5
    if name == "norm_linear":
        return x, g, 1e-6, torch.randn(N, K, **d) / K**0.5, torch.randn(N, **d)
    if name == "linear_add":
        return x, torch.randn(N, K, **d) / K**0.5, torch.randn(rows, N, **d)
    return x, g, 1e-6, torch.randn(2 * N, K, **d) / K**0.5


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "small-tiles", "wide-tiles"])
@pytest.mark.parametrize("pdl", ["1", "0"], ids=["pdl", "no-pdl"])
def test_kernel_matches_torch_ops(dtype, config, pdl, rows, monkeypatch):
    monkeypatch.setenv("PEARL_PDL", pdl)
    torch.manual_seed(0)
    for (name, kern, ref), (N, K) in itertools.product(OPS, ((40, 72), (1152, 896), (333, 1000), (4608, 3584),
                                                            (896, 4864), (1536, 8960))):
        args = _args(name, N, K, dtype, rows)
        torch.cuda.synchronize()   # a dependent launch reads its weights before it waits
        got, want = kern(*args, config=config), ref(*args)
        label = f"{name} {dtype} rows={rows} N={N} K={K} config={config}"
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=label)
            continue
        exact = ref(*[a.double() if torch.is_tensor(a) else a for a in args])
        e_kernel = (got.double() - exact).abs().max().item()
        e_torch = (want.double() - exact).abs().max().item()
        assert e_kernel <= 3 * e_torch + 1e-3, f"{label}: kernel error {e_kernel:.2e}, torch error {e_torch:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,hidden,bias", [(14, 2, 64, 896, True), (28, 4, 128, 3584, True),
                                                                 (4, 4, 64, 72, False)])
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "small-tiles", "wide-tiles"])
@pytest.mark.parametrize("rows", [1, 2])
def test_qkv_rope_matches_separate_kernels(dtype, heads, kv_heads, head_dim, hidden, bias, config, rows,
                                           device="cuda"):
    """norm_qkv_rope against the path it replaces: norm_linear, then the attention backend's
    rotary + K/V store kernel. The same q, and the same cache with only the tokens' slots written."""
    from pearl_runtime.attention.gpu import TritonBackend
    from pearl_runtime.layers.rotary import RotaryEmbedding
    from pearl_runtime.utils.context import AttnContext
    torch.manual_seed(0)
    d = dict(dtype=dtype, device=device)
    n_out = (heads + 2 * kv_heads) * head_dim
    x, g = torch.randn(rows, hidden, **d), torch.rand(hidden, **d) + 0.5
    w, b = torch.randn(n_out, hidden, **d) / hidden**0.5, torch.randn(n_out, **d) if bias else None
    positions = torch.tensor([1234, 1235][:rows], device=device)
    cos, sin = RotaryEmbedding(head_dim, 4096, 1e6, None).to(device).cos_sin(positions, dtype)
    slot = torch.tensor([37, 38][:rows], device=device)
    caches = [torch.zeros(8, 16, kv_heads, head_dim, **d) for _ in range(4)]
    ctx = AttnContext(q_lens=[rows], context_lens=[37 + rows], cu_seqlens_q=None, q_lens_t=None,
                      context_lens_t=None, slot_mapping=slot, block_tables=None, max_q_len=rows,
                      max_context_len=37 + rows)
    if device == "cuda":
        torch.cuda.synchronize()   # a dependent launch reads its weights before it waits
    qkv = S.norm_linear(x, g, 1e-6, w, b, config=config)
    q, k, v = (t.view(rows, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                            kv_heads * head_dim], dim=-1))
    want_q = TritonBackend().rope_store(q, k, v, cos, sin, caches[0], caches[1], ctx)
    got_q = S.norm_qkv_rope(x, g, 1e-6, w, b, cos, sin, caches[2], caches[3], slot, heads, kv_heads, config=config)
    # the two kernels sum each row's products in their own lane order: fp32 agrees to rounding,
    # bf16 to one rounding step of the projection's output
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    label = f"{dtype} rows={rows} heads={heads}/{kv_heads}x{head_dim} K={hidden} config={config}"
    torch.testing.assert_close(got_q, want_q, **tol, msg=label)
    for got, want in ((caches[2], caches[0]), (caches[3], caches[1])):
        assert int(got.view(-1, kv_heads, head_dim).abs().sum((1, 2)).count_nonzero()) == rows, label
        torch.testing.assert_close(got, want, **tol, msg=label)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_fp8_weights_match_the_dequantized_reference(dtype, rows):
    """A draft's fp8 weights (layers/fp8.py): the kernels read the fp8 copy and scale the row
    sums; the reference multiplies by the dequantized weight. Power-of-two scales make the two
    one computation, so the tolerances are the bf16/fp32 ones above."""
    from pearl_runtime.layers.fp8 import quantize_rows
    torch.manual_seed(0)
    for (name, kern, ref), (N, K) in itertools.product(OPS, ((1152, 896), (896, 4864), (4608, 3584), (40, 72))):
        args = list(_args(name, N, K, dtype, rows))
        w_at = 3 if name != "linear_add" else 1
        w8, scale = quantize_rows(args[w_at])
        args[w_at] = w8
        torch.cuda.synchronize()
        got, want = kern(*args, scale=scale), ref(*args, scale=scale)
        label = f"fp8 {name} {dtype} rows={rows} N={N} K={K}"
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=label)
            continue
        exact = ref(*[a.double() if torch.is_tensor(a) and a.dtype != torch.float8_e4m3fn else a for a in args],
                    scale=scale.double())
        e_kernel = (got.double() - exact).abs().max().item()
        e_torch = (want.double() - exact).abs().max().item()
        assert e_kernel <= 3 * e_torch + 1e-3, f"{label}: kernel error {e_kernel:.2e}, torch error {e_torch:.2e}"
    # the qkv projection with rotary and the cache store, and the LM head's shape
    from pearl_runtime.layers.rotary import RotaryEmbedding
    heads, kv_heads, head_dim, hidden = 14, 2, 64, 896
    d = dict(dtype=dtype, device="cuda")
    x, g = torch.randn(rows, hidden, **d), torch.rand(hidden, **d) + 0.5
    w8, scale = quantize_rows(torch.randn((heads + 2 * kv_heads) * head_dim, hidden, **d) / hidden**0.5)
    b = torch.randn(w8.shape[0], **d)
    cos, sin = RotaryEmbedding(head_dim, 4096, 1e6, None).to("cuda").cos_sin(torch.arange(rows, device="cuda"), dtype)
    slot = torch.tensor([5, 6][:rows], device="cuda")
    caches = [torch.zeros(8, 16, kv_heads, head_dim, **d) for _ in range(4)]
    got_q = S.norm_qkv_rope(x, g, 1e-6, w8, b, cos, sin, caches[0], caches[1], slot, heads, kv_heads, scale=scale)
    want_q = S.reference_norm_qkv_rope(x, g, 1e-6, w8, b, cos, sin, caches[2], caches[3], slot, heads, kv_heads,
                                       scale=scale)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got_q, want_q, **tol)
    torch.testing.assert_close(caches[0], caches[2], **tol)
    head8, head_scale = quantize_rows(torch.randn(151936, hidden, **d) / hidden**0.5)
    torch.testing.assert_close(S.norm_linear(x, None, 0.0, head8, None, scale=head_scale),
                               S.reference_norm_linear(x, None, 0.0, head8, None, scale=head_scale), **tol)
