"""Engine greedy output == transformers greedy output, token for token (CPU, fp32), across
architectures, batch shapes, block sizes, prefix-cache hits and continuous batching."""
import json
import random
import shutil
from functools import partial

import pytest

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.sampling import SamplingParams
from tests.tiny_models import assert_same_tokens, hf_greedy, hf_logits

MAX_NEW = 64
TEXT = ("The scheduler preempts the newest sequence when the cache is full. "
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n")


def random_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(451) for _ in range(n)]


def batch_prompts(tokenizer) -> list[list[int]]:
    # lengths straddle block boundaries (16) and reach past 300
    prompts = [random_prompt(n, seed=n) for n in (1, 2, 15, 16, 17, 40, 129, 301)]
    prompts.append(tokenizer.encode(TEXT, add_special_tokens=False))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}],
                                         tokenize=False, add_generation_prompt=True)
    prompts.append(tokenizer.encode(chat, add_special_tokens=False))
    return prompts


@pytest.fixture(scope="module")
def reference(hf_model):
    """reference(model_dir, prompt) -> HF greedy completion of MAX_NEW tokens (cached)."""
    cache = {}

    def ref(model_dir, prompt):
        key = (str(model_dir), tuple(prompt))
        if key not in cache:
            cache[key] = hf_greedy(hf_model(model_dir), list(prompt), MAX_NEW)
            assert len(cache[key]) == MAX_NEW
        return cache[key]
    return ref


def check(model_dir, prompts, outs, reference, hf_model, max_tokens=None):
    max_tokens = max_tokens or [MAX_NEW] * len(prompts)
    for i, (p, o, n) in enumerate(zip(prompts, outs, max_tokens)):
        assert_same_tokens(o, reference(model_dir, p)[:n], partial(hf_logits, hf_model(model_dir)), p,
                           label=f"prompt {i} (len {len(p)}): ")


def engine(model_dir, **kw) -> LLMEngine:
    kw.setdefault("block_size", 16)
    kw.setdefault("num_blocks", 400)
    return LLMEngine(EngineConfig(model=str(model_dir), **kw))


GREEDY = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)


def test_greedy_batch_matches_transformers(any_model_dir, reference, hf_model):
    eng = engine(any_model_dir)
    prompts = batch_prompts(eng.tokenizer)
    assert len(prompts) >= 8 and min(map(len, prompts)) == 1 and max(map(len, prompts)) > 300
    outs = eng.generate(prompts, GREEDY)
    check(any_model_dir, prompts, outs, reference, hf_model)
    # everything returned to the pool
    assert eng.blocks.num_free == eng.runner.num_blocks
    assert not eng.scheduler.has_work()


@pytest.mark.parametrize("arch,block_size", [("llama", 2), ("qwen3", 3), ("qwen2", 1)])
def test_small_blocks(tiny_model_factory, reference, hf_model, arch, block_size):
    d = tiny_model_factory(arch)
    prompts = [random_prompt(n, seed=n) for n in (1, 16, 129, 301)]
    eng = engine(d, block_size=block_size, num_blocks=2000)
    outs = eng.generate(prompts, GREEDY)
    check(d, prompts, outs, reference, hf_model)


def test_prefix_cache_hit_across_calls(qwen3_dir, reference, hf_model):
    eng = engine(qwen3_dir, block_size=8, num_blocks=400)
    a = random_prompt(250, seed=100)
    first = eng.generate([a], GREEDY)
    assert eng.blocks.prefix_hits == 0
    b = a[:200] + random_prompt(37, seed=101)
    outs = eng.generate([b, a], GREEDY)
    # b reuses the 25 full blocks it shares with a; a reuses all its full prompt blocks
    assert eng.blocks.prefix_hits >= 200 + 248, eng.blocks.prefix_hits
    assert outs[1] == first[0]
    check(qwen3_dir, [a, b, a], first + outs, reference, hf_model)


def test_prefix_shared_within_one_batch(llama_dir, reference, hf_model):
    """The second sequence hits blocks the first one allocates in the same step, whose K/V
    are written by that same forward."""
    eng = engine(llama_dir, block_size=4, num_blocks=400)
    a = random_prompt(120, seed=7)
    prompts = [a, a[:101] + random_prompt(20, seed=8), a]
    outs = eng.generate(prompts, GREEDY)
    assert eng.blocks.prefix_hits >= 100 + 116, eng.blocks.prefix_hits
    check(llama_dir, prompts, outs, reference, hf_model)


