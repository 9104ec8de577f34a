"""Gamma retuned from the rounds: the observed draft time per token, verify time and
acceptance move each batch bucket's gamma by the same rules as the start-time pick."""
import pytest

from pearl_runtime.engine.step_timer import VerifyCost
from pearl_runtime.spec.policy import GammaTuner
from pearl_runtime.spec.round_model import head_start_for, pearl_mean_query, sd_gamma, sd_tokens_per_ms


def _rounds(tuner, n, batch=1, gamma=None, draft_ms_per_token=1.0, verify_ms=8.0, drafted=4, accepted=3):
    moves = []
    for _ in range(n):
        g = gamma or tuner.gamma_for(batch)
        moves.append(tuner.observe(batch, g, draft_ms_per_token * g, verify_ms, drafted, accepted))
    return [m for m in moves if m is not None]


def test_pearl_shortens_gamma_when_the_draft_slows_beside_the_verify():
    """One GPU under MPS: the start pick (draft alone, 1.3 ms a step) was 5 against a 6.8 ms
    verify; beside the verify a step takes 2.6 ms, so half as many fit."""
    tuner = GammaTuner("pearl", max_gamma=16, default=4)
    tuner.seed({1: 5, 16: 6})
    assert _rounds(tuner, GammaTuner.WARMUP - 1, draft_ms_per_token=2.6, verify_ms=7.5) == []   # warm-up
    _rounds(tuner, 30, draft_ms_per_token=2.6, verify_ms=7.5)
    assert tuner.gamma_for(1) == 3
    assert tuner.gamma_for(16) == 6            # another bucket keeps its own pick


def test_pearl_lengthens_gamma_for_a_faster_draft_and_respects_the_ceiling():
    tuner = GammaTuner("pearl", max_gamma=16, default=4)
    _rounds(tuner, 40, draft_ms_per_token=1.0, verify_ms=9.2)
    assert tuner.gamma_for(1) == 9
    _rounds(tuner, 60, draft_ms_per_token=0.5, verify_ms=20.0)
    assert tuner.gamma_for(1) == 16


def test_pearl_holds_still_for_a_small_gain():
    tuner = GammaTuner("pearl", max_gamma=16, default=6)
    assert _rounds(tuner, 50, draft_ms_per_token=1.0, verify_ms=6.5) == []
    assert tuner.gamma_for(1) == 6


@pytest.mark.parametrize("accepted,expect_longer", [(4, True), (1, False)])
def test_sd_follows_the_measured_acceptance(accepted, expect_longer):
    """sd takes turns: a draft whose tokens are nearly all accepted earns a longer gamma than
    the 0.8 prior gives; a poor one a shorter gamma."""
    tuner = GammaTuner("sd", max_gamma=16, default=5)
    _rounds(tuner, 60, draft_ms_per_token=1.3, verify_ms=6.75, drafted=5, accepted=accepted)
    assert (tuner.gamma_for(1) > 5) == expect_longer
    assert (tuner.gamma_for(1) < 5) == (not expect_longer)


def test_buckets_without_seeds_are_powers_of_two():
    tuner = GammaTuner("pearl", max_gamma=16, default=4)
    assert [tuner.bucket(b) for b in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, 16]
    _rounds(tuner, 40, batch=1, draft_ms_per_token=3.0, verify_ms=6.0)   # bucket 1 retuned to 2
    assert tuner.gamma_for(1) == 2
    assert tuner.bucket(8) == 8 and tuner.gamma_for(8) == 4             # others keep theirs
    tuner.seed({1: 4, 8: 4, 32: 4})
    assert [tuner.bucket(b) for b in (1, 2, 8, 9, 64)] == [1, 8, 8, 32, 32]


def test_rounds_without_timing_are_ignored():
    tuner = GammaTuner("pearl", max_gamma=16, default=4)
    assert tuner.observe(1, 4, 0.0, 5.0, 4, 4) is None
    assert tuner.observed == {}


