"""Tiny random HF checkpoints (Llama, Qwen2, Qwen3) and a byte-level BPE tokenizer for tests.

Everything here is built from scratch on CPU in well under a second per model; no hub access.

    from tests.tiny_models import make_tiny_model, derive_draft, make_tokenizer

Random tiny models normally have near-uniform logits, so greedy decoding sits on near-ties and
any 1e-6 numerical difference flips a token. `make_tiny_model` scales the weights so logits are
peaked (median top-1/top-2 gap well above 0.1) while greedy generations stay varied.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
BPE_VOCAB_SIZE = 448          # 256 byte tokens + ~190 merges; specials come on top

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Fixed training text for the merges: a little English prose and a little Python.
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token from
the tokens before it. Speculative decoding lets a small draft model propose several tokens
and the large target model verify them in one forward pass; the output is the same as the
target's own greedy output. The server streams tokens to the client as soon as they are
committed. When the cache is full, the scheduler preempts the newest sequence and recomputes
it later. Hello world! How are you today? I am fine, thank you. What is the weather like?
It is sunny and warm in the morning and cold in the evening. Please write a short story
about a robot who learns to paint. Once upon a time there was a little robot named Pixel.

def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Sequence:
    def __init__(self, token_ids, params=None):
        self.token_ids = list(token_ids)
        self.params = params
        self.num_kv = 0

for i in range(10):
    print(f"value {i}: {fibonacci(i)}")

import torch
x = torch.zeros(4, 8, dtype=torch.float32)
return self.model(input_ids, positions)
"""


def make_tokenizer(out_dir: str | Path):
    """Train a byte-level BPE tokenizer on TRAINING_TEXT, save it to `out_dir` as a
    PreTrainedTokenizerFast with a ChatML chat template; returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token="<|endoftext|>", bos_token=None,
        unk_token=None, additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# weight scales that make logits peaked without collapsing generation into a constant loop
INIT_STD = 0.25         # all matrices except the embedding / head
EMBED_STD = 1.0         # embedding rows (the input RMSNorm removes their scale anyway)
HEAD_STD = 0.6          # lm_head rows: logit std ~ HEAD_STD * sqrt(hidden)
BIAS_STD = 0.5          # Qwen2 q/k/v bias
NORM_JITTER = 0.2       # RMSNorm weights ~ 1 + N(0, NORM_JITTER)


def _hf_config(arch: str, *, vocab: int, num_layers: int, hidden: int, heads: int, kv_heads: int,
               max_position_embeddings: int, tie: bool, eos_id: int, pad_id: int, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
              num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
              tie_word_embeddings=tie, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None,
              initializer_range=INIT_STD)
    if arch == "qwen3":
        kw["head_dim"] = hidden // heads
    kw.update(overrides)
    cfg = cls(**kw)
    cfg.architectures = [ARCHS[arch]]
    return cfg


@torch.no_grad()
def _init_weights(model, seed: int, tie: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):
            p.copy_(1 + NORM_JITTER * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(BIAS_STD * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_((HEAD_STD if tie else EMBED_STD) * torch.randn(p.shape, generator=g))
        elif name == "lm_head.weight":
            if not tie:
                p.copy_(HEAD_STD * torch.randn(p.shape, generator=g))
        else:
            fan_in = p.shape[1]
            p.copy_(INIT_STD * (64 / fan_in) ** 0.5 * torch.randn(p.shape, generator=g))


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, tie: bool = False,
                    num_layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    vocab: int | None = None, max_position_embeddings: int = 1024,
                    **overrides) -> Path:
    """Build a random HF checkpoint of `arch` (llama | qwen2 | qwen3) with peaked logits and
    save it (model.safetensors + config.json + tokenizer) to `out_dir`; returns the path.
    `overrides` go to the HF config (e.g. rope_scaling=..., intermediate_size=...)."""
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    out_dir = Path(out_dir)
    tok = make_tokenizer(out_dir)
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    vocab = vocab or _round_up(len(tok))
    cfg = _hf_config(arch, vocab=vocab, num_layers=num_layers, hidden=hidden, heads=heads,
                     kv_heads=kv_heads, max_position_embeddings=max_position_embeddings, tie=tie,
                     eos_id=eos_id, pad_id=pad_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    _init_weights(model, seed, tie)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def load_hf(model_dir: str | Path):
    """The transformers model of a tiny checkpoint, fp32, eval mode."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return model.float().eval()


