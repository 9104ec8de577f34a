"""The verifier: the target's rounds without any I/O. Admit, attach drafts, verify, judge,
commit, retire.

A request's sequence holds its committed tokens C; all of C but the last token are in the
KV cache between rounds. `pending` holds draft tokens awaiting verification (post-verify).
"""
from itertools import accumulate
from dataclasses import dataclass, field

import torch

from pearl_runtime import validation
from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.admission import check_prompt
from pearl_runtime.engine.block_manager import BlockManager
from pearl_runtime.engine.model_runner import StagedStep
from pearl_runtime.engine.scheduler import Scheduler
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.engine.stopping import commit
from pearl_runtime.engine.tp_group import make_runner
from pearl_runtime.spec.verdict import judge
from pearl_runtime.log import get_logger

log = get_logger(__name__)


@dataclass(eq=False)
class Request:
    request_id: str
    seq: Sequence
    sink: object = None                  # where its updates go (a gateway stream)
    pending: list[int] = field(default_factory=list)
    pending_probs: torch.Tensor | None = None
    on_draft: bool = False               # the draft mirrors this sequence
    forwards: int = 0
    new_tokens: list[int] = field(default_factory=list)   # committed, not yet streamed
    accepted: int = 0
    drafted: int = 0
    trimmed: bool = False                # pending was cut short: the draft must drop what follows
    traceparent: str = ""                # W3C trace context the request came with (passed to the draft)
    span: object = None                  # its tracing span on this service, while it runs
    error: str | None = None             # why it failed alone (its own judge or commit raised)

    @property
    def finished(self) -> bool:
        return self.seq.finish_reason is not None


@dataclass
class DraftTokens:
    """What the draft proposed this round for one sequence."""
    tokens: list[int]
    probs: torch.Tensor | None = None


PLACEHOLDER = -1   # a draft token still on the device: replaced before anything judges it


@dataclass
class DeviceDrafts:
    """An sd round's draft tokens, attached while still on the device (the sequences hold
    placeholders): the verify reads them from `ids()` (every request's fed tokens, [last
    committed] + gamma drafts, in order) and the host gets them back with the logits
    (`fill`). `tokens`: the draft's buffer, its rows in `seq_ids` order (`rows` picks the
    requests'); nothing reads it before the draft's event says it is written."""
    reqs: list[Request]
    last: list[int]        # each request's last committed token
    tokens: torch.Tensor   # [rows, gamma], the draft's buffer
    rows: list[int] | None   # the requests' rows of it (None: all, in order)
    gamma: int

    def ids(self, device: torch.device) -> torch.Tensor:
        """Every request's fed tokens on `device`. Called once the drafts are written: nothing
        here touches the device before (a copy queued while the draft's steps run, in another
        process, costs them a context switch)."""
        tokens = self.tokens if self.rows is None else self.tokens[_upload(self.rows, self.tokens.device)]
        last = _upload(self.last, device)
        return torch.cat([last[:, None], tokens.to(device, torch.int64)], 1).view(-1)

    def detach(self) -> None:
        """Take the placeholders back out (the draft went away before writing its tokens)."""
        for req in self.reqs:
            del req.seq.token_ids[len(req.seq) - len(req.pending):]
            req.pending = []

    def fill(self, fed: list[int]) -> None:
        """fed: `ids` on the host. The drafts replace the placeholders in pending and the sequence."""
        g = self.gamma
        for i, req in enumerate(self.reqs):
            drafts = fed[i * (g + 1) + 1:(i + 1) * (g + 1)]
            req.pending = drafts
            req.seq.token_ids[len(req.seq) - g:] = drafts


