"""Skinny linears: a decode step of one sequence multiplies one row by each weight.

Such a step is a chain of matrix-vector products, each short enough that the kernels
around it (RMSNorm, SiLU, the residual add) and their launch gaps cost as much as the
product itself: a 0.5B draft layer reads ~29 MB of weights (microseconds at HBM bandwidth)
but ran 10 kernels. The Triton kernels here fold those pieces into the product (5 kernels a
layer, attention's included):

  norm_linear      y = norm(x) @ W.T (+ bias)            RMSNorm in the prologue
  norm_qkv_rope    norm_linear for q/k/v, then rotary on q and k, k and v into the cache
  linear_add       y = x @ W.T + residual                 the residual add in the epilogue
  norm_gate_up     y = silu(norm(x) @ Wg.T) * (norm(x) @ Wu.T)

so a layer is norm_qkv_rope, attention, linear_add(o), norm_gate_up, linear_add(down)
(norm_linear for the qkv of models with per-head q/k norms, then attention's rotary kernel).
Each keeps the reference's bf16 rounding points (norm output, weight * norm, product,
then the add or the SiLU), so results differ from the torch path only in the order of the
dot product's fp32 sums (norm_qkv_rope rotates in fp32 and rounds once, as attention's own
rotary kernel does). `reference_*` are the torch definitions: CPU runs them, GPU tests
check the kernel against them.
"""

import torch
import torch.nn.functional as F

from pearl_runtime import envs
from pearl_runtime.layers import pdl
from pearl_runtime.layers.fused import rms_norm, rotate

# Steps of more rows (a batch, a verify) stay on cuBLAS: tensor-core variants of this kernel
# for 2-16 rows lost to it, and so did one that keeps the weight tile in registers across the
# rows (compute-bound from 4 rows, though ahead of cuBLAS at 2), while the one-row kernel beats
# it clearly, the more so the smaller the model (measured: benchmarks/journal/BENCHMARKS.md).
# The kernels take up to two rows: a draft's catch-up step after a fully accepted round feeds
# two tokens (the last draft token and the target's bonus token).
MAX_ROWS = 2
FP8 = torch.float8_e4m3fn   # weights of models loaded with fp8_weights (layers/fp8.py)

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:   # CPU installs: the reference ops below are the only path
    triton = None


def dequantize(w, scale, dtype):
    """An fp8 weight with its per-row power-of-two scale as `dtype` (exact: layers/fp8.py)."""
    return w if scale is None else (w.float() * scale[:, None]).to(dtype)


def reference_norm_linear(x, norm_w, eps, w, bias=None, scale=None):
    h = rms_norm(x, norm_w, eps) if norm_w is not None else x
    return F.linear(h, dequantize(w, scale, x.dtype), bias)


def reference_norm_qkv_rope(x, norm_w, eps, w, bias, cos, sin, k_cache, v_cache, slots, heads, kv_heads,
                            scale=None):
    head_dim = k_cache.shape[-1]
    qkv = reference_norm_linear(x, norm_w, eps, w, bias, scale)
    q, k, v = (t.view(-1, n, head_dim) for t, n in zip(
        qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1), (heads, kv_heads, kv_heads)))
    q, k = rotate(q, k, cos, sin)
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)
    return q


def reference_linear_add(x, w, residual, scale=None):
    return F.linear(x, dequantize(w, scale, x.dtype)) + residual


