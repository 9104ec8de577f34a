"""The Target gRPC service: gateway streams in, PEARL / sd / ar rounds, committed tokens out."""
import asyncio
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from pearl_runtime.pb import common_pb2, draft_pb2, target_pb2, target_pb2_grpc
from pearl_runtime import gc_pauses
from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.admission import check_prompt
from pearl_runtime.engine.llm_engine import load_tokenizer
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.errors import InvalidRequest, OutOfBlocks
from pearl_runtime.rpc import params as wire_params
from pearl_runtime.rpc import tensors
from pearl_runtime.rpc.identity import tokenizer_hash
from pearl_runtime.rpc.server import bind, new_server
from target_service.core import DraftTokens, Request, TargetCore
from target_service.draft_link import DraftLink
from pearl_runtime.engine.step_timer import VerifyCost, measure_verify_cost
from pearl_runtime.spec.policy import GammaTuner
from pearl_runtime.spec.round_model import HEAD_START_QUORUM
from pearl_runtime.log import get_logger

log = get_logger(__name__)

MODES = ("pearl", "sd", "ar")
FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


@dataclass
class GatewayStream:
    """One gateway's Serve stream: its requests and its outbound queue."""
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    requests: dict[str, Request] = field(default_factory=dict)


@dataclass
class RoundStats:
    """Cumulative counters, served by the Metrics RPC (benchmarks diff two readings)."""
    rounds: int = 0
    speculative_rounds: int = 0
    draft_ms: float = 0.0
    target_ms: float = 0.0
    wait_ms: float = 0.0
    exchange_ms: float = 0.0     # round sent -> draft batch received, overlapped or not
    round_ms: float = 0.0
    committed_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    head_start_rounds: int = 0
    gamma_sum: int = 0           # each speculative round's gamma (its early part not counted)
    judged_runs: Counter = field(default_factory=Counter)   # (judged, accepted) -> sequence-rounds


