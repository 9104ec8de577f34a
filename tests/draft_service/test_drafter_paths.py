"""The drafter's two paths give the same greedy drafts: `chained` (gamma steps on the device,
one sync a round) and `stepwise` (a host round trip each step, the path for sampled drafts
and TP groups). Rounds replay verdicts, so rollbacks and 2-token first steps are covered."""
import random

import pytest

from draft_service.drafter import Drafter, Mirror
from pearl_runtime.config import EngineConfig
from pearl_runtime.sampling import SamplingParams

GAMMA = 4


def drafter(model_dir, chained: bool) -> Drafter:
    d = Drafter(EngineConfig(model=str(model_dir), block_size=4, num_blocks=400))
    d.runner.chains_on_device = chained
    return d


def play(d: Drafter, prompts, rounds: int, seed: int) -> list[list[list[int]]]:
    """Draft `rounds` rounds; between rounds a seeded 'target' accepts a random prefix of each
    draft and corrects the next token, as verdicts do."""
    rng = random.Random(seed)
    mirror = Mirror()
    d.apply(mirror, [(i, p, SamplingParams()) for i, p in enumerate(prompts)], [], [])
    committed = {i: list(p) for i, p in enumerate(prompts)}
    seen = []
    for _ in range(rounds):
        result = d.draft(mirror, GAMMA)
        drafts = result.tokens.tolist()
        seen.append(drafts)
        verdicts = []
        for sid, toks in zip(result.seq_ids, drafts):
            keep = rng.randrange(GAMMA + 1)
            committed[sid] += toks[:keep] + [rng.randrange(400)]
            verdicts.append((sid, len(committed[sid]), committed[sid][-1]))
        d.apply(mirror, [], [], verdicts)
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chained_drafts_equal_stepwise(tiny_model_factory, arch):
    model = tiny_model_factory(arch)
    rng = random.Random(7)
    prompts = [[rng.randrange(400) for _ in range(n)] for n in (1, 5, 17, 40)]
    chained, stepwise = drafter(model, True), drafter(model, False)
    a = play(chained, prompts, rounds=6, seed=3)
    b = play(stepwise, prompts, rounds=6, seed=3)
    assert chained.paths == {"chained": 6} and stepwise.paths == {"stepwise": 6}
    for r, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"round {r}: chained {x} != stepwise {y}"
    assert all(t >= 0 for rnd in a for row in rnd for t in row)


def test_sampled_sequence_takes_stepwise_path(tiny_model_factory):
    d = drafter(tiny_model_factory("llama"), True)
    mirror = Mirror()
    d.apply(mirror, [(0, [1, 2, 3], SamplingParams()),
                     (1, [4, 5], SamplingParams(temperature=0.8, seed=1))], [], [])
    result = d.draft(mirror, GAMMA)
    assert d.paths == {"stepwise": 1}
    assert result.probs is not None and result.probs.shape[:2] == (2, GAMMA)


def test_window_end_falls_back_to_stepwise(tiny_model_factory):
    """Near the end of the window not all gamma tokens fit: the stepwise path drafts what fits."""
    model = tiny_model_factory("llama")
    d = Drafter(EngineConfig(model=str(model), block_size=4, num_blocks=400, max_model_len=12))
    mirror = Mirror()
    d.apply(mirror, [(0, list(range(1, 10)), SamplingParams())], [], [])
    result = d.draft(mirror, GAMMA)
    assert d.paths == {"stepwise": 1}
    row = result.tokens[0].tolist()
    assert all(t >= 0 for t in row[:3]) and row[3] == -1   # 9 + 3 tokens fill the window of 12


@pytest.mark.parametrize("chained,temperature", [(True, 0.0), (False, 0.0), (False, 0.8)])
def test_early_part_is_the_head_of_the_round(tiny_model_factory, chained, temperature):
    """With early=2 the callback gets, once and before the round ends, exactly the first two
    columns of what the round returns (probabilities too, for sampled sequences)."""
    d = drafter(tiny_model_factory("llama"), chained)
    mirror = Mirror()
    params = SamplingParams(temperature=temperature, seed=5) if temperature else SamplingParams()
    d.apply(mirror, [(0, [1, 2, 3], params), (1, [7, 8, 9, 10, 11], params)], [], [])
    seen = []
    result = d.draft(mirror, 6, early=2, on_early=seen.append)
    assert len(seen) == 1
    assert seen[0].tokens.tolist() == result.tokens[:, :2].tolist()
    assert seen[0].seq_ids == result.seq_ids
    if temperature:
        assert seen[0].probs is not None and bool((seen[0].probs == result.probs[:, :2]).all())
    assert d.paths == ({"chained": 1} if chained and not temperature else {"stepwise": 1})


