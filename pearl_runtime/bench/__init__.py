"""`pearl bench`: autoregressive vs speculative vs PEARL decoding through the real services,
with the per-round time split, HBM roofline and a separate-GPU projection (see run.py)."""
