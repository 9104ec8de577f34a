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
    def _few_rows(X, W, B, R, G, Y, WS, WS_SS, CNT, K_cache, V_cache, COS, SIN, SLOTS,
                  M, N, K, NW, stride_w, stride_x, eps, stride_slot, stride_cs,
                  MODE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                  SPLIT: tl.constexpr, PDL: tl.constexpr, IEEE: tl.constexpr,
                  HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (p, s): weight rows `ra` of W (and `rb`: the up half when MODE 1, the
        rotary partners half a head further when MODE 2), columns [s * BLOCK_K, +BLOCK_K),
        against the rows of X. One tile a program, loaded before the wait for the previous
        kernel, as the one-row kernel does: a loop over tiles waits out the memory latency
        after the wait (session 11's first version ran a pipelined loop and reached 41-88%
        of copy). MODE 0: y = x W^T (+ bias, + residual); 1: silu(gate) * up; 2: the fused
        q/k/v projection, rotated, q to Y and k, v into the cache slots."""
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
        rk = s * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        w = tl.load(W + ra[:, None] * stride_w + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        wb = w
        if MODE != 0:
            wb = tl.load(W + rb[:, None] * stride_w + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if PDL:   # x is the previous kernel's output
            gdc_wait()
        x = tl.load(X + rm[:, None] * stride_x + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)   # this tile's sum of x^2 a row, with HAS_NORM
        if HAS_NORM:   # weight * x now, 1 / RMS(x) on the sums at the end (_normed)
            g = tl.load(G + rk, mask=k_ok, other=0.0).to(tl.float32)
            xf = x.to(tl.float32)
            ss = tl.sum(xf * xf, 1)
            x = (g[None, :] * xf).to(x.dtype)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w))
        acc_b = acc
        if MODE != 0:
            if IEEE:
                acc_b = tl.dot(x, tl.trans(wb), input_precision="ieee")
            else:
                acc_b = tl.dot(x, tl.trans(wb))
        if SPLIT > 1:
            # leave this tile's sums (the real rows only); the last program of the weight rows
            # adds all SPLIT of them in order, so the result does not depend on which was last
            keep = m_ok[:, None] & n_ok[None, :]
            part = WS + s * BLOCK_M * NW + rm[:, None] * NW + ra[None, :]
            tl.store(part, acc, mask=keep)
            if MODE != 0:
                tl.store(part + (rb - ra)[None, :], acc_b, mask=keep)
            if HAS_NORM:
                tl.store(WS_SS + (p * SPLIT + s) * BLOCK_M + rm, ss)
            tl.debug_barrier()   # every thread's stores before the release below
            done = tl.atomic_add(CNT + p, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT - 1:
                tl.debug_barrier()
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                ss = tl.zeros([BLOCK_M], dtype=tl.float32)
                for i in tl.static_range(SPLIT):
                    part = WS + i * BLOCK_M * NW + rm[:, None] * NW + ra[None, :]
                    acc += tl.load(part, mask=keep, other=0.0, cache_modifier=".cg")
                    if MODE != 0:
                        acc_b += tl.load(part + (rb - ra)[None, :], mask=keep, other=0.0, cache_modifier=".cg")
                    if HAS_NORM:
                        ss += tl.load(WS_SS + (p * SPLIT + i) * BLOCK_M + rm, cache_modifier=".cg")
                tl.atomic_xchg(CNT + p, 0)   # ready for the next launch (graph replays included)
                if HAS_NORM:
                    acc, acc_b = _normed(acc, acc_b, ss, K, eps, MODE)
                _finish(acc, acc_b, rm, m_ok, ra, rb, j, n_ok, head, B, R, Y, K_cache, V_cache, COS, SIN, SLOTS,
                        N, stride_slot, stride_cs, MODE, HAS_BIAS, HAS_RES, HEADS, KV_HEADS, HEAD_DIM)
        else:
            if HAS_NORM:
                acc, acc_b = _normed(acc, acc_b, ss, K, eps, MODE)
            _finish(acc, acc_b, rm, m_ok, ra, rb, j, n_ok, head, B, R, Y, K_cache, V_cache, COS, SIN, SLOTS,
                    N, stride_slot, stride_cs, MODE, HAS_BIAS, HAS_RES, HEADS, KV_HEADS, HEAD_DIM)

    @triton.jit
    def _normed(acc, acc_b, ss, K, eps, MODE: tl.constexpr):
        """RMSNorm's scale on the products' sums: sum(g x w) / RMS(x). The reference rounds
        x / RMS(x), then g times it, to the dtype before the product; scaling first would need
        the whole row's RMS before a program's one tile, a pass over x per program. So these
        sums differ from the reference's by those two roundings of the inputs."""
        rstd = 1.0 / tl.sqrt(ss / K + eps)
        acc = acc * rstd[:, None]
        if MODE != 0:
            acc_b = acc_b * rstd[:, None]
        return acc, acc_b

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
MAX_TILES = 8192


def prepare(device: torch.device) -> None:
    """Make the device's tile counters (zeros; every launch leaves them at zero). Called
    before graph capture: a graph keeps the pointer it captured."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _counters:
        _counters[index] = torch.zeros(MAX_TILES, dtype=torch.int32, device=torch.device("cuda", index))


def default_config(K: int, gated: bool = False) -> dict:
    """Not swept yet: 32 weight rows by 512 columns a program (16 rows for the gated pair),
    so each holds ~64 registers of weights a thread."""
    return dict(block_n=16 if gated else 32, block_k=min(512, max(16, triton.next_power_of_2(K))), num_warps=4)


def _launch(x, w, *, n_tiles, out, mode, bias=None, residual=None, norm_w=None, eps=0.0, config=None,
            rope=None, heads=0, kv_heads=0, head_dim=0):
    M, K = x.shape
    assert 1 <= M <= MAX_ROWS and x.is_contiguous() and w.is_contiguous(), \
        f"the few-row kernel takes 1-{MAX_ROWS} contiguous rows, got {tuple(x.shape)}"
    assert residual is None or residual.is_contiguous()
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _counters:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("few_rows.prepare(device) must run before CUDA graph capture")
        prepare(x.device)
    c = config or default_config(K, gated=mode == 1)
    bn = min(c["block_n"], head_dim // 2) if mode == 2 else c["block_n"]   # within half a head
    grid0, split = n_tiles(bn), triton.cdiv(K, c["block_k"])
    assert grid0 <= MAX_TILES, f"{grid0} tiles for {MAX_TILES} counters"
    nw = w.shape[0]
    ws = torch.empty(split, MAX_ROWS, nw, dtype=torch.float32, device=x.device) if split > 1 else x
    ws_ss = torch.empty(grid0, split, MAX_ROWS, dtype=torch.float32, device=x.device) \
        if split > 1 and norm_w is not None else x
    k_cache, v_cache, cos, sin, slots = rope or (x, x, x, x, x)
    use_pdl = pdl.enabled(x.device)
    _few_rows[(grid0, split)](
        x, w, w if bias is None else bias, w if residual is None else residual, w if norm_w is None else norm_w,
        out, ws, ws_ss, _counters[index], k_cache, v_cache, cos, sin, slots,
        M, w.shape[0] // 2 if mode == 1 else w.shape[0], K, nw, w.stride(0), x.stride(0), eps,
        k_cache.stride(1) if rope else 0, cos.stride(0) if rope else 0,
        MODE=mode, HAS_NORM=norm_w is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        SPLIT=split, PDL=use_pdl, IEEE=x.dtype == torch.float32, HEADS=heads, KV_HEADS=kv_heads,
        HEAD_DIM=head_dim, BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=c["block_k"],
        num_warps=c["num_warps"], num_stages=1, launch_pdl=use_pdl)
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
    return _launch(x, w, n_tiles=lambda bn: heads_all * (half // bn), out=q, mode=2, bias=bias,
                   norm_w=norm_w, eps=eps, config=config, rope=(k_cache, v_cache, cos, sin, slots), heads=heads,
                   kv_heads=kv_heads, head_dim=head_dim)


def fits_qkv_rope(head_dim: int, qk_norm: bool) -> bool:
    """The tensor cores need 16 columns a program, all within half a head."""
    return skinny.fits_qkv_rope(head_dim, qk_norm) and head_dim >= 32


FEW_ROWS = skinny.SkinnyOps("triton few-row", norm_linear, linear_add, norm_gate_up, norm_qkv_rope,
                            fits_qkv_rope) if triton is not None else None
