"""The PEARL verdict for one sequence in one round.

Every round the target feeds [last committed token] + `pending` (draft tokens from earlier
rounds, empty in pre-verify) and gets k+1 rows of logits, while the draft proposes `fresh`
tokens that continue after `pending`. Row i is the target's prediction after pending[:i].

- pending[i] is checked against row i; the first rejection commits the target's
  correction and sends the sequence back to pre-verify (both sides roll back).
- when all of `pending` holds, row k pre-verifies fresh[0]: accepted, it is committed and
  fresh[1:] becomes next round's pending (post-verify); rejected, row k's token is committed.
- with no fresh tokens (ar; sd, where pending is this round's draft) row k gives the bonus token.

Greedy checks token equality. Sampling accepts a draft token x with probability
min(1, p(x)/q(x)) and samples a rejection's correction from norm(max(p - q, 0)), so the
output distribution is exactly the target's.
"""
from dataclasses import dataclass

import torch

from pearl_runtime.sampling import SamplingParams, probabilities, sample_from


@dataclass
class Verdict:
    tokens: list[int]                      # to commit, in order
    pending: list[int]                     # carried into the next round
    pending_probs: torch.Tensor | None     # the draft's q rows for `pending` (sampling only)
    accepted: int                          # draft tokens accepted this round
    rejected: bool


def judge(logits: torch.Tensor, pending: list[int], pending_probs: torch.Tensor | None,
          fresh: list[int], fresh_probs: torch.Tensor | None, params: SamplingParams,
          generator: torch.Generator | None = None, argmax: list[int] | None = None) -> Verdict:
    """`argmax`: the rows' argmax computed by the caller for the whole batch at once (greedy)."""
    k = len(pending)
    assert logits.shape[0] == k + 1, (logits.shape, k)
    candidates = pending + fresh[:1]
    q_rows = _rows(pending_probs, fresh_probs, len(candidates))
    tokens: list[int] = []
    if params.greedy and argmax is None:
        argmax = logits.argmax(-1).tolist()
    for i, tok in enumerate(candidates):
        if params.greedy:
            best = argmax[i]
            if tok == best:
                tokens.append(tok)
                continue
            return Verdict(tokens + [best], [], None, i, True)
        p = probabilities(logits[i], params)
        if tok < 0:   # the draft proposed nothing here
            return Verdict(tokens + [sample_from(p, generator)], [], None, i, True)
        q = q_rows[i]
        u = torch.rand((), generator=generator).item()
        if u * float(q[tok]) < float(p[tok]):
            tokens.append(tok)
            continue
        residual = (p - q.to(p.device)).clamp_min(0)
        correction = sample_from(residual if residual.sum() > 0 else p, generator)
        return Verdict(tokens + [correction], [], None, i, True)
    if fresh:
        rest = fresh[1:]
        rest = rest[:rest.index(-1)] if -1 in rest else rest   # the draft stopped early
        rest_probs = None if fresh_probs is None else fresh_probs[1:1 + len(rest)]
        return Verdict(tokens, rest, rest_probs, k + 1, False)
    bonus = argmax[k] if params.greedy else sample_from(probabilities(logits[k], params), generator)
    return Verdict(tokens + [bonus], [], None, k, False)


def _rows(pending_probs, fresh_probs, n):
    parts = [t for t in (pending_probs, None if fresh_probs is None else fresh_probs[:1]) if t is not None]
    if not parts:
        return [None] * n
    return list(torch.cat(parts))
