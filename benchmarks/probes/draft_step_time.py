"""The 0.5B draft's decode step at bs 1: its CUDA graph replayed (with the LM head, as the
draft times itself at start; best of 3 x 200) and a whole engine ar step (host work and a
sync a step included), with its weights in bf16 and in fp8 (layers/fp8.py).

    python3 benchmarks/probes/draft_step_time.py [--fp8-weights off,on]
"""
import argparse
import gc

import torch

from pearl_runtime.bench.probe import ar_step_ms
from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.engine.step_timer import measure_step_ms
from pearl_runtime.models.synthetic import prepare_synthetic_pair


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp8-weights", default="off,on")
    draft_dir = prepare_synthetic_pair("qwen2.5-7b", "qwen2.5-0.5b", 0.8)[1]
    for fp8 in ap.parse_args().fp8_weights.split(","):
        eng = LLMEngine(EngineConfig(model=str(draft_dir), device="cuda", dtype="bfloat16", kv_cache_gb=2,
                                     max_num_seqs=16, fp8_weights=fp8))
        graph = [measure_step_ms(eng.runner, query_len=1, repeats=200)[1] for _ in range(3)]
        step = ar_step_ms(eng, [[300 + j for j in range(128)]], tokens=300)
        print(f"fp8 weights {fp8}: graph step ms {min(graph):.4f} (of 3: {' '.join(f'{x:.4f}' for x in graph)}) | "
              f"engine ar step ms {step:.4f}", flush=True)
        del eng
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
