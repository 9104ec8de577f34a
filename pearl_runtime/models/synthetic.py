"""Shape-faithful synthetic pairs: random-weight targets and drafts with the real shapes of
public checkpoints, built on the device in seconds, with a calibrated acceptance rate.

How agreement is made: both models share a random permutation pi of the vocabulary, and
each one's LM head maps the embedding of token v onto token pi(v), so with its layers silent
a model predicts pi(last token). The draft's layers are silent (their output projections are
zero; they still run, so the draft costs what the real one costs). The target's output
projections are scaled by s, and its layers push the prediction off pi(v) more often as s
grows: at start-up the target bisects s until its agreement with pi on pi-chain contexts
equals the requested acceptance. The services then measure the acceptance they really see.

A directory holds config.json, a byte-level tokenizer (shared by construction) and
synthetic.json; there are no weights on disk.
"""
import json
from pathlib import Path

import torch
from pearl_runtime.log import get_logger

log = get_logger(__name__)

# name -> (architecture, hidden, layers, heads, kv_heads, intermediate, vocab, extra config)
SHAPES = {
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", 896, 24, 14, 2, 4864, 151936, {}),
    "qwen2.5-1.5b": ("Qwen2ForCausalLM", 1536, 28, 12, 2, 8960, 151936, {}),
    "qwen2.5-7b": ("Qwen2ForCausalLM", 3584, 28, 28, 4, 18944, 152064, {}),
    "qwen2.5-32b": ("Qwen2ForCausalLM", 5120, 64, 40, 8, 27648, 152064, {}),
    "qwen2.5-72b": ("Qwen2ForCausalLM", 8192, 80, 64, 8, 29568, 152064, {}),
    "llama-3.2-1b": ("LlamaForCausalLM", 2048, 16, 32, 8, 8192, 128256, {"head_dim": 64}),
    "llama-3.1-8b": ("LlamaForCausalLM", 4096, 32, 32, 8, 14336, 128256, {}),
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def _config(name: str, vocab: int) -> dict:
    arch, hidden, layers, heads, kv, inter, _, extra = SHAPES[name]
    cfg = {"architectures": [arch], "model_type": "llama" if arch == "LlamaForCausalLM" else "qwen2",
           "hidden_size": hidden, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter,
           "vocab_size": vocab, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "eos_token_id": 0, "bos_token_id": 0, "torch_dtype": "bfloat16"}
    if arch == "LlamaForCausalLM":
        cfg.update(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072)
    else:
        cfg.update(rope_theta=1000000.0)
    cfg.update(extra)
    return cfg


def _write_tokenizer(out: Path, vocab: int) -> None:
    """Byte-level: text maps to the 256 byte tokens; the other ids decode as '<tN>'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: ord(c))
    table = {c: i for i, c in enumerate(byte_chars)}
    table.update({f"<t{i}>": i for i in range(len(table), vocab)})
    tok = Tokenizer(models.BPE(vocab=table, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=byte_chars[0]).save_pretrained(str(out))


def prepare_synthetic(name: str, role: str, seed: int = 0, accept: float | None = None,
                      vocab: int | None = None, root: Path | None = None) -> Path:
    if name not in SHAPES:
        raise ValueError(f"unknown synthetic shape {name!r}; known: {', '.join(SHAPES)}")
    from pearl_runtime.models.default_model import cache_root
    vocab = vocab or SHAPES[name][6]
    tag = f"{name}-{role}-v{vocab}-s{seed}" + (f"-a{accept:.3f}" if accept is not None else "")
    out = (root or cache_root() / "synthetic") / tag
    if (out / "synthetic.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_config(name, vocab), indent=2))
    _write_tokenizer(out, vocab)
    (out / "synthetic.json").write_text(json.dumps({"shape": name, "role": role, "seed": seed, "accept": accept}))
    return out


def prepare_synthetic_pair(target: str, draft: str, accept: float, seed: int = 0,
                           root: Path | None = None) -> tuple[Path, Path]:
    """Directories for a target calibrated to `accept` and a draft sharing its vocabulary."""
    vocab = SHAPES[target][6]
    return (prepare_synthetic(target, "target", seed, accept, vocab, root),
            prepare_synthetic(draft, "draft", seed, None, vocab, root))


def synthetic_spec(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / "synthetic.json"
    return json.loads(path.read_text()) if path.is_file() else None


# -- weights ---------------------------------------------------------------------------------
def _out_projections(model):
    for layer in model.model.layers:
        yield layer.self_attn.o_proj.weight
        yield layer.mlp.down_proj.weight


@torch.no_grad()
def init_synthetic(model, spec: dict) -> None:
    """Random weights with the shared permutation head (see the module docstring)."""
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(spec["seed"] * 1000 + (spec["role"] == "draft"))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
    emb, head = model.model.embed_tokens, model.lm_head
    vocab, hidden = emb.vocab_size, emb.weight.shape[1]
    # the permutation comes from the seed alone, on the CPU: CUDA random streams depend on
    # the SM count a process sees, which CUDA MPS shares change, and the draft and the
    # target must rebuild the same permutation. The full embedding only has to agree across
    # the TP ranks of one model, which see the same GPUs.
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(spec["seed"])).to(dev)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(vocab, device=dev)
    # in the weights' dtype, and the head gathered in chunks: beside a 72B rank's 73 GB of
    # weights an fp32 copy of the full embedding (5 GB) and its gather did not fit an 80 GB GPU
    full = torch.randn(vocab, hidden, generator=gen, device=dev, dtype=emb.weight.dtype)
    start, n = emb.start, max(0, min(emb.rows, vocab - emb.start))
    emb.weight[:n].copy_(full[start:start + n])
    # head row u is the embedding of the token whose successor is u: logits peak at pi(v)
    for i in range(0, n, 16384):
        j = min(n, i + 16384)
        head.weight[i:j].copy_(full[inverse[start + i:start + j]]).div_(hidden ** 0.5)
    del full
    model.synthetic_perm = perm
    for w in _out_projections(model):
        w.zero_() if spec["role"] == "draft" else None


@torch.no_grad()
def calibrate(runner, spec: dict, seqs: int = 8, length: int = 128) -> float:
    """Bisect the scale of the target's output projections until its agreement with pi
    on pi-chain contexts matches spec['accept']. Returns the measured agreement."""
    from pearl_runtime.engine.step import StepInput
    model, dev = runner.model, runner.device
    perm = model.synthetic_perm
    gen = torch.Generator(device=dev).manual_seed(spec["seed"] + 7)
    # contexts like the target's own output: each token follows pi with probability
    # `accept`, else it is a deviation (a random token)
    accept = spec["accept"]
    tokens = torch.empty(seqs, length, dtype=torch.int64, device=dev)
    tokens[:, 0] = torch.randint(0, perm.numel(), (seqs,), generator=gen, device=dev)
    for i in range(1, length):
        deviate = torch.rand(seqs, generator=gen, device=dev) > accept
        noise = torch.randint(0, perm.numel(), (seqs,), generator=gen, device=dev)
        tokens[:, i] = torch.where(deviate, noise, perm[tokens[:, i - 1]])
    want = perm[tokens]
    bs = runner.block_size
    blocks_per = -(-length // bs)
    ids = tokens.flatten().tolist()
    step = StepInput(ids=ids, positions=list(range(length)) * seqs,
                     slots=[(i * blocks_per) * bs + p for i in range(seqs) for p in range(length)],
                     q_lens=[length] * seqs, ctx_lens=[length] * seqs,
                     cu_seqlens_q=[i * length for i in range(seqs + 1)],
                     block_tables=[list(range(i * blocks_per, (i + 1) * blocks_per)) for i in range(seqs)],
                     logit_rows=list(range(seqs * length)))

    current = 1.0

    def agreement(scale: float) -> float:
        # rescale in place: a copy of the out-projections would cost 20 GB on a 32B model
        nonlocal current
        for w in _out_projections(model):
            w.mul_(scale / current)
        current = scale
        pred = runner.execute(step).argmax(-1).view(seqs, length)
        return (pred == want).float().mean().item()

    lo, hi, target = -4.0, 2.0, spec["accept"]             # log10 of the scale
    silent = agreement(1e-6)
    if silent < 0.99:   # with its layers silent the target must follow pi: else the build is broken
        raise RuntimeError(f"synthetic target with silent layers agrees with its head map on only "
                           f"{silent:.3f} of tokens; the model or the attention path is broken")
    for _ in range(14):
        mid = (lo + hi) / 2
        if agreement(10 ** mid) > target:
            lo = mid
        else:
            hi = mid
    measured = agreement(10 ** ((lo + hi) / 2))    # leaves the weights at the calibrated scale
    log.info("synthetic target calibrated: requested acceptance %.3f, measured %.3f on calibration "
             "contexts (output-projection scale %.4g)", target, measured, 10 ** ((lo + hi) / 2))
    return measured
