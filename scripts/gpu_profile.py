"""Where a bs=1 decode step goes: GPU kernel time vs wall time (torch profiler)."""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.models.synthetic import prepare_synthetic_pair
from pearl_runtime.sampling import SamplingParams

tdir, _ = prepare_synthetic_pair(sys.argv[1], "qwen2.5-0.5b", 0.8)
eng = LLMEngine(EngineConfig(model=str(tdir), device="cuda", dtype="bfloat16", kv_cache_gb=4, max_num_seqs=64))
eng.add([300 + j for j in range(128)], SamplingParams(max_tokens=400, ignore_eos=True))
for _ in range(20):
    eng.step()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(50):
    eng.step()
torch.cuda.synchronize()
print(f"wall per step {(time.perf_counter() - t) / 50 * 1e3:.2f} ms")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(20):
        eng.step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
# host-side split of one step
import cProfile, pstats
pr = cProfile.Profile(); pr.enable()
for _ in range(20):
    eng.step()
pr.disable()
pstats.Stats(pr).sort_stats("cumulative").print_stats(18)
