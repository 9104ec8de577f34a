#!/usr/bin/env bash
# One device call: the GPU test suite, then the one-GPU bench of issue #29 (ar, sd, auto; HF for
# reference), each result under $OUT. Run from the repository root on the device machine, with
# the pure-Python wheels it lacks in .whl/ (structlog, grpcio-health-checking, grpcio-reflection).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
COMMIT=${1:-unknown}; SUITE_S=${2:-300}; BENCH_S=${3:-240}
export NCCL_NVLS_ENABLE=0 PEARL_GIT_COMMIT="$COMMIT"
nvidia-smi -L
# into a folder of their own on PYTHONPATH (the services' subprocesses inherit it): the machine's
# system pip may refuse or install for another interpreter
python3 -m pip install -q --no-deps --target .whl/site .whl/*.whl 2>&1 | grep -v "root" | tail -2
export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import structlog, grpc_health, grpc_reflection; print('wheels ok')"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout "$SUITE_S" python3 -m pytest -v -m gpu tests --continue-on-collection-errors -p no:cacheprovider -rfEs \
  --junitxml="$OUT/gpu_junit.xml" > "$OUT/gpu_suite.txt" 2>&1
echo "gpu suite rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_suite.txt" | tail -25
echo "tests passed: $(grep -c " PASSED" "$OUT/gpu_suite.txt"), failed: $(grep -c " FAILED" "$OUT/gpu_suite.txt"), skipped: $(grep -c " SKIPPED" "$OUT/gpu_suite.txt") (counts a timed-out run too)"
timeout "$BENCH_S" python3 -m pearl_runtime.cli bench --seed 0 --prompt-len 256 --max-tokens 128 --batch-sizes 1,16 \
  --accept 0.8 --synthetic qwen2.5-7b/qwen2.5-0.5b --gamma auto --modes ar,sd,auto --hf-baseline \
  --label gpu-check --out "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"
tail -40 "$OUT/bench.txt"
