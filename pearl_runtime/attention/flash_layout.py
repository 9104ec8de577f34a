"""The padded query layout flash-attn's paged kernel takes, built from our packed one."""
import torch


def padded_query_index(cu_seqlens_q: torch.Tensor, q_lens: torch.Tensor, qmax: int, total: int) -> torch.Tensor:
    """Where each of `total` packed query rows goes in an [n, qmax] layout padded at the front
    of each sequence (flash-attn aligns its causal mask to the end of the keys). Rows past the
    last sequence's queries (a CUDA graph's padding) go to row n * qmax, one past the layout.
    Device ops only, no host sync: it runs inside captured graphs."""
    n = q_lens.shape[0]
    r = torch.arange(total, device=q_lens.device, dtype=cu_seqlens_q.dtype)
    seq = torch.searchsorted(cu_seqlens_q[1:].contiguous(), r, right=True)
    live = seq < n
    seq = seq.clamp(max=n - 1)
    pos = seq * qmax + qmax - q_lens[seq] + r - cu_seqlens_q[seq]
    return torch.where(live, pos, n * qmax).long()
