"""`--mode auto`: which path a batch bucket's rounds take (ar, sd or pearl), by expected tokens
per ms, from the target's start-time step times, the draft's, the acceptance and the rounds.

Each mode is first priced by the round model (round_model.py) at its best gamma: ar at one
verify of one token a step, sd at fixed + gamma draft steps + verify(gamma), pearl at the
longer of gamma draft steps and one verify. Once a mode has run in a bucket, its price is
corrected by what its rounds measured (a moving average of measured over modelled tokens
per ms), so the model's errors (host work, transport, a contended draft) are taken back
out; a mode nothing can price (no step times: a CPU target) is measured by running it. pearl
is a candidate only where draft and target do not share a GPU's bandwidth, or where its
own rounds measured it: on one GPU the two move the same bytes and a rejected verify voids
what was drafted beside it (docs/rounds.md). A bucket moves to a new mode only when two
decisions in a row pick it and it is priced MIN_GAIN above the current one, as auto gamma
moves gamma (policy.GammaTuner). Pure: the round loop reports rounds and asks.
"""
from dataclasses import dataclass, field

from pearl_runtime.log import get_logger
from pearl_runtime.spec.round_model import SD_PRIOR_ALPHA, pearl_tokens_per_ms, sd_tokens_per_ms
from pearl_runtime.spec.verify_cost import VerifyCost

log = get_logger(__name__)

AR, SD, PEARL = "ar", "sd", "pearl"


@dataclass
class BucketState:
    mode: str
    rounds: int = 0                  # rounds of this bucket since its last decision
    since_switch: int = 0            # rounds in the current mode
    proposed: tuple[str, int] | None = None   # (mode, decisions in a row that picked it)
    correction: dict[str, float] = field(default_factory=dict)   # measured / modelled, by mode
    measured: dict[str, float] = field(default_factory=dict)     # tokens per ms a sequence, unmodelled modes
    slow: int = 0                    # slow rounds in a row left out


