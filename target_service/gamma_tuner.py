"""Auto gamma, retuned from the rounds themselves.

The start-time picks (step_timer.py) come from graph replays of each model alone. In service
the draft may share its GPU with the verify (MPS: a draft step beside a 7B verify took 2.6 ms
against 1.6 ms alone), every round pays host and transport costs, and the acceptance is not
the prior. So each speculative round reports its own draft time per token, verify time and
acceptance, and gamma per batch bucket follows their moving averages with the same rules.
The verify is observed at the current gamma only; other gammas are priced by scaling it with
the start-time table of verify times by query length (step_timer.VerifyCost).
"""
import logging
from dataclasses import dataclass

from pearl_runtime.bench.projection import fit_alpha
from pearl_runtime.bench.projection import head_start_for
from pearl_runtime.engine.step_timer import (SD_PRIOR_ALPHA, VerifyCost, pearl_gamma, pearl_tokens_per_ms,
                                             sd_gamma, sd_tokens_per_ms)

log = logging.getLogger(__name__)


@dataclass
class Observed:
    """Moving averages of one batch bucket's rounds."""
    draft_ms_per_token: float
    verify_ms: float
    rounds: int = 1
    skipped: int = 0      # slow rounds in a row left out of the averages


class GammaTuner:
    WARMUP = 4        # rounds a bucket runs on its start pick before observations steer it
    WEIGHT = 0.2      # of the newest round in the moving averages
    MIN_GAIN = 1.02   # move only for 2% more expected tokens per ms
    EVERY = 4         # rounds of a bucket between decisions (sd's fit costs ~50 us on the round's path)
    OUTLIER = 3.0     # a round this many times slower than the average is not observed...
    OUTLIER_RUN = 3   # ...unless more than this many come in a row
    CLIP = 1.5        # a slow round counts as at most this many times the average

    def __init__(self, mode: str, max_gamma: int, default: int, head_start: int = -1,
                 verify_cost: VerifyCost | None = None):
        self.mode, self.max_gamma, self.default = mode, max_gamma, default
        self.head_start = head_start               # pearl's setting: -1 auto (gamma // 2)
        self.verify_cost = verify_cost or VerifyCost()
        self.picks: dict[int, int] = {}        # batch bucket -> gamma
        self.buckets: list[int] = []           # the seeded buckets (graph batch sizes), if any
        self.observed: dict[int, Observed] = {}
        self.drafted = self.accepted = 0.0     # decaying sums, for the acceptance rate
        self.last_gamma = default

    def seed(self, picks: dict[int, int]) -> None:
        """Start-time picks per batch bucket (what was measured before any round)."""
        self.picks = dict(picks)
        self.buckets = sorted(picks)
        self.observed.clear()

    def bucket(self, batch: int) -> int:
        """The smallest seeded bucket that holds `batch`; without seeds, the next power of 2."""
        if self.buckets:
            return next((b for b in self.buckets if b >= batch), self.buckets[-1])
        return 1 << max(0, batch - 1).bit_length()

    def gamma_for(self, batch: int) -> int:
        return self.picks.get(self.bucket(batch), self.default)

    @property
    def alpha(self) -> float:
        """Per-token acceptance that explains the recent accept rate under this mode's rules
        (the prior until a few tokens were judged)."""
        if self.drafted < 8:
            return SD_PRIOR_ALPHA
        return fit_alpha(self.accepted / self.drafted, self.last_gamma, self.mode,
                         head_start_for(self.last_gamma, self.head_start) if self.mode == "pearl" else 0)

    def observe(self, batch: int, gamma: int, draft_ms: float, verify_ms: float,
                drafted: int, accepted: int) -> int | None:
        """One speculative round: `gamma` draft tokens a sequence took `draft_ms`, the verify
        `verify_ms`; the batch drafted and accepted that many tokens. Returns the bucket's new
        gamma when it moves, else None."""
        if gamma < 1 or draft_ms <= 0 or verify_ms <= 0:
            return None
        w = self.WEIGHT
        self.drafted = (1 - w) * self.drafted + drafted
        self.accepted = (1 - w) * self.accepted + accepted
        self.last_gamma = gamma
        b = self.bucket(batch)
        per_token = draft_ms / gamma
        obs = self.observed.get(b)
        if obs is None:
            obs = self.observed[b] = Observed(per_token, verify_ms)
        elif obs.rounds < self.WARMUP:
            # a bucket's first rounds carry prefills (a 256-token prompt on a 72B target:
            # 360 ms against a 23 ms verify) and first-use stalls, which only ever slow a
            # round: keep the fastest
            obs.draft_ms_per_token = min(obs.draft_ms_per_token, per_token)
            obs.verify_ms = min(obs.verify_ms, verify_ms)
            obs.rounds += 1
        else:
            # later prefills (a request joining) and stalls: skip a round over OUTLIER x the
            # average, clip one over CLIP x, so one slow round cannot swing gamma; a run of slow rounds
            # is a new regime (a neighbour on the GPU) and is followed, clipped
            slow = per_token > self.OUTLIER * obs.draft_ms_per_token or verify_ms > self.OUTLIER * obs.verify_ms
            obs.skipped = obs.skipped + 1 if slow else 0
            if slow and obs.skipped <= self.OUTLIER_RUN:
                return None
            obs.draft_ms_per_token += w * (min(per_token, self.CLIP * obs.draft_ms_per_token) - obs.draft_ms_per_token)
            obs.verify_ms += w * (min(verify_ms, self.CLIP * obs.verify_ms) - obs.verify_ms)
            obs.rounds += 1
        if obs.rounds < self.WARMUP or obs.rounds % self.EVERY:
            return None
        current = self.picks.get(b, self.default)
        new = self._rule(b, obs, current)
        if new == current:
            return None
        self.picks[b] = new
        log.info("gamma retuned: bucket %d, %d -> %d (draft %.3f ms a token, verify %.2f ms, alpha %.2f)", b, current,
                 new, obs.draft_ms_per_token, obs.verify_ms, self.alpha)
        return new

    def _rule(self, bucket: int, obs: Observed, current: int) -> int:
        t_d, alpha = obs.draft_ms_per_token, self.alpha
        t_v = self.verify_cost.at(bucket, current, observed_ms=obs.verify_ms, observed_gamma=current)
        if self.mode == "pearl":
            best = pearl_gamma(t_v, t_d, self.max_gamma, alpha, self.head_start)
            rate = lambda g: pearl_tokens_per_ms(g, t_v, t_d, alpha, self.head_start)
        else:
            best = sd_gamma(t_v, t_d, self.max_gamma, alpha)
            rate = lambda g: sd_tokens_per_ms(g, t_v, t_d, alpha)
        return best if rate(best) > self.MIN_GAIN * rate(current) else current
