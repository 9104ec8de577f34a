"""--mode auto's choice (pearl_runtime/spec/mode_choice.py) with injected step times: the mode
per batch size for several timing tables, the two-decisions-in-a-row rule, the margin, and a
shared GPU leaving pearl out."""
import pytest

from pearl_runtime.spec.mode_choice import ModeChooser
from pearl_runtime.spec.policy import SpecPolicy
from pearl_runtime.spec.verify_cost import VerifyCost

# one GPU, 7B + 0.5B-like: a bandwidth-bound verify at small batches, compute-bound at 64
BANDWIDTH = VerifyCost({1: {1: 7.0, 16: 8.0, 64: 12.0}, 8: {1: 7.3, 16: 12.0, 64: 60.0},
                        16: {1: 7.6, 16: 18.0, 64: 110.0}})
CHEAP_DRAFT = {1: 0.5, 16: 0.7, 64: 1.2}
# the CPU demo: the draft steps about as long as the target's
SLOW_DRAFT = {1: 6.0, 16: 7.0, 64: 10.0}


def chooser(draft=CHEAP_DRAFT, shared=True, cost=BANDWIDTH, **kw) -> ModeChooser:
    return ModeChooser(cost, draft, shared_gpu=shared, **kw)


@pytest.mark.parametrize("draft,shared,expect", [
    (CHEAP_DRAFT, True, {1: "sd", 16: "sd", 64: "ar"}),       # one GPU: sd, ar where speculation does not pay
    (CHEAP_DRAFT, False, {1: "pearl", 16: "pearl", 64: "pearl"}),   # own GPUs: pearl overlaps draft and verify
    (SLOW_DRAFT, True, {1: "ar", 16: "ar", 64: "ar"}),        # a draft no cheaper than the target
    (SLOW_DRAFT, False, {1: "ar", 16: "ar", 64: "ar"}),       # even overlapped
])
def test_mode_per_batch_size_by_timing_table(draft, shared, expect):
    c = chooser(draft, shared)
    assert {b: c.mode_for(b) for b in expect} == expect
    assert c.mode_for(3) == expect[16]   # a batch takes its bucket's mode


def test_shared_gpu_leaves_pearl_out_even_when_modelled_fastest():
    own, shared = chooser(shared=False), chooser(shared=True)
    m = own.modelled(1, 0.8)
    assert m["pearl"][0] > m["sd"][0] > m["ar"][0]
    assert "pearl" not in shared.estimates(1, 0.8) and shared.mode_for(1) == "sd"
    assert "pearl" in own.estimates(1, 0.8)


def rounds(c: ModeChooser, mode: str, rate: float, n: int, batch: int = 1) -> list:
    """n rounds of `mode` committing `rate` tokens per ms a sequence (10 ms rounds)."""
    return [c.observe(mode, batch, round(rate * 10 * batch), 10.0) for _ in range(n)]


def test_a_switch_needs_two_decisions_in_a_row():
    c = chooser()
    assert c.mode_for(1) == "sd"
    ar_rate = c.modelled(1, 0.8)["ar"][0]
    # sd's rounds run at half ar's rate: its correction takes it below ar
    out = rounds(c, "sd", ar_rate / 2, c.EVERY)
    assert out == [None] * c.EVERY and c.mode_for(1) == "sd"       # one decision picked ar: not yet
    assert c.buckets[1].proposed == ("ar", 1)
    out = rounds(c, "sd", ar_rate / 2, c.EVERY)
    assert out[-1] == "ar" and c.mode_for(1) == "ar"              # the second in a row moves it


def test_a_decision_for_the_current_mode_resets_the_count():
    c = chooser()
    ar_rate = c.modelled(1, 0.8)["ar"][0]
    rounds(c, "sd", ar_rate / 2, c.EVERY)
    assert c.buckets[1].proposed == ("ar", 1)
    rounds(c, "sd", ar_rate * 10, c.EVERY)     # sd fast again: the averages favour it
    assert c.buckets[1].proposed is None
    rounds(c, "sd", ar_rate / 2, c.EVERY)      # one slow stretch is a first decision again
    assert c.mode_for(1) == "sd"


def test_no_switch_inside_the_margin():
    c = ModeChooser(VerifyCost(), {}, shared_gpu=True)   # nothing priced: measured only
    assert c.mode_for(1) == "sd"
    rounds(c, "sd", 1.0, 3 * c.EVERY)
    assert c.mode_for(1) == "ar"                    # ar is unmeasured: it runs, to be measured
    rounds(c, "ar", 0.98, 8 * c.EVERY)              # 2% slower than sd: sd is better, by less than the margin
    assert c.mode_for(1) == "ar"
    rounds(c, "ar", 0.9, 8 * c.EVERY)               # 10% slower: sd wins by more than the margin
    assert c.mode_for(1) == "sd"


def test_unpriced_modes_are_measured_and_the_faster_kept():
    c = ModeChooser(VerifyCost(), {}, shared_gpu=True)   # a CPU target: no step times
    assert c.mode_for(4) == "sd"
    rounds(c, "sd", 0.5, 3 * c.EVERY, batch=4)
    assert c.mode_for(4) == "ar"
    rounds(c, "ar", 1.0, 4 * c.EVERY, batch=4)
    assert c.mode_for(4) == "ar"                   # measured faster: it stays
    assert c.candidates(4) == ["ar", "sd"]           # pearl never ran here: left out on a shared GPU


def test_pearl_on_a_shared_gpu_only_where_measured_faster():
    c = chooser()
    sd_rate = c.modelled(1, 0.8)["sd"][0]
    rounds(c, "sd", sd_rate, c.EVERY)
    rounds(c, "pearl", sd_rate * 1.5, 2)        # rounds pearl ran here (a measurement of its own)
    assert "pearl" in c.candidates(1)
    rounds(c, "sd", sd_rate, 2 * c.EVERY)
    assert c.mode_for(1) == "pearl"


def test_a_prefill_round_does_not_swing_the_choice():
    c = chooser()
    sd_rate = c.modelled(1, 0.8)["sd"][0]
    rounds(c, "sd", sd_rate, 3 * c.EVERY)
    corr = c.buckets[1].correction["sd"]
    rounds(c, "sd", sd_rate / 20, 1)            # one very slow round: left out
    assert c.buckets[1].correction["sd"] == corr and c.mode_for(1) == "sd"


def test_policy_under_auto_routes_gamma_and_observations_by_path():
    p = SpecPolicy("auto", gamma=None, max_gamma=16, verify_cost=BANDWIDTH)
    p.seed_from_draft(CHEAP_DRAFT, shared_gpu=True)
    assert set(p.tuners) == {"sd", "pearl"}
    assert p.choose(1) == "sd" and p.gamma_for(1) == p.tuners["sd"].gamma_for(1)
    assert p.choose(64) == "ar" and p.path == "sd"     # ar leaves the speculative path as it was
    p.seed_from_draft(CHEAP_DRAFT, shared_gpu=False)   # a new draft, on its own GPU
    assert p.choose(1) == "pearl" and p.path == "pearl" and p.shown_mode("pearl") == "auto:pearl"
    assert p.gamma_for(1) == p.tuners["pearl"].gamma_for(1)
    p.observe(batch=1, gamma=p.gamma_for(1), draft_ms=5.0, verify_ms=7.0, drafted=4, accepted=3)
    assert p.tuners["pearl"].observed and not p.tuners["sd"].observed
    fixed = SpecPolicy("sd")
    assert fixed.chooser is None and fixed.observe_mode("sd", 1, 3, 5.0) is None and fixed.shown_mode("sd") == "sd"