class ModeChooser:
    EVERY = 4         # rounds of a bucket between decisions
    CONFIRM = 2       # decisions in a row that must pick the same new mode
    MIN_GAIN = 1.03   # move only for 3% more expected tokens per ms
    SETTLE = 2        # rounds after a switch left unmeasured (the first verifies what the last mode left)
    WEIGHT = 0.2      # of the newest round in the measured averages
    OUTLIER = 3.0     # a round this many times slower than its mode's average (a prefill)...
    OUTLIER_RUN = 3   # ...is left out, unless more than this many come in a row

    def __init__(self, verify_cost: VerifyCost | None = None, draft_ms: dict[int, float] | None = None,
                 shared_gpu: bool = True, max_gamma: int = 16, gamma: int | None = None, head_start: int = -1):
        """`verify_cost`: the target's verify ms by batch and query length (query 1: an ar step);
        `draft_ms`: the draft's step ms by batch (its handshake); `shared_gpu`: draft and target
        share a GPU's bandwidth (one device, with or without MPS); `gamma`: a fixed gamma, else
        each speculative mode is priced at its best one up to `max_gamma`."""
        self.verify_cost = verify_cost or VerifyCost()
        self.draft_ms = dict(draft_ms or {})
        self.shared_gpu, self.max_gamma, self.gamma, self.head_start = shared_gpu, max_gamma, gamma, head_start
        self.buckets: dict[int, BucketState] = {}

    # -- prices ------------------------------------------------------------------------------
    def bucket(self, batch: int) -> int:
        """The smallest measured batch bucket that holds `batch`; without a table, the next power of 2."""
        bs = self.verify_cost.batch_buckets
        if bs:
            return next((b for b in bs if b >= batch), bs[-1])
        return 1 << max(0, batch - 1).bit_length()

    def _draft_step(self, batch: int) -> float | None:
        bs = sorted(self.draft_ms)
        return self.draft_ms[next((b for b in bs if b >= batch), bs[-1])] if bs else None

    def modelled(self, batch: int, alpha: float, fixed_ms: float = 0.0) -> dict[str, tuple[float, int] | None]:
        """Each mode's expected tokens per ms a sequence and the gamma it is priced at, by the
        round model (None: no step times to price it). `fixed_ms`: sd's per-round cost besides
        its draft steps and verify."""
        b = self.bucket(batch)
        t_ar = self.verify_cost.ms(b, 1)
        t_d = self._draft_step(b)
        out: dict[str, tuple[float, int] | None] = {AR: (1.0 / t_ar, 0) if t_ar else None, SD: None, PEARL: None}
        if t_ar is None or t_d is None:
            return out
        gammas = [self.gamma] if self.gamma else range(1, self.max_gamma + 1)
        sd_v = lambda g: self.verify_cost.ms(b, g + 1)   # noqa: E731
        pearl_v = lambda g: self.verify_cost.ms(b, g + 1, interpolate=True)   # noqa: E731
        out[SD] = max(((sd_tokens_per_ms(g, sd_v, t_d, alpha, fixed_ms), g) for g in gammas))
        out[PEARL] = max(((pearl_tokens_per_ms(g, pearl_v, t_d, alpha, self.head_start), g) for g in gammas))
        return out

    def estimates(self, batch: int, alpha: float, fixed_ms: float = 0.0) -> dict[str, float | None]:
        """Each candidate mode's tokens per ms a sequence: modelled, times its measured
        correction once it ran here; measured alone where nothing models it; None: unknown."""
        st = self._state(batch, alpha, fixed_ms)
        model = self.modelled(batch, alpha, fixed_ms)
        out = {}
        for m in self.candidates(batch):
            if model[m] is not None:
                out[m] = model[m][0] * st.correction.get(m, 1.0)
            else:
                out[m] = st.measured.get(m)
        return out

    def candidates(self, batch: int) -> list[str]:
        st = self.buckets.get(self.bucket(batch))
        pearl_ran = st is not None and (PEARL in st.correction or PEARL in st.measured)
        return [AR, SD] + ([PEARL] if not self.shared_gpu or pearl_ran else [])

    # -- choice ------------------------------------------------------------------------------
    def _state(self, batch: int, alpha: float = SD_PRIOR_ALPHA, fixed_ms: float = 0.0) -> BucketState:
        b = self.bucket(batch)
        if b not in self.buckets:
            # the start pick: the best priced mode, else speculation (sd on a shared GPU), measured
            model = self.modelled(b, alpha, fixed_ms)
            priced = {m: model[m][0] for m in self.candidates(b) if model[m] is not None}
            mode = max(priced, key=priced.get) if len(priced) > 1 else (SD if self.shared_gpu else PEARL)
            self.buckets[b] = BucketState(mode)
            log.info("mode chosen", batch_bucket=b, mode=mode, reason="start pick" if len(priced) > 1 else
                     "no step times to price the modes: measured as they run",
                     **{f"{m}_tokens_per_ms": round(v, 4) for m, v in priced.items()})
        return self.buckets[b]

    def mode_for(self, batch: int) -> str:
        """The mode this batch's bucket runs now."""
        return self._state(batch).mode

    @property
    def picks(self) -> dict[int, str]:
        return {b: st.mode for b, st in sorted(self.buckets.items())}

    def observe(self, mode: str, batch: int, tokens: int, round_ms: float, alpha: float = SD_PRIOR_ALPHA,
                fixed_ms: float = 0.0) -> str | None:
        """One round of `mode` over `batch` sequences that committed `tokens` in `round_ms`.
        Every EVERY rounds of the bucket, a decision; returns the bucket's new mode when it
        moves, else None."""
        if batch < 1 or round_ms <= 0:
            return None
        st = self._state(batch, alpha, fixed_ms)
        if mode == st.mode:
            st.since_switch += 1
        if st.since_switch > self.SETTLE or mode != st.mode:
            self._measure(st, mode, batch, tokens / batch / round_ms, alpha, fixed_ms)
        st.rounds += 1
        if st.rounds < self.EVERY:
            return None
        st.rounds = 0
        return self._decide(st, batch, alpha, fixed_ms)

    def _measure(self, st: BucketState, mode: str, batch: int, rate: float, alpha: float, fixed_ms: float) -> None:
        model = self.modelled(batch, alpha, fixed_ms).get(mode)
        value, store = (rate / model[0], st.correction) if model else (rate, st.measured)
        if mode not in store:
            store[mode] = value
            return
        # a round far slower than its mode's average (a prompt's prefill) is not the mode's speed
        if rate < store[mode] * (model[0] if model else 1.0) / self.OUTLIER:
            st.slow += 1
            if st.slow <= self.OUTLIER_RUN:
                return
        else:
            st.slow = 0
        store[mode] += self.WEIGHT * (value - store[mode])

    def _decide(self, st: BucketState, batch: int, alpha: float, fixed_ms: float) -> str | None:
        est = self.estimates(batch, alpha, fixed_ms)
        if est.get(st.mode) is None:   # the current mode is not measured yet
            return None
        unknown = [m for m, v in est.items() if v is None and m != st.mode]
        if unknown:          # nothing prices it: run it to measure it
            best, reason = unknown[0], "unmeasured"
        else:
            best = max((m for m in est if est[m] is not None), key=est.get, default=st.mode)
            reason = "faster"
            current = est.get(st.mode)
            if best == st.mode or (current is not None and est[best] <= self.MIN_GAIN * current):
                st.proposed = None
                return None
        seen = st.proposed if st.proposed and st.proposed[0] == best else (best, 0)
        st.proposed = (best, seen[1] + 1)
        if st.proposed[1] < self.CONFIRM:
            return None
        old, st.mode, st.proposed, st.since_switch = st.mode, best, None, 0
        log.info("mode chosen", batch_bucket=self.bucket(batch), mode=best, previous=old, reason=reason,
                 alpha=round(alpha, 3), **{f"{m}_tokens_per_ms": None if v is None else round(v, 4)
                                           for m, v in est.items()})
        return best
