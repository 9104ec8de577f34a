"""The round model: tokens per round and per-token time of ar, sd and PEARL, and the PEARL
speedup it projects for draft and target on separate GPUs from one run's measurements.

Inputs, all per batch size and in ms: t_ar (one ar decode step of the whole batch), t_d (one
draft step), t_v (one target verify forward), t_x (what a round costs beyond the two models:
the target's host work plus the draft round trip's transport), alpha (the probability that
the target accepts a draft token, independently per position), gamma (draft tokens a round).

    ar     one token a step                     time t_ar
    sd     E_sd = (1 - a^(g+1)) / (1 - a)        time g*t_d + t_v + t_x
    PEARL  E_pearl (below)                      time max(g*t_d, t_v) + t_x

PEARL as target_service/speculation.py runs it. A sequence is in *pre-verify* (nothing
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

(a = 0: 1 token a round; a = 1: g tokens a round). `simulate_pearl` replays the same rules
round by round as a Monte-Carlo cross-check.

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
import random

# the share of a batch in pre-verify that earns a head start (the target's --head-start-quorum
# default): the whole batch waits for it, and with the 72B + 1.5B inputs measured at batch 8
# (H200, session 8) simulate_pearl_batch gives 4.66x over ar at 3/4 against 4.43x at 1/2,
# never worse at batch 2 to 32. At batch 1 any share grants it.
HEAD_START_QUORUM = 0.75


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


def simulate_pearl(alpha: float, gamma: int, rounds: int = 100_000, seed: int = 0,
                   head_start: int = 0) -> tuple[float, float]:
    """Monte-Carlo of the PEARL rules at iid acceptance `alpha`: (tokens per round, accepted /
    judged as the target's Metrics count them)."""
    rng = random.Random(seed)
    pending = committed = judged_total = accepted_total = 0   # pending: drafts awaiting verification
    for _ in range(rounds):
        # pending + the first fresh token; in pre-verify the early tokens are the pending ones
        judged = (pending or head_start) + 1
        first_reject = next((i for i in range(judged) if rng.random() >= alpha), None)
        judged_total += judged
        if first_reject is None:
            committed += judged
            accepted_total += judged
            pending = gamma - 1                        # the rest of this round's fresh draft
        else:
            committed += first_reject + 1              # accepted prefix + the correction
            accepted_total += first_reject
            pending = 0
    return committed / rounds, accepted_total / judged_total


def simulate_pearl_batch(alpha: float, gamma: int, head_start: int, batch: int, t_d: float, t_v,
                         t_x: float = 0.0, quorum: float = HEAD_START_QUORUM, rounds: int = 20_000,
                         seed: int = 0) -> float:
    """Tokens per ms a sequence under the target's batch rules, at iid acceptance `alpha`: a
    round waits for the head start (head_start draft steps, the whole batch waiting) only when
    at least `quorum` of the batch is in pre-verify; its pre-verify sequences then judge
    head_start + 1 tokens, else 1; post-verify ones judge their pending tokens and the first
    fresh one. A round lasts the wait, then the longer of gamma draft steps and the verify at
    the batch's mean query (t_v: tokens a sequence -> ms), then t_x. The closed forms above
    follow one sequence; this shows what one sequence's head start costs the rest of its batch."""
    rng = random.Random(seed)
    pending = [0] * batch
    tokens, ms = 0, 0.0
    for _ in range(rounds):
        pre = sum(p == 0 for p in pending)
        wait = head_start if head_start and pre >= quorum * batch else 0
        fed = 0
        for i, p in enumerate(pending):
            judged = p + 1 if p else wait + 1
            fed += judged
            first_reject = next((k for k in range(judged) if rng.random() >= alpha), None)
            tokens += judged if first_reject is None else first_reject + 1
            pending[i] = gamma - 1 if first_reject is None else 0
        ms += wait * t_d + max(gamma * t_d, t_v(fed / batch)) + t_x
    return tokens / batch / ms


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


def mean_judged(judged_runs) -> float | None:
    """Tokens a sequence fed a verify, on average over a run's sequence-rounds that judged any
    ([judged, accepted, count] rows): the query its measured verify time belongs to."""
    n = sum(c for _, _, c in judged_runs)
    return sum(j * c for j, _, c in judged_runs) / n if n else None


def acceptance_by_position(judged_runs) -> list[tuple[float | None, int]]:
    """From [judged, accepted, count] rows (sequence-rounds that judged `judged` draft tokens
    and accepted the first `accepted`): for each position k >= 1, the share of sequence-rounds
    that reached k (judged >= k, the k - 1 before it accepted) and accepted it, with how many
    reached it. Under the model's independent acceptance every position reads alpha; a draft
    that agrees in streaks reads higher further in, which makes long gammas pay more than the
    model says."""
    longest = max((j for j, _, _ in judged_runs), default=0)
    out = []
    for k in range(1, longest + 1):
        reached = sum(c for j, a, c in judged_runs if j >= k and a >= k - 1)
        took = sum(c for j, a, c in judged_runs if a >= k)
        out.append((took / reached if reached else None, reached))
    return out


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


def best_gamma(t_ar: float, t_d: float, t_v, t_x: float, alpha: float,
               gammas: range = range(1, 17), head_start: int = -1) -> tuple[int, float]:
    """The gamma with the highest projected PEARL speedup. `t_v`: the verify's ms, held fixed
    (a verify of a few more tokens costs about the same while decoding is bandwidth-bound),
    or gamma -> ms (a compute-bound verify grows with its gamma + 1 tokens a sequence)."""
    at = as_function(t_v)
    scored = [(project(t_ar, t_d, at(g), t_x, alpha, g, head_start_for(g, head_start))["pearl_speedup"] or 0.0, g)
              for g in gammas]
    speedup, g = max(scored)
    return g, speedup
