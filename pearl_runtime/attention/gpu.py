"""GPU attention: flash-attn where installed, else a Triton kernel over the paged cache.

One Triton kernel covers prefill, decode and verify: program (sequence, kv head, row tile)
where a row is (query token, query head of that kv head's group), so GQA heads share each
K/V tile load. Query j of a sequence sits at position ctx_len - q_len + j and sees keys up
to it. Queries are read from `cu_seqlens_q[i]` with `q_lens[i]` real tokens; the rest of a
padded CUDA-graph slot is skipped. At small batches a row tile's keys are split across
programs and a second kernel merges them.
"""
from typing import ClassVar

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pearl_runtime.attention.base import AttentionBackend
from pearl_runtime.attention.flash_layout import padded_query_index
from pearl_runtime.layers import pdl
from pearl_runtime.log import get_logger

log = get_logger(__name__)


# The arguments that change with an eager step's shape (rows, block-table width, splits) are
# plain runtime ints: specialized (Triton's ==1 and %16 variants, a constexpr per split count)
# each new shape compiled a kernel mid-serving, a first-token stall of up to ~0.75 s
@triton.jit(do_not_specialize=["stride_bt", "n_rows", "SPLITS"])
def _paged_attention(Q, K, V, O, O_part, M_part, L_part, block_tables, cu_q, q_lens, ctx_lens, scale,
                     stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, n_rows, SPLITS,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # without splits the o projection comes next (layers/pdl.py)
        gdc_launch_dependents()
        # launched early too, behind the qkv kernel: everything read here is its output (or
        # was written before it), so wait first; what it saves is the launch gap
        gdc_wait()
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
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
    # split-K: this program takes one contiguous share of the key tiles
    n_tiles = tl.cdiv(n_keys, BLOCK_N)
    per_split = tl.cdiv(n_tiles, SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_tiles)
    t = tl.arange(0, BLOCK_N)
    for b in range(lo, hi):
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
    token = q_start + qi
    if SPLITS == 1:
        out = acc / l_i[:, None]
        o_ptrs = O + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        # unnormalized partials, merged by _merge_splits; rows are (split, token, head)
        n_heads = tl.num_programs(1) * GROUP
        row = (split * n_rows + token) * n_heads + head
        tl.store(O_part + row[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(M_part + row, m_i, mask=row_ok)
        tl.store(L_part + row, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "splits"])
def _merge_splits(O_part, M_part, L_part, O, stride_ot, stride_oh, n_rows, n_heads, splits,
                  HEAD_DIM: tl.constexpr, MAX_SPLITS: tl.constexpr, PDL: tl.constexpr):
    """One program per (token, head): rescale each split's partial sums to the common max,
    all splits in one load (the split count is a runtime int: one compiled kernel)."""
    if PDL:   # the o projection after it may start loading its weights (layers/pdl.py)
        gdc_launch_dependents()
        gdc_wait()   # the partials are the attention kernel's output
    token = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, MAX_SPLITS)
    live = s < splits
    row = (s * n_rows + token) * n_heads + head
    m = tl.load(M_part + row, mask=live, other=-1e30)
    weight = tl.exp(m - tl.max(m, 0))
    total = tl.sum(tl.load(L_part + row, mask=live, other=0.0) * weight, 0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(O_part + row[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / total
    tl.store(O + token * stride_ot + head * stride_oh + d, out.to(O.dtype.element_ty))


@triton.jit
def _store_kv(K, V, k_cache, v_cache, slots, stride_k, stride_v, stride_slot, WIDTH: tl.constexpr):
    """One program per new token: its K and V rows into their cache slot (one launch, not two)."""
    t = tl.program_id(0)
    slot = tl.load(slots + t)
    i = tl.arange(0, WIDTH)
    tl.store(k_cache + slot * stride_slot + i, tl.load(K + t * stride_k + i))
    tl.store(v_cache + slot * stride_slot + i, tl.load(V + t * stride_v + i))


@triton.jit
def _rope_store(Q, K, V, Q_out, cos, sin, k_cache, v_cache, slots, stride_qt, stride_kt, stride_vt, stride_cs,
                stride_slot, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEADS_P2: tl.constexpr,
                KV_HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program per new token: rotate its q and k heads, write q to Q_out and k, v into
    the token's cache slot (three kernels in one). Math in fp32, rounded once at the end."""
    t = tl.program_id(0)
    d = tl.arange(0, HEAD_DIM)
    partner = (d + HEAD_DIM // 2) % HEAD_DIM        # rotate_half: (-x2, x1)
    sign = tl.where(d < HEAD_DIM // 2, -1.0, 1.0)
    c = tl.load(cos + t * stride_cs + d).to(tl.float32)
    s = tl.load(sin + t * stride_cs + d).to(tl.float32)
    hq = tl.arange(0, HEADS_P2)[:, None]
    q_row = Q + t * stride_qt + hq * HEAD_DIM
    x = tl.load(q_row + d[None, :], mask=hq < HEADS, other=0.0).to(tl.float32)
    xp = tl.load(q_row + partner[None, :], mask=hq < HEADS, other=0.0).to(tl.float32)
    tl.store(Q_out + t * HEADS * HEAD_DIM + hq * HEAD_DIM + d[None, :],
             (x * c[None, :] + sign[None, :] * xp * s[None, :]).to(Q_out.dtype.element_ty), mask=hq < HEADS)
    slot = tl.load(slots + t)
    hk = tl.arange(0, KV_HEADS_P2)[:, None]
    k_row = K + t * stride_kt + hk * HEAD_DIM
    x = tl.load(k_row + d[None, :], mask=hk < KV_HEADS, other=0.0).to(tl.float32)
    xp = tl.load(k_row + partner[None, :], mask=hk < KV_HEADS, other=0.0).to(tl.float32)
    cache_off = slot * stride_slot + hk * HEAD_DIM + d[None, :]
    tl.store(k_cache + cache_off, (x * c[None, :] + sign[None, :] * xp * s[None, :]).to(k_cache.dtype.element_ty),
             mask=hk < KV_HEADS)
    v = tl.load(V + t * stride_vt + hk * HEAD_DIM + d[None, :], mask=hk < KV_HEADS, other=0.0)
    tl.store(v_cache + cache_off, v, mask=hk < KV_HEADS)


class TritonBackend(AttentionBackend):
    name = "triton"
    BLOCK_M = 16
    BLOCK_N = 64    # keys per tile: several pages, so short contexts take few serial steps
    MAX_SPLITS = 16
    _sms: ClassVar[dict[int, int]] = {}   # SM count per device index
    _logged_store_fallback = False
    _logged_rope_fallback = False

    def rope_store(self, q, k, v, cos, sin, k_cache, v_cache, ctx):
        head_dim = q.shape[2]
        fits = (all(x.stride(2) == 1 and x.stride(1) == head_dim for x in (q, k, v))
                and cos.stride(-1) == 1 and cos.stride(0) == sin.stride(0) and not head_dim & (head_dim - 1)
                and k_cache.stride(2) == head_dim and k_cache.stride(1) == v_cache.stride(1))
        if not fits:
            if not self._logged_rope_fallback:
                log.info("rotary + KV store: separate kernels (q/k/v rows not packed heads of a power-of-two size)")
                self._logged_rope_fallback = True
            return super().rope_store(q, k, v, cos, sin, k_cache, v_cache, ctx)
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        _rope_store[(q.shape[0],)](q, k, v, q_out, cos, sin, k_cache, v_cache, ctx.slot_mapping, q.stride(0),
                                   k.stride(0), v.stride(0), cos.stride(0), k_cache.stride(1),
                                   HEADS=q.shape[1], KV_HEADS=k.shape[1], HEADS_P2=triton.next_power_of_2(q.shape[1]),
                                   KV_HEADS_P2=triton.next_power_of_2(k.shape[1]), HEAD_DIM=head_dim)
        return q_out

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

    def splits(self, programs: int, device: torch.device) -> int:
        """Key-range splits per (sequence, kv head, row tile): a decode step at a small batch
        has only a few of those programs, each walking the whole context alone, so the
        keys are split until the programs cover the SMs. Depends on the batch shape only,
        never on context lengths, so a captured graph stays valid."""
        sms = self._sms.get(device.index)
        if sms is None:
            sms = self._sms[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
        splits = 1
        while splits < self.MAX_SPLITS and programs * splits < sms:
            splits *= 2
        return splits

    def attend(self, q, k_cache, v_cache, ctx, scale):
        out = torch.empty_like(q)
        n_seqs = ctx.context_lens_t.shape[0]
        kv_heads, block_size, head_dim = k_cache.shape[2], k_cache.shape[1], q.shape[2]
        group = q.shape[1] // kv_heads
        tiles = triton.cdiv(ctx.max_q_len * group, self.BLOCK_M)
        n_rows = q.shape[0]
        # split by the tiles an average sequence fills: a CUDA graph's grid holds the longest
        # query it may see, and the programs past a sequence's own queries return at once
        busy_tiles = triton.cdiv(triton.cdiv(n_rows, n_seqs) * group, self.BLOCK_M)
        splits = self.splits(n_seqs * kv_heads * min(tiles, busy_tiles), q.device)
        if splits > 1:
            o_part = torch.empty(splits, n_rows, q.shape[1], head_dim, dtype=torch.float32, device=q.device)
            m_part = torch.empty(splits, n_rows, q.shape[1], dtype=torch.float32, device=q.device)
            l_part = torch.empty_like(m_part)
        else:
            o_part = m_part = l_part = out   # unused
        use_pdl = pdl.enabled(q.device)
        _paged_attention[(n_seqs, kv_heads, tiles * splits)](
            q, k_cache, v_cache, out, o_part, m_part, l_part, ctx.block_tables, ctx.cu_seqlens_q,
            ctx.q_lens_t, ctx.context_lens_t, scale, q.stride(0), q.stride(1), k_cache.stride(0),
            k_cache.stride(1), k_cache.stride(2), ctx.block_tables.stride(0), n_rows, splits, GROUP=group,
            HEAD_DIM=head_dim, BLOCK_M=self.BLOCK_M, BLOCK_N=max(self.BLOCK_N, block_size), PAGE=block_size,
            IEEE=q.dtype == torch.float32, PDL=use_pdl, launch_pdl=use_pdl)
        if splits > 1:
            # rows of padding tokens in a graph were never written: their output is garbage,
            # as it is without splits, and nothing reads it
            _merge_splits[(n_rows, q.shape[1])](o_part, m_part, l_part, out, out.stride(0), out.stride(1),
                                                n_rows, q.shape[1], splits, HEAD_DIM=head_dim,
                                                MAX_SPLITS=self.MAX_SPLITS, PDL=use_pdl, launch_pdl=use_pdl)
        return out


GPU_BACKENDS = {"triton": TritonBackend}

try:
    from flash_attn import flash_attn_with_kvcache

    class FlashAttnBackend(AttentionBackend):
        """flash-attn's paged kernel; queries padded to a uniform length per call."""
        name = "flash-attn"

        def attend(self, q, k_cache, v_cache, ctx, scale):
            n, qmax = ctx.context_lens_t.shape[0], ctx.max_q_len
            padded = q.new_zeros(n * qmax + 1, *q.shape[1:])
            idx = padded_query_index(ctx.cu_seqlens_q, ctx.q_lens_t, qmax, q.shape[0])
            padded[idx] = q
            # flash-attn aligns causal masks to the end of the keys; pad at the front
            out = flash_attn_with_kvcache(padded[:-1].view(n, qmax, *q.shape[1:]), k_cache, v_cache,
                                          cache_seqlens=ctx.context_lens_t, block_table=ctx.block_tables,
                                          softmax_scale=scale, causal=True)
            return out.reshape(n * qmax, *q.shape[1:])[idx.clamp(max=n * qmax - 1)]

    GPU_BACKENDS["flash-attn"] = FlashAttnBackend
except ImportError:
    pass
