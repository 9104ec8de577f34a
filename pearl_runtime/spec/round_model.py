"""The round model: tokens per round and per-token time of ar, sd and PEARL, and the PEARL
speedup it projects for draft and target on separate GPUs from one run's measurements.

Inputs, all per batch size and in ms: t_ar (one ar decode step of the whole batch), t_d (one
draft step), t_v (one target verify forward), t_x (what a round costs beyond the two models:
the target's host work plus the draft round trip's transport), alpha (the probability that
the target accepts a draft token, independently per position), gamma (draft tokens a round).

    ar     one token a step                     time t_ar
    sd     E_sd = (1 - a^(g+1)) / (1 - a)        time g*t_d + t_v + t_x
    PEARL  E_pearl (below)                      time max(g*t_d, t_v) + t_x

PEARL as spec/verdict.py runs it. A sequence is in *pre-verify* (nothing
pending) or *post-verify* (g-1 draft tokens pending from the last round). Each round the
target judges pending + the first of the draft's g fresh tokens:
- pre-verify judges 1 token and commits 1 (the draft token or the correction); accepted
  (prob a), the other g-1 fresh tokens become pending: post-verify.
- post-verify judges g tokens. The first rejection at position i commits i+1 tokens and
  returns to pre-verify; all g accepted (prob a^g) commits g and stays in post-verify. The
  expected commit is sum_{k<g} a^k = (1 - a^g) / (1 - a).
The two-state chain moves P->V with prob a and V->P with prob 1 - a^g, so it spends a
fraction pi_V = a / (a + 1 - a^g) of rounds in post-verify and

    E_pearl = pi_P * 1 + pi_V * (1 - a^g) / (1 - a) = (1 - a^g) / ((1 - a) (1 + a - a^g))

(a = 0: 1 token a round; a = 1: g tokens a round). bench/projection.simulate_pearl replays the
same rules round by round as a Monte-Carlo cross-check.

With a head start of w tokens (the target's default, w = g // 2), a pre-verify round first
waits w draft steps and judges w + 1 tokens: it commits sum_{k<=w} a^k and moves to
post-verify with prob a^(w+1), so

    E_pearl(w) = (1 - a^g) / ((1 - a) (1 + a^(w+1) - a^g))

and the average round grows by pi_P * w * t_d, pi_P = (1 - a^g) / (1 + a^(w+1) - a^g).

Speedups are per-token time ratios: speedup = t_ar / (round time / tokens per round). The
model is conservative for PEARL in two ways: t_x is charged outside the max although the
transport overlaps the target's forward, and t_v is the sd verify of g+1 tokens a sequence
while a PEARL verify feeds at most g.
"""

# the share of a batch in pre-verify that earns a head start (the target's --head-start-quorum
# default): the whole batch waits for it, so a lower share makes the many post-verify
# sequences idle for the few; bench/projection.simulate_pearl_batch replays the batch rules
# that chose it. At batch 1 any share grants it.
HEAD_START_QUORUM = 0.75
# draft steps one Round may ask for (gamma + its head start): the draft refuses more, and its
# device token buffer holds this many columns
MAX_ROUND_STEPS = 64


def sd_tokens_per_round(alpha: float, gamma: int) -> float:
    """Expected committed tokens of one sd round: accepted drafts plus the correction/bonus."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def _pre_verify_share(alpha: float, gamma: int, head_start: int) -> float:
    """pi_P: the stationary share of pre-verify rounds (P->V with a^(w+1), V->P with 1 - a^g)."""
    to_post, to_pre = alpha ** (head_start + 1), 1.0 - alpha ** gamma
    return to_pre / (to_post + to_pre) if to_post + to_pre > 0 else 0.0


def pearl_tokens_per_round(alpha: float, gamma: int, head_start: int = 0) -> float:
    """Expected committed tokens per PEARL round in the stationary pre/post-verify chain."""
    if alpha >= 1.0:
        return float(gamma)
    pre = (1.0 - alpha ** (head_start + 1)) / (1.0 - alpha)   # a pre-verify round judges w + 1
    post = (1.0 - alpha ** gamma) / (1.0 - alpha)             # a post-verify round judges g
    pi_pre = _pre_verify_share(alpha, gamma, head_start)
    return pi_pre * pre + (1.0 - pi_pre) * post


def pearl_mean_query(alpha: float, gamma: int, head_start: int = 0) -> float:
    """Tokens a sequence feeds a PEARL verify, on average over the chain: w + 1 in pre-verify,
    gamma (g - 1 pending and the first fresh one) in post-verify. CUDA graphs pack a verify's
    tokens, so this, not the longest query, is what a batch's verify costs."""
    pi_pre = _pre_verify_share(alpha, gamma, head_start)
    return pi_pre * (head_start + 1) + (1.0 - pi_pre) * gamma


def head_start_granted(alpha: float, gamma: int, head_start: int, share: float | None) -> float:
    """The fraction of pre-verify rounds that got the head start. The target grants it to a
    whole batch, and only when most of the batch is in pre-verify (HEAD_START_QUORUM): at
    batch 1 that is every pre-verify round, at batch 32 (pi_P ~ 0.4) almost none. `share`:
    the measured fraction of all rounds that waited for one (None: the design's every
    pre-verify round)."""
    if share is None or head_start == 0:
        return 1.0
    pi_pre = _pre_verify_share(alpha, gamma, head_start)
    return min(1.0, share / pi_pre) if pi_pre > 0 else 0.0


