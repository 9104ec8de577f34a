"""Debug: why the synthetic target's self-check fails under CUDA MPS.

Runs the same checks in a child process without MPS and under MPS at several SM shares:
the SM count the process sees, a bf16 GEMM against fp32, the CUDA RNG, and a synthetic
0.5B-shaped target's build + calibration (its self-check) with each attention backend."""
import json
import os
import subprocess
import sys

CHILD = r'''
import json, logging, torch
from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.model_runner import ModelRunner
from pearl_runtime.models.synthetic import prepare_synthetic_pair
logging.basicConfig(level=logging.WARNING)
out = {"sms": torch.cuda.get_device_properties(0).multi_processor_count}
for m, k, n in ((1, 3584, 4608), (16, 3584, 18944), (1024, 896, 4096), (4096, 4096, 4096)):
    a = torch.randn(m, k, device="cuda"); b = torch.randn(k, n, device="cuda")
    ref = a.double() @ b.double()
    for dt in (torch.bfloat16, torch.float32):
        err = ((a.to(dt) @ b.to(dt)).double() - ref).abs().max().item() / ref.abs().max().item()
        out[f"gemm_{m}x{k}x{n}_{str(dt)[6:]}"] = round(err, 4)
g = torch.Generator(device="cuda").manual_seed(0)
out["randn_sum"] = torch.randn(1 << 20, generator=g, device="cuda").sum().item()
out["randperm_head"] = torch.randperm(151936, generator=torch.Generator(device="cuda").manual_seed(0), device="cuda")[:4].tolist()
tdir, _ = prepare_synthetic_pair("qwen2.5-0.5b", "qwen2.5-0.5b", 0.8)
for backend in ("triton",):
    try:
        r = ModelRunner(EngineConfig(model=str(tdir), device="cuda", dtype="bfloat16", kv_cache_gb=1,
                                     attention_backend=backend, cuda_graphs=False, compile_ops=False))
        out[backend] = r.synthetic.get("measured_accept")
        del r
    except Exception as e:
        out[backend] = f"{type(e).__name__}: {e}"[:300]
print("RESULT " + json.dumps(out))
'''


def child(extra_env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, **extra_env},
                          capture_output=True, text=True, timeout=300)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"rc": done.returncode, "stderr": done.stderr[-1500:]}


if __name__ == "__main__":
    from pearl_runtime.bench.mps import mps_daemon
    print("no MPS:", child({}), flush=True)
    with mps_daemon((100, 100)) as env:
        for share in sys.argv[1:] or ("100", "90", "80", "70", "50", "20"):
            print(f"MPS {share}%:", child({**env["target"], "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": share}), flush=True)
