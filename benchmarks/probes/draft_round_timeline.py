"""Where a draft round's time goes between its graph steps: the device's timeline of one
`Drafter.draft` round (CUDA events around every step) against the host's.

    python3 benchmarks/probes/draft_round_timeline.py [gamma] [rounds]

Per round: host prep (round start -> the first step's event), each step on the device (event to
event: its graph, LM head, argmax and input copies; the last interval runs on to an event the host
records once it holds the tokens, so it includes the sync's tail). Medians over the rounds.
"""
import statistics
import sys
import time

import torch

from draft_service.drafter import Drafter, Mirror
from pearl_runtime.config import EngineConfig
from pearl_runtime.models.synthetic import prepare_synthetic_pair
from pearl_runtime.sampling import SamplingParams

gamma = int(sys.argv[1]) if len(sys.argv) > 1 else 6
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 50
_, ddir = prepare_synthetic_pair("qwen2.5-7b", "qwen2.5-0.5b", 0.8)
d = Drafter(EngineConfig(model=str(ddir), device="cuda", dtype="bfloat16", kv_cache_gb=2, max_num_seqs=64))
mirror = Mirror()
d.apply(mirror, [(1, [300 + j % 1000 for j in range(256)], SamplingParams(max_tokens=4000, ignore_eos=True))], [], [])
runner = d.runner
marks: list[tuple[str, torch.cuda.Event, float]] = []
execute = runner.execute


def timed_execute(step, ids=None):
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    marks.append(("step", ev, time.perf_counter()))
    out = execute(step, ids)
    return out


runner.execute = timed_execute


def verdict(full: bool):
    seq = mirror.seqs[1]
    if full:   # every draft token accepted: the target's bonus token follows them
        return [(1, len(seq) + 1, 300)]
    return [(1, len(seq), (seq.token_ids[-1] + 1) % 1000 + 300)]   # the last one rejected


rows = {"prep": [], "host total": []}
steps: dict[int, list[float]] = {}
for full in (False, True):
    for k in range(rounds + 5):
        torch.cuda.synchronize()
        marks.clear()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        d.apply(mirror, [], [], verdict(full))
        d.draft(mirror, gamma)
        t1 = time.perf_counter()   # the draft returned: its tokens are on the host
        end.record()
        end.synchronize()
        if k < 5:
            continue
        evs = [m[1] for m in marks] + [end]
        rows["prep"].append(start.elapsed_time(evs[0]))
        for i in range(len(marks)):
            steps.setdefault(i, []).append(evs[i].elapsed_time(evs[i + 1]))
        rows["host total"].append((t1 - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in rows.items()}
    st = [statistics.median(steps[i]) for i in sorted(steps)]
    print(f"gamma {gamma}, {'full acceptance (2-token catch-up)' if full else 'last token rejected'}: "
          f"host total {med['host total']:.3f} ms | prep {med['prep']:.3f} | steps "
          + " ".join(f"{s:.3f}" for s in st) + f" (sum {sum(st):.3f}; the last includes the sync's tail)")
    for v in rows.values():
        v.clear()
    steps.clear()
