"""Step time against the attention kernel's split cap (PEARL_ATTN_MAX_SPLITS): the 7B verify
(7 tokens) and the 0.5B draft decode step (1 token), graph + LM head row, at bs 1, per
context length. Each cap builds its engines anew (the split count is fixed at capture).

    python3 scripts/attention_splits.py [--caps 1,2,4,16] [--contexts 256,1024]
"""
import argparse
import gc
import os

import torch

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.engine.step_timer import measure_step_ms
from pearl_runtime.models.synthetic import prepare_synthetic_pair


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--caps", default="1,2,4,16")
    ap.add_argument("--contexts", default="256,1024")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    target, draft = prepare_synthetic_pair("qwen2.5-7b", "qwen2.5-0.5b", 0.8)
    print(torch.cuda.get_device_name())
    print("| model | query | split cap | " + " | ".join(f"ctx {c} ms" for c in contexts) + " |")
    print("|---|---|---|" + "---|" * len(contexts))
    for name, model, q in (("0.5B draft", draft, 1), ("7B verify", target, 7)):
        for cap in args.caps.split(","):
            os.environ["PEARL_ATTN_MAX_SPLITS"] = cap
            eng = LLMEngine(EngineConfig(model=str(model), device="cuda", dtype="bfloat16", kv_cache_gb=2,
                                         max_num_seqs=1))
            times = [min(measure_step_ms(eng.runner, query_len=q, context_len=c, repeats=100)[1] for _ in range(3))
                     for c in contexts]
            print(f"| {name} | {q} | {cap} | " + " | ".join(f"{t:.4f}" for t in times) + " |", flush=True)
            del eng
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
