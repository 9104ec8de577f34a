"""Draft steps beside verify steps on one GPU: a 7B verify (7 tokens, graph + LM head row) and
a 0.5B draft decode step (graph + LM head row) looped in two processes, each timed alone and
then while the other loops, per sharing setup: no MPS, MPS at given SM shares, and MPS with
one client at a lower priority (`CUDA_MPS_CLIENT_PRIORITY=1`, "below normal", where the
driver has it).

    python3 benchmarks/probes/mps_contention.py [--setups none,mps,mps-tlow,mps-dlow] [--seconds 4]

Prints one table row per setup: ms a step alone and together, and the bytes both moved
together as GB/s (weights per step x steps per second; KV and activations left out).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAIR = ("qwen2.5-7b", "qwen2.5-0.5b")
QUERY = {"target": 7, "draft": 1}


def worker(role: str, sync: Path, seconds: float) -> None:
    import torch
    from pearl_runtime.config import EngineConfig
    from pearl_runtime.engine.llm_engine import LLMEngine
    from pearl_runtime.engine.step_timer import measure_step_ms
    from pearl_runtime.models.synthetic import prepare_synthetic_pair

    model = prepare_synthetic_pair(*PAIR, 0.8)[0 if role == "target" else 1]
    eng = LLMEngine(EngineConfig(model=str(model), device="cuda", dtype="bfloat16", kv_cache_gb=1, max_num_seqs=1))
    weights_gb = sum(p.numel() * p.element_size() for n, p in eng.runner.model.named_parameters()
                     if "embed_tokens" not in n) / 1e9   # a step reads one embedding row
    q = QUERY[role]

    def loop(until: float) -> float:
        steps, spent = 0, 0.0
        while time.perf_counter() < until:
            spent += measure_step_ms(eng.runner, query_len=q, repeats=20)[1] * 20
            steps += 20
        return spent / max(steps, 1)

    def wait(name: str) -> None:
        while not (sync / name).exists():
            time.sleep(0.001)

    # built, then the target alone, then the draft alone (the GPU otherwise idle), then both
    (sync / f"{role}.built").touch()
    wait("target.built"), wait("draft.built")
    if role == "draft":
        wait("target.alone")
    alone = loop(time.perf_counter() + seconds / 2)
    (sync / f"{role}.alone").touch()
    wait("draft.alone")
    together = loop(time.perf_counter() + seconds)
    torch.cuda.synchronize()
    print(json.dumps({"role": role, "alone_ms": alone, "together_ms": together, "weights_gb": weights_gb}), flush=True)


def run_setup(name: str, seconds: float) -> dict:
    from contextlib import nullcontext
    from types import SimpleNamespace
    from pearl_runtime.bench.mps import mps_daemon
    from pearl_runtime.launch import Stack
    shares = (100, 100) if name.startswith("mps") else None
    sync = Path(tempfile.mkdtemp(prefix="contention-"))
    with (mps_daemon(shares) if shares else nullcontext(None)) as envs:
        procs = {}
        for role in ("target", "draft"):
            env = Stack(SimpleNamespace(), env=envs).child_env(role)   # the services' own environment rule
            if (name == "mps-tlow" and role == "target") or (name == "mps-dlow" and role == "draft"):
                env["CUDA_MPS_CLIENT_PRIORITY"] = "1"
            procs[role] = subprocess.Popen([sys.executable, __file__, "--role", role, "--sync", str(sync),
                                            "--seconds", str(seconds)], env=env, stdout=subprocess.PIPE, text=True)
        out = {}
        for role, p in procs.items():
            text, _ = p.communicate(timeout=600)
            lines = [l for l in text.splitlines() if l.startswith("{")]
            out[role] = json.loads(lines[-1]) if lines else {"error": f"rc {p.returncode}"}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--role")
    ap.add_argument("--sync")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--setups", default="none,mps,mps-tlow,mps-dlow")
    args = ap.parse_args()
    if args.role:
        return worker(args.role, Path(args.sync), args.seconds)
    from pearl_runtime.models.synthetic import prepare_synthetic_pair
    prepare_synthetic_pair(*PAIR, 0.8)   # config and tokenizer on disk once, before two processes race
    print("| setup | verify alone ms | verify together ms | draft alone ms | draft together ms | "
          "GB/s together |")
    print("|---|---|---|---|---|---|")
    for name in args.setups.split(","):
        r = run_setup(name, args.seconds)
        t, d = r.get("target", {}), r.get("draft", {})
        if "together_ms" not in t or "together_ms" not in d:
            print(f"| {name} | failed: {r} |", flush=True)
            continue
        gbs = t["weights_gb"] / t["together_ms"] * 1e3 + d["weights_gb"] / d["together_ms"] * 1e3
        print(f"| {name} | {t['alone_ms']:.3f} | {t['together_ms']:.3f} | {d['alone_ms']:.3f} | "
              f"{d['together_ms']:.3f} | {gbs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
