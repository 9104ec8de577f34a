"""A 7B engine's verify step at bs 1 (graph replay + one LM-head row, as auto gamma times it)
for q tokens, with the engine built under each of torch's BLAS back ends.

    python3 benchmarks/probes/verify_blas.py
"""
import gc

import torch

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.engine.step_timer import measure_step_ms
from pearl_runtime.models.synthetic import prepare_synthetic_pair

QUERY_LENS = [1, 4, 5, 6, 8]


def main():
    tdir = prepare_synthetic_pair("qwen2.5-7b", "qwen2.5-0.5b", 0.8)[0]
    print(torch.cuda.get_device_name(), "| default BLAS:", torch.backends.cuda.preferred_blas_library())
    print("| library | " + " | ".join(f"q{q}" for q in QUERY_LENS) + " |")
    for lib in ("default", "cublaslt", "cublas"):
        if lib != "default":
            torch.backends.cuda.preferred_blas_library(lib)
        eng = LLMEngine(EngineConfig(model=str(tdir), device="cuda", dtype="bfloat16", kv_cache_gb=2, max_num_seqs=1))
        times = [measure_step_ms(eng.runner, query_len=q, repeats=50).get(1, float("nan")) for q in QUERY_LENS]
        print(f"| {lib} | " + " | ".join(f"{t:.3f}" for t in times) + " |", flush=True)
        del eng
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