def accept_rate(alpha: float, gamma: int, mode: str, head_start: int = 0) -> float:
    """The Metrics acceptance rate (accepted / judged draft tokens) the rules produce at iid
    acceptance `alpha`. Tokens after a round's first rejection count as judged, so this is
    below alpha: sd judges all gamma tokens a round and accepts sum_{k=1..g} a^k of them;
    PEARL judges w + 1 (pre-verify) or g (post-verify) and accepts the same kind of sums."""
    def run(n: int) -> float:   # expected accepted of n judged in a row
        return sum(alpha ** k for k in range(1, n + 1))
    if mode == "sd":
        return run(gamma) / gamma
    pi_pre = _pre_verify_share(alpha, gamma, head_start)
    return ((pi_pre * run(head_start + 1) + (1 - pi_pre) * run(gamma))
            / (pi_pre * (head_start + 1) + (1 - pi_pre) * gamma))


def fit_alpha(rate: float, gamma: int, mode: str, head_start: int = 0) -> float:
    """The iid acceptance whose `accept_rate` equals a measured one (bisection; the rate
    increases with alpha). Prefill rounds and the last truncated round barely move it, unlike
    tokens per forward."""
    lo, hi = 0.0, 1.0
    if rate <= accept_rate(lo, gamma, mode, head_start):
        return 0.0
    if rate >= accept_rate(hi, gamma, mode, head_start):
        return 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if accept_rate(mid, gamma, mode, head_start) < rate else (lo, mid)
    return (lo + hi) / 2


def project(t_ar: float, t_d: float, t_v: float, t_x: float, alpha: float, gamma: int,
            head_start: int = 0, head_start_share: float | None = None) -> dict:
    """Round times, tokens per round and speedups over ar of sd and PEARL (separate GPUs).
    With `head_start_share` (measured), only that share of the rounds wait for the head start
    and the tokens are the mix of the two chains (see head_start_granted)."""
    sd_round = gamma * t_d + t_v + t_x
    e_sd = sd_tokens_per_round(alpha, gamma)
    if head_start_share is None:
        waited = _pre_verify_share(alpha, gamma, head_start)
        e_pearl = pearl_tokens_per_round(alpha, gamma, head_start)
    else:
        f = head_start_granted(alpha, gamma, head_start, head_start_share)
        waited = head_start_share
        e_pearl = f * pearl_tokens_per_round(alpha, gamma, head_start) + (1 - f) * pearl_tokens_per_round(alpha, gamma)
    pearl_round = max(gamma * t_d, t_v) + t_x + waited * head_start * t_d
    return {"sd_round_ms": sd_round, "pearl_round_ms": pearl_round,
            "sd_tokens_per_round": e_sd, "pearl_tokens_per_round": e_pearl,
            "sd_speedup": t_ar * e_sd / sd_round if sd_round > 0 else None,
            "pearl_speedup": t_ar * e_pearl / pearl_round if pearl_round > 0 else None}


def head_start_for(gamma: int, setting: int = -1) -> int:
    """The target's rule: -1 (auto) waits gamma // 2 tokens, else the setting (0: plain PEARL)."""
    return max(1, gamma // 2) if setting < 0 else setting


def as_function(t_v):
    """A verify's ms as gamma -> ms: a number stands for every gamma."""
    return t_v if callable(t_v) else (lambda g: t_v)


SD_PRIOR_ALPHA = 0.8   # acceptance assumed before any is measured


def sd_tokens_per_ms(gamma: int, target_ms, draft_ms: float, alpha: float, fixed_ms: float = 0.0) -> float:
    """sd's expected tokens per ms: sum(alpha^i, i <= g) / (fixed + g * draft + verify(g)).
    `fixed_ms`: what a round costs whatever its gamma (transport, host work, the draft's own
    per-round overhead); spread over the draft's tokens instead, it prices long gammas too
    dear, since with a small draft it is a sizeable share of a round."""
    return sum(alpha ** i for i in range(gamma + 1)) / (fixed_ms + gamma * draft_ms + as_function(target_ms)(gamma))


def sd_gamma(target_ms, draft_ms: float, max_gamma: int, alpha: float = SD_PRIOR_ALPHA, fixed_ms: float = 0.0) -> int:
    """sd: draft and verify take turns, so the best gamma maximizes expected tokens per ms; a
    cheap draft earns a longer gamma. `target_ms`: a verify's ms, or gamma -> ms."""
    return max(range(1, max_gamma + 1), key=lambda g: sd_tokens_per_ms(g, target_ms, draft_ms, alpha, fixed_ms))


def pearl_tokens_per_ms(gamma: int, target_ms, draft_ms: float, alpha: float, head_start: int = -1) -> float:
    """PEARL's expected tokens per ms by the round model above: the round lasts
    as long as the longer of gamma draft steps and one verify, plus the head start's waits.
    The verify is priced at the mean tokens a sequence feeds (pre-verify sequences feed few),
    since graphs pack them: priced at gamma + 1 for all, a large batch's verify looks dearer at long
    gammas than it runs, and auto gamma picks too short a gamma."""
    w = head_start_for(gamma, head_start)
    r = project(1.0, draft_ms, as_function(target_ms)(pearl_mean_query(alpha, gamma, w) - 1), 0.0, alpha, gamma, w)
    return r["pearl_tokens_per_round"] / r["pearl_round_ms"]


def pearl_gamma(target_ms, draft_ms: float, max_gamma: int, alpha: float = SD_PRIOR_ALPHA,
                head_start: int = -1) -> int:
    """PEARL: draft and verify overlap, so the best gamma makes gamma draft steps last about one
    verify, no longer than the verify of gamma + 1 tokens it buys (the round model decides)."""
    return max(range(1, max_gamma + 1),
               key=lambda g: pearl_tokens_per_ms(g, target_ms, draft_ms, alpha, head_start))
