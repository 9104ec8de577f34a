"""Derive a draft from a target's own files until a trained small draft ships.

The embedded demo's draft is the target with every linear weight re-quantized to 4 bits
(symmetric, groups of 32) and stored dequantized: same tokenizer by construction, ~80%
greedy agreement on SmolLM2-135M-Instruct. It is not cheaper to run than the target; it
exists to exercise the whole PEARL pipeline on real weights. (Truncating the target to its
first layers agrees on under 25% of tokens for this model, so we do not use that.)"""
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pearl_runtime.utils.loader import checkpoint_files


def fake_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    levels = 2 ** (bits - 1) - 1
    g = w.float().reshape(-1, group)
    scale = g.abs().amax(1, keepdim=True).clamp_min(1e-8) / levels
    return (torch.round(g / scale) * scale).reshape(w.shape).to(w.dtype)


def derive_quantized_draft(target_dir: str | Path, out_dir: str | Path, bits: int = 4, group: int = 32) -> Path:
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    tensors = {}
    for path in checkpoint_files(target_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                linear = t.dim() == 2 and "embed_tokens" not in name and t.numel() % group == 0
                tensors[name] = fake_quantize(t, bits, group) if linear else t
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    for f in target_dir.iterdir():
        if f.name == "config.json" or f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges",
                                                         "generation_config", "chat_template")):
            shutil.copy(f, tmp / f.name)
    (tmp / "SOURCE.txt").write_text(f"{target_dir} with linear weights re-quantized to int{bits} "
                                    f"(groups of {group}), stored dequantized\n")
    tmp.rename(out_dir)
    return out_dir