class TargetService:
    def __init__(self, cfg: EngineConfig, mode: str = "pearl", draft_address: str | None = None,
                 gamma: int | None = 4, max_waiting: int = 1024, ar_steps: int = 4, max_gamma: int = 16,
                 head_start: int = -1, head_start_quorum: float = HEAD_START_QUORUM, device_tokens: bool = True,
                 round_datagrams: bool = True):
        """gamma None: auto, from the measured draft and target step times (GPU), else 4.
        ar_steps: ar mode chains up to this many greedy decode steps a round on the device
        (one host sync for all; tokens stream in bursts of that many). device_tokens: in sd,
        ask the draft to leave greedy draft tokens on the device (pearl_runtime/rpc/ipc.py).
        round_datagrams: also send each small Round as a datagram, ahead of the stream's copy
        (pearl_runtime/rpc/round_datagrams.py)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if ar_steps < 1:
            raise ValueError(f"ar_steps must be >= 1, got {ar_steps}")
        if max_gamma < 1:
            raise ValueError(f"max_gamma must be >= 1, got {max_gamma}")
        if not 0 < head_start_quorum <= 1:
            raise ValueError(f"head_start_quorum must be in (0, 1], got {head_start_quorum}")
        self.cfg, self.mode, self.max_waiting, self.ar_steps = cfg, mode, max_waiting, ar_steps
        self.head_start = head_start   # pearl: -1 auto (gamma // 2), 0 off, n: n draft tokens
        self.head_start_quorum = head_start_quorum
        self.fixed_gamma = gamma
        self.gamma = gamma or 4
        self.tokenizer = load_tokenizer(cfg.model)
        self.core = TargetCore(cfg)
        graphs = self.core.runner.graphs
        if graphs is not None and max_gamma + 1 > max(graphs.q_buckets):
            # a verify judges up to gamma + 1 tokens a sequence: keep auto gamma inside the graphs
            log.warning("max gamma lowered to fit the largest graph query bucket", asked=max_gamma,
                        max_gamma=max(graphs.q_buckets) - 1)
            max_gamma = max(graphs.q_buckets) - 1
        self.max_gamma = max_gamma   # auto gamma's ceiling
        # verify step time by batch and query length (gamma + 1 tokens a sequence), for auto gamma
        self.verify_cost = VerifyCost()
        if gamma is None and graphs is not None:
            # the query lengths whose batches fill a token bucket (graphs pack a step's tokens),
            # one for each bucket that gamma 1..max_gamma verify in (gamma + 1 tokens a sequence)
            per_seq = graphs.token_buckets[1]
            buckets = sorted({next(t for t in per_seq if t >= q) for q in range(2, max_gamma + 2)})
            self.verify_cost = measure_verify_cost(self.core.runner, buckets)
        self.tuner = GammaTuner(mode, max_gamma, default=self.gamma, head_start=head_start,
                                verify_cost=self.verify_cost)   # auto gamma's picks per batch bucket
        self.tok_hash = tokenizer_hash(self.tokenizer)
        self.link = None
        if mode != "ar" and draft_address:
            device = self.core.runner.device
            hello = draft_pb2.Hello(target_id=f"target-{id(self):x}", tokenizer_hash=self.tok_hash,
                                    vocab_size=self.core.runner.model_cfg.vocab_size,
                                    device=device.index if device.type == "cuda" else -1,
                                    device_tokens=device_tokens and mode == "sd" and self.core.runner.chains_on_device,
                                    round_datagrams=round_datagrams)
            self.link = DraftLink(draft_address, hello, device=device)
        self.token_paths = Counter()   # sd rounds by how their draft tokens came, for logs and tests
        self.inbox: deque = deque()           # ("submit", stream, Submission) | ("cancel", stream, id)
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-forward")
        self.round_id = 0
        self._ahead = None   # sd: (reqs, Round, sent, t0) of the next round, its Round already sent
        self.stats = RoundStats()
        self.draft_generation = 0
        self._last_path = None
        self._chain_logged = False
        self._query_len = 1

    # -- inputs from gateway streams --------------------------------------------------------
    def submit(self, stream: GatewayStream, item: target_pb2.Submission) -> None:
        self.inbox.append(("submit", stream, item))
        self.wakeup.set()

    def cancel(self, stream: GatewayStream, request_id: str) -> None:
        self.inbox.append(("cancel", stream, request_id))
        self.wakeup.set()

    def _drain_inbox(self) -> None:
        while self.inbox:
            kind, stream, item = self.inbox.popleft()
            if kind == "cancel":
                req = stream.requests.pop(item, None)   # unknown ids are harmless
                if req is not None:
                    self.core.cancel(req)
                continue
            try:
                if len(self.core.scheduler.waiting) >= self.max_waiting:
                    raise OutOfBlocks(f"target queue is full ({self.max_waiting} waiting)")
                req = self._admit(stream, item)
                stream.requests[item.request_id] = req
            except (InvalidRequest, OutOfBlocks) as e:
                code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, InvalidRequest) \
                    else grpc.StatusCode.RESOURCE_EXHAUSTED
                stream.out.put_nowait(target_pb2.TargetOut(tokens=target_pb2.TokenBatch(updates=[
                    target_pb2.SeqUpdate(request_id=item.request_id, error=str(e), error_code=code.value[0])])))

    def _admit(self, stream: GatewayStream, item: target_pb2.Submission) -> Request:
        params = wire_params.from_proto(item.params, item.stop_token_ids)
        prompt = list(item.prompt_ids)
        check_prompt(prompt, self.core.max_model_len, self.core.runner.model_cfg.vocab_size, self.core.blocks,
                     field="prompt_ids", headroom=1 + 2 * self.gamma)
        req = Request(item.request_id, Sequence(prompt, params), sink=stream)
        self.core.add(req)
        return req

    # -- the round loop ---------------------------------------------------------------------
    async def run(self) -> None:
        if self.link:
            asyncio.get_running_loop().create_task(self.link.maintain())
        while True:
            self._drain_inbox()
            if not self.core.has_work() and self._ahead is None:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            try:
                await self.round()
            except Exception as e:   # a bug must not stop the loop and hang every stream
                log.exception("round failed; failing the requests in it")
                self._fail_running(f"internal error in the target's round: {type(e).__name__}: {e}")

    async def round(self) -> None:
        loop = asyncio.get_running_loop()
        if (ahead := self._ahead) is not None:   # sd: this round's Round already went out
            self._ahead = None
            await self._sd_round(*ahead)
            return
        t0 = time.perf_counter()
        reqs = self.core.schedule()
        if not reqs:
            await asyncio.sleep(0.001)
            return
        if self.mode == "ar" and (steps := self.core.chain_length(reqs, self.ar_steps)) > 1:
            self._log_path("ar")
            if not self._chain_logged:
                log.info("ar rounds chain greedy decode steps on the device (one sync a round)",
                         max_steps=self.ar_steps)
                self._chain_logged = True
            before = [len(r.seq) for r in reqs]
            target_ms = await loop.run_in_executor(self.executor, self._timed_chain, reqs, steps)
            self._publish(reqs)
            s = self.stats
            s.rounds += steps   # a round in the counters is one target forward
            s.target_ms += target_ms
            s.round_ms += (time.perf_counter() - t0) * 1e3
            s.committed_tokens += sum(len(r.seq) - n for r, n in zip(reqs, before))
            return
        speculate = self.link is not None and self.link.connected
        self._log_path("pearl" if speculate and self.mode == "pearl" else "sd" if speculate else "ar")
        drafts: dict[int, DraftTokens] = {}
        rnd, batch, wait_ms, exchange_ms = None, None, 0.0, 0.0
        if speculate:
            rnd = self._build_round(reqs)
            if self.mode == "pearl":
                head, taken = None, {}
                if early := self._head_start(reqs):
                    # most sequences are in pre-verify: wait for the draft's first `early` tokens
                    # and verify them in this forward, while it drafts gamma more
                    rnd.early, rnd.gamma = early, rnd.gamma + early
                    sent = time.perf_counter()
                    head = await self.link.exchange(rnd)
                    wait_ms = exchange_ms = (time.perf_counter() - sent) * 1e3   # the target idles meanwhile
                    if head is not None and not head.early:
                        # a draft that predates early parts sent the whole batch: judge it as
                        # fresh tokens (correct, just no head start) and stop asking
                        log.warning("the draft answers without early parts; head start off")
                        self.head_start, batch, head = 0, head, None
                    elif head is not None:
                        self.stats.head_start_rounds += 1
                        # pre-verify sequences judge the early tokens now; post-verify ones
                        # keep their query at gamma (adding the early tokens after their
                        # pending ones would push the verify into the next query bucket)
                        pre = [r for r in reqs if not r.pending] if self._trims else reqs
                        taken = self.core.attach(pre, self._parse(head))
                # the heart of PEARL: verify while the draft drafts the next gamma tokens
                forward = loop.run_in_executor(self.executor, self._timed_forward, reqs)
                sent = time.perf_counter()
                if not early:
                    batch = await self.link.exchange(rnd)
                elif head is not None:
                    batch = await self.link.rest(rnd)
                arrived = time.perf_counter()
                exchange_ms += (arrived - sent) * 1e3
                logits, target_ms, fwd_done = await forward
                wait_ms += max(0.0, arrived - fwd_done) * 1e3
                # fresh tokens continue after what each sequence took from the early part
                drafts = self._parse(batch, skip=taken)
            else:
                sent = time.perf_counter()
                await self._sd_round(reqs, rnd, sent if await self.link.send(rnd) else None, t0)
                return
        else:
            logits, target_ms, _ = await loop.run_in_executor(self.executor, self._timed_forward, reqs)
        # PEARL carries at most gamma - 1 pending tokens a sequence into the next round (when
        # the draft reads the verdicts' keep column, so it can drop what it drafted past them)
        cap = rnd.gamma - rnd.early - 1 if batch is not None and self.mode == "pearl" and self._trims else None
        before = self._judge(reqs, logits, drafts, cap)
        self._account(reqs, rnd, batch, before, target_ms, wait_ms, exchange_ms, (time.perf_counter() - t0) * 1e3)

    async def _sd_round(self, reqs: list[Request], rnd: draft_pb2.Round, sent: float | None, t0: float) -> None:
        """An sd round whose Round went to the draft at `sent` (None: the write failed, the link
        is down). Nothing overlaps sd's verify, so it runs right here on the event loop: the hop
        to the forward thread and back cost ~0.1 ms a round. Once judged, the next round's
        Round goes out (`_send_ahead`) before this one's tokens are published."""
        batch = await self.link.receive(rnd) if sent is not None else None
        wait_ms = exchange_ms = (time.perf_counter() - sent) * 1e3 if sent is not None else 0.0
        # a request cancelled after its Round went out leaves the round (its drafts are ignored)
        reqs = [r for r in reqs if self.core.requests.get(r.seq.seq_id) is r]
        if not reqs:
            return
        logits, target_ms, batch = await self._verify_drafts(reqs, batch)
        before = self._judge(reqs, logits, {}, None)
        round_ms = (time.perf_counter() - t0) * 1e3
        if batch is not None:
            await self._send_ahead()
        self._account(reqs, rnd, batch, before, target_ms, wait_ms, exchange_ms, round_ms)

    async def _send_ahead(self) -> None:
        """sd: schedule the next round and send its Round now, right after this round's verdicts
        exist: the draft starts on it while this round's tokens are published and counted (on a
        shared GPU the GPU idles from the verify's end to the draft's first step). New requests
        and cancellations that came in meanwhile are taken first, as at the top of a round."""
        t0 = time.perf_counter()
        self._drain_inbox()
        if not self.link.connected or not self.core.has_work():
            return
        reqs = self.core.schedule()
        if not reqs:
            return
        rnd = self._build_round(reqs)
        sent = time.perf_counter()
        self._ahead = (reqs, rnd, sent if await self.link.send(rnd) else None, t0)

    def _judge(self, reqs: list[Request], logits, drafts: dict[int, DraftTokens], cap: int | None) -> list[tuple]:
        """Judge and commit the round; returns each request's (committed, drafted, accepted)
        before it, for the counters."""
        before = [(len(r.seq) - len(r.pending), r.drafted, r.accepted) for r in reqs]
        self.core.finish_round(reqs, logits, drafts, max_pending=cap)
        return before

    def _account(self, reqs: list[Request], rnd, batch, before: list[tuple], target_ms: float, wait_ms: float,
                 exchange_ms: float, round_ms: float) -> None:
        """Publish the round's tokens, then count it (and let auto gamma see it)."""
        self._publish(reqs)
        s = self.stats
        s.rounds += 1
        s.speculative_rounds += batch is not None
        s.gamma_sum += rnd.gamma - rnd.early if batch is not None else 0
        s.draft_ms += batch.draft_ms if batch is not None else 0.0
        s.target_ms += target_ms
        s.wait_ms += wait_ms
        s.exchange_ms += exchange_ms if batch is not None else 0.0
        s.round_ms += round_ms
        judged = taken_ok = 0
        for r, (n, drafted, accepted) in zip(reqs, before):
            s.committed_tokens += len(r.seq) - n
            judged += r.drafted - drafted
            taken_ok += r.accepted - accepted
            if r.drafted > drafted:
                s.judged_runs[(r.drafted - drafted, r.accepted - accepted)] += 1
        s.drafted_tokens += judged
        s.accepted_tokens += taken_ok
        if batch is not None and self.fixed_gamma is None:
            self.tuner.observe(len(reqs), rnd.gamma - rnd.early, batch.draft_ms, target_ms, judged, taken_ok,
                               query_len=self._query_len, draft_steps=rnd.gamma, round_ms=round_ms)

    def close(self) -> None:
        """Release the engine (a TP group stops its workers and leaves its group). Synchronous:
        a cancelled serve() may be cancelled again while it cleans up. The forward thread
        finishes its step first, so no collective is cut in half."""
        self.executor.shutdown(wait=True)
        self.core.runner.close()

    def _fail_running(self, message: str) -> None:
        for seq in list(self.core.scheduler.running):
            req = self.core.requests.get(seq.seq_id)
            if req is None:
                self.core.scheduler.finish(seq)
                continue
            req.sink.requests.pop(req.request_id, None)
            self.core.cancel(req)
            req.sink.out.put_nowait(target_pb2.TargetOut(tokens=target_pb2.TokenBatch(updates=[
                target_pb2.SeqUpdate(request_id=req.request_id, error=message,
                                     error_code=grpc.StatusCode.INTERNAL.value[0])])))

    async def _verify_drafts(self, reqs: list[Request], batch):
        """sd: verify the round's draft tokens. Inline ones attach as they are. Ones left on the
        device feed the verify from there when the round allows it: the verify is staged
        first, and launched once the draft's event says they are written; else they are read
        to the host once written. The path is counted and logged. Returns (logits, verify ms,
        the batch or None when there was none or the draft went away before writing)."""
        if batch is not None and batch.tokens.HasField("ipc"):
            tokens = self.link.tokens_view(batch.tokens)
            handoff = self.core.attach_device(reqs, list(batch.seq_ids), tokens) if tokens is not None else None
            if handoff is not None:
                staged = self.core.stage_verify(reqs)
                if await self.link.tokens_written():
                    self._token_path("device")
                    return *self._timed(reqs, self.core.launch_verify, staged, handoff), batch
                handoff.detach()
            elif tokens is not None and await self.link.tokens_written():
                self.core.attach(reqs, {sid: DraftTokens(t) for sid, t in zip(batch.seq_ids, tokens.tolist())})
                self._token_path("device, read on the host (the round feeds a prompt)")
                return *self._timed(reqs, self.core.forward, reqs), batch
            batch = None   # the round goes on without drafts (the link is down: ar until it is back)
        elif batch is not None:
            self.core.attach(reqs, self._parse(batch))
            self._token_path("inline")
        return *self._timed(reqs, self.core.forward, reqs), batch

    def _token_path(self, path: str) -> None:
        self.token_paths[path] += 1
        if self.token_paths[path] in (1, 100, 10000):
            log.info("sd draft tokens", path=path, rounds=self.token_paths[path])

    def _timed_forward(self, reqs):
        logits, ms = self._timed(reqs, self.core.forward, reqs)
        return logits, ms, time.perf_counter()

    def _timed(self, reqs, verify, *args):
        """verify(*args) (it ends in a device sync: the argmax to the host, so the time is the
        GPU's) and its time in ms."""
        # tokens a sequence feeds, on average: what a packed verify's time depends on (a PEARL
        # round judges the last round's drafts, so this is not the round's own gamma + 1)
        self._query_len = sum(len(r.seq) - r.seq.num_kv for r in reqs) / len(reqs)
        t = time.perf_counter()
        logits = verify(*args)
        return logits, (time.perf_counter() - t) * 1e3

    def _timed_chain(self, reqs, steps):
        t = time.perf_counter()
        self.core.chain_round(reqs, steps)   # ends in a device sync (the tokens to host)
        return (time.perf_counter() - t) * 1e3

    def _log_path(self, path: str) -> None:
        if path != self._last_path:
            log.info("round path", path=path, mode=self.mode)
            self._last_path = path

    def _auto_gamma(self) -> None:
        """Start-time gamma per batch size from the measured step times and the prior acceptance:
        the gamma with the most expected tokens per ms by the mode's round model, each gamma's
        verify priced at its own query length (step_timer.py). The rounds then retune it
        (gamma_tuner.py)."""
        info = self.link.info
        draft_ms = dict(zip(info.step_batch_sizes, info.step_ms))
        cost = self.verify_cost
        self.tuner.seed_measured(draft_ms)
        picks = self.tuner.picks
        if picks:
            log.info("auto gamma by batch size", mode=self.mode, **{f"bs{b}": g for b, g in picks.items()},
                     verify_ms={f"q{q}": {b: round(t, 2) for b, t in row.items()} for q, row in cost.table.items()},
                     draft_ms={b: round(t, 2) for b, t in draft_ms.items()})
        else:
            log.info("auto gamma: no step-time measurements (CPU or no CUDA graphs); gamma starts at the "
                     "default and follows the rounds", gamma=self.gamma)

    def _gamma_for(self, batch: int) -> int:
        return self.tuner.gamma_for(batch)

    def _build_round(self, reqs: list[Request]) -> draft_pb2.Round:
        if self.link.generation != self.draft_generation:   # a new draft mirror: replay everything
            self.draft_generation = self.link.generation
            if self.fixed_gamma is None:
                self._auto_gamma()
            for r in self.core.requests.values():
                r.on_draft = False
            self.core.removed.clear()
        self.round_id += 1
        self.gamma = self._gamma_for(len(reqs))
        rnd = draft_pb2.Round(round_id=self.round_id, gamma=self.gamma, removes=self.core.removed,
                              device_tokens=self.mode == "sd" and self.link.tokens_in is not None)
        self.core.removed = []
        verdicts = self.core.draft_verdicts(keep_column=self._trims)
        if verdicts:
            rnd.verdicts.CopyFrom(tensors.encode_ints(verdicts, "int64"))
        for r in reqs:
            if not r.on_draft:
                committed = r.seq.token_ids[:len(r.seq) - len(r.pending)]
                rnd.adds.add(seq_id=r.seq.seq_id, token_ids=committed, params=wire_params.to_proto(r.seq.params))
                r.on_draft = True
        return rnd

    @staticmethod
    def _parse(batch, skip: dict[int, int] | None = None) -> dict[int, DraftTokens]:
        """A DraftBatch by seq id; `skip` drops each sequence's first tokens (already pending)."""
        if batch is None:
            return {}
        toks = tensors.decode_ints(batch.tokens)
        probs = None if tensors.is_empty(batch.probs) else tensors.decode(batch.probs)
        out = {}
        for i, sid in enumerate(batch.seq_ids):
            k = skip.get(sid, 0) if skip else 0
            out[sid] = DraftTokens(toks[i][k:], None if probs is None else probs[i][k:])
        return out

    @property
    def _trims(self) -> bool:
        """The draft reads the verdicts' keep column: post-verify sequences of a head-start
        round then take no early tokens and carry gamma - 1 pending ones (older drafts: they
        take them, and carry what they got)."""
        info = self.link.info if self.link is not None else None
        return bool(info is not None and info.verdict_keep)

    def _head_start(self, reqs: list[Request]) -> int:
        """Draft tokens PEARL waits for before a round where at least head_start_quorum of the
        sequences are in pre-verify (after a rejection, or new): judging `early` more tokens a
        sequence costs `early` draft steps, where plain PEARL spends the whole forward on one
        token for them. Post-verify sequences of that round take none (their query stays at
        gamma; they carry gamma - 1 of the round's fresh tokens on), but wait all the same.
        0: plain PEARL.

        Never in a round that prefills a prompt: the draft's prefill then runs beside the
        target's instead of before it (72B + 1.5B at batch 32: 8192 prompt tokens, ~60 ms of
        draft prefill that the first token would otherwise wait for)."""
        if self.head_start == 0 or sum(not r.pending for r in reqs) < self.head_start_quorum * len(reqs):
            return 0
        if any(len(r.seq) - r.seq.num_kv - len(r.pending) > 1 for r in reqs):
            return 0
        return self.head_start if self.head_start > 0 else max(1, self.gamma // 2)

    def _publish(self, reqs: list[Request]) -> None:
        by_stream: dict[int, tuple[GatewayStream, list]] = {}
        for r in reqs:
            if not r.new_tokens and not r.finished:
                continue
            upd = target_pb2.SeqUpdate(request_id=r.request_id, token_ids=r.new_tokens, target_forwards=r.forwards,
                                       path=self._last_path or "")
            if r.finished:
                upd.finish_reason = FINISH[r.seq.finish_reason]
                r.sink.requests.pop(r.request_id, None)
            r.new_tokens = []
            by_stream.setdefault(id(r.sink), (r.sink, []))[1].append(upd)
        for stream, updates in by_stream.values():
            stream.out.put_nowait(target_pb2.TargetOut(tokens=target_pb2.TokenBatch(updates=updates)))

    def drop_stream(self, stream: GatewayStream) -> None:
        for rid in list(stream.requests):
            self.cancel(stream, rid)


class TargetServicer(target_pb2_grpc.TargetServicer):
    def __init__(self, service: TargetService):
        self.service = service

    async def Info(self, request, context):
        s = self.service
        return target_pb2.ModelInfo(model=s.cfg.model, vocab_size=s.core.runner.model_cfg.vocab_size,
                                    max_model_len=s.core.max_model_len, eos_token_ids=list(s.core.eos_ids),
                                    tokenizer_hash=s.tok_hash, mode=s.mode)

    async def Metrics(self, request, context):
        s = self.service.stats
        return target_pb2.TargetMetrics(
            rounds=s.rounds, speculative_rounds=s.speculative_rounds, draft_ms=s.draft_ms, target_ms=s.target_ms,
            wait_ms=s.wait_ms, exchange_ms=s.exchange_ms, round_ms=s.round_ms, committed_tokens=s.committed_tokens,
            drafted_tokens=s.drafted_tokens, accepted_tokens=s.accepted_tokens,
            path=self.service._last_path or "", gamma=self.service.gamma, head_start_rounds=s.head_start_rounds,
            draft_connected=self.service.link is not None and self.service.link.connected,
            gamma_sum=s.gamma_sum, gamma_by_batch=self.service.tuner.picks,
            verify_times=[target_pb2.VerifyTime(batch=b, query=q, ms=t)
                          for q, row in self.service.verify_cost.table.items() for b, t in row.items()],
            judged_runs=[target_pb2.JudgedRun(judged=j, accepted=a, count=c) for (j, a), c in s.judged_runs.items()],
            device_token_rounds=self.service.token_paths["device"], **self._split())

    def _split(self) -> dict:
        split = self.service.link.split if self.service.link is not None else None
        return {} if split is None else {"xfer_out_ms": split.out_ms, "xfer_back_ms": split.back_ms,
                                         "xfer_rounds": split.rounds}

    async def Serve(self, request_iterator, context):
        stream = GatewayStream()

        async def read():
            try:
                async for msg in request_iterator:
                    kind = msg.WhichOneof("kind")
                    if kind == "submit":
                        for item in msg.submit.items:
                            self.service.submit(stream, item)
                    elif kind == "cancel":
                        for rid in msg.cancel.request_ids:
                            self.service.cancel(stream, rid)
            finally:
                stream.out.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (msg := await stream.out.get()) is not None:
                yield msg
        finally:
            reader.cancel()
            self.service.drop_stream(stream)   # the gateway went away: free its sequences


async def serve(cfg: EngineConfig, host: str = "127.0.0.1", port: int = 50051, mode: str = "pearl",
                draft_address: str | None = None, gamma: int = 4, ready=None, ar_steps: int = 4,
                max_gamma: int = 16, head_start: int = -1, head_start_quorum: float = HEAD_START_QUORUM,
                device_tokens: bool = True, round_datagrams: bool = True) -> None:
    if cfg.device == "cpu":
        torch.set_num_threads(max(1, int(cfg.extra.get("threads", 1))))
    service = TargetService(cfg, mode, draft_address, gamma, ar_steps=ar_steps, max_gamma=max_gamma,
                             head_start=head_start, head_start_quorum=head_start_quorum, device_tokens=device_tokens,
                             round_datagrams=round_datagrams)
    server = new_server()
    target_pb2_grpc.add_TargetServicer_to_server(TargetServicer(service), server)
    bound = bind(server, host, port)
    gc_pauses.settle()   # the start-up heap out of the collector's walks
    await server.start()
    log.info("target serving", address=f"{host}:{bound}", mode=mode, draft=draft_address, gamma=gamma,
             model=cfg.model, **({"head_start": head_start, "head_start_quorum": head_start_quorum}
                                 if mode == "pearl" else {}))
    loop_task = asyncio.get_running_loop().create_task(service.run())
    if ready:
        ready(bound)
    try:
        await server.wait_for_termination()
    finally:
        loop_task.cancel()
        try:
            await server.stop(grace=1)   # raises CancelledError when serve() itself was cancelled
        finally:
            service.close()
