"""The Triton paged-attention backend against the reference path, on the GPU."""
import pytest
import torch

from pearl_runtime.attention.reference import ReferenceBackend
from pearl_runtime.utils.context import AttnContext

pytestmark = pytest.mark.gpu


def _case(q_lens, ctx_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")
    n_blocks = sum(-(-c // block_size) for c in ctx_lens) + 4
    k_cache = torch.randn(n_blocks, block_size, kv_heads, head_dim, generator=g).to(dev, dtype)
    v_cache = torch.randn(n_blocks, block_size, kv_heads, head_dim, generator=g).to(dev, dtype)
    perm = torch.randperm(n_blocks, generator=g).tolist()   # scattered blocks, as in a real cache
    tables, used = [], 0
    for c in ctx_lens:
        nb = -(-c // block_size)
        tables.append(perm[used:used + nb])
        used += nb
    width = max(len(t) for t in tables)
    tables = [t + [-1] * (width - len(t)) for t in tables]
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(dev, dtype)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    ctx = AttnContext(q_lens=q_lens, context_lens=ctx_lens,
                      cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
                      q_lens_t=torch.tensor(q_lens, dtype=torch.int32, device=dev),
                      context_lens_t=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
                      slot_mapping=torch.zeros(0, dtype=torch.int64, device=dev),
                      block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
                      max_q_len=max(q_lens), max_context_len=max(ctx_lens))
    return q, k_cache, v_cache, ctx


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(28, 4, 128), (14, 2, 64), (4, 4, 64)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_triton_matches_reference(dtype, tol, heads, kv_heads, head_dim, block_size):
    from pearl_runtime.attention.gpu import TritonBackend
    # prefill, decode and verify rows in one ragged batch
    q_lens = [37, 1, 5, 1, 8, 300]
    ctx_lens = [37, 90, 205, 1, 8, 333]
    q, kc, vc, ctx = _case(q_lens, ctx_lens, heads, kv_heads, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    ref = ReferenceBackend().attend(q.float(), kc.float(), vc.float(), ctx, scale)
    out = TritonBackend().attend(q, kc, vc, ctx, scale).float()
    diff = (out - ref).abs().max().item()
    assert diff < tol, f"max abs diff {diff:.3g} (tolerance {tol})"


def test_triton_store_kv_matches_reference():
    """K rows packed (after rotary), V a strided view into the fused qkv output, as in the model."""
    from pearl_runtime.attention.base import AttentionBackend
    from pearl_runtime.attention.gpu import TritonBackend
    dev = torch.device("cuda")
    t, hq, hkv, d = 37, 28, 4, 128
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=torch.bfloat16)
    _, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    k = k.reshape(t, hkv, d).clone()
    v = v.view(t, hkv, d)
    q, kc, vc, ctx = _case([t], [t], hq, hkv, d, 16, torch.bfloat16)
    ctx.slot_mapping = torch.randperm(kc.shape[0] * 16, device=dev)[:t]
    ref_k, ref_v = torch.zeros_like(kc), torch.zeros_like(vc)
    AttentionBackend().store_kv(k, v, ref_k, ref_v, ctx)
    out_k, out_v = torch.zeros_like(kc), torch.zeros_like(vc)
    TritonBackend().store_kv(k, v, out_k, out_v, ctx)
    assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(28, 4, 128), (14, 2, 64)])
@pytest.mark.parametrize("max_splits", [1, 2, 16])
@pytest.mark.parametrize("pdl", ["1", "0"], ids=["pdl", "no-pdl"])
def test_split_keys_match_reference(dtype, tol, heads, kv_heads, head_dim, max_splits, pdl, monkeypatch):
    """Decode and verify rows of a small batch, where the keys are split across programs:
    contexts shorter than one key tile per split, longer ones, and a split with nothing.
    Both kernels launch as dependents (PEARL_PDL=1) or plainly."""
    from pearl_runtime.attention.gpu import TritonBackend
    monkeypatch.setenv("PEARL_PDL", pdl)
    q_lens = [1, 5, 1, 16]
    ctx_lens = [1000, 333, 3, 70]
    q, kc, vc, ctx = _case(q_lens, ctx_lens, heads, kv_heads, head_dim, 16, dtype, seed=1)
    scale = head_dim ** -0.5
    backend = TritonBackend()
    backend.MAX_SPLITS = max_splits
    backend._sms = {q.device.index: 10**6}   # as if the GPU had SMs to spare: always split the most
    tiles = -(-max(q_lens) * (heads // kv_heads) // backend.BLOCK_M)
    assert backend.splits(len(q_lens) * kv_heads * tiles, q.device) == max_splits
    ref = ReferenceBackend().attend(q.float(), kc.float(), vc.float(), ctx, scale)
    out = backend.attend(q, kc, vc, ctx, scale).float()
    diff = (out - ref).abs().max().item()
    assert diff < tol, f"max abs diff {diff:.3g} (tolerance {tol}) with up to {max_splits} splits"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(28, 4, 128), (14, 2, 64), (3, 1, 64)])
def test_fused_rope_store_matches_separate_ops(dtype, heads, kv_heads, head_dim):
    """q and k as views into the fused qkv output, as in the model: the fused kernel gives
    the reference rotation (fp32 math, one rounding) and the same cache contents."""
    from pearl_runtime.attention.gpu import TritonBackend
    from pearl_runtime.layers.rotary import RotaryEmbedding
    dev = torch.device("cuda")
    t = 37
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device=dev, dtype=dtype)
    q, k, v = (x.view(t, -1, head_dim) for x in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                           kv_heads * head_dim], dim=-1))
    cos, sin = RotaryEmbedding(head_dim, 4096, 10000.0, None).to(dev).cos_sin(
        torch.randint(0, 4096, (t,), device=dev), dtype)
    _, kc, vc, ctx = _case([t], [t], heads, kv_heads, head_dim, 16, dtype)
    ctx.slot_mapping = torch.randperm(kc.shape[0] * 16, device=dev)[:t]
    # reference: the eager rotation in fp32, rounded once, as the fused kernel computes it
    from pearl_runtime.layers.fused import rotate
    ref_q, ref_kr = rotate(q.float(), k.float(), cos.float(), sin.float())
    ref_k, ref_v = torch.zeros_like(kc), torch.zeros_like(vc)
    ref_k.view(-1, kv_heads, head_dim)[ctx.slot_mapping] = ref_kr.to(dtype)
    ref_v.view(-1, kv_heads, head_dim)[ctx.slot_mapping] = v
    out_k, out_v = torch.zeros_like(kc), torch.zeros_like(vc)
    out_q = TritonBackend().rope_store(q, k, v, cos, sin, out_k, out_v, ctx)
    rtol = 1e-6 if dtype == torch.float32 else 1e-2   # bf16: one rounding step apart at most
    torch.testing.assert_close(out_q, ref_q.to(dtype), atol=1e-5, rtol=rtol)
    torch.testing.assert_close(out_k, ref_k, atol=1e-5, rtol=rtol)
    assert torch.equal(out_v, ref_v)


def test_eager_shapes_compile_the_attention_kernel_once():
    """Eager steps (prefills, a first verify) come in every shape: the row count, the block
    table's width and the split count must not each compile a kernel variant mid-serving (a
    first-token stall of up to ~0.75 s in a bench run)."""
    from pearl_runtime.attention.gpu import TritonBackend, _merge_splits, _paged_attention
    backend = TritonBackend()
    shapes = [([1], [1]), ([1, 1, 1], [40, 700, 3]), ([16], [16]), ([5, 1], [300, 33]), ([1] * 17, [90] * 17),
              ([37, 1, 5], [37, 90, 205])]
    before = None
    for q_lens, ctx_lens in shapes:
        q, kc, vc, ctx = _case(q_lens, ctx_lens, 14, 2, 64, 16, torch.bfloat16)
        backend.attend(q, kc, vc, ctx, 0.125)
        kernels = sum(len(c[0]) for f in (_paged_attention, _merge_splits) for c in f.device_caches.values())
        before = kernels if before is None else before
        assert kernels == before, f"a new kernel variant compiled for q_lens={q_lens} ctx_lens={ctx_lens}"