class Verifier:
    def __init__(self, cfg: EngineConfig):
        self.runner = make_runner(cfg)   # TP group when cfg.tp_size > 1
        self.max_model_len = self.runner.max_model_len
        self.eos_ids = self.runner.model_cfg.eos_token_ids
        self.blocks = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_cache)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_prefill_tokens)
        self.requests: dict[int, Request] = {}     # by seq_id
        self.removed: list[int] = []               # seq ids the draft must forget

    # -- admission and cancellation -------------------------------------------------------
    def admit(self, req: Request, headroom: int) -> Request:
        """Check the prompt (InvalidRequest / OutOfBlocks name what is wrong) and queue it;
        `headroom`: tokens past the prompt a round may need at once."""
        check_prompt(req.seq.token_ids, self.max_model_len, self.runner.model_cfg.vocab_size, self.blocks,
                     field="prompt_ids", headroom=headroom)
        validation.check_max_tokens(req.seq.params.max_tokens, len(req.seq), self.max_model_len)
        validation.check_stop_token_ids(req.seq.params.stop_token_ids, self.runner.model_cfg.vocab_size)
        self.add(req)
        return req

    def add(self, req: Request) -> None:
        self.requests[req.seq.seq_id] = req
        self.scheduler.add(req.seq)

    def cancel(self, req: Request) -> None:
        self.scheduler.drop(req.seq)
        self._forget(req)

    def _forget(self, req: Request) -> None:
        if self.requests.pop(req.seq.seq_id, None) is not None and req.on_draft:
            self.removed.append(req.seq.seq_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- one round --------------------------------------------------------------------------
    def schedule(self) -> list[Request]:
        """Attach pending draft tokens, then admit/preempt. Returns the running requests."""
        for seq in self.scheduler.running:
            seq.token_ids.extend(self.requests[seq.seq_id].pending)
        running = self.scheduler.schedule()
        for seq in self.scheduler.waiting:     # preempted: they will be recomputed
            req = self.requests[seq.seq_id]
            if req.pending:
                del seq.token_ids[len(seq) - len(req.pending):]
                req.pending, req.pending_probs = [], None
        return [self.requests[s.seq_id] for s in running]

    def attach(self, reqs: list[Request], drafts: dict[int, DraftTokens]) -> dict[int, int]:
        """Draft tokens that arrived before the forward join the tokens to verify, after any
        pending ones, where the cache has room (sd: the round's drafts; pearl: a head start's
        early tokens). Returns how many each sequence took, by seq id."""
        taken = {}
        for req in reqs:
            d = drafts.get(req.seq.seq_id)
            if not d or not d.tokens:
                continue
            toks = d.tokens[:d.tokens.index(-1)] if -1 in d.tokens else d.tokens
            if toks and self.blocks.ensure_capacity(req.seq, len(req.seq) + len(toks)):
                if req.seq.params.greedy or d.probs is None:
                    req.pending_probs = None
                else:
                    rows = d.probs[:len(toks)]
                    req.pending_probs = rows if not req.pending else torch.cat([req.pending_probs, rows])
                req.pending = req.pending + list(toks)
                req.seq.token_ids.extend(toks)
                taken[req.seq.seq_id] = len(toks)
        return taken

    def attach_device(self, reqs: list[Request], seq_ids: list[int], tokens: torch.Tensor) -> DeviceDrafts | None:
        """sd's draft tokens still on the device ([n, gamma], rows in `seq_ids` order, not yet
        read). When every request verifies just its last token plus the whole draft (no prompt
        in the round, room in the cache), they attach as placeholders and the verify will
        feed them from the device. Otherwise None: read them on the host, once written, and
        `attach` them."""
        g = tokens.shape[1]
        row = {sid: i for i, sid in enumerate(seq_ids)}
        if not (self.runner.chains_on_device and g > 0
                and all(r.seq.seq_id in row and not r.pending and len(r.seq) - r.seq.num_kv == 1 for r in reqs)
                and all(self.blocks.ensure_capacity(r.seq, len(r.seq) + g) for r in reqs)):
            return None
        rows = [row[r.seq.seq_id] for r in reqs]
        last = [r.seq.token_ids[-1] for r in reqs]
        for r in reqs:
            r.pending = [PLACEHOLDER] * g
            r.seq.token_ids.extend(r.pending)
        return DeviceDrafts(reqs, last, tokens, None if rows == list(range(len(seq_ids))) else rows, g)

    def stage_verify(self, reqs: list[Request]) -> tuple[StagedStep, list[int]]:
        """The host half of a verify fed from the device (`forward` with a DeviceDrafts): its
        inputs prepared on the host, so the launch that waits for the draft is short."""
        sizes = [len(r.pending) + 1 for r in reqs]
        return self.runner.stage([r.seq for r in reqs], sizes), sizes

    def launch_verify(self, staged: tuple[StagedStep, list[int]], handoff: DeviceDrafts
                      ) -> list[tuple[torch.Tensor, list[int]]]:
        """A staged verify, fed the draft's tokens (written by now): as `forward`."""
        step, sizes = staged
        ids = handoff.ids(self.runner.device)
        logits = self.runner.launch(step, ids)
        n = logits.shape[0]
        both = torch.cat([logits.argmax(-1), ids]).tolist()   # the drafts come to the host in the same sync
        handoff.fill(both[n:])
        return _by_request(logits, both[:n], sizes)

    def forward(self, reqs: list[Request]) -> list[tuple[torch.Tensor, list[int]]]:
        """Verify step: rows for [last committed] + pending of every request (a new request
        feeds its whole prompt and gets one row). Returns each request's logit rows and their
        argmax, taken for the whole batch with one device sync."""
        sizes = [len(r.pending) + 1 for r in reqs]
        logits = self.runner.run([r.seq for r in reqs], sizes)
        return _by_request(logits, logits.argmax(-1).tolist(), sizes)

    def chain_length(self, reqs: list[Request], limit: int) -> int:
        """ar with every request greedy: how many decode steps this round may chain on the
        device, with one host sync for all of them (1: chaining does not apply). Never past a
        request's max_tokens or the window; EOS may still end one early (the rest is dropped)."""
        if limit <= 1 or not self.runner.chains_on_device or any(not r.seq.params.greedy or r.pending for r in reqs):
            return 1
        k = min([limit] + [r.seq.params.max_tokens - r.seq.num_completion_tokens for r in reqs]
                + [self.max_model_len - len(r.seq) for r in reqs])
        if k <= 1 or not all(self.blocks.ensure_capacity(r.seq, len(r.seq) + k - 1) for r in reqs):
            return 1
        return k

    def chain_round(self, reqs: list[Request], steps: int) -> list[Request]:
        """`steps` chained greedy decode steps (ar); commits each request's tokens up to its
        end. Returns the requests that finished."""
        out = self.runner.greedy_chain([r.seq for r in reqs], steps)
        done = []
        for req, toks in zip(reqs, out):
            committed_len = len(req.seq) - steps
            try:
                del req.seq.token_ids[committed_len:]
                committed = commit(req.seq, toks, self.eos_ids, self.max_model_len)
                req.new_tokens += committed
                req.forwards += len(committed)   # the forwards that made its tokens
                self._retire_or_trim(req, done)
            except Exception as e:
                self._fail(req, e, committed_len)
        return done

    def finish_round(self, reqs: list[Request], logits: list[tuple[torch.Tensor, list[int]]],
                     drafts: dict[int, DraftTokens], max_pending: int | None = None) -> list[Request]:
        """Judge and commit every request. `max_pending` caps what a request carries into the
        next round (PEARL: gamma - 1): a post-verify sequence of a head-start round got gamma +
        early fresh tokens, and carrying them all would verify gamma + early tokens next round,
        past the query bucket the rounds run in. Returns the requests that finished."""
        done = []
        for req, (rows, best) in zip(reqs, logits):
            committed_len = len(req.seq) - len(req.pending)
            try:
                self._judge_one(req, rows, best, drafts.get(req.seq.seq_id) or DraftTokens([]), max_pending)
                self._retire_or_trim(req, done)
            except Exception as e:   # its sampling params or numbers: the others' verdicts stand
                self._fail(req, e, committed_len)
        return done

    def _judge_one(self, req: Request, rows, best: list[int], d: DraftTokens, max_pending: int | None) -> None:
        seq = req.seq
        verdict = judge(rows, req.pending, req.pending_probs, d.tokens, d.probs, seq.params, seq.generator,
                        argmax=best)
        req.forwards += 1
        req.drafted += len(req.pending) + min(1, len(d.tokens))
        req.accepted += verdict.accepted
        del seq.token_ids[len(seq) - len(req.pending):]      # back to the committed tokens
        req.new_tokens += commit(seq, verdict.tokens, self.eos_ids, self.max_model_len)
        req.pending, req.pending_probs = verdict.pending, verdict.pending_probs
        if max_pending is not None and len(req.pending) > max_pending:
            req.pending = req.pending[:max_pending]
            if req.pending_probs is not None:
                req.pending_probs = req.pending_probs[:max_pending]
            req.trimmed = True

    def _fail(self, req: Request, error: Exception, committed_len: int) -> None:
        """One request's judge or commit raised: it leaves the batch (and the draft) with
        `error` set, back at its committed tokens; the round goes on for the others."""
        log.exception("a request failed in its round; the others go on", request_id=req.request_id)
        del req.seq.token_ids[committed_len:]
        req.pending, req.pending_probs, req.new_tokens = [], None, []
        req.error = f"{type(error).__name__}: {str(error)[:200]}"
        self.cancel(req)

    def _retire_or_trim(self, req: Request, done: list[Request]) -> None:
        """After a commit the cache keeps what it computed of the committed tokens, all but
        the last; a finished request leaves the batch (and the draft)."""
        self.blocks.truncate(req.seq, min(req.seq.num_kv, len(req.seq) - 1))
        if req.finished:
            self.scheduler.finish(req.seq)
            self._forget(req)
            done.append(req)

    def draft_verdicts(self) -> list[tuple[int, int, int, int]]:
        """(seq_id, length, last token, keep) of every sequence on the draft, where length
        counts the committed tokens and the pending ones the round verifies (schedule() put
        them in the sequence). keep 0: drop the drafts past them (pending was trimmed); -1:
        the drafts past them stand. Sending a row clears the request's `trimmed` mark."""
        out = []
        for r in self.requests.values():
            if r.on_draft:
                out.append((r.seq.seq_id, len(r.seq), r.seq.last_token, 0 if r.trimmed else -1))
                r.trimmed = False
        return out


def _by_request(logits: torch.Tensor, best: list[int], sizes: list[int]) -> list[tuple[torch.Tensor, list[int]]]:
    starts = accumulate(sizes, initial=0)
    return [(rows, best[s:s + n]) for rows, s, n in zip(logits.split(sizes), starts, sizes)]


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 values on `device` without a host sync (a copy from pageable memory waits for the
    stream): the verify's launch is what the GPU waits for."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    host = torch.empty(len(values), dtype=torch.int64, pin_memory=True)   # torch's pinned cache
    host.copy_(torch.tensor(values, dtype=torch.int64))
    return host.to(device, non_blocking=True)
