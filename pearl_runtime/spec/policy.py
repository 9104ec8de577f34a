"""Auto gamma, retuned from the rounds themselves.

The start-time picks (round_model.py, priced with step_timer.py's measures) come from graph replays of each model alone. In service
the draft may share its GPU with the verify (under MPS a draft step beside a verify runs
markedly slower than alone), every round pays host and transport costs, and the acceptance is not
the prior. So each speculative round reports its own draft time per token, verify time and
acceptance, and gamma per batch bucket follows their moving averages with the same rules.
The verify is observed at the current gamma only; other gammas are priced by scaling it with
the start-time table of verify times by query length (spec/verify_cost.py, measured by engine/step_timer.py).

sd with a measured start step also averages the round's fixed part (its wall time less the verify
and gamma start steps) and prices a round as fixed + gamma x step + verify.
"""
from dataclasses import dataclass

from pearl_runtime.spec.mode_choice import ModeChooser
from pearl_runtime.spec.verify_cost import VerifyCost
from pearl_runtime.spec.round_model import (HEAD_START_QUORUM, MAX_ROUND_STEPS, SD_PRIOR_ALPHA, fit_alpha, head_start_for,
                                            pearl_gamma, pearl_tokens_per_ms, sd_gamma, sd_tokens_per_ms)
from pearl_runtime.log import get_logger

log = get_logger(__name__)


@dataclass
class Observed:
    """Moving averages of one batch bucket's rounds."""
    draft_ms_per_token: float
    verify_ratio: float   # the verify over the start-time table's at its query length (ms without a table)
    fixed_ms: float | None = None   # sd: the round's ms besides its verify and draft steps
    rounds: int = 1
    skipped: int = 0      # slow rounds in a row left out of the averages