class SlowDraftLink:
    """A connected draft that proposes nothing (-1) and reports 3 ms a drafted token."""
    connected, generation = True, 1

    def __init__(self):
        from pearl_runtime.pb import draft_pb2
        self.info = draft_pb2.HelloReply(accepted=True)   # no step times: CPU-like start
        self.gammas = []

    async def exchange(self, rnd):
        import torch

        from pearl_runtime.pb import draft_pb2
        from pearl_runtime.rpc import tensors
        self.gammas.append(rnd.gamma)
        ids = [a.seq_id for a in rnd.adds] or self.ids
        self.ids = ids
        return draft_pb2.DraftBatch(round_id=rnd.round_id, seq_ids=ids, draft_ms=3.0 * rnd.gamma,
                                    tokens=tensors.encode(torch.full((len(ids), rnd.gamma), -1, dtype=torch.int32)))


def test_service_retunes_pearl_gamma_from_its_rounds_and_stays_lossless(llama_dir):
    """Auto gamma with no start-time measurements starts at 4; rounds whose draft takes 3 ms a
    token beside a 6 ms verify bring it to 2, and the output is still the target's."""
    import asyncio

    from pearl_runtime.config import EngineConfig
    from target_service.rounds import TargetService
    from tests.services.procs import reference_greedy
    from tests.target_service.drive import generate

    prompt, n = [5, 6, 7, 8], 24
    ref = reference_greedy(llama_dir, [prompt], [n])[0]

    async def main():
        service = TargetService(EngineConfig(model=str(llama_dir), num_blocks=64), mode="pearl", gamma=None,
                                head_start=0)
        real = service._timed_forward

        def timed_6ms(reqs):   # the verify "takes" 6 ms, whatever the CPU does
            logits, _, done = real(reqs)
            return logits, 6.0, done
        service._timed_forward = timed_6ms
        service.link = link = SlowDraftLink()
        return link, await generate(service, prompt, n)

    link, got = asyncio.run(main())
    assert got == ref
    assert link.gammas[0] == 4 and link.gammas[-1] == 2, link.gammas


def test_a_prefill_round_does_not_swing_gamma():
    """A bucket's first round carries the prompts' prefill (a large target on two GPUs: 361 ms and
    16.6 ms a draft token against a 23 ms verify and 1.7 ms steps); it moved gamma 13 -> 16
    before this rule. Later a joining request's prefill or a stall must not either."""
    tuner = GammaTuner("pearl", max_gamma=16, default=4)
    tuner.seed({1: 13})
    assert tuner.observe(1, 13, 16.6 * 13, 361.0, 13, 10) is None
    assert _rounds(tuner, 20, draft_ms_per_token=1.75, verify_ms=23.0) == []
    assert tuner.observe(1, 13, 1.75 * 13, 400.0, 13, 10) is None     # one stall: skipped
    assert _rounds(tuner, 8, draft_ms_per_token=1.75, verify_ms=23.0) == []
    assert tuner.gamma_for(1) == 13


def test_a_lasting_slowdown_is_followed():
    tuner = GammaTuner("pearl", max_gamma=16, default=4)
    tuner.seed({1: 8})
    _rounds(tuner, 20, draft_ms_per_token=1.0, verify_ms=8.0)
    assert tuner.gamma_for(1) == 8
    _rounds(tuner, 60, draft_ms_per_token=1.0, verify_ms=30.0)   # 3.75x, for good
    assert tuner.gamma_for(1) == 16


@pytest.mark.parametrize("mode", ["sd", "pearl"])
def test_a_compute_bound_verify_keeps_gamma_short(mode):
    """A large TP=2 target at batch 32: with the verify priced flat, sd at acceptance 0.92 went
    from gamma 7 to 16, and its 17-token verify ran in the 32-token bucket at 81 ms against
    46 ms. Priced by query length, sd's gamma + 1 stays inside the 16-token bucket; PEARL,
    priced at its batch's mean query (pre-verify sequences feed fewer tokens), short of where
    the flat price takes it (at acceptance ~0.98 long windows pay, so not by much)."""
    cost = VerifyCost({8: {32: 46.0}, 16: {32: 60.0}, 32: {32: 90.0}})
    tuner = GammaTuner(mode, max_gamma=31, default=7, verify_cost=cost)
    tuner.seed({32: 7})
    _rounds(tuner, 60, batch=32, draft_ms_per_token=2.2, verify_ms=46.0, drafted=7, accepted=6)
    assert tuner.alpha > 0.9
    flat = GammaTuner(mode, max_gamma=31, default=7)
    flat.seed({32: 7})
    _rounds(flat, 60, batch=32, draft_ms_per_token=2.2, verify_ms=46.0, drafted=7, accepted=6)
    assert flat.gamma_for(32) > 15          # what the flat price did
    g = tuner.gamma_for(32)
    if mode == "sd":
        assert 7 <= g <= 15
    else:
        assert 7 <= g < flat.gamma_for(32)

