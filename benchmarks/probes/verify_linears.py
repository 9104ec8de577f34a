"""The 7B verify's linears at a few rows: cuBLAS (`F.linear`) against split-K forms of the
same product, each timed as a CUDA graph of 28 distinct weights (the layers' count, so L2
holds none of them), in us a linear and % of the copy bandwidth measured here.

    python3 benchmarks/probes/verify_linears.py [--rows 1,5,7,8] [--splits 2,4,8]

Split-K: W [N, K] viewed as S slices [S, N, K/S] (no copy: batch stride K/S, row stride K),
one strided-batched GEMM x_s @ W_s.T -> [S, M, N], then the sum over S. cuBLAS gives a
7-row product of a narrow projection (qkv: N 4608) only a few dozen tiles on 132 SMs.
"""
import argparse

import torch
import torch.nn.functional as F

# name -> (N, K) of the Qwen2.5-7B linears
SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
LAYERS = 28


def copy_gbs() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(20):
        b.copy_(a)
    t1.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 20 / (t0.elapsed_time(t1) * 1e-3) / 1e9


def split_k(x, w, s: int, fp32_sum: bool):
    n, k = w.shape
    ks = k // s
    ws = w.as_strided((s, n, ks), (ks, k, 1))
    xs = x.view(x.shape[0], s, ks).transpose(0, 1)          # [S, M, K/S]
    if fp32_sum:
        parts = torch.bmm(xs, ws.transpose(1, 2), out_dtype=torch.float32)
        return parts.sum(0).to(x.dtype)
    return torch.bmm(xs, ws.transpose(1, 2)).sum(0)


def time_graph(fn, repeats: int = 20) -> float:
    """us per call of fn (which runs LAYERS linears) replayed as one graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(repeats):
        g.replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1e3 / repeats / LAYERS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,5,7,8")
    ap.add_argument("--splits", default="2,4,8")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    splits = [int(s) for s in args.splits.split(",")]
    bw = copy_gbs()
    print(torch.cuda.get_device_name(), f"| copy {bw:.0f} GB/s | torch {torch.__version__}")
    print("| linear | MB | rows | form | us | % of copy | max abs err vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        mb = n * k * 2 / 1e6
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = (x.double() @ ws[0].double().T)
            forms = {"cuBLAS": lambda w: F.linear(x, w)}
            for s in splits:
                if k % s == 0:
                    forms[f"split {s} bf16"] = lambda w, s=s: split_k(x, w, s, False)
                    forms[f"split {s} fp32"] = lambda w, s=s: split_k(x, w, s, True)
            for form, f in forms.items():
                try:
                    err = (f(ws[0]).double() - ref).abs().max().item()
                    us = time_graph(lambda: [f(w) for w in ws])
                except Exception as e:   # noqa: BLE001 - a form torch lacks is a row, not a stop
                    print(f"| {name} | {mb:.1f} | {m} | {form} | failed: {type(e).__name__}: {e} | | |")
                    continue
                print(f"| {name} | {mb:.1f} | {m} | {form} | {us:.1f} | {mb * 1e6 / (us * 1e-6) / 1e9 / bw * 100:.0f} | "
                      f"{err:.2e} |", flush=True)
        ws = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
