"""Tensor parallelism on CPU over gloo (NCCL on GPU runs the same code): a TP group's greedy
output equals TP=1 and transformers token for token, and its logits match TP=1, both for
sizes that divide the heads and for sizes that need padded heads, MLP features and vocab."""
import os
import signal
import time
from functools import partial

import pytest
import torch
import torch.distributed as dist

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.engine.tp_group import TPWorkerError
from pearl_runtime.layers.partition import shard_heads, split_evenly
from pearl_runtime.sampling import SamplingParams
from tests.tiny_models import assert_same_tokens, hf_greedy, hf_logits

MAX_NEW = 10
PROMPTS = [[7], list(range(100, 117)), [(i * 37) % 451 for i in range(40)]]
GREEDY = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
PROBE = [(i * 11) % 451 for i in range(23)]   # every position's logits are compared


def engine(model_dir, tp: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), block_size=8, num_blocks=48, tp_size=tp), load_tok=False)


def run(model_dir, tp: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy completions of PROMPTS and the logits of every PROBE position, with TP size `tp`."""
    eng = engine(model_dir, tp)
    try:
        outs = eng.generate(PROMPTS, GREEDY)
        seq = Sequence(PROBE)
        eng.blocks.allocate(seq)
        logits = eng.runner.run([seq], num_logits=[len(PROBE)])
        eng.blocks.free_seq(seq)
        return outs, logits
    finally:
        if tp > 1:
            workers = [proc for proc, _ in eng.runner.workers]
            eng.runner.close()
            assert [p.exitcode for p in workers] == [0] * (tp - 1), "workers did not shut down cleanly"
            assert not dist.is_initialized()


# (arch, TP size, tiny-model overrides) and what each case exercises:
# llama-tp2: 4 heads / 2 KV heads, divides (no padding); qwen2-tp2-tied: q/k/v bias, tied head;
# qwen3-tp2-kvpad: q/k norm, 3 KV heads over 2 ranks (a padded KV group);
# qwen3-tp3: 2 KV heads < 3 ranks (replicated KV, padded heads), padded MLP (190) and vocab (512);
# llama-tp4: 6 heads / 2 KV heads, each KV head on 2 ranks with query runs of 2 (one padded)
CASES = {
    "llama-tp2": ("llama", 2, {}),
    "qwen2-tp2-tied": ("qwen2", 2, {"tie": True}),
    "qwen3-tp2-kvpad": ("qwen3", 2, {"hidden": 48, "heads": 6, "kv_heads": 3}),
    "qwen3-tp3": ("qwen3", 3, {"intermediate_size": 190}),
    "llama-tp4": ("llama", 4, {"hidden": 48, "heads": 6, "kv_heads": 2}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tp_matches_tp1_and_transformers(case, tiny_model_factory, hf_model):
    arch, tp, kw = CASES[case]
    d = tiny_model_factory(arch, **kw)
    ref_outs, ref_logits = run(d, 1)
    outs, logits = run(d, tp)
    hf = hf_model(d)
    for i, (p, ours, mine) in enumerate(zip(PROMPTS, outs, ref_outs)):
        assert_same_tokens(mine, hf_greedy(hf, p, MAX_NEW), partial(hf_logits, hf), p, label=f"TP=1 prompt {i}: ")
        assert_same_tokens(ours, mine, partial(hf_logits, hf), p, label=f"TP={tp} prompt {i}: ")
    assert logits.shape == ref_logits.shape
    diff = (logits - ref_logits).abs().max().item()
    assert diff < 1e-4, f"TP={tp} logits differ from TP=1 by {diff:.3g}"


def test_dead_worker_is_a_clear_error(tiny_model_factory):
    eng = engine(tiny_model_factory("llama"), 2)
    proc = eng.runner.workers[0][0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with pytest.raises(TPWorkerError, match="TP rank 1 .* killed by signal 9"):
        eng.generate([[1, 2, 3]], GREEDY)
    eng.runner.close()
    assert not dist.is_initialized()


# -- the partition helper ---------------------------------------------------------------------
HEAD_SHAPES = [(4, 2), (6, 2), (6, 3), (8, 8), (8, 1), (7, 7), (12, 4), (14, 2), (32, 8), (40, 8)]


@pytest.mark.parametrize("heads,kv_heads", HEAD_SHAPES)
@pytest.mark.parametrize("tp", range(1, 9))
def test_head_partition(heads, kv_heads, tp):
    group = heads // kv_heads
    seen = []
    shards = [shard_heads(heads, kv_heads, 3, tp, rank) for rank in range(tp)]
    n_q, n_kv = len(shards[0][0].sources), len(shards[0][1].sources)
    for q, kv in shards:
        # the same slot counts on every rank, in whole GQA groups
        assert (len(q.sources), len(kv.sources)) == (n_q, n_kv) and n_q % n_kv == 0
        local_group = n_q // n_kv
        for j, h in enumerate(q.sources):
            if h is not None:
                assert kv.sources[j // local_group] == h // group, f"query head {h} reads the wrong KV head"
                seen.append(h)
        assert (q.size, kv.size, q.unit) == (heads * 3, kv_heads * 3, 3)
    assert sorted(seen) == list(range(heads)), "every query head exactly once"
    assert {k for _, kv in shards for k in kv.sources} - {None} == set(range(kv_heads))
    if kv_heads % tp == 0:
        assert n_q * tp == heads, "no padding when tp divides the KV heads"


def test_shard_take_pads_with_zeros():
    t = torch.arange(10.0).repeat_interleave(2).view(10, 2)
    parts = [split_evenly(10, 4, r).take(t, 0) for r in range(4)]
    assert all(p.shape == (3, 2) for p in parts)
    assert torch.equal(torch.cat(parts)[:10], t) and not torch.cat(parts)[10:].any()
    q, _ = shard_heads(4, 2, 2, 3, 1)         # rank 1 of 3 holds only padding heads
    assert q.take(torch.ones(4 * 2, 5), 0).abs().sum() == 0
    with pytest.raises(RuntimeError, match="expected 10"):
        split_evenly(10, 4, 0).take(torch.zeros(11, 2), 0)


def test_engine_config_devices():
    cfg = EngineConfig(model="m", device="cuda:2,3")
    assert (cfg.tp_size, cfg.device, cfg.rank_device(1)) == (2, "cuda:2", "cuda:3")
    assert EngineConfig(model="m", device="cuda:1", tp_size=3).rank_device(2) == "cuda:3"
    assert EngineConfig(model="m", tp_size=2).rank_device(1) == "cpu"
    with pytest.raises(ValueError, match="needs 4 devices"):
        EngineConfig(model="m", device="cuda:0,1", tp_size=4)


def test_idle_workers_outlive_the_collective_timeout(tiny_model_factory, monkeypatch):
    """Workers wait for the next step on a pipe: before, they waited in a
    collective of the model's group, which timed out (torch's defaults: gloo 30 min, NCCL
    10 min), so an idle service's workers died and its next request failed."""
    monkeypatch.setenv("PEARL_TP_TIMEOUT_S", "2")   # the model group's timeout, made short
    eng = engine(tiny_model_factory("llama"), 2)
    try:
        first = eng.generate(PROMPTS[:1], GREEDY)
        time.sleep(4)                                # idle past that timeout
        assert eng.generate(PROMPTS[:1], GREEDY) == first
    finally:
        eng.runner.close()