def test_buckets_not_yet_run_are_repriced_at_the_measured_acceptance():
    """The start picks assume acceptance 0.8. Once batch 1 has measured ~0.95, batch 8 (not run
    yet) starts at the gamma that acceptance earns instead of spending its first rounds on the
    prior's (a 128-token request at batch 8 lasts ~17 rounds)."""
    cost = VerifyCost({q: {1: 22.0, 8: 22.0 + q} for q in (2, 4, 8, 16, 32)})
    tuner = GammaTuner("sd", max_gamma=31, default=4, verify_cost=cost)
    tuner.seed_measured({1: 1.8, 8: 1.8, 64: 2.0})      # 64: no verify measured, left out
    assert sorted(tuner.picks) == [1, 8]
    prior = dict(tuner.picks)
    _rounds(tuner, 12, batch=1, draft_ms_per_token=1.8, verify_ms=22.0, drafted=8, accepted=8)
    assert tuner.alpha > 0.9
    assert tuner.gamma_for(8) > prior[8]
    # a bucket still in its warm-up rounds is re-priced too; one past them is left to its own
    # observations
    _rounds(tuner, GammaTuner.WARMUP - 1, batch=8, draft_ms_per_token=6.0, verify_ms=30.0, drafted=8, accepted=8)
    before = tuner.gamma_for(8)
    tuner._reprice(0.5)
    assert tuner.gamma_for(8) < before
    _rounds(tuner, 8, batch=8, draft_ms_per_token=6.0, verify_ms=30.0, drafted=8, accepted=8)
    before = tuner.gamma_for(8)
    tuner._reprice(0.5)
    assert tuner.gamma_for(8) == before


def test_a_verify_is_priced_at_the_query_it_ran():
    """A PEARL round judges the last round's drafts, so its verify length is not gamma + 1: at
    batch 8, short pre-verify rounds (24 ms at 8 tokens) read as a cheap 16-token verify
    took gamma 15 -> 7. Each round is compared with the table at its own length."""
    cost = VerifyCost({q: {8: t} for q, t in ((2, 21.7), (4, 22.8), (8, 24.3), (16, 29.3), (32, 41.9))})
    tuner = GammaTuner("pearl", max_gamma=31, default=15, verify_cost=cost)
    tuner.seed({8: 15})
    for _ in range(40):   # pre-verify (8 tokens) and post-verify (16) rounds, at the table's times
        tuner.observe(8, 15, 15 * 1.9, 24.3, 8, 7, query_len=8)
        tuner.observe(8, 15, 15 * 1.9, 29.3, 8, 7, query_len=16)
        # a mixed batch: a mean of 12 tokens a sequence, priced between the two as PEARL's
        # model prices it (packed graphs)
        tuner.observe(8, 15, 15 * 1.9, 26.8, 8, 7, query_len=12.0)
    assert tuner.observed[8].verify_ratio == pytest.approx(1.0)
    assert tuner.gamma_for(8) >= 13


def test_a_head_start_round_counts_its_early_tokens_as_draft_steps():
    """A head-start round drafts gamma + w tokens: its draft time per token divides by those,
    and the acceptance fit uses the bucket's gamma, not gamma + w."""
    tuner = GammaTuner("pearl", max_gamma=16, default=6)
    tuner.observe(1, 6, 9 * 1.5, 8.0, 6, 5, draft_steps=9)
    assert tuner.observed[1].draft_ms_per_token == pytest.approx(1.5)
    assert tuner.last_gamma == 6