def test_evicted_prefix_blocks_are_not_reused(qwen2_dir, reference, hf_model):
    # 48 blocks of 8: a (250 + 64 tokens, 40 blocks) then d (40 blocks) evicts most of a's
    eng = engine(qwen2_dir, block_size=8, num_blocks=48)
    a, d = random_prompt(250, seed=200), random_prompt(250, seed=201)
    outs = [eng.generate([p], GREEDY)[0] for p in (a, d)]
    hits = eng.blocks.prefix_hits
    outs.append(eng.generate([a], GREEDY)[0])
    assert 0 < eng.blocks.prefix_hits - hits < 248, "a should hit only its surviving head blocks"
    check(qwen2_dir, [a, d, a], outs, reference, hf_model)


def test_continuous_batching(qwen2_dir, reference, hf_model):
    """Requests join while others run; some finish early (different max_tokens)."""
    eng = engine(qwen2_dir, block_size=16, num_blocks=400)
    prompts = [random_prompt(n, seed=300 + n) for n in (5, 200, 1, 64, 33, 150, 17, 2)]
    max_tokens = [MAX_NEW, 10, MAX_NEW, 3, MAX_NEW, 40, 1, MAX_NEW]
    arrivals = {0: [0, 1], 2: [2], 5: [3, 4], 11: [5], 12: [6], 30: [7]}   # step -> prompt indices
    seqs, step, max_batch = {}, 0, 0
    while step <= max(arrivals) or eng.scheduler.has_work():
        for i in arrivals.get(step, []):
            seqs[i] = eng.add(prompts[i], SamplingParams(max_tokens=max_tokens[i], ignore_eos=True))
        out = eng.step()
        max_batch = max(max_batch, len(out))
        step += 1
    assert max_batch >= 4, "requests should have overlapped"
    assert all(seqs[i].finish_reason == "length" for i in seqs)
    outs = [seqs[i].completion_ids for i in range(len(prompts))]
    assert [len(o) for o in outs] == max_tokens
    check(qwen2_dir, prompts, outs, reference, hf_model, max_tokens)
    assert eng.blocks.num_free == eng.runner.num_blocks


def test_stop_token_ends_generation(llama_dir, reference):
    eng = engine(llama_dir)
    p = random_prompt(30, seed=9)
    ref = reference(llama_dir, p)
    stop = ref[10]
    first = ref.index(stop)
    (out,) = eng.generate([p], SamplingParams(max_tokens=MAX_NEW, stop_token_ids=(stop,)))
    assert out == ref[:first + 1]


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
VARIANTS = {
    "llama-rope-llama3": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama-rope-linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-mha": ("llama", dict(kv_heads=4)),
    "qwen2-mqa-theta": ("qwen2", dict(kv_heads=1, rope_theta=1000000.0)),
    "qwen3-head_dim-32": ("qwen3", dict(head_dim=32)),
    "llama-3-layers-tied": ("llama", dict(num_layers=3, tie=True)),
}


def to_legacy_rope_format(model_dir):
    """Rewrite config.json the way transformers 4.x (and most published checkpoints) write
    it: top-level rope_theta, rope_scaling with "type"."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", "default")
    cfg["rope_scaling"] = None if kind == "default" else dict(rope, type=kind)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("variant", [*VARIANTS, "llama-rope-llama3-legacy-config"])
def test_config_variants(tiny_model_factory, tmp_path, hf_model, variant):
    arch, kw = VARIANTS[variant.removesuffix("-legacy-config")]
    d = tiny_model_factory(arch, **kw)
    if variant.endswith("legacy-config"):
        shutil.copytree(d, tmp_path / "m")
        d = tmp_path / "m"
        to_legacy_rope_format(d)
    hf = hf_model(d)
    prompts = [random_prompt(n, seed=n) for n in (1, 100, 300)]
    outs = engine(d, block_size=16, num_blocks=200).generate(prompts, GREEDY)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert_same_tokens(o, hf_greedy(hf, p, MAX_NEW), partial(hf_logits, hf), p,
                           label=f"{variant} prompt {i} (len {len(p)}): ")
