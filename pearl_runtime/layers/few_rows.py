"""Few-row linears: a verify step feeds gamma + 1 tokens, 3 to 16 rows at bs 1.

Such a step reads the same weights as a one-token step, yet on cuBLAS a 7B verify of 4
tokens took 4.43 ms against 3.92 ms for a one-token step on the skinny kernels (H200,
session 10): cuBLAS leaves the norms, SiLU, residual adds and rotary as separate kernels,
and its few-row GEMMs read the weights more slowly. The kernels here do for up to 16 rows
what skinny.py does for one or two: the same four fused ops at the same rounding points,
the products on the tensor cores (rows padded to 16 in registers only).

A 3584-wide projection (the 7B's o and down) makes ~100 weight tiles, too few programs to
keep an H200's memory busy, so the K dimension is split: each program leaves its partial
sums in a workspace, and the last program of a tile (an atomic counter) adds them up in
split order and runs the epilogue. The order is fixed, so the result does not depend on
which program finished last.
"""
import torch

from pearl_runtime.layers import pdl
from pearl_runtime.layers import skinny

MAX_ROWS = 16   # the tensor-core tile's rows

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:   # CPU installs: skinny's reference ops are the only path
    triton = None


if triton is not None:
    @triton.jit
    def _rows_rstd(X, M, K, stride_x, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """1 / RMS of each input row, [BLOCK_M] (rows past M read as zero)."""
        rm = tl.arange(0, BLOCK_M)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(X + rm[:, None] * stride_x + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :],
                         other=0.0).to(tl.float32)
            ss += tl.sum(xs * xs, 1)
        return 1.0 / tl.sqrt(ss / K + eps)

    @triton.jit
    def _few_rows(X, W, B, R, G, Y, WS, CNT, K_cache, V_cache, COS, SIN, SLOTS,
                  M, N, K, NW, stride_w, stride_x, eps, stride_slot, stride_cs,
                  MODE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                  SPLIT: tl.constexpr, PDL: tl.constexpr, IEEE: tl.constexpr,
                  HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (p, s): weight rows `ra` of W (and `rb`: the up half when MODE 1, the
        rotary partners half a head further when MODE 2) against the rows of X, over the
        s-th of SPLIT slices of K. MODE 0: y = x W^T (+ bias, + residual); 1: silu(gate) *
        up; 2: the fused q/k/v projection, rotated, q to Y and k, v into the cache slots."""
        if PDL:
            gdc_launch_dependents()
        p = tl.program_id(0)
        s = tl.program_id(1)
        head = p   # MODE 2 only
        if MODE == 2:
            HALF: tl.constexpr = HEAD_DIM // 2
            per_head: tl.constexpr = HALF // BLOCK_N
            head = p // per_head
            j = (p % per_head) * BLOCK_N + tl.arange(0, BLOCK_N)
            ra = head * HEAD_DIM + j
            rb = ra + HALF
        else:
            j = p * BLOCK_N + tl.arange(0, BLOCK_N)
            ra = j
            rb = ra + N
        rm = tl.arange(0, BLOCK_M)
        m_ok = rm < M
        n_ok = ra < N
        tiles = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(tiles, SPLIT)
        k_lo = s * per_split * BLOCK_K
        k_hi = tl.minimum(K, k_lo + per_split * BLOCK_K)
        if PDL:   # x is the previous kernel's output
            gdc_wait()
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_NORM:
            rstd = _rows_rstd(X, M, K, stride_x, eps, BLOCK_M, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_b = acc
        if MODE != 0:
            acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < k_hi
            x = tl.load(X + rm[:, None] * stride_x + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_NORM:   # the reference's rounding points: norm(x) in the dtype, then weight * it
                g = tl.load(G + rk, mask=k_ok, other=0.0).to(tl.float32)
                xn = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
                x = (g[None, :] * xn.to(tl.float32)).to(x.dtype)
            w = tl.load(W + ra[:, None] * stride_w + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
            if MODE != 0:
                wb = tl.load(W + rb[:, None] * stride_w + rk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                             other=0.0)
                if IEEE:
                    acc_b = tl.dot(x, tl.trans(wb), acc_b, input_precision="ieee")
                else:
                    acc_b = tl.dot(x, tl.trans(wb), acc_b)
        if SPLIT > 1:
            # leave this slice's sums; the tile's last program adds all slices in order
            tile = rm[:, None] * NW + ra[None, :]
            tl.store(WS + s * BLOCK_M * NW + tile, acc, mask=n_ok[None, :])
            if MODE != 0:
                tl.store(WS + s * BLOCK_M * NW + tile + (rb - ra)[None, :], acc_b, mask=n_ok[None, :])
            tl.debug_barrier()   # every thread's stores before the release below
            done = tl.atomic_add(CNT + p, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT - 1:
                tl.debug_barrier()
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                if MODE != 0:
                    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for i in tl.static_range(SPLIT):
                    acc += tl.load(WS + i * BLOCK_M * NW + tile, mask=n_ok[None, :], other=0.0, cache_modifier=".cg")
                    if MODE != 0:
                        acc_b += tl.load(WS + i * BLOCK_M * NW + tile + (rb - ra)[None, :], mask=n_ok[None, :],
                                         other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(CNT + p, 0)   # ready for the next launch (graph replays included)
                _finish(acc, acc_b, rm, m_ok, ra, rb, j, n_ok, head, B, R, Y, K_cache, V_cache, COS, SIN, SLOTS,
                        N, stride_slot, stride_cs, MODE, HAS_BIAS, HAS_RES, HEADS, KV_HEADS, HEAD_DIM)
        else:
            _finish(acc, acc_b, rm, m_ok, ra, rb, j, n_ok, head, B, R, Y, K_cache, V_cache, COS, SIN, SLOTS,
                    N, stride_slot, stride_cs, MODE, HAS_BIAS, HAS_RES, HEADS, KV_HEADS, HEAD_DIM)

    @triton.jit
    def _finish(acc, acc_b, rm, m_ok, ra, rb, j, n_ok, head, B, R, Y, K_cache, V_cache, COS, SIN, SLOTS,
                N, stride_slot, stride_cs, MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
        """The epilogue at skinny.py's rounding points: bias, then SiLU * up, the residual
        add, or rotary and the q / cache stores."""
        out_ty = Y.dtype.element_ty
        mask = m_ok[:, None] & n_ok[None, :]
        a = acc.to(out_ty).to(tl.float32)
        if HAS_BIAS:
            a = (a + tl.load(B + ra, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(out_ty).to(tl.float32)
        if MODE == 2:
            b = acc_b.to(out_ty).to(tl.float32)
            if HAS_BIAS:
                b = (b + tl.load(B + rb).to(tl.float32)[None, :]).to(out_ty).to(tl.float32)
            HALF: tl.constexpr = HEAD_DIM // 2
            if head < HEADS + KV_HEADS:   # q and k rotate: (a, b) -> (a c - b s, b c + a s)
                c = tl.load(COS + rm[:, None] * stride_cs + j[None, :], mask=mask, other=0.0).to(tl.float32)
                sn = tl.load(SIN + rm[:, None] * stride_cs + j[None, :], mask=mask, other=0.0).to(tl.float32)
                a, b = a * c - b * sn, b * c + a * sn
            if head < HEADS:
                q = Y + rm[:, None] * (HEADS * HEAD_DIM)
                tl.store(q + ra[None, :], a.to(out_ty), mask=mask)
                tl.store(q + rb[None, :], b.to(out_ty), mask=mask)
            else:
                slot = tl.load(SLOTS + rm, mask=m_ok, other=0)
                if head < HEADS + KV_HEADS:
                    row = K_cache + slot[:, None] * stride_slot + (head - HEADS) * HEAD_DIM
                else:
                    row = V_cache + slot[:, None] * stride_slot + (head - HEADS - KV_HEADS) * HEAD_DIM
                tl.store(row + j[None, :], a.to(out_ty), mask=mask)
                tl.store(row + j[None, :] + HALF, b.to(out_ty), mask=mask)
        else:
            if MODE == 1:
                up = acc_b.to(out_ty).to(tl.float32)
                a = (a / (1.0 + tl.exp(-a))).to(out_ty).to(tl.float32) * up
            if HAS_RES:
                a = a + tl.load(R + rm[:, None] * N + ra[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + rm[:, None] * N + ra[None, :], a.to(out_ty), mask=mask)


_counters: dict[int, torch.Tensor] = {}   # device index -> split-K tile counters
_sms: dict[int, int] = {}
MAX_TILES = 8192


def prepare(device: torch.device) -> None:
    """Make the device's tile counters (zeros; every launch leaves them at zero). Called
    before graph capture: a graph keeps the pointer it captured."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _counters:
        _counters[index] = torch.zeros(MAX_TILES, dtype=torch.int32, device=torch.device("cuda", index))
        _sms[index] = torch.cuda.get_device_properties(index).multi_processor_count


def default_config(n_tiles: int, K: int, sms: int) -> dict:
    """Not swept yet: 32-wide tiles of 128 columns, 4 stages of loads in flight, and K split
    until the programs cover the SMs twice (each slice keeping at least 4 tiles)."""
    block_k = 128
    tiles = triton.cdiv(K, block_k)
    split = max(1, min(16, triton.cdiv(2 * sms, n_tiles), tiles // 4))
    return dict(block_n=32, block_k=block_k, split=split, num_warps=4, num_stages=4)


def _launch(x, w, *, n_tiles, out, mode, bias=None, residual=None, norm_w=None, eps=0.0, config=None,
            rope=None, heads=0, kv_heads=0, head_dim=0, block_n=None):
    M, K = x.shape
    assert 1 <= M <= MAX_ROWS and x.is_contiguous() and w.is_contiguous(), \
        f"the few-row kernel takes 1-{MAX_ROWS} contiguous rows, got {tuple(x.shape)}"
    assert residual is None or residual.is_contiguous()
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _counters:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("few_rows.prepare(device) must run before CUDA graph capture")
        prepare(x.device)
    c = dict(config or default_config(n_tiles(32), K, _sms[index]))
    bn = block_n or c["block_n"]
    grid0 = n_tiles(bn)
    assert grid0 <= MAX_TILES, f"{grid0} tiles for {MAX_TILES} counters"
    split = c["split"]
    nw = w.shape[0]
    ws = torch.empty(split, MAX_ROWS, nw, dtype=torch.float32, device=x.device) if split > 1 else x
    k_cache, v_cache, cos, sin, slots = rope or (x, x, x, x, x)
    use_pdl = pdl.enabled(x.device)
    _few_rows[(grid0, split)](
        x, w, w if bias is None else bias, w if residual is None else residual, w if norm_w is None else norm_w,
        out, ws, _counters[index], k_cache, v_cache, cos, sin, slots,
        M, w.shape[0] // 2 if mode == 1 else w.shape[0], K, nw, w.stride(0), x.stride(0), eps,
        k_cache.stride(1) if rope else 0, cos.stride(0) if rope else 0,
        MODE=mode, HAS_NORM=norm_w is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        SPLIT=split, PDL=use_pdl, IEEE=x.dtype == torch.float32, HEADS=heads, KV_HEADS=kv_heads,
        HEAD_DIM=head_dim, BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=c["block_k"],
        num_warps=c["num_warps"], num_stages=c["num_stages"], launch_pdl=use_pdl)
    return out


def _new(x, n):
    return torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)


def norm_linear(x, norm_w, eps, w, bias=None, config=None):
    n = w.shape[0]
    return _launch(x, w, n_tiles=lambda bn: triton.cdiv(n, bn), out=_new(x, n), mode=0, bias=bias,
                   norm_w=norm_w, eps=eps, config=config)


def linear_add(x, w, residual, config=None):
    n = w.shape[0]
    return _launch(x, w, n_tiles=lambda bn: triton.cdiv(n, bn), out=_new(x, n), mode=0, residual=residual,
                   config=config)


def norm_gate_up(x, norm_w, eps, w, config=None):
    n = w.shape[0] // 2
    return _launch(x, w, n_tiles=lambda bn: triton.cdiv(n, bn), out=_new(x, n), mode=1, norm_w=norm_w,
                   eps=eps, config=config)


def norm_qkv_rope(x, norm_w, eps, w, bias, cos, sin, k_cache, v_cache, slots, heads, kv_heads, config=None):
    """skinny.norm_qkv_rope for up to 16 tokens: q rotated as [tokens, heads, head_dim], each
    token's rotated k and its v into its cache slot."""
    head_dim = k_cache.shape[-1]
    assert fits_qkv_rope(head_dim, False)
    assert w.shape[0] == (heads + 2 * kv_heads) * head_dim and k_cache.stride(2) == head_dim
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1
    half = head_dim // 2
    heads_all = heads + 2 * kv_heads
    q = torch.empty(x.shape[0], heads, head_dim, dtype=x.dtype, device=x.device)
    # a program's columns stay within half a head
    return _launch(x, w, n_tiles=lambda bn: heads_all * (half // min(bn, half)), out=q, mode=2, bias=bias,
                   norm_w=norm_w, eps=eps, config=config, rope=(k_cache, v_cache, cos, sin, slots), heads=heads,
                   kv_heads=kv_heads, head_dim=head_dim,
                   block_n=min((config or {}).get("block_n", 32), half))


def fits_qkv_rope(head_dim: int, qk_norm: bool) -> bool:
    """The tensor cores need 16 columns a program, all within half a head."""
    return skinny.fits_qkv_rope(head_dim, qk_norm) and head_dim >= 32


FEW_ROWS = skinny.SkinnyOps("triton few-row", norm_linear, linear_add, norm_gate_up, norm_qkv_rope,
                            fits_qkv_rope) if triton is not None else None