def _pearl_moves(draft_ms_per_token):
    tuner = GammaTuner("pearl", max_gamma=16, default=4)
    tuner.seed({1: 9})
    moves = [tuner.observe(1, tuner.gamma_for(1), t * tuner.gamma_for(1), 9.2, 4, 3) for t in draft_ms_per_token]
    return [m for m in moves if m is not None], tuner.gamma_for(1)


def test_a_one_decision_blip_does_not_move_gamma(monkeypatch):
    """Four slow draft rounds between steady ones: a single decision would have walked gamma
    9 -> 7 -> 8 -> 9 (each move a round at a worse gamma); a move must be picked twice in a row."""
    blip = [1.0] * 8 + [1.4] * 4 + [1.0] * 12
    assert _pearl_moves(blip) == ([], 9)
    monkeypatch.setattr(GammaTuner, "CONFIRM", 1)
    assert _pearl_moves(blip) == ([7, 8, 9], 9)


def test_a_lasting_change_moves_gamma_at_the_second_decision():
    moves, gamma = _pearl_moves([1.0] * 8 + [1.4] * 16)
    assert moves == [7] and gamma == 7


FLAT_4_8 = VerifyCost({q: {1: 4.8} for q in (2, 4, 8, 16, 32)})   # 7B verify at bs 1, ~flat in query length


def _sd_rounds(tuner, n, round_ms=True, fixed=1.37, accepted=(2, 2, 2, 2, 2, 2, 2, 1)):
    """Rounds at gamma 3 as a 7B target + 0.5B draft ran them at bs 1 (GPU): verify 4.8 ms, draft
    0.57 ms a step + 0.9 ms a round, transport and host 0.47 ms; ~0.78 acceptance."""
    moves = []
    for i in range(n):
        draft = 0.57 * 3 + 0.9
        moves.append(tuner.observe(1, 3, draft, 4.8, 3, accepted[i % len(accepted)],
                                   round_ms=4.8 + 0.57 * 3 + fixed if round_ms else None))
    return [m for m in moves if m is not None]


def _sd_tuner():
    tuner = GammaTuner("sd", max_gamma=16, default=4, verify_cost=FLAT_4_8)
    tuner.seed_measured({1: 0.57})
    tuner.picks[1] = 3        # where the draft-time-per-token price settled
    return tuner


def test_sd_prices_the_rounds_fixed_part_and_lengthens_gamma():
    """gamma 3 rounds of 7.8 ms carry ~1.37 ms that no gamma changes; spread over 3 draft tokens
    it kept auto gamma at 3 where 4 ran ~3% faster. Priced as fixed + gamma x 0.57 + verify,
    the model's best is 6."""
    tuner = _sd_tuner()
    assert _sd_rounds(tuner, 40) == [6]
    obs = tuner.observed[1]
    assert obs.fixed_ms == pytest.approx(1.37)
    assert 0.77 < tuner.alpha < 0.8
    assert tuner.gamma_for(1) == sd_gamma(4.8, 0.57, 16, tuner.alpha, fixed_ms=obs.fixed_ms) == 6
    # the same rounds without their wall time: priced as before (draft ms / gamma, no fixed
    # part), gamma 4 gains under MIN_GAIN and 3 stays
    old = _sd_tuner()
    assert _sd_rounds(old, 40, round_ms=False) == []
    assert old.gamma_for(1) == 3 and old.observed[1].fixed_ms is None
    t_d = old.observed[1].draft_ms_per_token
    assert sd_tokens_per_ms(4, 4.8, t_d, old.alpha) < GammaTuner.MIN_GAIN * sd_tokens_per_ms(3, 4.8, t_d, old.alpha)


def test_round_times_are_ignored_without_a_start_step_or_in_pearl():
    for tuner in (GammaTuner("sd", max_gamma=16, default=3, verify_cost=FLAT_4_8),   # seeded picks only
                  GammaTuner("pearl", max_gamma=16, default=3, verify_cost=FLAT_4_8)):
        tuner.seed({1: 3})
        _sd_rounds(tuner, 8)
        assert tuner.observed[1].fixed_ms is None


