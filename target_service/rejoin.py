"""Which sequences join the draft's mirror in a round.

A new request joins at once: the target prefills it in the same round, so the draft's prefill
runs beside its own. A sequence the draft must take back whole (every running one once a new
draft answers, or once --mode auto speculates again after serving ar) rejoins a token budget at
a time, so the first rounds after a draft's return are normal rounds rather than one prefill of
every running sequence that the whole batch waits for; the others are verified without drafts
meanwhile. The budget doubles after each quick rejoining round (the draft's time under a
floor or under the target's forward of that round) and halves after a slow one, so a draft
takes everything back within a few rounds without one round the batch waits on."""
from pearl_runtime.log import get_logger
from target_service.verifier import Request

log = get_logger(__name__)


class Rejoin:
    START_TOKENS = 64          # one sequence, mostly: the first round back stays short
    MAX_TOKENS = 1 << 20       # the draft's bound on one add (draft_service/round_bounds.py)
    QUICK_MS = 250.0           # a rejoining round's draft time under this (or its verify's) grows the budget

    def __init__(self):
        self.waiting: set[int] = set()    # seq ids to take back, by the budget
        self.budget = self.START_TOKENS
        self.spent: dict[int, int] = {}   # tokens rejoined, by the round that carries them
        self.rounds = self.tokens = 0     # of the rejoin under way, for its log line

    def all_back(self, seq_ids) -> None:
        """A new draft mirror: these sequences (the target already holds their KV) rejoin under the budget."""
        self.waiting = set(seq_ids)
        self.budget = self.START_TOKENS
        self.spent.clear()
        self.rounds = self.tokens = 0
        if self.waiting:
            log.info("running sequences rejoin the draft", sequences=len(self.waiting), budget=self.budget)

    def left(self, seq_id: int) -> None:
        """A sequence taken off the draft (auto serving ar) rejoins under the budget."""
        self.waiting.add(seq_id)

    def adds(self, reqs: list[Request], round_id: int) -> list[Request]:
        """Round `round_id`'s sequences that join the draft now (at least one rejoins, whatever its length)."""
        out, spent = [], 0
        for r in reqs:
            sid = r.seq.seq_id
            if r.on_draft:
                continue
            if sid in self.waiting:
                if spent and spent + len(r.seq) > self.budget:
                    continue
                spent += len(r.seq)
                self.waiting.discard(sid)
            out.append(r)
        if spent:
            self.spent[round_id] = spent
            self.rounds, self.tokens = self.rounds + 1, self.tokens + spent
            if not self.waiting:
                log.info("every sequence back on the draft", rounds=self.rounds, tokens=self.tokens)
        return out

    def observe(self, round_id: int, draft_ms: float, verify_ms: float = 0.0) -> None:
        """The draft's and the target's times for round `round_id`. A draft that took back its
        tokens within the target's own forward held the round up little (under PEARL not at
        all), whatever the absolute time: a slow target's forward may take longer than QUICK_MS."""
        if self.spent.pop(round_id, 0):
            quick = draft_ms < max(self.QUICK_MS, verify_ms)
            self.budget = min(self.MAX_TOKENS, self.budget * 2) if quick else max(self.START_TOKENS, self.budget // 2)
        for old in [k for k in self.spent if k < round_id]:   # rounds that never came back
            del self.spent[old]
