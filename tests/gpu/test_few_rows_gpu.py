"""The few-row kernels (layers/few_rows.py, steps of 3-16 tokens) against the torch ops they
replace, with and without split K: fp32 to float tolerance, bf16 within a small multiple of
the torch path's own rounding error (both against float64), as for the skinny kernels."""
import itertools

import pytest
import torch

from pearl_runtime.layers import few_rows as FR
from pearl_runtime.layers import skinny as S
from tests.gpu.test_skinny_gpu import _args

pytestmark = pytest.mark.gpu

OPS = [("norm_linear", FR.norm_linear, S.reference_norm_linear),
       ("linear_add", FR.linear_add, S.reference_linear_add),
       ("norm_gate_up", FR.norm_gate_up, S.reference_norm_gate_up)]
# default; wide tiles (K split in 7 for 3584 columns); small tiles (K split in 14-74)
CONFIGS = [None, dict(block_n=64, block_k=512, num_warps=8), dict(block_n=16, block_k=256, num_warps=4)]


@pytest.mark.parametrize("rows", [1, 3, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "wide-tiles", "small-tiles"])
@pytest.mark.parametrize("pdl", ["1", "0"], ids=["pdl", "no-pdl"])
def test_kernel_matches_torch_ops(dtype, config, pdl, rows, monkeypatch):
    monkeypatch.setenv("PEARL_PDL", pdl)
    torch.manual_seed(0)
    for (name, kern, ref), (N, K) in itertools.product(OPS, ((40, 72), (1152, 896), (333, 1000), (4608, 3584),
                                                            (3584, 18944))):
        args = _args(name, N, K, dtype, rows)
        torch.cuda.synchronize()
        got, want = kern(*args, config=config), ref(*args)
        label = f"{name} {dtype} rows={rows} N={N} K={K} config={config}"
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=label)
        else:
            exact = ref(*[a.double() if torch.is_tensor(a) else a for a in args])
            e_kernel = (got.double() - exact).abs().max().item()
            e_torch = (want.double() - exact).abs().max().item()
            assert e_kernel <= 3 * e_torch + 1e-3, f"{label}: kernel error {e_kernel:.2e}, torch error {e_torch:.2e}"
    torch.cuda.synchronize()
    assert int(FR._counters[torch.cuda.current_device()].abs().sum()) == 0, "split-K counters left set"


def test_split_k_is_deterministic_and_replays_in_a_graph():
    """The last program adds the slices in order: the same inputs give the same bits, run
    after run and under graph replay (the counters reset themselves)."""
    torch.manual_seed(0)
    x, w, r = _args("linear_add", 3584, 18944, torch.bfloat16, rows=5)
    cfg = dict(block_n=32, block_k=512, num_warps=4)   # 37 slices of K
    first = FR.linear_add(x, w, r, config=cfg)
    for _ in range(3):
        assert torch.equal(FR.linear_add(x, w, r, config=cfg), first)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        FR.linear_add(x, w, r, config=cfg)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = FR.linear_add(x, w, r, config=cfg)
    for _ in range(3):
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,hidden,bias", [(14, 2, 64, 896, True), (28, 4, 128, 3584, True),
                                                                 (4, 4, 64, 72, False)])
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "wide-tiles", "small-tiles"])
@pytest.mark.parametrize("rows", [3, 5, 16])
def test_qkv_rope_matches_reference(dtype, heads, kv_heads, head_dim, hidden, bias, config, rows):
    """norm_qkv_rope for a verify's tokens: the same q, and the same cache with only the
    tokens' slots written."""
    from pearl_runtime.layers.rotary import RotaryEmbedding
    torch.manual_seed(0)
    d = dict(dtype=dtype, device="cuda")
    n_out = (heads + 2 * kv_heads) * head_dim
    x, g = torch.randn(rows, hidden, **d), torch.rand(hidden, **d) + 0.5
    w, b = torch.randn(n_out, hidden, **d) / hidden**0.5, torch.randn(n_out, **d) if bias else None
    cos, sin = RotaryEmbedding(head_dim, 4096, 1e6, None).to("cuda").cos_sin(
        torch.arange(1234, 1234 + rows, device="cuda"), dtype)
    slots = torch.randperm(128, device="cuda")[:rows]
    caches = [torch.zeros(8, 16, kv_heads, head_dim, **d) for _ in range(4)]
    want_q = S.reference_norm_qkv_rope(x, g, 1e-6, w, b, cos, sin, caches[0], caches[1], slots, heads, kv_heads)
    got_q = FR.norm_qkv_rope(x, g, 1e-6, w, b, cos, sin, caches[2], caches[3], slots, heads, kv_heads,
                             config=config)
    label = f"{dtype} rows={rows} heads={heads}/{kv_heads}x{head_dim} K={hidden} config={config}"
    for got, want in ((caches[2], caches[0]), (caches[3], caches[1])):
        assert int(got.view(-1, kv_heads, head_dim).abs().sum((1, 2)).count_nonzero()) == rows, label
    if dtype == torch.float32:
        for got, want in ((got_q, want_q), (caches[2], caches[0]), (caches[3], caches[1])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=label)
        return
    # bf16: the norm's scale lands on the sums (few_rows._normed), so compare both paths'
    # errors against a float64 evaluation, as for the other ops
    caches64 = [torch.zeros(8, 16, kv_heads, head_dim, dtype=torch.float64, device="cuda") for _ in range(2)]
    exact_q = S.reference_norm_qkv_rope(x.double(), g.double(), 1e-6, w.double(), None if b is None else b.double(),
                                        cos.double(), sin.double(), *caches64, slots, heads, kv_heads)
    for got, want, exact in ((got_q, want_q, exact_q), (caches[2], caches[0], caches64[0]),
                             (caches[3], caches[1], caches64[1])):
        e_kernel = (got.double() - exact).abs().max().item()
        e_torch = (want.double() - exact).abs().max().item()
        assert e_kernel <= 3 * e_torch + 1e-3, f"{label}: kernel error {e_kernel:.2e}, torch error {e_torch:.2e}"