def derive_draft(target_dir: str | Path, out_dir: str | Path, kind: str = "perturbed",
                 noise: float = 0.035, seed: int = 1) -> Path:
    """A draft checkpoint for `target_dir` in `out_dir`:
    - copy: identical weights (100% greedy agreement)
    - perturbed: every non-norm weight w gets w + noise * std(w) * N(0, 1). The tiny models are
      sensitive: greedy agreement with the target (draft argmax == target argmax along the
      target's greedy path) measured ~0.6-0.8 at noise=0.035, ~0.45-0.7 at 0.05, ~0.2-0.4
      at 0.12 (tests/test_tiny_models.py checks the default stays in [0.4, 0.9])
    - unrelated: same config, weights from another seed (agreement near chance)."""
    from safetensors.torch import load_file, save_file

    target_dir, out_dir = Path(target_dir), Path(out_dir)
    if kind not in ("copy", "perturbed", "unrelated"):
        raise ValueError(f"kind must be copy, perturbed or unrelated, got {kind!r}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(target_dir, out_dir)
    if kind == "copy":
        return out_dir
    cfg = json.loads((target_dir / "config.json").read_text())
    if kind == "unrelated":
        for f in out_dir.glob("*.safetensors*"):
            f.unlink()
        arch = {v: k for k, v in ARCHS.items()}[cfg["architectures"][0]]
        kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        return make_tiny_model(out_dir, arch, seed=seed, tie=cfg.get("tie_word_embeddings", False),
                               num_layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
                               heads=cfg["num_attention_heads"], kv_heads=kv, vocab=cfg["vocab_size"],
                               max_position_embeddings=cfg["max_position_embeddings"])
    g = torch.Generator().manual_seed(seed)
    for f in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(str(f))
        for name in sorted(tensors):
            t = tensors[name]
            if name.endswith("norm.weight"):
                continue   # keep the norms; noise there moves every logit at once
            tensors[name] = t + noise * t.std() * torch.randn(t.shape, generator=g, dtype=t.dtype)
        save_file(tensors, str(f), metadata={"format": "pt"})
    return out_dir


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding of exactly `max_new_tokens` tokens (EOS does not stop
    it and is not masked: the engine's ignore_eos keeps EOS as a normal token)."""
    from transformers import GenerationConfig
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=None,
                          eos_token_id=None, pad_token_id=model.config.pad_token_id,
                          bos_token_id=None)
    ids = torch.tensor([prompt_ids])
    # a checkpoint's own generation_config.json would put its EOS back into the merged config
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return out[0, len(prompt_ids):].tolist()


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """fp32 logits of a full forward over `token_ids`: [len, vocab]."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def assert_same_tokens(ours: list[int], ref: list[int], logits_fn=None, prompt: list[int] = (),
                       label: str = "") -> None:
    """Assert two token sequences are equal. On a mismatch the message names the first
    differing position and, given `logits_fn(token_ids) -> [len, vocab]` (e.g.
    `functools.partial(hf_logits, model)`) and the prompt, the reference's top-2 logit gap
    there (a gap near 0 means a numerical near-tie, not a logic bug)."""
    if list(ours) == list(ref):
        return
    n = min(len(ours), len(ref))
    pos = next((i for i in range(n) if ours[i] != ref[i]), n)
    msg = [f"{label}token mismatch at completion position {pos} "
           f"(lengths: ours {len(ours)}, ref {len(ref)})"]
    if pos < n:
        msg.append(f"ours {ours[pos]} vs ref {ref[pos]}; context ours {list(ours[max(0, pos - 3):pos + 3])} "
                   f"ref {list(ref[max(0, pos - 3):pos + 3])}")
        if logits_fn is not None:
            row = logits_fn(list(prompt) + list(ref[:pos]))[-1]
            top = row.topk(2)
            msg.append(f"reference top-2 {top.indices.tolist()} gap {float(top.values[0] - top.values[1]):.3g}; "
                       f"ref logit[ours]={float(row[ours[pos]]):.6g} ref logit[ref]={float(row[ref[pos]]):.6g}")
    raise AssertionError("; ".join(msg))


def greedy_agreement(target, draft, prompts: list[list[int]], max_new_tokens: int = 64) -> float:
    """Fraction of positions on the target's greedy path where the draft's argmax equals the
    target's (HF models, e.g. from load_hf)."""
    hits = total = 0
    for p in prompts:
        seq = list(p) + hf_greedy(target, p, max_new_tokens)
        a = hf_logits(target, seq)[len(p) - 1:-1].argmax(-1)
        b = hf_logits(draft, seq)[len(p) - 1:-1].argmax(-1)
        hits += int((a == b).sum())
        total += len(a)
    return hits / total
