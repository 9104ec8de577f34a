"""Debug: the synthetic 7B target's calibration with each attention backend."""
import logging
import sys

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.model_runner import ModelRunner
from pearl_runtime.models.synthetic import prepare_synthetic_pair

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
tdir, _ = prepare_synthetic_pair("qwen2.5-7b", "qwen2.5-0.5b", 0.8)
for backend in sys.argv[1:]:
    r = ModelRunner(EngineConfig(model=str(tdir), device="cuda", dtype="bfloat16", kv_cache_gb=2,
                                 attention_backend=backend, cuda_graphs=False))
    print(backend, r.synthetic.get("measured_accept"))
    del r
