"""In-process device measurements for `pearl bench`, run in a short-lived child process
before the services start, so that their GPU memory is wholly free again afterwards:

- machine: GPU name and count, torch / CUDA versions;
- copy bandwidth: a large device-to-device copy, (bytes read + bytes written) / time, best
  of several (the practical HBM ceiling a decode step can approach);
- HF baseline: transformers `generate` (greedy, batch 1, exactly max_tokens new tokens) on a
  model of the same config: the checkpoint where the directory has weights, otherwise
  random weights built directly on the device.

    python -m pearl_runtime.bench.probe REQUEST.json RESULT.json
"""
import json
import platform
import sys
import time
from pathlib import Path

import torch


def machine(device: str) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "hostname": platform.node(), "gpu": None, "gpu_count": 0}
    if device.startswith("cuda"):
        dev = torch.device(device)
        info.update(gpu=torch.cuda.get_device_name(dev), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gb=round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1))
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: str, mib: int = 1024, repeats: int = 10) -> dict:
    """Best-of-`repeats` device-to-device copy of `mib` MiB: GB/s counting read + write."""
    dev = torch.device(device)
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=dev)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    moved = 2 * src.numel()
    del src, dst
    return {"bytes_per_copy": moved, "best_s": best, "gbps": moved / best / 1e9, "repeats": repeats}


def ar_step_ms(engine, prompts: list[list[int]], tokens: int, warm_tokens: int = 16) -> float:
    """ms a greedy decode step of `engine` over `prompts` as one batch: a warm-up generate (graphs,
    compiles, the prefix cache), then `tokens` steps timed end to end, prefill included."""
    from pearl_runtime.sampling import SamplingParams
    dev = engine.runner.device
    engine.generate(prompts, SamplingParams(max_tokens=warm_tokens, ignore_eos=True))
    _sync(dev)
    t = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=tokens, ignore_eos=True))
    _sync(dev)
    return (time.perf_counter() - t) / tokens * 1e3


def _hf_model(model_dir: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    if any(Path(model_dir).glob("*.safetensors")):
        try:                         # straight onto the GPU (needs accelerate)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=str(device))
        except (ImportError, ValueError):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        return model.eval(), "checkpoint"
    cfg = AutoConfig.from_pretrained(model_dir)
    with device:                     # initialize on the device: random init of 70B on CPU takes minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval(), "random weights (same config)"


@torch.no_grad()
def hf_baseline(model_dir: str, device: str, dtype: str, prompt_ids: list[int], max_tokens: int) -> dict:
    """Greedy `generate` of exactly `max_tokens` tokens at batch 1, after one short warm-up."""
    from transformers import GenerationConfig

    from pearl_runtime.config import DTYPES
    dev = torch.device(device)
    model, weights = _hf_model(model_dir, dev, DTYPES[dtype])
    ids = torch.tensor([prompt_ids], device=dev)

    def run(n: int) -> float:
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                              pad_token_id=0, bos_token_id=None)
        _sync(dev)
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        _sync(dev)
        assert out.shape[1] - ids.shape[1] == n, (out.shape, n)
        return time.perf_counter() - t

    run(min(8, max_tokens))
    wall = run(max_tokens)
    model = None   # free its memory before the services start
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"weights": weights, "wall_s": wall, "tokens": max_tokens, "tokens_per_s": max_tokens / wall,
            "step_ms": wall / max_tokens * 1e3, "prompt_tokens": len(prompt_ids)}


def main(request_path: str, result_path: str) -> None:
    req = json.loads(Path(request_path).read_text())
    out = {"machine": machine(req["device"])}
    out["copy"] = copy_bandwidth(req["device"], mib=req.get("copy_mib", 1024))
    if req.get("hf_model"):
        out["hf_baseline"] = hf_baseline(req["hf_model"], req["device"], req["dtype"], req["prompt_ids"],
                                         req["max_tokens"])
    Path(result_path).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