class GammaTuner:
    WARMUP = 4        # rounds a bucket runs on its start pick before observations steer it
    WEIGHT = 0.2      # of the newest round in the moving averages
    MIN_GAIN = 1.02   # move only for 2% more expected tokens per ms
    EVERY = 4         # rounds of a bucket between decisions (sd's fit costs ~50 us on the round's path)
    CONFIRM = 2       # decisions in a row that must pick the same new gamma before it moves
    OUTLIER = 3.0     # a round this many times slower than the average is not observed...
    OUTLIER_RUN = 3   # ...unless more than this many come in a row
    CLIP = 1.5        # a slow round counts as at most this many times the average
    REPRICE = 0.02    # re-price the start picks when the fitted acceptance moves this far
    ALPHA_HALF_LIFE = 128    # judged tokens after which a round's acceptance weighs half
    ALPHA_MIN_TOKENS = 48    # judged tokens (decayed) before the fit replaces the prior

    def __init__(self, mode: str, max_gamma: int, default: int, head_start: int = -1,
                 verify_cost: VerifyCost | None = None):
        self.mode, self.max_gamma, self.default = mode, max_gamma, default
        self.head_start = head_start               # pearl's setting: -1 auto (gamma // 2)
        self.verify_cost = verify_cost or VerifyCost()
        self.picks: dict[int, int] = {}        # batch bucket -> gamma
        self.buckets: list[int] = []           # the seeded buckets (graph batch sizes), if any
        self.start_draft_ms: dict[int, float] = {}
        self.priced_alpha = SD_PRIOR_ALPHA     # the acceptance the start picks were priced at
        self.observed: dict[int, Observed] = {}
        self.proposed: dict[int, tuple[int, int]] = {}   # batch bucket -> (gamma, decisions that picked it)
        self.drafted = self.accepted = 0.0     # decaying sums, for the acceptance rate
        self.last_gamma = default

    def seed(self, picks: dict[int, int]) -> None:
        """Start picks per batch bucket, as given."""
        self.picks = dict(picks)
        self.buckets = sorted(picks)
        self.observed.clear()
        self.proposed.clear()
        self.start_draft_ms = {}

    def seed_measured(self, draft_ms: dict[int, float]) -> None:
        """Start picks per batch bucket from the draft's measured step (ms by batch bucket) and
        the verify table, at the prior acceptance; re-priced as the acceptance is measured."""
        draft_ms = {b: t for b, t in draft_ms.items() if b in self.verify_cost.batch_buckets}
        self.seed({b: self._best(b, t, 1.0, SD_PRIOR_ALPHA) for b, t in draft_ms.items()})
        self.start_draft_ms = draft_ms
        self.priced_alpha = SD_PRIOR_ALPHA

    def _reprice(self, alpha: float) -> None:
        """Buckets that no rounds steer yet (a batch size not run so far, or still in its
        warm-up rounds) take their start picks again at the acceptance the other buckets
        measured: a 128-token request at batch 8 runs ~17 rounds, too few to spend 8 of them
        on a pick priced at the prior (a bench's short warm-up would otherwise leave a batch
        size measured from a gamma well short of the one due)."""
        fresh = [b for b in self.start_draft_ms
                 if b not in self.observed or self.observed[b].rounds < self.WARMUP]
        moved = {}
        for b in fresh:
            g = self._best(b, self.start_draft_ms[b], 1.0, alpha)
            if g != self.picks.get(b):
                moved[b] = g
        self.picks.update(moved)
        self.priced_alpha = alpha
        if moved:
            log.info("start picks re-priced at alpha %.2f: %s", alpha, moved)

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
        if self.drafted < self.ALPHA_MIN_TOKENS:
            return SD_PRIOR_ALPHA
        return fit_alpha(self.accepted / self.drafted, self.last_gamma, self.mode,
                         head_start_for(self.last_gamma, self.head_start) if self.mode == "pearl" else 0)

    def observe(self, batch: int, gamma: int, draft_ms: float, verify_ms: float,
                drafted: int, accepted: int, query_len: float | None = None,
                draft_steps: int | None = None, round_ms: float | None = None) -> int | None:
        """One speculative round at the bucket's `gamma`: the draft took `draft_ms` for
        `draft_steps` tokens a sequence (default gamma; a head-start round drafts gamma + its
        early part), the verify of `query_len` tokens a sequence (a mean over the batch; default gamma + 1)
        `verify_ms`; the batch's verify judged `drafted` draft tokens and accepted that many.
        `round_ms`: the round's wall time, for sd's fixed part. Returns the bucket's new gamma
        when it moves, else None."""
        if gamma < 1 or draft_ms <= 0 or verify_ms <= 0:
            return None
        w = self.WEIGHT
        # acceptance over the last few hundred judged tokens, however many rounds that took:
        # a few rounds at batch 1 (~40 tokens) read anywhere from 0.7 to 0.95
        keep = 0.5 ** (drafted / self.ALPHA_HALF_LIFE)
        self.drafted = keep * self.drafted + drafted
        self.accepted = keep * self.accepted + accepted
        self.last_gamma = gamma
        b = self.bucket(batch)
        per_token = draft_ms / (draft_steps or gamma)
        # comparable across rounds of different lengths
        ratio = verify_ms / self._verify(b, 1.0)((query_len or gamma + 1) - 1)
        # sd's round has a fixed part: besides the verify and gamma draft steps, the draft's
        # own per-round overhead, transport and host work. Priced as draft_ms / gamma (the
        # fixed part spread over the tokens, transport and host left out), auto settles on too
        # short a gamma; priced as fixed + gamma x step + verify, it finds the longer one
        step = self.start_draft_ms.get(b) if self.mode == "sd" and round_ms else None
        fixed = None if step is None else max(0.0, round_ms - verify_ms - (draft_steps or gamma) * step)
        obs = self.observed.get(b)
        if obs is not None and fixed is not None and obs.fixed_ms is None:
            obs.fixed_ms = fixed
        if obs is None:
            obs = self.observed[b] = Observed(per_token, ratio, fixed)
        elif obs.rounds < self.WARMUP:
            # a bucket's first rounds carry prefills (a 256-token prompt on a 72B target:
            # 360 ms against a 23 ms verify) and first-use stalls, which only ever slow a
            # round: keep the fastest
            obs.draft_ms_per_token = min(obs.draft_ms_per_token, per_token)
            obs.verify_ratio = min(obs.verify_ratio, ratio)
            if fixed is not None:
                obs.fixed_ms = min(obs.fixed_ms, fixed)
            obs.rounds += 1
        else:
            # later prefills (a request joining) and stalls: skip a round over OUTLIER x the
            # average, clip one over CLIP x, so one slow round cannot swing gamma; a run of slow rounds
            # is a new regime (a neighbour on the GPU) and is followed, clipped
            slow = per_token > self.OUTLIER * obs.draft_ms_per_token or ratio > self.OUTLIER * obs.verify_ratio
            # the fixed part is judged at one draft step at least: near 0, any round would be slow
            ref = None if fixed is None else max(obs.fixed_ms, step)
            slow = slow or (ref is not None and fixed > self.OUTLIER * ref)
            obs.skipped = obs.skipped + 1 if slow else 0
            if slow and obs.skipped <= self.OUTLIER_RUN:
                return None
            obs.draft_ms_per_token += w * (min(per_token, self.CLIP * obs.draft_ms_per_token) - obs.draft_ms_per_token)
            obs.verify_ratio += w * (min(ratio, self.CLIP * obs.verify_ratio) - obs.verify_ratio)
            if fixed is not None:
                obs.fixed_ms += w * (min(fixed, self.CLIP * ref) - obs.fixed_ms)
            obs.rounds += 1
        if obs.rounds < self.WARMUP or obs.rounds % self.EVERY:
            return None
        alpha = self.alpha
        if abs(alpha - self.priced_alpha) > self.REPRICE:
            self._reprice(alpha)
        current = self.picks.get(b, self.default)
        # without a fixed part (pearl, no start step, no round times) a token carries the round's share
        t_d, t_f = (self.start_draft_ms[b], obs.fixed_ms) if obs.fixed_ms is not None else \
            (obs.draft_ms_per_token, 0.0)
        new = self._best(b, t_d, obs.verify_ratio, alpha, t_f)
        if new == current or self._rate(b, new, t_d, obs.verify_ratio, alpha, t_f) <= \
                self.MIN_GAIN * self._rate(b, current, t_d, obs.verify_ratio, alpha, t_f):
            self.proposed.pop(b, None)
            return None
        # a pick seen at one decision only is often the averages' noise: as the draft's time
        # per token wanders, an unconfirmed pick swings gamma back and forth within a few
        # dozen rounds, and its MAT falls short of the round model's
        seen = self.proposed.get(b, (new, 0))
        seen = (new, seen[1] + 1 if seen[0] == new else 1)
        if seen[1] < self.CONFIRM:
            self.proposed[b] = seen
            return None
        self.proposed.pop(b, None)
        self.picks[b] = new
        log.info("gamma retuned: bucket %d, %d -> %d (draft %.3f ms a token, fixed %.2f ms, verify %.2f ms, "
                 "alpha %.2f)", b, current, new, t_d, t_f, obs.verify_ratio * self.verify_cost.scale(b, current), alpha)
        return new

    def _verify(self, bucket: int, ratio: float):
        # PEARL prices its verify at the mean query of a mixed batch (pearl_tokens_per_ms)
        return lambda g: ratio * self.verify_cost.scale(bucket, g, interpolate=self.mode == "pearl")

    def _rate(self, bucket: int, gamma: int, t_d: float, ratio: float, alpha: float, fixed: float = 0.0) -> float:
        """Expected tokens per ms of `gamma` by the mode's round model (`fixed`: sd's only)."""
        t_v = self._verify(bucket, ratio)
        if self.mode == "pearl":
            return pearl_tokens_per_ms(gamma, t_v, t_d, alpha, self.head_start)
        return sd_tokens_per_ms(gamma, t_v, t_d, alpha, fixed)

    def _best(self, bucket: int, t_d: float, ratio: float, alpha: float, fixed: float = 0.0) -> int:
        t_v = self._verify(bucket, ratio)
        if self.mode == "pearl":
            return pearl_gamma(t_v, t_d, self.max_gamma, alpha, self.head_start)
        return sd_gamma(t_v, t_d, self.max_gamma, alpha, fixed)


