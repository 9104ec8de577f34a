"""The PEARL per-sequence state machine on its own: `judge()` on hand-made logits, the stopping
rules it feeds (`commit`), and Verifier rounds on a tiny model with a scripted draft.

Vocabulary of the hand-made cases: V tokens, row i of `logits` peaks at the token the target
predicts after pending[:i]."""
import math
import random

import pytest
import torch

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.engine.stopping import commit
from pearl_runtime.sampling import SamplingParams, probabilities
from target_service.verifier import DraftTokens, Request, Verifier
from pearl_runtime.spec.verdict import judge

V = 16
GREEDY = SamplingParams()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On the 2-core CI box torch's 2 intra-op threads made small CPU forwards ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peaked(*argmaxes: int, vocab: int = V) -> torch.Tensor:
    """One logits row per argument, each peaking (clearly) at that token."""
    rows = torch.randn(len(argmaxes), vocab, generator=torch.Generator().manual_seed(len(argmaxes))) * 0.1
    for i, t in enumerate(argmaxes):
        rows[i, t] = 5.0
    return rows


# -- greedy: pre-verify --------------------------------------------------------------------
def test_pre_verify_rejects_wrong_first_token_and_commits_the_targets():
    v = judge(peaked(7), pending=[], pending_probs=None, fresh=[3, 4, 5, 6], fresh_probs=None, params=GREEDY)
    assert v.tokens == [7]
    assert v.pending == [] and v.pending_probs is None
    assert v.accepted == 0 and v.rejected


def test_pre_verify_accepts_first_token_and_carries_the_rest_as_pending():
    v = judge(peaked(3), pending=[], pending_probs=None, fresh=[3, 4, 5, 6], fresh_probs=None, params=GREEDY)
    assert v.tokens == [3]
    assert v.pending == [4, 5, 6]
    assert v.accepted == 1 and not v.rejected


# -- greedy: post-verify ------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
def test_everything_accepted_commits_gamma_tokens_per_round(gamma):
    """A draft that always agrees: round 1 (pre-verify) commits 1 token, every later round
    (post-verify) commits gamma (gamma - 1 pending + fresh[0]), and the draft never stops."""
    truth = [(3 * i + 1) % V for i in range(200)]     # the target's greedy continuation
    committed, pending = [], []
    per_round = []
    for _ in range(20):
        n = len(committed)
        # the target's rows: after committed, after committed + pending[:1], ...
        logits = peaked(*truth[n:n + len(pending) + 1])
        fresh = truth[n + len(pending):n + len(pending) + gamma]   # drafted after the pending tokens
        v = judge(logits, pending, None, fresh, None, GREEDY)
        assert not v.rejected
        assert v.accepted == len(pending) + 1
        committed += v.tokens
        per_round.append(len(v.tokens))
        pending = v.pending
        assert len(pending) == gamma - 1
    assert per_round == [1] + [gamma] * 19
    assert committed == truth[:len(committed)]


@pytest.mark.parametrize("reject_at", [0, 1, 2, 3])
def test_rejection_in_post_verify_commits_accepted_prefix_and_correction(reject_at):
    """pending = [a, b, c], fresh[0] = d: a rejection at position i commits pending[:i] + the
    target's token there and clears pending (i = 3 rejects fresh[0] after all pending held)."""
    pending, fresh = [1, 2, 3], [4, 5, 6, 8]
    candidates = pending + fresh[:1]
    target = list(candidates)
    target[reject_at] = 9
    v = judge(peaked(*target[:len(pending) + 1]), pending, None, fresh, None, GREEDY)
    assert v.tokens == candidates[:reject_at] + [9]
    assert v.pending == [] and v.pending_probs is None
    assert v.accepted == reject_at and v.rejected


def test_sd_round_without_fresh_tokens_gets_a_bonus_token():
    """sd / ar: pending is this round's draft, no fresh tokens; all held -> row k is a bonus."""
    v = judge(peaked(1, 2, 11), [1, 2], None, [], None, GREEDY)
    assert v.tokens == [1, 2, 11] and v.pending == [] and v.accepted == 2 and not v.rejected
    v = judge(peaked(10), [], None, [], None, GREEDY)           # ar: one token, the argmax
    assert v.tokens == [10] and v.accepted == 0 and not v.rejected


