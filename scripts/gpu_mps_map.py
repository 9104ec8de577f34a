"""Debug: which CUDA MPS SM shares give right bf16 GEMMs for a pair's matrix shapes, and
whether a cuBLAS setting avoids the wrong ones. Prints one line per (share, setting).

    python scripts/gpu_mps_map.py qwen2.5-7b,qwen2.5-0.5b 20,30,40,50,90,100
"""
import os
import subprocess
import sys

CHILD = r'''
import sys, torch
from pearl_runtime.engine.gemm_check import check_gemms, GemmCheckError
from pearl_runtime.models.synthetic import SHAPES
if sys.argv[2] == "cublaslt":
    torch.backends.cuda.preferred_blas_library("cublaslt")
elif sys.argv[2] == "cublas":
    torch.backends.cuda.preferred_blas_library("cublas")
bad = []
for name in sys.argv[1].split(","):
    _, h, _, heads, kv, inter, _, extra = SHAPES[name]
    hd = extra.get("head_dim", h // heads)
    for shape in ((h, (heads + 2 * kv) * hd), (h, 2 * inter), (inter, h), (heads * hd, h)):
        try:
            check_gemms(torch.device("cuda:0"), torch.bfloat16, [shape])
        except GemmCheckError as e:
            bad.append(str(e).split(" on ")[0].replace("torch.bfloat16 GEMM ", ""))
print("RESULT", torch.cuda.get_device_properties(0).multi_processor_count, "SMs, wrong:", bad or "none")
'''

if __name__ == "__main__":
    from pearl_runtime.bench.mps import mps_daemon
    models, shares = sys.argv[1], sys.argv[2].split(",")
    settings = sys.argv[3].split(",") if len(sys.argv) > 3 else ["default", "nows", "cublaslt"]
    with mps_daemon((100, 100)) as env:
        for share in shares:
            for setting in settings:
                extra = {**env["target"], "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": share}
                if setting == "nows":
                    extra["CUBLAS_WORKSPACE_CONFIG"] = ":0:0"
                done = subprocess.run([sys.executable, "-c", CHILD, models, setting], env={**os.environ, **extra},
                                      capture_output=True, text=True, timeout=120)
                line = next((x[7:] for x in done.stdout.splitlines() if x.startswith("RESULT")), done.stderr[-300:])
                print(f"share {share:>3}% {setting:>9}: {line}", flush=True)