DEFAULT_GAMMA = 4   # a fixed gamma's default, and auto gamma's before anything is measured
MODES = ("pearl", "sd", "ar", "auto")
SPECULATIVE = ("sd", "pearl")


class SpecPolicy:
    """What a target decides about speculation, in one place: gamma per batch bucket (fixed, or
    auto: start picks from measured step times, then the tuner), PEARL's head start and the
    quorum that earns it, the pending cap of a round, and under --mode auto which path a batch
    takes (spec/mode_choice.py). Pure: the round loop asks, the policy answers."""

    def __init__(self, mode: str, gamma: int | None = None, max_gamma: int = 16, head_start: int = -1,
                 quorum: float = HEAD_START_QUORUM, verify_cost: VerifyCost | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if gamma is not None and gamma < 1:
            raise ValueError(f"gamma must be >= 1 or auto, got {gamma}")
        if max_gamma < 1:
            raise ValueError(f"max_gamma must be >= 1, got {max_gamma}")
        if head_start < -1:
            raise ValueError(f"head_start must be -1 (auto), 0 (off) or a number of tokens, got {head_start}")
        check_round_steps(mode, gamma, max_gamma, head_start)
        if not 0 < quorum <= 1:
            raise ValueError(f"head_start_quorum must be in (0, 1], got {quorum}")
        self.mode, self.fixed_gamma, self.max_gamma = mode, gamma, max_gamma
        self.head_start, self.quorum = head_start, quorum
        verify_cost = verify_cost or VerifyCost()
        # auto runs sd and pearl rounds, each with its own gamma picks
        paths = SPECULATIVE if mode == "auto" else (mode,)
        self.tuners = {p: GammaTuner(p, max_gamma, default=gamma or DEFAULT_GAMMA, head_start=head_start,
                                     verify_cost=verify_cost) for p in paths}
        self.path = paths[0] if mode != "auto" else "sd"   # the speculative path the rounds run now
        self.chooser = ModeChooser(verify_cost, max_gamma=max_gamma, gamma=gamma, head_start=head_start) \
            if mode == "auto" else None
        self.draft_model = ""   # the last draft's, from its handshake

    @property
    def auto(self) -> bool:
        """Auto gamma (not to be confused with --mode auto: `chooser`)."""
        return self.fixed_gamma is None

    @property
    def tuner(self) -> GammaTuner:
        return self.tuners[self.path]

    @property
    def verify_cost(self) -> VerifyCost:
        return self.tuner.verify_cost

    def gamma_for(self, batch: int) -> int:
        return self.tuner.gamma_for(batch)

    @property
    def alpha(self) -> float:
        """The acceptance of the path that judged the most tokens lately (the prior before any)."""
        return max(self.tuners.values(), key=lambda t: t.drafted).alpha

    def mode_for(self, batch: int) -> str:
        """The path a round of `batch` sequences takes with the draft up: the mode, or auto's
        pick for the batch's bucket."""
        return self.mode if self.chooser is None else self.chooser.mode_for(batch)

    def choose(self, batch: int) -> str:
        """mode_for, and the rounds' gamma and observations follow it when it speculates."""
        path = self.mode_for(batch)
        if path in self.tuners:
            self.path = path
        return path

    def observe_mode(self, path: str, batch: int, tokens: int, round_ms: float) -> str | None:
        """A round's committed tokens and wall time, for --mode auto (a no-op otherwise).
        Returns the batch bucket's new mode when it moves."""
        if self.chooser is None:
            return None
        sd = self.tuners["sd"]
        obs = sd.observed.get(sd.bucket(batch))
        return self.chooser.observe(path, batch, tokens, round_ms, self.alpha,
                                    obs.fixed_ms if obs is not None and obs.fixed_ms is not None else 0.0)

    def shown_mode(self, last_path: str | None) -> str:
        """The mode as Info reports it: auto with the path its last round took (auto:sd)."""
        return self.mode if self.chooser is None else f"auto:{last_path or self.path}"

    def seed_from_draft(self, draft_ms: dict[int, float], shared_gpu: bool = True, draft_model: str = "") -> None:
        """Start-time gamma per batch size from the draft's measured step times (its handshake)
        and the prior acceptance: the gamma with the most expected tokens per ms by the mode's
        round model, each gamma's verify priced at its own query length. The rounds then
        retune it. --mode auto prices its modes with the same step times; `shared_gpu`: draft
        and target share a GPU's bandwidth (pearl is then left out until measured).
        A handshake without step times from the same `draft_model` as the last one (a restarted
        CPU draft) keeps what the rounds measured: starting over from the default gamma would
        make the first rounds back pay for draft steps the rounds had already priced out."""
        same, self.draft_model = bool(draft_model) and draft_model == self.draft_model, draft_model
        if same and not draft_ms and self.auto and any(t.observed for t in self.tuners.values()):
            log.info("auto gamma: the same draft model is back; the rounds' measurements stay",
                     draft_model=draft_model, gamma_by_batch=self.tuner.picks)
            return
        if self.chooser is not None:
            self.chooser.draft_ms, self.chooser.shared_gpu = dict(draft_ms), shared_gpu
            self.chooser.buckets.clear()
            log.info("auto mode: priced from the step times", shared_gpu=shared_gpu,
                     draft_ms={b: round(t, 3) for b, t in draft_ms.items()})
        if not self.auto:
            return
        for path, tuner in self.tuners.items():
            self._seed_tuner(path, tuner, draft_ms)

    def _seed_tuner(self, path: str, tuner: GammaTuner, draft_ms: dict[int, float]) -> None:
        tuner.seed_measured(draft_ms)
        if tuner.picks:
            log.info("auto gamma by batch size", mode=path, **{f"bs{b}": g for b, g in tuner.picks.items()},
                     verify_ms={f"q{q}": {b: round(t, 2) for b, t in row.items()}
                                for q, row in tuner.verify_cost.table.items()},
                     draft_ms={b: round(t, 2) for b, t in draft_ms.items()})
        else:
            log.info("auto gamma: no step-time measurements (CPU or no CUDA graphs); gamma starts at the "
                     "default and follows the rounds", gamma=tuner.default)

    def early(self, batch: int, pre_verify: int, prefills: bool, gamma: int) -> int:
        """Draft tokens a PEARL round waits for before its forward: only when at least `quorum`
        of the batch is in pre-verify (after a rejection, or new), since judging `early` more
        tokens a sequence costs `early` draft steps where plain PEARL spends the whole forward
        on one token; post-verify sequences of that round take none but wait all the same.
        Never in a round that prefills a prompt (`prefills`): the draft's prefill then runs
        beside the target's instead of before it. 0: plain PEARL."""
        if self.path != "pearl" or self.head_start == 0 or prefills or pre_verify < self.quorum * batch:
            return 0
        return head_start_for(gamma, self.head_start)

    @staticmethod
    def pending_cap(gamma: int) -> int:
        """PEARL carries at most gamma - 1 pending tokens a sequence into the next round: a
        post-verify sequence of a head-start round got gamma + early fresh tokens, and carrying
        them all would verify past the query bucket the rounds run in."""
        return gamma - 1

    def observe(self, **round_) -> None:
        """A speculative round's times and acceptance, for auto gamma (fixed gamma ignores them)."""
        if self.auto:
            self.tuner.observe(**round_)


def check_round_steps(mode: str, gamma: int | None, max_gamma: int, head_start: int = -1) -> None:
    """Raise ValueError, naming the flag, when a Round of these settings could ask the draft for
    more than MAX_ROUND_STEPS draft steps (gamma, and in PEARL rounds its head start)."""
    if mode == "ar":
        return
    flag, top = ("--gamma", gamma) if gamma is not None else ("--max-gamma", max_gamma)
    early = head_start_for(top, head_start) if mode in ("pearl", "auto") and head_start != 0 else 0
    if top + early > MAX_ROUND_STEPS:
        head = f" plus its head start of {early}" if early else ""
        raise ValueError(f"{flag} {top}{head} is {top + early} draft steps a round; a draft takes at most "
                         f"{MAX_ROUND_STEPS}")


def parse_gamma(text) -> int | None:
    """--gamma: 'auto' (None: the start-time picks and the tuner) or a fixed number of draft tokens."""
    return None if str(text) == "auto" else int(text)


def parse_head_start(text: str) -> int:
    """--head-start: 'auto' (-1: gamma // 2) or a number of tokens >= 0 (0: plain PEARL)."""
    if text == "auto":
        return -1
    if not text.isdigit():
        raise ValueError(f"wants 'auto' or a number of tokens >= 0, got {text!r}")
    return int(text)


def parse_quorum(text: str) -> float:
    """--head-start-quorum: the share of a batch in pre-verify that earns a head start, in (0, 1]."""
    try:
        q = float(text)
    except ValueError:
        q = -1.0
    if not 0 < q <= 1:
        raise ValueError(f"wants a share of the batch in (0, 1], got {text!r}")
    return q
