"""Where the 7B verify step's time goes against a one-token step: each step's CUDA graph (plus
its LM-head rows) replayed under the torch profiler, kernels grouped by name, us a step.

    python3 benchmarks/probes/verify_profile.py [--queries 1,7]

The last row of each table is the gap: wall time a step minus the kernels' sum (launch
latency between the graph's kernels and the host's replay call).
"""
import argparse
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.engine.step_timer import measure_step_ms
from pearl_runtime.models.synthetic import prepare_synthetic_pair

STEPS = 20


def group(name: str) -> str:
    """A kernel's family: cuBLAS tiles by their shape tag, Triton kernels by function name."""
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"_\d+$", "", name)
    return name[:70]


def profile_query(runner, q: int) -> None:
    wall = measure_step_ms(runner, query_len=q, repeats=100)[1]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        measure_step_ms(runner, query_len=q, repeats=STEPS)
    per = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            g = per[group(e.name)]
            g[0] += e.device_time_total
            g[1] += 1
    steps = STEPS + 1   # measure_step_ms replays once before its timed loop
    total = sum(t for t, _ in per.values()) / steps
    print(f"\n### query {q}: wall {wall * 1e3:.0f} us a step, kernels {total:.0f} us\n")
    print("| kernel | calls a step | us a step |")
    print("|---|---|---|")
    for name, (t, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        print(f"| {name} | {n / steps:.0f} | {t / steps:.1f} |")
    print(f"| (gap: wall - kernels) | | {wall * 1e3 - total:.1f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", default="1,7")
    args = ap.parse_args()
    tdir = prepare_synthetic_pair("qwen2.5-7b", "qwen2.5-0.5b", 0.8)[0]
    eng = LLMEngine(EngineConfig(model=str(tdir), device="cuda", dtype="bfloat16", kv_cache_gb=2, max_num_seqs=1))
    print(torch.cuda.get_device_name(), time.strftime("%Y-%m-%d"))
    for q in (int(x) for x in args.queries.split(",")):
        profile_query(eng.runner, q)


if __name__ == "__main__":
    main()