def test_early_part_is_sent_even_when_drafting_stops_before_it(tiny_model_factory):
    model = tiny_model_factory("llama")
    d = Drafter(EngineConfig(model=str(model), block_size=4, num_blocks=400, max_model_len=10))
    mirror = Mirror()
    d.apply(mirror, [(0, list(range(1, 10)), SamplingParams())], [], [])   # room for one token
    seen = []
    result = d.draft(mirror, 6, early=3, on_early=seen.append)
    assert len(seen) == 1 and seen[0].tokens.tolist() == result.tokens[:, :3].tolist()
    assert result.tokens[0, 0] >= 0 and (result.tokens[0, 1:] == -1).all()


@pytest.mark.parametrize("chained", [True, False])
def test_an_accepting_verdict_keeps_the_drafts_past_it_and_their_kv(tiny_model_factory, chained):
    """PEARL: the draft drafts on while the target verifies, so a verdict that accepts lands
    inside the mirror's tokens. Those tokens and their K/V stand (no re-feed of up to gamma
    tokens the next round), and the next drafts equal those of a mirror that recomputed them."""
    model = tiny_model_factory("llama")
    prompt = list(range(3, 30))
    kept, fresh = drafter(model, chained), drafter(model, chained)
    mirror = Mirror()
    kept.apply(mirror, [(0, prompt, SamplingParams())], [], [])
    first = kept.draft(mirror, GAMMA).tokens[0].tolist()
    second = kept.draft(mirror, GAMMA).tokens[0].tolist()      # drafted on, before any verdict
    seq = mirror.seqs[0]
    num_kv, tokens = seq.num_kv, list(seq.token_ids)
    assert tokens == prompt + first + second and num_kv == len(tokens) - 1
    num = len(prompt) + GAMMA                                   # all of `first` accepted
    kept.apply(mirror, [], [], [(0, num, first[-1])])
    assert seq.token_ids == tokens and seq.num_kv == num_kv
    third = kept.draft(mirror, GAMMA).tokens[0].tolist()
    other = Mirror()
    fresh.apply(other, [(0, prompt + first + second, SamplingParams())], [], [])
    assert third == fresh.draft(other, GAMMA).tokens[0].tolist()


@pytest.mark.parametrize("chained", [True, False])
def test_a_verdict_with_keep_zero_drops_the_drafts_past_it(tiny_model_factory, chained):
    """The target trimmed what it carries into the next round (a post-verify sequence of a
    head-start round): the verdict says keep 0, the mirror ends at its length, the K/V past it
    goes, and the next drafts continue from there, equal to a mirror built from those tokens."""
    model = tiny_model_factory("llama")
    prompt = list(range(3, 30))
    d, fresh = drafter(model, chained), drafter(model, chained)
    mirror = Mirror()
    d.apply(mirror, [(0, prompt, SamplingParams())], [], [])
    first = d.draft(mirror, 2 * GAMMA).tokens[0].tolist()
    seq = mirror.seqs[0]
    num = len(prompt) + GAMMA                                   # the target holds GAMMA of them
    d.apply(mirror, [], [], [(0, num, first[GAMMA - 1], 0)])
    assert seq.token_ids == prompt + first[:GAMMA] and seq.num_kv <= num - 1
    nxt = d.draft(mirror, GAMMA).tokens[0].tolist()
    other = Mirror()
    fresh.apply(other, [(0, prompt + first[:GAMMA], SamplingParams())], [], [])
    assert nxt == fresh.draft(other, GAMMA).tokens[0].tolist()
    # keep -1 (and the old three-column rows) leave the drafts past the verdict standing
    tokens = list(seq.token_ids)
    d.apply(mirror, [], [], [(0, num, first[GAMMA - 1], -1)])
    d.apply(mirror, [], [], [(0, num, first[GAMMA - 1])])
    assert seq.token_ids == tokens
