"""Paged KV bookkeeping: allocation, growth, freeing, prefix-cache reuse and ref counts,
rollback, running out of blocks, and scheduler preemption when the cache is full."""
import random

import pytest

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.block_manager import BlockManager
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.errors import InvalidRequest, OutOfBlocks
from pearl_runtime.sampling import SamplingParams
from tests.tiny_models import hf_greedy


def toks(n, start=0):
    return list(range(start, start + n))


def refcounts(bm, seq):
    return [bm.blocks[b].ref_count for b in seq.block_table]


def test_allocate_append_free():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_cache=False)
    s = Sequence(toks(9))
    bm.allocate(s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert s.num_kv == 0 and bm.num_free == 7
    s.num_kv = len(s)
    s.token_ids += [1, 2, 3]                       # 12 tokens: still 3 blocks
    assert bm.ensure_capacity(s, len(s)) and len(s.block_table) == 3
    s.token_ids.append(4)                          # 13: a 4th block
    assert bm.ensure_capacity(s, len(s)) and len(s.block_table) == 4 and bm.num_free == 6
    assert bm.ensure_capacity(s, 13 + 8)           # room for 8 speculative tokens: 6 blocks
    assert len(s.block_table) == 6 and bm.num_free == 4
    assert not bm.ensure_capacity(s, 13 + 40)      # too many: nothing allocated
    assert len(s.block_table) == 6 and bm.num_free == 4
    bm.free_seq(s)
    assert bm.num_free == 10 and s.block_table == [] and s.num_kv == 0
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_cache_reuse_and_refcounts():
    bm = BlockManager(num_blocks=20, block_size=4)
    a = Sequence(toks(10))                         # blocks [0..3] [4..7] hashed, [8, 9] not
    bm.allocate(a)
    assert a.num_kv == 0 and bm.prefix_hits == 0
    b = Sequence(toks(8) + [99, 98, 97])           # shares the two full blocks
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_kv == 8 and bm.prefix_hits == 8
    assert refcounts(bm, a) == [2, 2, 1]
    # a prompt that is exactly 2 full blocks keeps its last block to compute (its logits)
    c = Sequence(toks(8))
    bm.allocate(c)
    assert c.block_table[0] == a.block_table[0] and c.block_table[1] != a.block_table[1]
    assert c.num_kv == 4 and refcounts(bm, a) == [3, 2, 1]
    # the same tokens after a different first block: chained hash, no hit
    d = Sequence(toks(4, start=50) + toks(4, start=4) + [1])
    bm.allocate(d)
    assert d.num_kv == 0 and d.block_table[1] != a.block_table[1]
    for s in (b, c, d):
        bm.free_seq(s)
    assert refcounts(bm, a) == [1, 1, 1]
    # freed blocks keep their hash: a new sequence reuses a's blocks even after a is freed
    first_two = a.block_table[:2]
    bm.free_seq(a)
    assert bm.num_free == 20
    e = Sequence(toks(9))
    bm.allocate(e)
    assert e.block_table[:2] == first_two and e.num_kv == 8 and refcounts(bm, e)[:2] == [1, 1]
    assert bm.num_free == 20 - 3


def test_prefix_cache_disabled():
    bm = BlockManager(num_blocks=20, block_size=4, enable_prefix_cache=False)
    a, b = Sequence(toks(10)), Sequence(toks(10))
    bm.allocate(a)
    bm.allocate(b)
    assert b.num_kv == 0 and bm.prefix_hits == 0 and not set(a.block_table) & set(b.block_table)


def test_evicted_block_loses_its_hash():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Sequence(toks(9))
    bm.allocate(a)
    bm.free_seq(a)                                   # LRU: a's blocks go back last-first
    filler = Sequence(toks(13, start=100))           # needs all 4 blocks: evicts a's
    bm.allocate(filler)
    bm.free_seq(filler)
    again = Sequence(toks(9))
    bm.allocate(again)
    assert again.num_kv == 0, "a block reused for other tokens must not serve a's prefix"


def test_truncate_frees_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = Sequence(toks(6))
    bm.allocate(s)
    s.num_kv = 6
    s.token_ids += toks(11, start=200)               # 17 tokens: 5 blocks
    assert bm.ensure_capacity(s, len(s))
    s.num_kv = len(s)
    assert bm.num_free == 5
    del s.token_ids[9:]
    bm.truncate(s, 9)                                # 9 tokens: 3 blocks
    assert s.num_kv == 9 and len(s.block_table) == 3 and bm.num_free == 7
    bm.truncate(s, 9)                                # idempotent
    assert len(s.block_table) == 3 and bm.num_free == 7
    del s.token_ids[8:]
    bm.truncate(s, 8)                                # exactly 2 blocks
    assert len(s.block_table) == 2 and bm.num_free == 8


def test_truncate_keeps_shared_prefix_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = Sequence(toks(9)), Sequence(toks(9))
    bm.allocate(a)
    bm.allocate(b)
    shared = b.block_table[:2]
    b.num_kv = 9
    del b.token_ids[3:]
    bm.truncate(b, 3)
    assert b.block_table == shared[:1]
    assert bm.blocks[shared[1]].ref_count == 1, "a still holds the second block"
    assert bm.blocks[shared[0]].ref_count == 2


def test_out_of_blocks_is_clear():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate(Sequence(toks(8)))
    with pytest.raises(OutOfBlocks, match=r"needs 2 blocks, 1 free"):
        bm.allocate(Sequence(toks(5, start=30)))


def test_cache_size_caps_the_context_window(llama_dir):
    """A sequence must fit in the cache on its own; a prompt that cannot is refused."""
    eng = LLMEngine(EngineConfig(model=str(llama_dir), block_size=4, num_blocks=4, max_model_len=64),
                    load_tok=False)
    assert eng.max_model_len == 16
    with pytest.raises(InvalidRequest) as e:
        eng.add(toks(40))
    assert e.value.field == "prompt" and "40 tokens" in str(e.value) and "16" in str(e.value)
    assert not eng.scheduler.has_work()


def _reference(model, prompts, n):
    return [hf_greedy(model, p, n) for p in prompts]


def test_preemption_when_cache_is_full(qwen3_dir, hf_model):
    """A cache that holds far less than the batch: sequences are preempted, recomputed, and
    every output is still exactly the reference."""
    rng = random.Random(5)
    prompts = [[rng.randrange(451) for _ in range(n)] for n in (20, 45, 3, 60, 31, 12)]
    eng = LLMEngine(EngineConfig(model=str(qwen3_dir), block_size=4, num_blocks=40), load_tok=False)
    preempted = []
    orig = eng.scheduler.preempt
    eng.scheduler.preempt = lambda seq: (preempted.append(seq.seq_id), orig(seq))[-1]
    outs = eng.generate(prompts, SamplingParams(max_tokens=64, ignore_eos=True))
    assert len(preempted) >= 2, "the test should force preemption"
    assert [len(o) for o in outs] == [64] * len(prompts)
    assert outs == _reference(hf_model(qwen3_dir), prompts, 64)
    assert eng.blocks.num_free == 40


@pytest.mark.timeout(60)
def test_sequence_longer_than_whole_cache_finishes(llama_dir, hf_model):
    """One sequence that outgrows the whole cache must finish (length), not stall forever."""
    eng = LLMEngine(EngineConfig(model=str(llama_dir), block_size=4, num_blocks=4), load_tok=False)
    prompt = toks(10, start=60)
    seq = eng.add(prompt, SamplingParams(max_tokens=64, ignore_eos=True))
    for _ in range(100):
        if not eng.scheduler.has_work():
            break
        assert eng.step(), "a step with work pending made no progress"
    assert seq.finish_reason == "length"
    assert 1 <= len(seq.completion_ids) <= 6
    assert seq.completion_ids == hf_greedy(hf_model(llama_dir), prompt, 64)[:len(seq.completion_ids)]


def test_a_step_admits_prompt_tokens_up_to_its_budget():
    """max_prefill_tokens: whole sequences while they fit the budget, one at least however long;
    the rest wait for the next steps, in order."""
    from pearl_runtime.engine.scheduler import Scheduler
    sched = Scheduler(BlockManager(num_blocks=100, block_size=4, enable_prefix_cache=False), max_num_seqs=8,
                      max_prefill_tokens=10)
    seqs = [Sequence(toks(n, start=100 * i)) for i, n in enumerate([4, 5, 3, 12, 2])]
    for s in seqs:
        sched.add(s)
    assert sched.schedule() == seqs[:2]              # 4 + 5; a third would make 12
    assert sched.schedule() == seqs[:3]              # 3 more (12 waits: 3 + 12 > 10)
    assert sched.schedule() == seqs[:4]              # longer than the budget, alone: it still goes
    assert sched.schedule() == seqs
    unlimited = Scheduler(BlockManager(num_blocks=100, block_size=4, enable_prefix_cache=False), max_num_seqs=8)
    for s in [Sequence(toks(n, start=1000 + 100 * i)) for i, n in enumerate([40, 50])]:
        unlimited.add(s)
    assert len(unlimited.schedule()) == 2
