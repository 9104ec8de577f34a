"""GPU attention: flash-attn where installed, else a Triton kernel over the paged cache.

One Triton kernel covers prefill, decode and verify: program (sequence, kv head, row tile)
where a row is (query token, query head of that kv head's group), so GQA heads share each
K/V tile load. Query j of a sequence sits at position ctx_len - q_len + j and sees keys up
to it. Queries are read from `cu_seqlens_q[i]` with `q_lens[i]` real tokens; the rest of a
padded CUDA-graph slot is skipped.
"""
import logging

import torch
import triton
import triton.language as tl

from pearl_runtime.attention.base import AttentionBackend

log = logging.getLogger(__name__)


@triton.jit
def _paged_attention(Q, K, V, O, block_tables, cu_q, q_lens, ctx_lens, scale,
                     stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)
    q_len = tl.load(q_lens + seq)
    if tile * BLOCK_M >= q_len * GROUP:
        return
    q_start = tl.load(cu_q + seq)
    ctx = tl.load(ctx_lens + seq)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = qi < q_len
    d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + (q_start + qi)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    qpos = ctx - q_len + qi
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    last_q = tl.minimum(q_len - 1, (tile * BLOCK_M + BLOCK_M - 1) // GROUP)
    n_keys = ctx - q_len + last_q + 1
    t = tl.arange(0, BLOCK_N)
    for b in range(0, tl.cdiv(n_keys, BLOCK_N)):
        # a key tile spans BLOCK_N // PAGE pages of the cache: gather each token's page
        kpos = b * BLOCK_N + t
        live = kpos < n_keys
        page = tl.load(block_tables + seq * stride_bt + kpos // PAGE, mask=live, other=0).to(tl.int64)
        kv_off = (page * stride_kb + (kpos % PAGE) * stride_kt)[:, None] + kvh * stride_kh + d[None, :]
        k = tl.load(K + kv_off, mask=live[:, None], other=0.0)
        v = tl.load(V + kv_off, mask=live[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        s = tl.where((kpos[None, :] <= qpos[:, None]) & live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = O + (q_start + qi)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _store_kv(K, V, k_cache, v_cache, slots, stride_k, stride_v, stride_slot, WIDTH: tl.constexpr):
    """One program per new token: its K and V rows into their cache slot (one launch, not two)."""
    t = tl.program_id(0)
    slot = tl.load(slots + t)
    i = tl.arange(0, WIDTH)
    tl.store(k_cache + slot * stride_slot + i, tl.load(K + t * stride_k + i))
    tl.store(v_cache + slot * stride_slot + i, tl.load(V + t * stride_v + i))


class TritonBackend(AttentionBackend):
    name = "triton"
    BLOCK_M = 16
    BLOCK_N = 64    # keys per tile: several pages, so short contexts take few serial steps
    _logged_store_fallback = False

    def store_kv(self, k, v, k_cache, v_cache, ctx):
        width = k.shape[1] * k.shape[2]
        packed = k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2] and k.stride(2) == v.stride(2) == 1
        if not packed or width & (width - 1):   # rows must be packed and a power of two wide
            if not self._logged_store_fallback:
                log.info("KV store: torch index_copy (rows of %d values are not a packed power of two)", width)
                self._logged_store_fallback = True
            return super().store_kv(k, v, k_cache, v_cache, ctx)
        # k is a fresh tensor after rotary, v a view into the fused qkv output: own strides
        _store_kv[(k.shape[0],)](k, v, k_cache, v_cache, ctx.slot_mapping, k.stride(0), v.stride(0),
                                 k_cache.stride(1), WIDTH=width)

    def attend(self, q, k_cache, v_cache, ctx, scale):
        out = torch.empty_like(q)
        n_seqs = ctx.context_lens_t.shape[0]
        kv_heads, block_size, head_dim = k_cache.shape[2], k_cache.shape[1], q.shape[2]
        group = q.shape[1] // kv_heads
        tiles = triton.cdiv(ctx.max_q_len * group, self.BLOCK_M)
        _paged_attention[(n_seqs, kv_heads, tiles)](
            q, k_cache, v_cache, out, ctx.block_tables, ctx.cu_seqlens_q, ctx.q_lens_t, ctx.context_lens_t,
            scale, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            ctx.block_tables.stride(0), GROUP=group, HEAD_DIM=head_dim, BLOCK_M=self.BLOCK_M,
            BLOCK_N=max(self.BLOCK_N, block_size), PAGE=block_size, IEEE=q.dtype == torch.float32)
        return out


GPU_BACKENDS = {"triton": TritonBackend}

try:
    from flash_attn import flash_attn_with_kvcache

    class FlashAttnBackend(AttentionBackend):
        """flash-attn's paged kernel; queries padded to a uniform length per call."""
        name = "flash-attn"

        def attend(self, q, k_cache, v_cache, ctx, scale):
            n, qmax = ctx.context_lens_t.shape[0], ctx.max_q_len
            padded = q.new_zeros(n, qmax, *q.shape[1:])
            idx = _padded_index(ctx, qmax)
            padded.view(-1, *q.shape[1:])[idx] = q
            # flash-attn aligns causal masks to the end of the keys; pad at the front
            out = flash_attn_with_kvcache(padded, k_cache, v_cache, cache_seqlens=ctx.context_lens_t,
                                          block_table=ctx.block_tables, softmax_scale=scale, causal=True)
            return out.view(-1, *q.shape[1:])[idx]

    def _padded_index(ctx, qmax):
        starts = torch.arange(ctx.context_lens_t.shape[0], device=ctx.q_lens_t.device) * qmax + qmax - ctx.q_lens_t
        return torch.cat([torch.arange(s, s + n, device=starts.device) for s, n in zip(starts.tolist(), ctx.q_lens)])

    GPU_BACKENDS["flash-attn"] = FlashAttnBackend
except ImportError:
    pass
