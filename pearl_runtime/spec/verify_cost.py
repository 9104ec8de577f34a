"""A verify's measured time by batch bucket and query length: the table the gamma rules price
with. Pure data; engine/step_timer.py measures it."""


class VerifyCost:
    """A verify's time by batch bucket and query length, as measured at start.

    While decoding is bandwidth-bound, a verify of 17 tokens costs what one of 4 does; a large
    model's verify at a large batch is compute-bound and grows with its query length. So the
    gamma rules price each gamma at its own query length
    (gamma + 1 tokens a sequence), in the token bucket it will run in."""

    def __init__(self, table: dict[int, dict[int, float]] | None = None):
        self.table = table or {}   # query bucket -> batch bucket -> ms

    @classmethod
    def from_rows(cls, rows) -> "VerifyCost":
        """From [batch, query, ms] rows (TargetMetrics.verify_times as the bench records them)."""
        table: dict[int, dict[int, float]] = {}
        for b, q, ms in rows:
            table.setdefault(int(q), {})[int(b)] = float(ms)
        return cls(table)

    @property
    def batch_buckets(self) -> list[int]:
        return sorted({b for row in self.table.values() for b in row})

    def ms(self, batch: int, query_len: float, interpolate: bool = False) -> float | None:
        """The verify time of `batch` sequences feeding `query_len` tokens each, at the batch's
        bucket. The table is measured at the query lengths whose batches fill a token bucket,
        so a uniform verify costs the smallest measured length that holds it (the largest if
        none does). `interpolate`, for a mean over sequences that feed different counts (a
        PEARL batch): linear between the measured lengths, since the batch's total lands
        anywhere between two token buckets."""
        if not self.table:
            return None
        qs = sorted(self.table)

        def at(q: int) -> float:
            row = self.table[q]
            bs = sorted(row)
            return row[next((b for b in bs if b >= batch), bs[-1])]
        hi = next((x for x in qs if x >= query_len), None)
        if hi is None:
            return at(qs[-1])
        lo = max((x for x in qs if x <= query_len), default=hi)
        if not interpolate or lo == hi:
            return at(hi)
        return at(lo) + (at(hi) - at(lo)) * (query_len - lo) / (hi - lo)

    def scale(self, batch: int, gamma: float, interpolate: bool = False) -> float:
        """The table's verify ms at gamma + 1 tokens a sequence (1.0 without a table: every
        gamma costs the same). The tuner keeps observed verifies as ratios to it, so rounds
        run at different gammas average together and price the gammas not run."""
        ms = self.ms(batch, gamma + 1, interpolate)
        return 1.0 if ms is None else ms