def reference_norm_gate_up(x, norm_w, eps, w, scale=None):
    gate, up = F.linear(rms_norm(x, norm_w, eps), dequantize(w, scale, x.dtype)).chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:
    @triton.jit
    def _row_rstd(X, K, eps, BLOCK_K: tl.constexpr):
        """1 / RMS of the one input row, as a [1] tensor. Every program recomputes it: x is a
        few KB and sits in L2."""
        rm = tl.arange(0, 1)
        ss = tl.zeros([1], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(X + rm[:, None] * 0 + rk[None, :], mask=(rk < K)[None, :], other=0.0).to(tl.float32)
            ss += tl.sum(xs * xs, 1)
        return 1.0 / tl.sqrt(ss / K + eps)

    @triton.jit
    def _row_chunk(X, G, rk, k_ok, rstd, HAS_NORM: tl.constexpr):
        """Elements rk of the input row as a [1, BLOCK_K] fp32 tile; with HAS_NORM, normalized
        at the reference's rounding points: norm(x) in the dtype, then weight * it."""
        rm = tl.arange(0, 1)
        x = tl.load(X + rm[:, None] * 0 + rk[None, :], mask=k_ok[None, :], other=0.0)
        if HAS_NORM:
            g = tl.load(G + rk, mask=k_ok, other=0.0).to(tl.float32)
            xn = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
            x = (g[None, :] * xn.to(tl.float32)).to(x.dtype)
        return x.to(tl.float32)

    @triton.jit
    def _skinny(X, W, B, R, G, S, Y, N, K, stride_w, stride_x, eps, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_RES: tl.constexpr, GATED: tl.constexpr, ONE_TILE: tl.constexpr, PDL: tl.constexpr,
                TWO: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program n: rows [n*BLOCK_N, +BLOCK_N) of W (and the same rows + N, the up half, when
        GATED) against the input row (both rows with TWO: each weight tile loaded once, used
        twice). Each lane keeps partial sums across the K loop and they are reduced once at
        the end, so the loop is loads and FMAs only. A row is held as a [1, BLOCK_K] tile: a
        1-D load broadcast against the weights measured slower. HAS_SCALE: W is fp8 with a
        power-of-two scale per row (S), applied to the sums, where it is exact."""
        if PDL:
            gdc_launch_dependents()
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        X1 = X + stride_x   # the second row (TWO)
        rstd = tl.zeros([1], dtype=tl.float32)   # set below where HAS_NORM
        rstd1 = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = acc   # stands in where not GATED
        acc1 = acc
        acc_up1 = acc
        if GATED:
            acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if TWO:
            acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            if GATED:
                acc_up1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if ONE_TILE:
            # the whole row in one tile: the weight loads go out before the norm's, so the
            # DRAM and L2 latencies overlap instead of adding up
            rk = tl.arange(0, BLOCK_K)
            k_ok = rk < K
            mask = n_ok[:, None] & k_ok[None, :]
            w = tl.load(W + rn[:, None] * stride_w + rk[None, :], mask=mask, other=0.0)
            if GATED:
                wu = tl.load(W + (rn + N)[:, None] * stride_w + rk[None, :], mask=mask, other=0.0)
            if PDL:   # the row is the previous kernel's output
                gdc_wait()
            if HAS_NORM:
                rstd = _row_rstd(X, K, eps, BLOCK_K)
                if TWO:
                    rstd1 = _row_rstd(X1, K, eps, BLOCK_K)
            xf = _row_chunk(X, G, rk, k_ok, rstd, HAS_NORM)
            acc += w.to(tl.float32) * xf
            if GATED:
                acc_up += wu.to(tl.float32) * xf
            if TWO:
                xf1 = _row_chunk(X1, G, rk, k_ok, rstd1, HAS_NORM)
                acc1 += w.to(tl.float32) * xf1
                if GATED:
                    acc_up1 += wu.to(tl.float32) * xf1
        else:
            if PDL:
                gdc_wait()
            if HAS_NORM:
                rstd = _row_rstd(X, K, eps, BLOCK_K)
                if TWO:
                    rstd1 = _row_rstd(X1, K, eps, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                xf = _row_chunk(X, G, rk, k_ok, rstd, HAS_NORM)
                mask = n_ok[:, None] & k_ok[None, :]
                w = tl.load(W + rn[:, None] * stride_w + rk[None, :], mask=mask, other=0.0)
                acc += w.to(tl.float32) * xf
                if TWO:
                    xf1 = _row_chunk(X1, G, rk, k_ok, rstd1, HAS_NORM)
                    acc1 += w.to(tl.float32) * xf1
                if GATED:
                    wu = tl.load(W + (rn + N)[:, None] * stride_w + rk[None, :], mask=mask, other=0.0)
                    acc_up += wu.to(tl.float32) * xf
                    if TWO:
                        acc_up1 += wu.to(tl.float32) * xf1
        _row_out(acc, acc_up, rn, n_ok, B, R, Y, S, N, HAS_BIAS, HAS_RES, GATED, HAS_SCALE)
        if TWO:
            _row_out(acc1, acc_up1, rn, n_ok, B, R + N, Y + N, S, N, HAS_BIAS, HAS_RES, GATED, HAS_SCALE)

    @triton.jit
    def _row_out(acc, acc_up, rn, n_ok, B, R, Y, S, N, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                 GATED: tl.constexpr, HAS_SCALE: tl.constexpr):
        """One output row from its partial sums: the reduction (and the rows' scales), then the
        bias, SiLU * up or the residual add at the reference's rounding points, and the store."""
        rm = tl.arange(0, 1)
        out_ty = Y.dtype.element_ty
        y = tl.sum(acc, 1)[None, :]
        if HAS_SCALE:
            y = y * tl.load(S + rn, mask=n_ok, other=0.0)[None, :]
        y = y.to(out_ty).to(tl.float32)
        if HAS_BIAS:
            y = (y + tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(out_ty).to(tl.float32)
        if GATED:
            up = tl.sum(acc_up, 1)[None, :]
            if HAS_SCALE:
                up = up * tl.load(S + N + rn, mask=n_ok, other=0.0)[None, :]
            up = up.to(out_ty).to(tl.float32)
            y = (y / (1.0 + tl.exp(-y))).to(out_ty).to(tl.float32) * up
        if HAS_RES:
            y = y + tl.load(R + rm[:, None] * 0 + rn[None, :], mask=n_ok[None, :], other=0.0).to(tl.float32)
        tl.store(Y + rm[:, None] * 0 + rn[None, :], y.to(out_ty), mask=n_ok[None, :])


    @triton.jit
    def _skinny_qkv_rope(X, W, B, G, S, Q_out, k_cache, v_cache, cos, sin, slots, K, stride_w, stride_slot,
                         stride_x, stride_cs, eps, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_TILE: tl.constexpr, PDL: tl.constexpr,
                         TWO: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
        """norm_linear for the fused q/k/v projection with the attention's first kernel folded
        into the epilogue: program p takes BLOCK_H dims of the first half of one head together
        with their rotary partners in the second half, rotates q and k (fp32 math, one
        rounding, as the separate kernel does), writes q out and k, v into the token's cache
        slot. Same prologue, loop, rounding points and second row (TWO) as _skinny."""
        if PDL:
            gdc_launch_dependents()
        HALF: tl.constexpr = HEAD_DIM // 2
        per_head = HALF // BLOCK_H
        head = tl.program_id(0) // per_head
        j = (tl.program_id(0) % per_head) * BLOCK_H + tl.arange(0, BLOCK_H)
        lo = head * HEAD_DIM + j
        hi = lo + HALF
        X1 = X + stride_x
        acc_lo = tl.zeros([BLOCK_H, BLOCK_K], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_H, BLOCK_K], dtype=tl.float32)
        acc_lo1 = acc_lo   # the second row's, with TWO
        acc_hi1 = acc_hi
        if TWO:
            acc_lo1 = tl.zeros([BLOCK_H, BLOCK_K], dtype=tl.float32)
            acc_hi1 = tl.zeros([BLOCK_H, BLOCK_K], dtype=tl.float32)
        if ONE_TILE:   # weights first, as in _skinny
            rk = tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w_lo = tl.load(W + lo[:, None] * stride_w + rk[None, :], mask=k_ok[None, :], other=0.0)
            w_hi = tl.load(W + hi[:, None] * stride_w + rk[None, :], mask=k_ok[None, :], other=0.0)
            if PDL:   # the row, the rotary rows and the slot come from earlier kernels
                gdc_wait()
            rstd = _row_rstd(X, K, eps, BLOCK_K)
            xf = _row_chunk(X, G, rk, k_ok, rstd, True)
            acc_lo += w_lo.to(tl.float32) * xf
            acc_hi += w_hi.to(tl.float32) * xf
            if TWO:
                xf1 = _row_chunk(X1, G, rk, k_ok, _row_rstd(X1, K, eps, BLOCK_K), True)
                acc_lo1 += w_lo.to(tl.float32) * xf1
                acc_hi1 += w_hi.to(tl.float32) * xf1
        else:
            if PDL:
                gdc_wait()
            rstd = _row_rstd(X, K, eps, BLOCK_K)
            rstd1 = rstd
            if TWO:
                rstd1 = _row_rstd(X1, K, eps, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                xf = _row_chunk(X, G, rk, k_ok, rstd, True)
                w_lo = tl.load(W + lo[:, None] * stride_w + rk[None, :], mask=k_ok[None, :], other=0.0)
                w_hi = tl.load(W + hi[:, None] * stride_w + rk[None, :], mask=k_ok[None, :], other=0.0)
                acc_lo += w_lo.to(tl.float32) * xf
                acc_hi += w_hi.to(tl.float32) * xf
                if TWO:
                    xf1 = _row_chunk(X1, G, rk, k_ok, rstd1, True)
                    acc_lo1 += w_lo.to(tl.float32) * xf1
                    acc_hi1 += w_hi.to(tl.float32) * xf1
        _rope_out(acc_lo, acc_hi, lo, hi, j, head, B, S, Q_out, k_cache, v_cache, cos, sin, slots, stride_slot,
                  HEADS, KV_HEADS, HEAD_DIM, HAS_BIAS, HAS_SCALE)
        if TWO:
            _rope_out(acc_lo1, acc_hi1, lo, hi, j, head, B, S, Q_out + HEADS * HEAD_DIM, k_cache, v_cache,
                      cos + stride_cs, sin + stride_cs, slots + 1, stride_slot, HEADS, KV_HEADS, HEAD_DIM, HAS_BIAS,
                      HAS_SCALE)

    @triton.jit
    def _rope_out(acc_lo, acc_hi, lo, hi, j, head, B, S, Q_out, k_cache, v_cache, cos, sin, slots, stride_slot,
                  HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_SCALE: tl.constexpr):
        """One token's share of _skinny_qkv_rope's output: reduce (and scale), add the bias,
        rotate q and k, store q or the cache row."""
        HALF: tl.constexpr = HEAD_DIM // 2
        out_ty = Q_out.dtype.element_ty
        a = tl.sum(acc_lo, 1)
        b = tl.sum(acc_hi, 1)
        if HAS_SCALE:
            a = a * tl.load(S + lo)
            b = b * tl.load(S + hi)
        a = a.to(out_ty).to(tl.float32)
        b = b.to(out_ty).to(tl.float32)
        if HAS_BIAS:
            a = (a + tl.load(B + lo).to(tl.float32)).to(out_ty).to(tl.float32)
            b = (b + tl.load(B + hi).to(tl.float32)).to(out_ty).to(tl.float32)
        if head < HEADS + KV_HEADS:   # q and k rotate: (a, b) -> (a c - b s, b c + a s)
            c = tl.load(cos + j).to(tl.float32)
            s = tl.load(sin + j).to(tl.float32)
            a, b = a * c - b * s, b * c + a * s
        if head < HEADS:
            tl.store(Q_out + lo, a.to(out_ty))
            tl.store(Q_out + hi, b.to(out_ty))
        else:
            slot = tl.load(slots)
            if head < HEADS + KV_HEADS:
                row = k_cache + slot * stride_slot + (head - HEADS) * HEAD_DIM
            else:
                row = v_cache + slot * stride_slot + (head - HEADS - KV_HEADS) * HEAD_DIM
            tl.store(row + j, a.to(out_ty))
            tl.store(row + j + HALF, b.to(out_ty))


# "auto" takes the kernel for models up to this hidden size: with per-shape configs and
# dependent launches an engine ar step runs faster than on cuBLAS at 0.5B and 7B, but slower at
# 32B. A TP=2 rank's share of the 72B layers ran faster than cuBLAS (no all-reduce counted);
# no TP engine was measured, so the 72B keeps cuBLAS unless --skinny-linears triton asks.
AUTO_MAX_HIDDEN = 4096

# Two-row steps take the kernel where it beat cuBLAS at two rows: the 0.5B layer chain and
# engine step ran faster, but the 1.5B chain slower (its long rows need looped tiles for two rows'
# partial sums). Larger models keep cuBLAS for two rows. PEARL_SKINNY_ROWS=1|2 overrides.
TWO_ROWS_MAX_HIDDEN = 1024


def rows_for(hidden: int) -> int:
    """How many rows a step may have and still take the skinny kernels."""
    forced = envs.get("PEARL_SKINNY_ROWS")
    if forced is not None:
        if forced not in (1, 2):
            raise ValueError(f"PEARL_SKINNY_ROWS must be 1 or 2, got {forced!r}")
        return forced
    return 2 if hidden <= TWO_ROWS_MAX_HIDDEN else 1


def default_config(K: int, gated: bool = False) -> dict:
    """Two weight rows a program and the whole row in one tile where it fits (a loop over
    tiles waits out the memory latency once per tile), 4 warps for short rows and the gated
    pair, 8 for long rows. Picked per linear by a sweep of block shapes; each beat a single
    fixed config at 0.5B, 1.5B and 7B."""
    tile = triton.next_power_of_2(K)
    if gated and tile > 4096:   # the 32B / 72B gate_up: tiles past 4096 swept on their own
        if 4 * K >= 3 * tile:   # a row that fills its tile: one row a program, one tile
            return dict(block_n=1, block_k=tile, num_warps=4)
        return dict(block_n=4, block_k=1024, num_warps=4)
    if tile > (4096 if gated else 8192):   # the down projections past 1.5B: a loop of mid-size tiles
        return dict(block_n=2, block_k=2048, num_warps=8)
    return dict(block_n=2, block_k=tile, num_warps=4 if gated or K <= 1024 else 8)


def two_row_config(K: int, gated: bool = False) -> dict:
    """default_config for a step of two rows: its tiles while both rows' partial sums fit in
    what one row's largest tiles hold (64 fp32 a lane), else tiles halved until they do, in a
    loop. Not swept."""
    c = dict(default_config(K, gated))
    while 2 * (2 if gated else 1) * c["block_n"] * c["block_k"] > 64 * 32 * c["num_warps"] and c["block_k"] > 256:
        c["block_k"] //= 2
    return c


def _fp8_config(w, c: dict) -> dict:
    """An fp8 weight row is half the bytes, so a program takes twice the rows: the 0.5B draft's
    graph step ran fastest with twice the bf16 configs' rows; four times gave the gain back."""
    return dict(c, block_n=c["block_n"] * 2) if w.dtype == FP8 else c


def _rows(x, w) -> int:
    M = x.shape[0]
    assert 1 <= M <= MAX_ROWS and x.is_contiguous() and w.is_contiguous(), \
        f"the skinny kernel takes 1-{MAX_ROWS} contiguous rows, got {tuple(x.shape)}"
    return M


def _launch(x, w, *, out_features, bias=None, residual=None, norm_w=None, eps=0.0, gated=False, scale=None,
            config=None):
    M, K = _rows(x, w), x.shape[1]
    assert residual is None or residual.is_contiguous()
    assert (scale is None) == (w.dtype != FP8), "an fp8 weight comes with its row scales, and only it"
    y = torch.empty(M, out_features, dtype=x.dtype, device=x.device)
    c = config or _fp8_config(w, (default_config if M == 1 else two_row_config)(K, gated))
    use_pdl = pdl.enabled(x.device)
    _skinny[(triton.cdiv(out_features, c["block_n"]),)](
        x, w, w if bias is None else bias, w if residual is None else residual, w if norm_w is None else norm_w,
        w if scale is None else scale, y, out_features, K, w.stride(0), x.stride(0), eps, HAS_NORM=norm_w is not None,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, GATED=gated, ONE_TILE=K <= c["block_k"], PDL=use_pdl,
        TWO=M == 2, HAS_SCALE=scale is not None, BLOCK_N=c["block_n"], BLOCK_K=c["block_k"],
        num_warps=c["num_warps"], num_stages=1, launch_pdl=use_pdl)
    return y


def norm_linear(x, norm_w, eps, w, bias=None, scale=None, config=None):
    return _launch(x, w, out_features=w.shape[0], bias=bias, norm_w=norm_w, eps=eps, scale=scale, config=config)


def linear_add(x, w, residual, scale=None, config=None):
    return _launch(x, w, out_features=w.shape[0], residual=residual, scale=scale, config=config)


def norm_gate_up(x, norm_w, eps, w, scale=None, config=None):
    return _launch(x, w, out_features=w.shape[0] // 2, norm_w=norm_w, eps=eps, gated=True, scale=scale,
                   config=config)


def norm_qkv_rope(x, norm_w, eps, w, bias, cos, sin, k_cache, v_cache, slots, heads, kv_heads, scale=None,
                  config=None):
    """q of each token (one or two), rotated, as [tokens, heads, head_dim]; token i's rotated
    k and its v go straight into the cache slot slots[i]. cos, sin: the tokens' rows of the
    rotary tables."""
    head_dim = k_cache.shape[-1]
    M, K = _rows(x, w), x.shape[1]
    assert w.shape[0] == (heads + 2 * kv_heads) * head_dim and k_cache.stride(2) == head_dim
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1
    c = config or _fp8_config(w, default_config(K) if M == 1 else two_row_config(K))
    block_h = min(max(c["block_n"] // 2, 1), head_dim // 2)
    q = torch.empty(M, heads, head_dim, dtype=x.dtype, device=x.device)
    use_pdl = pdl.enabled(x.device)
    assert (scale is None) == (w.dtype != FP8), "an fp8 weight comes with its row scales, and only it"
    _skinny_qkv_rope[((heads + 2 * kv_heads) * (head_dim // 2) // block_h,)](
        x, w, w if bias is None else bias, norm_w, w if scale is None else scale, q, k_cache, v_cache, cos, sin, slots,
        K, w.stride(0), k_cache.stride(1), x.stride(0), cos.stride(0), eps, HEADS=heads, KV_HEADS=kv_heads,
        HEAD_DIM=head_dim, HAS_BIAS=bias is not None, ONE_TILE=K <= c["block_k"], PDL=use_pdl, TWO=M == 2,
        HAS_SCALE=scale is not None, BLOCK_H=block_h, BLOCK_K=c["block_k"], num_warps=c["num_warps"], num_stages=1,
        launch_pdl=use_pdl)
    return q


def fits_qkv_rope(head_dim: int, qk_norm: bool) -> bool:
    """norm_qkv_rope takes heads of a power-of-two size without per-head q/k norms (Qwen3's
    sit between the projection and the rotation)."""
    return not qk_norm and head_dim >= 2 and not head_dim & (head_dim - 1)


class SkinnyOps:
    """norm_qkv_rope is None where the rotation and the cache store stay in attention's kernel."""
    def __init__(self, name, norm_linear, linear_add, norm_gate_up, norm_qkv_rope=None):
        self.name, self.norm_linear, self.linear_add, self.norm_gate_up = name, norm_linear, linear_add, norm_gate_up
        self.norm_qkv_rope = norm_qkv_rope


REFERENCE = SkinnyOps("torch reference", reference_norm_linear, reference_linear_add, reference_norm_gate_up,
                      reference_norm_qkv_rope)
TRITON = SkinnyOps("triton", norm_linear, linear_add, norm_gate_up, norm_qkv_rope) if triton is not None else None
