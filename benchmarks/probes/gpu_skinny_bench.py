"""Skinny linears on the GPU: the layer chain (a decoder layer minus attention, distinct
weights per layer so nothing sits in L2) timed in a CUDA graph for the torch path and for the
Triton kernel with a few configs, then ar decode of whole engines with the skinny path off
and on. Correctness against the torch ops is tests/gpu/test_skinny_gpu.py.

    python3 benchmarks/probes/gpu_skinny_bench.py [--sweep] [--engines qwen2.5-7b,qwen2.5-0.5b]
    python3 benchmarks/probes/gpu_skinny_bench.py --ops qwen2.5-0.5b --chains "" --engines ""   # per-op config sweep
"""
import argparse
import gc
import itertools
import time
from functools import partial

import torch
import torch.nn.functional as F
import triton

from pearl_runtime.bench.probe import ar_step_ms, copy_bandwidth
from pearl_runtime.bench.roofline import weight_bytes_per_step
from pearl_runtime.layers import skinny as S
from pearl_runtime.layers.fused import enable_compile, ops as fused

# name: (layers, hidden, intermediate, q+k+v width[, o input width]); the 32B and 72B ones have
# 16 of their layers (the per-layer time is what they show), the -tp2 ones a rank's share at TP=2
SHAPES = {"qwen2.5-0.5b": (24, 896, 4864, 1152), "qwen2.5-1.5b": (28, 1536, 8960, 2048),
          "qwen2.5-7b": (28, 3584, 18944, 4608), "qwen2.5-32b": (16, 5120, 27648, 7168),
          "qwen2.5-32b-tp2": (16, 5120, 13824, 3584, 2560), "qwen2.5-72b-tp2": (16, 8192, 14784, 5120, 4096)}


def graph_ms(fn, reps=20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


class Chain:
    """L layers of (norm+qkv, o + add, norm+gate_up+silu, down + add), distinct weights."""

    def __init__(self, shape, M, dtype=torch.bfloat16):
        L, H, I, Q, O = (*shape, shape[1])[:5]
        d = dict(dtype=dtype, device="cuda")
        self.layers = [dict(qkv=torch.randn(Q, H, **d) * 0.02, bias=torch.randn(Q, **d) * 0.02,
                            o=torch.randn(H, O, **d) * 0.02, gu=torch.randn(2 * I, H, **d) * 0.02,
                            down=torch.randn(H, I, **d) * 0.02, g1=torch.ones(H, **d), g2=torch.ones(H, **d))
                       for _ in range(L)]
        self.bytes = sum(t.numel() * t.element_size() for lay in self.layers for t in lay.values())
        self.h = torch.randn(M, H, **d)
        self.a = torch.randn(M, O, **d)      # stands in for attention's output
        self.H = H

    def torch_path(self):
        x, res = self.h, self.h
        for lay in self.layers:
            h, res = fused.add_rms_norm(x, res, lay["g1"], 1e-6)
            F.linear(h, lay["qkv"], lay["bias"])
            x = F.linear(self.a, lay["o"])
            h, res = fused.add_rms_norm(x, res, lay["g2"], 1e-6)
            x = F.linear(fused.silu_mul(F.linear(h, lay["gu"])), lay["down"])
        return x

    def skinny_path(self, config=None):
        h = self.h
        for lay in self.layers:
            S.norm_linear(h, lay["g1"], 1e-6, lay["qkv"], lay["bias"], config=config)
            h = S.linear_add(self.a, lay["o"], h, config=config)
            m = S.norm_gate_up(h, lay["g2"], 1e-6, lay["gu"], config=config)
            h = S.linear_add(m, lay["down"], h, config=config)
        return h


def sweep_configs():
    for bn, bk, nw in itertools.product((1, 2, 4, 8), (256, 512, 1024, 2048), (4, 8)):
        if bn * bk <= 1024 * nw * 2:
            yield dict(block_n=bn, block_k=bk, num_warps=nw)


def op_configs(K, gated):
    """Tiles up to the whole row, at most 128 weight elements a thread."""
    for bn, bk, nw in itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096, 8192), (4, 8)):
        if bk <= max(512, triton.next_power_of_2(K)) and bn * bk * (2 if gated else 1) <= 128 * 32 * nw:
            yield dict(block_n=bn, block_k=bk, num_warps=nw)