def test_the_fixed_part_skips_a_lone_slow_round_and_warms_up_on_the_fastest():
    tuner = _sd_tuner()
    _sd_rounds(tuner, 1, fixed=40.0)       # a first round's stall: the warm-up keeps the fastest
    _sd_rounds(tuner, GammaTuner.WARMUP + 4)
    assert tuner.observed[1].fixed_ms == pytest.approx(1.37)
    assert _sd_rounds(tuner, 1, fixed=20.0) == []     # a transport stall: skipped
    assert tuner.observed[1].fixed_ms == pytest.approx(1.37)
    assert tuner.observed[1].skipped == 1
    _sd_rounds(tuner, 1)
    assert tuner.observed[1].skipped == 0
    # a lasting slowdown is followed, each round clipped to CLIP x the average
    _sd_rounds(tuner, GammaTuner.OUTLIER_RUN + 1, fixed=20.0)
    w, clip = GammaTuner.WEIGHT, GammaTuner.CLIP
    assert tuner.observed[1].fixed_ms == pytest.approx(1.37 + w * (clip - 1) * 1.37)


def test_sd_tokens_per_ms_without_a_fixed_part_is_the_old_formula():
    for g, verify, draft, alpha in ((3, 4.8, 0.86, 0.8), (7, lambda g: 20.0 + g, 1.8, 0.93)):
        t_v = verify(g) if callable(verify) else verify
        old = sum(alpha ** i for i in range(g + 1)) / (g * draft + t_v)
        assert sd_tokens_per_ms(g, verify, draft, alpha) == old
        assert sd_tokens_per_ms(g, verify, draft, alpha, fixed_ms=0.0) == old
        assert sd_tokens_per_ms(g, verify, draft, alpha, fixed_ms=1.3) == pytest.approx(
            sum(alpha ** i for i in range(g + 1)) / (1.3 + g * draft + t_v))
    assert sd_gamma(6.9, 1.0, 16) == sd_gamma(6.9, 1.0, 16, fixed_ms=0.0) == 5
    # a fixed cost per round prices like a dearer flat verify: it favours longer rounds
    assert sd_gamma(6.9, 1.0, 16, fixed_ms=18.1) == sd_gamma(25.0, 1.0, 16) == 9


def test_flag_parsers_read_the_flag_texts():
    from pearl_runtime.spec.policy import parse_gamma, parse_head_start, parse_quorum
    assert parse_gamma("auto") is None and parse_gamma("6") == 6
    assert parse_head_start("auto") == -1 and parse_head_start("0") == 0 and parse_head_start("3") == 3
    assert parse_quorum("0.75") == 0.75 and parse_quorum("1") == 1.0
    with pytest.raises(ValueError, match="wants 'auto' or a number of tokens >= 0, got '-1'"):
        parse_head_start("-1")
    for bad in ("0", "1.5", "half"):
        with pytest.raises(ValueError, match=r"wants a share of the batch in \(0, 1\]"):
            parse_quorum(bad)


def test_a_restarted_cpu_draft_of_the_same_model_keeps_the_gamma_the_rounds_found():
    """A CPU draft's handshake has no step times: gamma starts at the default and the rounds
    tune it. The same draft model back after a restart keeps the tuned gamma (its first rounds
    back stay short); another model starts over."""
    from pearl_runtime.spec.policy import SpecPolicy
    policy = SpecPolicy("pearl")
    policy.seed_from_draft({}, draft_model="draft-a")
    start = policy.gamma_for(1)
    _rounds(policy.tuner, 40, draft_ms_per_token=20.0, verify_ms=8.0)   # a slow draft: short gamma
    tuned = policy.gamma_for(1)
    assert tuned < start
    policy.seed_from_draft({}, draft_model="draft-a")
    assert policy.gamma_for(1) == tuned
    policy.seed_from_draft({}, draft_model="draft-b")
    assert policy.gamma_for(1) == start
