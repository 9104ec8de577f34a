"""The bounds of a Round, checked before any of it is applied: a caller past one of them gets
INVALID_ARGUMENT naming the field, and no round can hold the drafter (and with it every other
stream) longer than a normal one does."""
from dataclasses import dataclass

import numpy as np

from pearl_runtime.errors import InvalidRequest
from pearl_runtime.pb import draft_pb2
from pearl_runtime.spec.round_model import MAX_ROUND_STEPS

# a Round's draft steps (gamma, early part included): each is a step of every sequence; a target
# refuses to start with settings past it
MAX_GAMMA = MAX_ROUND_STEPS
# sequences a round may add, remove or judge: a target's batch is far smaller
MAX_ROUND_SEQS = 4096
# tokens one add may carry: past any model's window (a sequence longer than the draft's own is
# mirrored but not drafted, as before), and a bound on what one round copies
MAX_ADD_TOKENS = 1 << 20
_INT_BYTES = {"int32": 4, "int64": 8}


@dataclass(frozen=True)
class RoundBounds:
    vocab_size: int
    max_gamma: int = MAX_GAMMA
    max_seqs: int = MAX_ROUND_SEQS
    max_add_tokens: int = MAX_ADD_TOKENS

    def check(self, rnd: draft_pb2.Round) -> None:
        """Raise InvalidRequest for the first field out of bounds."""
        if rnd.gamma > self.max_gamma:
            raise InvalidRequest("round.gamma", f"must be <= {self.max_gamma}, got {rnd.gamma}")
        if rnd.early > rnd.gamma:
            raise InvalidRequest("round.early", f"must be <= round.gamma ({rnd.gamma}), got {rnd.early}")
        for field, n in (("round.adds", len(rnd.adds)), ("round.removes", len(rnd.removes))):
            if n > self.max_seqs:
                raise InvalidRequest(field, f"at most {self.max_seqs} a round, got {n}")
        for add in rnd.adds:
            ids = add.token_ids
            if not ids:
                raise InvalidRequest("round.adds.token_ids", f"sequence {add.seq_id} has no tokens")
            if len(ids) > self.max_add_tokens:
                raise InvalidRequest("round.adds.token_ids", f"sequence {add.seq_id} has {len(ids)} tokens, "
                                     f"more than {self.max_add_tokens}")
            self._in_vocab("round.adds.token_ids", min(ids), max(ids))
        self._check_verdicts(rnd.verdicts)

    def _check_verdicts(self, t) -> None:
        if not t.shape:
            return
        if t.dtype not in _INT_BYTES:
            raise InvalidRequest("round.verdicts", f"must be an int32 or int64 tensor, got {t.dtype!r}")
        if len(t.shape) != 2 or t.shape[1] not in (3, 4) or not 0 <= t.shape[0] <= self.max_seqs:
            raise InvalidRequest("round.verdicts", f"must be [n <= {self.max_seqs}, 4], got {list(t.shape)}")
        if len(t.data) != t.shape[0] * t.shape[1] * _INT_BYTES[t.dtype]:
            raise InvalidRequest("round.verdicts", f"holds {len(t.data)} bytes, not a {list(t.shape)} {t.dtype}")
        rows = np.frombuffer(t.data, dtype=t.dtype).reshape(tuple(t.shape))
        if len(rows) and rows[:, 1].min() < 1:
            raise InvalidRequest("round.verdicts", "num_committed_tokens must be >= 1")
        if len(rows):
            self._in_vocab("round.verdicts", int(rows[:, 2].min()), int(rows[:, 2].max()))

    def _in_vocab(self, field: str, low: int, high: int) -> None:
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise InvalidRequest(field, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
