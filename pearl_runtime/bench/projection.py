"""Bench-only analysis on top of the round model (pearl_runtime/spec/round_model.py, which
holds the closed forms and their derivation): Monte-Carlo replays of the PEARL rules, one
sequence and a whole batch, the acceptance by draft position, and the best gamma the model
projects for a run's measurements. The closed forms are re-exported here for the bench.
"""
import random

from pearl_runtime.spec.round_model import (HEAD_START_QUORUM, _pre_verify_share, accept_rate,  # noqa: F401
                                            as_function, fit_alpha, head_start_for, head_start_granted,
                                            pearl_mean_query, pearl_tokens_per_round, project,
                                            sd_tokens_per_round)


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
    the batch's mean query (t_v: tokens a sequence -> ms), then t_x. The closed forms
    (spec/round_model.py) follow one sequence; this shows what one sequence's head start costs the rest of its batch."""
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
