"""flash-attn's padded query layout from a packed (CUDA-graph) step, on the CPU."""
import torch

from pearl_runtime.attention.flash_layout import padded_query_index


def test_packed_rows_land_at_the_end_of_their_padded_slot():
    # three sequences of 1, 3 and 2 queries packed in 6 rows, then 2 rows of graph padding
    q_lens = torch.tensor([1, 3, 2], dtype=torch.int32)
    cu = torch.tensor([0, 1, 4, 6], dtype=torch.int32)
    idx = padded_query_index(cu, q_lens, qmax=4, total=8)
    # slot i is rows [4i, 4i + 4); a sequence's queries fill the end of its slot
    assert idx.tolist() == [3, 5, 6, 7, 10, 11, 12, 12]


def test_sequences_past_the_step_take_no_rows():
    """A graph's batch bucket holds more sequences than the step: theirs have no queries."""
    q_lens = torch.tensor([2, 0, 0], dtype=torch.int32)
    cu = torch.tensor([0, 2, 2, 2], dtype=torch.int32)
    assert padded_query_index(cu, q_lens, qmax=2, total=4).tolist() == [0, 1, 6, 6]