# -- draft padding (-1 where the draft produced nothing) ----------------------------------
def test_draft_padding():
    # the draft stopped after 2 tokens: only the real ones are carried
    v = judge(peaked(5), [], None, [5, 6, -1, -1], None, GREEDY)
    assert v.tokens == [5] and v.pending == [6]
    v = judge(peaked(5), [], None, [5, -1, -1, -1], None, GREEDY)
    assert v.tokens == [5] and v.pending == [] and not v.rejected
    # nothing drafted at all: the target's token is committed
    v = judge(peaked(5), [], None, [-1, -1, -1, -1], None, GREEDY)
    assert v.tokens == [5] and v.pending == [] and v.accepted == 0
    # sampling: a -1 is never committed; the token comes from the target's distribution
    sp = SamplingParams(temperature=1.0)
    logits = torch.full((1, V), -30.0)
    logits[0, 12] = 0.0                                        # p is (numerically) one-hot on 12
    for seed in range(20):
        v = judge(logits, [], None, [-1, -1], torch.full((2, V), 1 / V), sp, torch.Generator().manual_seed(seed))
        assert v.tokens == [12] and v.pending == []


def test_sampling_pending_probs_follow_their_tokens():
    """The q rows carried into the next round are exactly those of the carried tokens."""
    sp = SamplingParams(temperature=1.0)
    p_logits = torch.zeros(1, V)
    q = torch.softmax(torch.randn(4, V, generator=torch.Generator().manual_seed(3)), -1)
    fresh = [2, 7, 9, -1]
    q[0] = torch.full((V,), 1 / V)                              # q == p: fresh[0] is always accepted
    v = judge(p_logits, [], None, fresh, q, sp, torch.Generator().manual_seed(0))
    assert v.tokens == [2] and v.pending == [7, 9]
    assert torch.equal(v.pending_probs, q[1:3])


# -- what gets committed: EOS, stop tokens, max_tokens, the window -------------------------
EOS = 13


def seq_after(prompt_len=5, done=0, **params) -> Sequence:
    s = Sequence(list(range(prompt_len)), SamplingParams(**params))
    s.token_ids += [1] * done
    return s


def test_commit_stops_at_eos_inside_an_accepted_run():
    pending, fresh = [4, EOS, 6], [7, 8]
    v = judge(peaked(4, EOS, 6, 7), pending, None, fresh, None, GREEDY)
    assert v.tokens == [4, EOS, 6, 7] and not v.rejected
    seq = seq_after(max_tokens=100)
    assert commit(seq, v.tokens, (EOS,), 1024) == [4, EOS]
    assert seq.finish_reason == "stop" and seq.completion_ids == [4, EOS]
    # ignore_eos: EOS is a normal token, the whole run is committed
    seq = seq_after(max_tokens=100, ignore_eos=True)
    assert commit(seq, v.tokens, (EOS,), 1024) == [4, EOS, 6, 7] and seq.finish_reason is None
    # a request's own stop token counts even with ignore_eos
    seq = seq_after(max_tokens=100, ignore_eos=True, stop_token_ids=(6,))
    assert commit(seq, v.tokens, (EOS,), 1024) == [4, EOS, 6] and seq.finish_reason == "stop"


def test_commit_stops_at_max_tokens_inside_a_run():
    v = judge(peaked(1, 2, 3, 4, 5), [1, 2, 3, 4], None, [5, 6], None, GREEDY)
    assert len(v.tokens) == 5
    seq = seq_after(done=8, max_tokens=10)                      # 2 tokens of budget left
    assert commit(seq, v.tokens, (EOS,), 1024) == [1, 2]
    assert seq.finish_reason == "length" and seq.num_completion_tokens == 10
    # the context window cuts the same way
    seq = seq_after(prompt_len=5, done=0, max_tokens=100)
    assert commit(seq, v.tokens, (EOS,), 8) == [1, 2, 3] and seq.finish_reason == "length"


# -- sampling: the acceptance / residual rule is lossless ----------------------------------
def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def assert_fits(counts: torch.Tensor, p: torch.Tensor, what: str = "") -> None:
    """Pearson chi-square goodness of fit of `counts` to `p`, at a 1e-4 false-alarm rate
    (cells expected below 5 are pooled; Wilson-Hilferty approximation of the quantile)."""
    counts, p = counts.flatten().double(), p.flatten().double()
    n = float(counts.sum())
    big = p * n >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([p[big], p[~big].sum()[None]]) * n
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    z = 3.719                                   # the standard normal's 1 - 1e-4 quantile
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < limit, f"{what}: chi2 {chi2:.1f} >= {limit:.1f} (df {df}); empirical {obs / n} vs {exp / n}"


P_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.0, -0.5, 0.5, -3.0, 1.2])
Q = torch.tensor([0.02, 0.05, 0.30, 0.30, 0.15, 0.03, 0.10, 0.05])   # far from p on purpose


