"""Where a draft round goes on the GPU: a mirror of one (or a few) sequences, gamma greedy
steps through `Drafter.draft` (the chained path), wall time per round vs GPU kernel time.
Usage: python3 scripts/gpu_draft_profile.py [draft_shape] [gamma] [batch]"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from draft_service.drafter import Drafter, Mirror
from pearl_runtime.config import EngineConfig
from pearl_runtime.models.synthetic import prepare_synthetic_pair
from pearl_runtime.sampling import SamplingParams

shape = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-0.5b"
gamma = int(sys.argv[2]) if len(sys.argv) > 2 else 4
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 1
_, ddir = prepare_synthetic_pair("qwen2.5-7b", shape, 0.8)
d = Drafter(EngineConfig(model=str(ddir), device="cuda", dtype="bfloat16", kv_cache_gb=2, max_num_seqs=64))
mirror = Mirror()
params = SamplingParams(max_tokens=4000, ignore_eos=True)
d.apply(mirror, [(i, [300 + (i * 7 + j) % 1000 for j in range(256)], params) for i in range(batch)], [], [])


def round_():
    """One draft round, then a verdict that accepts all but the last draft token (the mirror
    rolls back one token and takes a 'target' token, as after a partial acceptance)."""
    out = d.draft(mirror, gamma)
    verdicts = []
    for sid, seq in mirror.seqs.items():
        num = len(seq)
        verdicts.append((sid, num, (seq.token_ids[-1] + 1) % 1000 + 300))
    d.apply(mirror, [], [], verdicts)
    return out


for _ in range(10):
    round_()
torch.cuda.synchronize()
n = 100
t = time.perf_counter()
for _ in range(n):
    round_()
torch.cuda.synchronize()
wall = (time.perf_counter() - t) / n * 1e3
print(f"{shape} bs={batch} gamma={gamma}: {wall:.3f} ms a round, {wall / gamma:.3f} ms a draft token; paths {dict(d.paths)}")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(20):
        round_()
    torch.cuda.synchronize()
events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
gpu_us = sum(e.self_device_time_total for e in events) / 20
print(f"GPU kernel time {gpu_us / 1e3:.3f} ms a round ({gpu_us / 1e3 / wall * 100:.0f}% of wall)")
print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=70))
