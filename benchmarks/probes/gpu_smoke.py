"""Quick GPU check: build a synthetic pair, time ar decode at bs=1 against the copy bandwidth."""
import logging
import sys
import time

from pearl_runtime.bench.probe import ar_step_ms, copy_bandwidth
from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.models.synthetic import prepare_synthetic_pair

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
target, draft = sys.argv[1], sys.argv[2]
t0 = time.time()
tdir, ddir = prepare_synthetic_pair(target, draft, 0.8)
copy_bw = copy_bandwidth("cuda")["gbps"]
eng = LLMEngine(EngineConfig(model=str(tdir), device="cuda", dtype="bfloat16", kv_cache_gb=4, max_num_seqs=64))
print(f"built + calibrated {target} in {time.time() - t0:.1f}s")
weights = sum(p.numel() * p.element_size() for p in eng.runner.model.parameters())
emb = eng.runner.model.model.embed_tokens.weight
weights -= emb.numel() * emb.element_size()   # only a few rows of the embedding are read
for bs in (1, 8, 32):
    dt = ar_step_ms(eng, [[(i * 7 + j) % 1000 + 300 for j in range(128)] for i in range(bs)], tokens=256) / 1e3
    print(f"ar bs={bs}: {dt * 1e3:.2f} ms/step, {bs / dt:.0f} tok/s, weights {weights / 1e9:.2f} GB -> "
          f"{weights / dt / 1e9:.0f} GB/s = {weights / dt / 1e9 / copy_bw * 100:.0f}% of copy bw {copy_bw:.0f} GB/s")
print("graph replays", eng.runner.graphs.hits)