def test_sampled_first_token_has_the_target_distribution():
    """Pre-verify with a draft whose q differs a lot from p: over many seeds the committed
    first token follows p (TV within ~5 standard errors), not q nor a mixture."""
    sp = SamplingParams(temperature=0.8, top_p=0.95)
    p = probabilities(P_LOGITS, sp)
    n, vocab = 12000, len(Q)
    counts = torch.zeros(vocab)
    accepted = 0
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        x = int(torch.multinomial(Q, 1, generator=g))            # the draft samples from q
        v = judge(P_LOGITS[None], [], None, [x, 0], Q[None].repeat(2, 1), sp, g)
        counts[v.tokens[0]] += 1
        accepted += v.accepted
    assert_fits(counts, p, "first token")
    assert tv(counts, Q) > 0.3                                 # q is far from p: a q-biased rule would show
    assert counts[6] < 0.01 * n                                 # p(6) ~ 0 (top-p cut) is never emitted
    # the acceptance rate is sum(min(p, q))
    assert abs(accepted / n - float(torch.minimum(p, Q).sum())) < 0.03


def test_sampled_stream_over_many_rounds_is_the_targets():
    """A full PEARL loop in sampling mode (pre- and post-verify, pending tokens carried with
    their q rows) against a target whose next-token distribution is p at every position:
    the committed tokens at positions 0..3 are each ~ p, and consecutive pairs ~ p x p."""
    sp = SamplingParams(temperature=1.0)
    p = probabilities(P_LOGITS, sp)
    gamma, positions, trials = 3, 4, 6000
    vocab = len(Q)
    marg = torch.zeros(positions, vocab)
    pairs = torch.zeros(vocab, vocab)
    post_verify_rounds = 0
    qs = torch.stack([Q.roll(j) for j in range(gamma)])     # the draft's q differs per step
    for seed in range(trials):
        g = torch.Generator().manual_seed(10_000 + seed)
        gd = torch.Generator().manual_seed(90_000 + seed)        # the draft's own randomness
        out, pending, pending_q = [], [], None
        while len(out) < positions:
            fresh = [int(torch.multinomial(qs[j], 1, generator=gd)) for j in range(gamma)]
            logits = P_LOGITS[None].repeat(len(pending) + 1, 1)
            post_verify_rounds += bool(pending)
            v = judge(logits, pending, pending_q, fresh, qs, sp, g)
            out += v.tokens
            pending, pending_q = v.pending, v.pending_probs
        for i in range(positions):
            marg[i, out[i]] += 1
        pairs[out[0], out[1]] += 1
    for i in range(positions):
        assert_fits(marg[i], p, f"position {i}")
    assert_fits(pairs, torch.outer(p, p), "positions 0 and 1 jointly")
    assert post_verify_rounds > trials / 4          # the post-verify path was really exercised


# -- Verifier rounds on a tiny model, with a scripted draft --------------------------------
def reference(model_dir, prompts, max_tokens):
    eng = LLMEngine(EngineConfig(model=str(model_dir), num_blocks=256), load_tok=False)
    return eng.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])


def run_core(model_dir, prompts, max_tokens, refs, gamma, mode, corrupt=0.0, seed=0, num_blocks=256, core_hook=None):
    """Drive Verifier like TargetService does, with a draft that proposes the reference
    continuation (corrupted with probability `corrupt` per token). Returns (completions,
    forwards per request)."""
    rng = random.Random(seed)
    core = Verifier(EngineConfig(model=str(model_dir), num_blocks=num_blocks))
    if core_hook:
        core_hook(core)
    reqs = []
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        req = Request(f"r{i}", Sequence(p, SamplingParams(max_tokens=m, ignore_eos=True)))
        core.add(req)
        reqs.append(req)
    truth = {r.seq.seq_id: list(p) + ref for r, p, ref in zip(reqs, prompts, refs)}

    def draft_for(req, n=gamma):
        start = len(req.seq.token_ids)                # committed (+ pending in pearl mode)
        toks = truth[req.seq.seq_id][start:start + n]
        toks = [(t + 1) % 64 if rng.random() < corrupt else t for t in toks]
        return DraftTokens(toks + [-1] * (n - len(toks)))

    rounds = 0
    while core.has_work():
        running = core.schedule()
        if mode == "pearl":   # the draft continues after committed + pending
            drafts = {r.seq.seq_id: draft_for(r) for r in running}
            logits = core.forward(running)
        elif mode == "pearl-head":   # every round a head start of 2: early tokens join pending
            full = {r.seq.seq_id: draft_for(r, gamma + 2) for r in running}
            taken = core.attach(running, {sid: DraftTokens(d.tokens[:2]) for sid, d in full.items()})
            logits = core.forward(running)
            drafts = {sid: DraftTokens(d.tokens[taken.get(sid, 0):]) for sid, d in full.items()}
        else:                 # sd: drafts after the committed tokens, verified in this forward
            drafts = {r.seq.seq_id: draft_for(r) for r in running}
            core.attach(running, drafts)
            logits = core.forward(running)
            drafts = {}
        core.finish_round(running, logits, drafts)
        for r in running:
            if not r.finished:   # the KV holds all committed tokens but the last
                assert r.seq.num_kv <= len(r.seq) - 1
        rounds += 1
        assert rounds < 2000
    return [r.seq.completion_ids for r in reqs], [r.forwards for r in reqs]


