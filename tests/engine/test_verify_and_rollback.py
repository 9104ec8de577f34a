"""The k-token verify forward and KV rollback, checked against full transformers forwards
(fp32 logits, max abs diff < 1e-4)."""
import random

import pytest
import torch

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.engine.sequence import Sequence
from tests.tiny_models import hf_logits

TOL = 1e-4


def rand_tokens(n, rng):
    return [rng.randrange(451) for _ in range(n)]


def make_engine(model_dir, block_size=4, num_blocks=600):
    return LLMEngine(EngineConfig(model=str(model_dir), block_size=block_size, num_blocks=num_blocks),
                     load_tok=False)


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor, what: str):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    assert diff < TOL, f"{what}: max |logit diff| = {diff:.3g} (tolerance {TOL})"


def split(logits: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(logits.split(counts))


def prefill(eng, prompts) -> list[Sequence]:
    seqs = [Sequence(p) for p in prompts]
    for s in seqs:
        eng.blocks.allocate(s)
    eng.runner.run(seqs)
    assert all(s.num_kv == len(s) for s in seqs)
    return seqs


def append(eng, seq, tokens):
    seq.token_ids.extend(tokens)
    assert eng.blocks.ensure_capacity(seq, len(seq))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_verify_step_matches_full_forward(tiny_model_factory, hf_model, arch):
    d = tiny_model_factory(arch)
    hf = hf_model(d)
    eng = make_engine(d)
    rng = random.Random(0)
    prompt_lens, ks = [1, 7, 16, 61, 203], [1, 4, 8, 2, 6]
    seqs = prefill(eng, [rand_tokens(n, rng) for n in prompt_lens])
    # the last committed token (not in the KV yet) + k draft tokens: k + 1 logits each
    for s, k in zip(seqs, ks):
        append(eng, s, rand_tokens(k + 1, rng))
    logits = eng.runner.run(seqs, num_logits=[k + 1 for k in ks])
    assert logits.shape == (sum(ks) + len(ks), eng.runner.model_cfg.vocab_size)
    assert logits.dtype == torch.float32
    for s, k, ours in zip(seqs, ks, split(logits, [k + 1 for k in ks])):
        assert s.num_kv == len(s)
        ref = hf_logits(hf, s.token_ids)[-(k + 1):]
        assert_logits_match(ours, ref, f"{arch} seq len {len(s)} verify k={k}")


def test_prefill_logits_and_partial_num_logits(qwen2_dir, hf_model):
    """A prefill may ask for more than the last position's logits; a mixed batch of prefill,
    decode and verify rows in one forward."""
    hf = hf_model(qwen2_dir)
    eng = make_engine(qwen2_dir, block_size=5)
    rng = random.Random(1)
    (old,) = prefill(eng, [rand_tokens(40, rng)])
    append(eng, old, rand_tokens(1, rng))                 # decode row
    (ver,) = prefill(eng, [rand_tokens(33, rng)])
    append(eng, ver, rand_tokens(6, rng))                 # verify rows
    new = Sequence(rand_tokens(77, rng))                  # prefill rows
    eng.blocks.allocate(new)
    counts = [1, 6, 9]
    logits = eng.runner.run([old, ver, new], num_logits=counts)
    for s, n, ours in zip([old, ver, new], counts, split(logits, counts)):
        assert_logits_match(ours, hf_logits(hf, s.token_ids)[-n:], f"len {len(s)} last {n}")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rollback_then_new_tokens(tiny_model_factory, hf_model, arch):
    d = tiny_model_factory(arch)
    hf = hf_model(d)
    eng = make_engine(d, block_size=4)
    rng = random.Random(2)
    # (prompt len, tokens appended, rolled back, new tokens appended): rollbacks within a block,
    # across several blocks, new run shorter than the rollback (stale K/V stays in the slots
    # past the context) and longer than it
    plans = [(10, 8, 3, 1), (33, 9, 9, 2), (50, 12, 7, 10), (5, 6, 6, 6), (64, 4, 2, 1)]
    seqs = prefill(eng, [rand_tokens(p, rng) for p, *_ in plans])
    for s, (_, k, _, _) in zip(seqs, plans):
        append(eng, s, rand_tokens(k, rng))
    eng.runner.run(seqs, num_logits=[k for _, k, _, _ in plans])
    free_before = eng.blocks.num_free
    for s, (_, _, r, _) in zip(seqs, plans):
        n = len(s) - r
        del s.token_ids[n:]
        eng.blocks.truncate(s, n)
        assert s.num_kv == n and len(s.block_table) == eng.blocks.blocks_needed(n)
    assert eng.blocks.num_free > free_before, "rolling back across blocks frees them"
    for s, (_, _, _, m) in zip(seqs, plans):
        append(eng, s, rand_tokens(m, rng))
    counts = [m for *_, m in plans]
    logits = eng.runner.run(seqs, num_logits=counts)
    for s, n, ours in zip(seqs, counts, split(logits, counts)):
        assert_logits_match(ours, hf_logits(hf, s.token_ids)[-n:], f"{arch} after rollback, len {len(s)}")
    # and once more: another verify on top of the rolled-back state
    for s in seqs:
        append(eng, s, rand_tokens(3, rng))
    logits = eng.runner.run(seqs, num_logits=[3] * len(seqs))
    for s, ours in zip(seqs, split(logits, [3] * len(seqs))):
        assert_logits_match(ours, hf_logits(hf, s.token_ids)[-3:], f"{arch} verify after rollback")


def test_rollback_matches_fresh_computation(llama_dir):
    """Logits after a rollback equal those of a sequence that never held the rolled-back
    tokens, computed by the same engine in a fresh cache."""
    rng = random.Random(3)
    prompt, spec, fix = rand_tokens(45, rng), rand_tokens(7, rng), rand_tokens(5, rng)
    eng = make_engine(llama_dir, block_size=4)
    (s,) = prefill(eng, [prompt])
    append(eng, s, spec)
    eng.runner.run([s], num_logits=[7])
    del s.token_ids[len(prompt) + 2:]
    eng.blocks.truncate(s, len(prompt) + 2)
    append(eng, s, fix)
    rolled = eng.runner.run([s], num_logits=[5])

    fresh_eng = make_engine(llama_dir, block_size=4)
    (f,) = prefill(fresh_eng, [prompt + spec[:2]])
    append(fresh_eng, f, fix)
    fresh = fresh_eng.runner.run([f], num_logits=[5])
    assert (rolled - fresh).abs().max().item() < 1e-5