def ops(names, copy, layers=24):
    """Each linear of a layer alone, `layers` distinct weights in one graph, every config:
    the per-shape pick that default_config should make. torch: the reference ops (cuBLAS and
    the norm / SiLU / add) in the same graph."""
    print("\n| shape | op | N x K | MB | torch us | default us | GB/s | best us | GB/s | % copy | best config |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        _, H, I, Q, O = (*SHAPES[name], SHAPES[name][1])[:5]
        d = dict(dtype=torch.bfloat16, device="cuda")
        for op, N, K in (("qkv", Q, H), ("o", H, O), ("gate_up", I, H), ("down", H, I)):
            gated = op == "gate_up"
            ws = [torch.randn((2 if gated else 1) * N, K, **d) * 0.02 for _ in range(layers)]
            x, g, r, b = torch.randn(1, K, **d), torch.ones(K, **d), torch.randn(1, N, **d), torch.randn(N, **d)

            def run(cfg, ref=False):
                for w in ws:
                    if op == "qkv":
                        (S.reference_norm_linear if ref else partial(S.norm_linear, config=cfg))(x, g, 1e-6, w, b)
                    elif gated:
                        (S.reference_norm_gate_up if ref else partial(S.norm_gate_up, config=cfg))(x, g, 1e-6, w)
                    else:
                        (S.reference_linear_add if ref else partial(S.linear_add, config=cfg))(x, w, r)
            mb = sum(w.numel() * 2 for w in ws) / layers / 1e6
            t_ref = graph_ms(lambda: run(None, ref=True), reps=50) / layers * 1e3
            t_def = graph_ms(lambda: run(None), reps=50) / layers * 1e3
            best, best_cfg = t_def, "default"
            for cfg in op_configs(K, gated):
                try:
                    t = graph_ms(lambda: run(cfg), reps=50) / layers * 1e3
                except Exception as e:
                    print(f"  {op} config {cfg} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                if t < best:
                    best, best_cfg = t, cfg
            print(f"| {name} | {op} | {N} x {K} | {mb:.1f} | {t_ref:.2f} | {t_def:.2f} | {mb * 1e3 / t_def:.0f} | "
                  f"{best:.2f} | {mb * 1e3 / best:.0f} | {100 * mb * 1e3 / best / copy:.0f}% | {best_cfg} |", flush=True)
            del ws
            torch.cuda.empty_cache()


def chains(names, rows, sweep, copy):
    print("\n| shape | M | weights MB | torch ms | skinny ms (default) | GB/s (default) | % copy | best sweep ms | best config |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for M in rows:
            c = Chain(SHAPES[name], M)
            t_torch = graph_ms(c.torch_path)
            t_sk = graph_ms(c.skinny_path)
            best, best_cfg = t_sk, "default"
            if sweep:
                for cfg in sweep_configs():
                    try:
                        t = graph_ms(lambda: c.skinny_path(cfg))
                    except Exception as e:   # a config that does not compile or fit
                        print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
                        continue
                    if t < best:
                        best, best_cfg = t, cfg
            gbps = c.bytes / (t_sk / 1e3) / 1e9
            print(f"| {name} | {M} | {c.bytes / 1e6:.0f} | {t_torch:.3f} | {t_sk:.3f} | {gbps:.0f} | "
                  f"{100 * gbps / copy:.0f}% | {best:.3f} | {best_cfg} |", flush=True)
            del c
            torch.cuda.empty_cache()


def engines(names, copy, batches=(1,)):
    """ar decode of whole engines, cuBLAS vs the skinny kernel (steps of up to
    skinny.rows_for(hidden) rows: two for draft-sized models, one for targets; past that both
    run cuBLAS, a check that the choice costs nothing there)."""
    from pearl_runtime.config import EngineConfig
    from pearl_runtime.engine.llm_engine import LLMEngine
    from pearl_runtime.models.synthetic import prepare_synthetic_pair
    print("\n| model | linears | bs | ms/step | weight GB/s | % copy |")
    print("|---|---|---|---|---|---|")
    for name in names:
        tdir = prepare_synthetic_pair(name, "qwen2.5-0.5b", 0.8)[0] if name in ("qwen2.5-7b", "qwen2.5-32b") else \
            prepare_synthetic_pair("qwen2.5-72b", name, 0.8)[1]
        weights = weight_bytes_per_step(tdir, "bfloat16")["bytes"]
        for mode in ("off", "triton"):
            eng = LLMEngine(EngineConfig(model=str(tdir), device="cuda", dtype="bfloat16", kv_cache_gb=2,
                                         max_num_seqs=16, skinny_linears=mode))
            for bs in batches:
                dt = ar_step_ms(eng, [[300 + 7 * i + j for j in range(128)] for i in range(bs)], tokens=200) / 1e3
                gbps = weights / dt / 1e9
                print(f"| {name} | {mode} | {bs} | {dt * 1e3:.3f} | {gbps:.0f} | {100 * gbps / copy:.0f}% |", flush=True)
            del eng
            gc.collect()
            torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--chains", default="qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b")
    p.add_argument("--rows", default="1")
    p.add_argument("--engines", default="qwen2.5-7b,qwen2.5-0.5b")
    p.add_argument("--engine-bs", default="1", help="batch sizes of the engine ar steps")
    p.add_argument("--ops", default="", help="shapes whose linears are swept one by one")
    args = p.parse_args()
    enable_compile()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    copy = copy_bandwidth("cuda")["gbps"]
    print(f"copy bandwidth {copy:.0f} GB/s (1 GiB device copy, read + write, best of 10)")
    if args.ops:
        ops(args.ops.split(","), copy)
    chains([n for n in args.chains.split(",") if n], [int(m) for m in args.rows.split(",")], args.sweep, copy)
    if args.engines:
        engines(args.engines.split(","), copy, [int(b) for b in args.engine_bs.split(",")])


if __name__ == "__main__":
    main()
