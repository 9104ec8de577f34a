"""The test fixtures themselves: tokenizer round-trips, architecture features, peaked logits,
draft agreement levels."""
import json
import random

import pytest
import torch
from safetensors import safe_open

from tests.tiny_models import (EOS_TOKEN, greedy_agreement, hf_greedy, hf_logits, load_hf,
                               make_tokenizer)


def test_tokenizer_roundtrip_and_chat_template(tmp_path):
    tok = make_tokenizer(tmp_path)
    assert 400 <= len(tok) <= 520
    text = "héllo wörld — 日本語 🙂\n\tdef f(x):\n        return x  # ünïcode"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()), "merges should compress the text"
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.encode(text, add_special_tokens=False) == ids
    assert again.eos_token == EOS_TOKEN
    chat = again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(again.encode(special, add_special_tokens=False)) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_arch_features(tiny_model_factory, arch):
    d = tiny_model_factory(arch)
    cfg = json.loads((d / "config.json").read_text())
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias") if arch == "qwen2" else None
    from transformers import AutoTokenizer
    assert cfg["eos_token_id"] == AutoTokenizer.from_pretrained(str(d)).convert_tokens_to_ids(EOS_TOKEN)
    assert tok_cfg["eos_token"] == EOS_TOKEN
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (arch == "qwen3")
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (arch == "qwen2")
    if bias is not None:
        assert bias.abs().mean() > 0.1
    assert "lm_head.weight" in names


def test_tied_variant(qwen2_tied_dir):
    cfg = json.loads((qwen2_tied_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    m = load_hf(qwen2_tied_dir)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_logits_are_peaked_and_generations_varied(any_model_dir, hf_model):
    m = hf_model(any_model_dir)
    rng = random.Random(0)
    gaps = []
    for n in (1, 20, 120):
        p = [rng.randrange(450) for _ in range(n)]
        out = hf_greedy(m, p, 48)
        assert len(set(out)) >= 12, f"degenerate generation {out}"
        top = hf_logits(m, p + out)[n - 1:].topk(2, -1).values
        gaps.append(top[:, 0] - top[:, 1])
    gaps = torch.cat(gaps)
    assert gaps.median() > 0.3, gaps.median()
    assert (gaps < 0.1).float().mean() < 0.25


def test_draft_agreement_levels(llama_dir, draft_factory, hf_model):
    rng = random.Random(1)
    prompts = [[rng.randrange(450) for _ in range(n)] for n in (3, 40, 100)]
    target = hf_model(llama_dir)
    rates = {kind: greedy_agreement(target, load_hf(draft_factory(llama_dir, kind)), prompts, 48)
             for kind in ("copy", "perturbed", "unrelated")}
    assert rates["copy"] == 1.0
    assert 0.4 <= rates["perturbed"] <= 0.9, rates
    assert rates["unrelated"] < 0.2, rates