@pytest.fixture(scope="module")
def core_case(llama_dir):
    rng = random.Random(1)
    lens = [1, 3, 17, 40, 90]
    max_tokens = [1, 9, 25, 13, 30]
    prompts = [[rng.randrange(400) for _ in range(n)] for n in lens]
    return llama_dir, prompts, max_tokens, reference(llama_dir, prompts, max_tokens)


@pytest.mark.parametrize("gamma", [1, 4])
def test_core_pearl_rounds_with_a_perfect_draft(core_case, gamma):
    d, prompts, max_tokens, refs = core_case
    outs, forwards = run_core(d, prompts, max_tokens, refs, gamma, "pearl")
    assert outs == refs
    # 1 token from the prefill round, then gamma per round
    assert forwards == [1 + math.ceil((m - 1) / gamma) for m in max_tokens]


def test_core_sd_rounds_with_a_perfect_draft(core_case):
    d, prompts, max_tokens, refs = core_case
    gamma = 4
    outs, forwards = run_core(d, prompts, max_tokens, refs, gamma, "sd")
    assert outs == refs
    # every round (the prefill one too) verifies gamma drafted tokens and adds a bonus token
    assert forwards == [math.ceil(m / (gamma + 1)) for m in max_tokens]


def test_core_pearl_head_start_rounds_with_a_perfect_draft(core_case):
    d, prompts, max_tokens, refs = core_case
    outs, forwards = run_core(d, prompts, max_tokens, refs, 4, "pearl-head")
    assert outs == refs
    _, plain = run_core(d, prompts, max_tokens, refs, 4, "pearl")
    assert all(h <= p for h, p in zip(forwards, plain)) and sum(forwards) < sum(plain)


@pytest.mark.parametrize("mode", ["pearl", "sd", "pearl-head"])
@pytest.mark.parametrize("corrupt", [0.2, 0.6, 1.0])
def test_core_rounds_with_a_wrong_draft_stay_lossless(core_case, mode, corrupt):
    d, prompts, max_tokens, refs = core_case
    outs, forwards = run_core(d, prompts, max_tokens, refs, 4, mode, corrupt=corrupt, seed=7)
    assert outs == refs
    assert all(f <= m for f, m in zip(forwards, max_tokens))     # never worse than ar
    if corrupt == 1.0:
        assert forwards == max_tokens                              # every draft token rejected


@pytest.mark.parametrize("mode", ["pearl", "sd"])
def test_core_rounds_preempted_by_a_full_cache_stay_lossless(core_case, mode):
    """A cache too small for every sequence at once: the scheduler preempts (dropping pending
    draft tokens) and recomputes later; the output is still the reference."""
    d = core_case[0]
    rng = random.Random(5)
    prompts = [[rng.randrange(400) for _ in range(20)] for _ in range(3)]
    max_tokens = [40, 40, 40]           # 60 tokens = 4 blocks each; 8 blocks hold two at the end
    refs = reference(d, prompts, max_tokens)
    preempted = []

    def count_preemptions(core):
        original = core.scheduler.preempt
        core.scheduler.preempt = lambda seq: (preempted.append(seq.seq_id), original(seq))[1]

    outs, _ = run_core(d, prompts, max_tokens, refs, 4, mode, corrupt=0.3, seed=3, num_blocks=8,
                       core_hook=count_preemptions)
    assert outs == refs
    assert preempted, "the cache was never full: the test did not exercise preemption"


def test_attach_appends_early_tokens_after_pending_with_their_probs(llama_dir):
    """A head start's early tokens join a post-verify sequence's pending ones, in order, with
    their draft probabilities (sampling) lined up behind the pending rows."""
    core = Verifier(EngineConfig(model=str(llama_dir), num_blocks=64))
    req = Request("a", Sequence([1, 2, 3], SamplingParams(temperature=0.7, seed=1)))
    core.add(req)
    core.schedule()
    vocab = core.runner.model_cfg.vocab_size
    old_q, new_q = torch.rand(2, vocab), torch.rand(3, vocab)
    req.pending, req.pending_probs = [5, 6], old_q
    req.seq.token_ids += [5, 6]
    taken = core.attach([req], {req.seq.seq_id: DraftTokens([7, 8, -1], new_q)})
    assert taken == {req.seq.seq_id: 2}
    assert req.pending == [5, 6, 7, 8] and req.seq.token_ids[-4:] == [5, 6, 7, 8]
    assert torch.equal(req.pending_probs, torch.cat([old_q, new_q[:2]]))
