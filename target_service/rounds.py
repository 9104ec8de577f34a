"""The target's round loop: PEARL, sd or ar rounds over the running batch, ar while the draft
is away. Each round asks the policy (gamma, head start, cap), sends the draft its Round,
verifies with the verifier and publishes the committed tokens to the gateway streams."""
import asyncio
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

import grpc

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import load_tokenizer
from pearl_runtime.engine.step_timer import measure_policy_verify_cost
from pearl_runtime.errors import InvalidRequest, OutOfBlocks
from pearl_runtime import tracing
from pearl_runtime.log import get_logger
from pearl_runtime.pb import draft_pb2, target_pb2
from pearl_runtime.rpc.identity import tokenizer_hash
from pearl_runtime.spec.policy import MODES, SpecPolicy
from pearl_runtime.spec.round_model import HEAD_START_QUORUM
from pearl_runtime.spec.verify_cost import VerifyCost
from target_service import wire
from target_service.draft_link import DraftLink
from target_service.rejoin import Rejoin
from target_service.stats import RoundStats
from target_service.streams import GatewayStream, end_span, publish
from target_service.verifier import DraftTokens, Request, Verifier

log = get_logger(__name__)


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
        self.cfg, self.mode, self.max_waiting, self.ar_steps = cfg, mode, max_waiting, ar_steps
        self.tokenizer = load_tokenizer(cfg.model)
        self.core = Verifier(cfg)
        graphs = self.core.runner.graphs
        if graphs is not None and max_gamma + 1 > max(graphs.q_buckets):
            # a verify judges up to gamma + 1 tokens a sequence: keep auto gamma inside the graphs
            log.warning("max gamma lowered to fit the largest graph query bucket", asked=max_gamma,
                        max_gamma=max(graphs.q_buckets) - 1)
            max_gamma = max(graphs.q_buckets) - 1
        verify_cost = VerifyCost()   # verify step time by batch and query length, for auto gamma
        if (gamma is None or mode == "auto") and graphs is not None:
            verify_cost = measure_policy_verify_cost(self.core.runner, max_gamma, with_ar=mode == "auto")
        self.policy = SpecPolicy(mode, gamma, max_gamma, head_start, head_start_quorum, verify_cost)
        self.gamma = self.policy.gamma_for(1)
        self.tok_hash = tokenizer_hash(self.tokenizer)
        self.link = None
        if mode != "ar" and draft_address:
            runner = self.core.runner
            hello = wire.hello(f"target-{id(self):x}", self.tok_hash, runner.model_cfg.vocab_size, runner.device,
                               device_tokens and mode in ("sd", "auto") and runner.chains_on_device, round_datagrams)
            self.link = DraftLink(draft_address, hello, device=runner.device)
        self.token_paths = Counter()   # sd rounds by how their draft tokens came, for logs and tests
        self.inbox: deque = deque()           # ("submit", stream, Submission) | ("cancel", stream, id)
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-forward")
        self.round_id = 0
        self._ahead = None   # sd: (reqs, Round, sent, t0) of the next round, its Round already sent
        self.stats = RoundStats()
        self.rejoin = Rejoin()
        self.collector = None          # the Prometheus collector, when /metrics is served
        self.draft_generation = 0
        self.last_path = None
        self.last_step_at = time.monotonic()   # when the loop last finished a round (or idled)
        self._chain_logged = False
        self._query_len = 1
        self._in_round: list[Request] = []   # the round's requests, for _fail_round

    def accepted_per_position(self) -> dict[int, int]:
        return self.stats.accepted_per_position()

    def queued_submissions(self) -> int:
        return sum(kind == "submit" for kind, _, _ in list(self.inbox))

    # -- inputs from gateway streams --------------------------------------------------------
    def submit(self, stream: GatewayStream, item: target_pb2.Submission) -> None:
        self.inbox.append(("submit", stream, item))
        self.wakeup.set()

    def cancel(self, stream: GatewayStream, request_id: str) -> None:
        self.inbox.append(("cancel", stream, request_id))
        self.wakeup.set()

    def drop_stream(self, stream: GatewayStream) -> None:
        for rid in list(stream.requests):
            self.cancel(stream, rid)

    def _drain_inbox(self) -> None:
        while self.inbox:
            kind, stream, item = self.inbox.popleft()
            if kind == "cancel":
                req = stream.requests.pop(item, None)   # unknown ids are harmless
                if req is not None:
                    log.info("request cancelled", request_id=req.request_id)
                    self.core.cancel(req)
                    end_span(req, "cancelled")
                continue
            try:
                if len(self.core.scheduler.waiting) >= self.max_waiting:
                    raise OutOfBlocks(f"target queue is full ({self.max_waiting} waiting)")
                req = self._admit(stream, item)
                stream.requests[item.request_id] = req
            except (InvalidRequest, OutOfBlocks) as e:
                code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, InvalidRequest) \
                    else grpc.StatusCode.RESOURCE_EXHAUSTED
                log.info("request refused", request_id=item.request_id, code=code.name, reason=str(e))
                stream.out.put_nowait(wire.error_update(item.request_id, str(e), code))

    def _admit(self, stream: GatewayStream, item: target_pb2.Submission) -> Request:
        req = self.core.admit(wire.request_from(item, stream), headroom=1 + 2 * self.gamma)
        req.span = tracing.start("target.request", item.traceparent or None, request_id=req.request_id)
        req.traceparent = req.span.traceparent or req.traceparent
        log.info("request admitted", request_id=req.request_id, prompt_tokens=len(req.seq),
                 max_tokens=req.seq.params.max_tokens)
        return req

    # -- the round loop ---------------------------------------------------------------------
    async def run(self) -> None:
        if self.link:
            asyncio.get_running_loop().create_task(self.link.maintain())
        while True:
            self._drain_inbox()
            if not self.core.has_work() and self._ahead is None:
                self.wakeup.clear()
                self.last_step_at = None   # idle: no step to hang
                await self.wakeup.wait()
                continue
            if self.last_step_at is None:
                self.last_step_at = time.monotonic()
            try:
                await self.round()
            except Exception as e:   # a bug must not stop the loop and hang every stream
                log.exception("round failed; failing the requests in it")
                self._fail_round(f"internal error in the target's round: {type(e).__name__}: {str(e)[:200]}")
            self.last_step_at = time.monotonic()

    async def round(self) -> None:
        loop = asyncio.get_running_loop()
        if (ahead := self._ahead) is not None:   # sd: this round's Round already went out
            self._ahead = None
            self._in_round = ahead[0]
            await self._sd_round(*ahead)
            return
        t0 = time.perf_counter()
        reqs = self._in_round = self.core.schedule()
        if not reqs:
            await asyncio.sleep(0.001)
            return
        speculate = self.link is not None and self.link.connected
        path = self._path_for(reqs) if speculate else "ar"
        if path == "ar" and (self.mode == "ar" or speculate) and \
                (steps := self.core.chain_length(reqs, self.ar_steps)) > 1:
            await self._ar_chain(reqs, steps, t0)
            return
        self._log_path(path)
        if path == "ar":
            logits, target_ms, _ = await loop.run_in_executor(self.executor, self._timed_forward, reqs)
            before = self._judge(reqs, logits, {}, None)
            self.stats.rounds_without_draft += self.mode != "ar" and not speculate
            self._account(reqs, None, None, before, target_ms, 0.0, 0.0, t0, phase="decode")
            return
        rnd = self._build_round(reqs)
        if path == "sd":
            sent = time.perf_counter()
            await self._sd_round(reqs, rnd, sent if await self.link.send(rnd) else None, t0)
            return
        await self._pearl_round(reqs, rnd, t0)

    async def _pearl_round(self, reqs: list[Request], rnd: draft_pb2.Round, t0: float) -> None:
        """The heart of PEARL: verify while the draft drafts the next gamma tokens. With a head
        start, first wait for the draft's `early` tokens and verify them in this forward."""
        loop = asyncio.get_running_loop()
        gamma = rnd.gamma
        pre_verify = sum(not r.pending for r in reqs)
        prefills = any(len(r.seq) - r.seq.num_kv - len(r.pending) > 1 for r in reqs)
        head, taken, wait_ms, exchange_ms = None, {}, 0.0, 0.0
        if early := self.policy.early(len(reqs), pre_verify, prefills, gamma):
            rnd.early, rnd.gamma = early, gamma + early
            sent = time.perf_counter()
            head = await self.link.exchange(rnd)
            wait_ms = exchange_ms = (time.perf_counter() - sent) * 1e3   # the target idles meanwhile
            if head is not None:
                self.stats.head_start_rounds += 1
                # pre-verify sequences judge the early tokens now; post-verify ones keep their
                # query at gamma (adding the early tokens after their pending ones would push
                # the verify into the next query bucket)
                taken = self.core.attach([r for r in reqs if not r.pending], wire.draft_tokens(head))
        forward = loop.run_in_executor(self.executor, self._timed_forward, reqs)
        sent = time.perf_counter()
        batch = None
        if not early:
            batch = await self.link.exchange(rnd)
        elif head is not None:
            batch = await self.link.rest(rnd)
        arrived = time.perf_counter()
        exchange_ms += (arrived - sent) * 1e3
        logits, target_ms, fwd_done = await forward
        wait_ms += max(0.0, arrived - fwd_done) * 1e3
        # fresh tokens continue after what each sequence took from the early part
        drafts = wire.draft_tokens(batch, skip=taken)
        cap = self.policy.pending_cap(gamma) if batch is not None else None
        before = self._judge(reqs, logits, drafts, cap)
        phase = "pre_verify" if pre_verify * 2 > len(reqs) else "post_verify"
        self._account(reqs, rnd, batch, before, target_ms, wait_ms, exchange_ms, t0, phase)

    async def _sd_round(self, reqs: list[Request], rnd: draft_pb2.Round, sent: float | None, t0: float) -> None:
        """An sd round whose Round went to the draft at `sent` (None: the write failed, the link
        is down). Nothing overlaps sd's verify, so it runs right here on the event loop: the hop
        to the forward thread and back costs more than it saves. Once judged, the next round's
        Round goes out (`_send_ahead`) before this one's tokens are published."""
        batch = await self.link.receive(rnd) if sent is not None else None
        wait_ms = exchange_ms = (time.perf_counter() - sent) * 1e3 if sent is not None else 0.0
        # a request cancelled after its Round went out leaves the round (its drafts are ignored)
        reqs = [r for r in reqs if self.core.requests.get(r.seq.seq_id) is r]
        if not reqs:
            return
        logits, target_ms, batch = await self._verify_drafts(reqs, batch)
        before = self._judge(reqs, logits, {}, None)
        if batch is not None:
            await self._send_ahead()
        self._account(reqs, rnd, batch, before, target_ms, wait_ms, exchange_ms, t0, "verify")

    async def _send_ahead(self) -> None:
        """sd: schedule the next round and send its Round now, right after this round's verdicts
        exist: the draft starts on it while this round's tokens are published and counted (on a
        shared GPU the GPU idles from the verify's end to the draft's first step). New requests
        and cancellations that came in meanwhile are taken first, as at the top of a round."""
        t0 = time.perf_counter()
        self._drain_inbox()
        if not self.link.connected or not self.core.has_work() or \
                self.policy.mode_for(len(self.core.scheduler.running)) != "sd":
            return
        reqs = self.core.schedule()
        if not reqs:
            return
        rnd = self._build_round(reqs)
        sent = time.perf_counter()
        self._ahead = (reqs, rnd, sent if await self.link.send(rnd) else None, t0)

    async def _ar_chain(self, reqs: list[Request], steps: int, t0: float) -> None:
        self._log_path("ar")
        if not self._chain_logged:
            log.info("ar rounds chain greedy decode steps on the device (one sync a round)", max_steps=self.ar_steps)
            self._chain_logged = True
        before = [len(r.seq) for r in reqs]
        target_ms = await asyncio.get_running_loop().run_in_executor(self.executor, self._timed_chain, reqs, steps)
        self._publish(reqs)
        round_s = time.perf_counter() - t0
        self.stats.count_chain(reqs, before, steps, target_ms, round_s * 1e3)
        self._observe_mode(reqs, sum(len(r.seq) - n for r, n in zip(reqs, before)), round_s)
        if self.collector is not None:
            self.collector.observe_round("ar", "decode", round_s)

    def _judge(self, reqs: list[Request], logits, drafts: dict[int, DraftTokens], cap: int | None) -> list[tuple]:
        """Judge and commit the round; returns each request's (committed, drafted, accepted)
        before it, for the counters."""
        before = [(len(r.seq) - len(r.pending), r.drafted, r.accepted) for r in reqs]
        self.core.finish_round(reqs, logits, drafts, max_pending=cap)
        return before

    def _account(self, reqs: list[Request], rnd, batch, before: list[tuple], target_ms: float, wait_ms: float,
                 exchange_ms: float, t0: float, phase: str) -> None:
        """Publish the round's tokens, then count it (and let auto gamma see it)."""
        self._publish(reqs)
        round_s = time.perf_counter() - t0
        self.stats.add_round(rnd if batch is not None else None, batch.draft_ms if batch is not None else 0.0,
                             target_ms, wait_ms, exchange_ms, round_s * 1e3)
        judged, accepted = self.stats.count(reqs, before, batch is not None)
        self._observe_mode(reqs, sum(len(r.seq) - b[0] for r, b in zip(reqs, before)), round_s)
        if self.collector is not None:
            self.collector.observe_round(self.last_path or self.mode, phase, round_s)
        if batch is not None:
            self.rejoin.observe(rnd.round_id, batch.draft_ms, target_ms)
            self.policy.observe(batch=len(reqs), gamma=rnd.gamma - rnd.early, draft_ms=batch.draft_ms,
                                verify_ms=target_ms, drafted=judged, accepted=accepted, query_len=self._query_len,
                                draft_steps=rnd.gamma, round_ms=round_s * 1e3)

    def close(self) -> None:
        """Release the engine (a TP group stops its workers and leaves its group). Synchronous:
        a cancelled serve() may be cancelled again while it cleans up. The forward thread
        finishes its step first, so no collective is cut in half."""
        self.executor.shutdown(wait=True)
        self.core.runner.close()

    def _fail_round(self, message: str) -> None:
        """A round raised: the requests it finished (or failed alone) left the scheduler untold, so
        their ends go out first; every other one of the round, or still running, fails with `message`."""
        running = [self.core.requests.get(s.seq_id) for s in self.core.scheduler.running]
        reqs = {id(r): r for r in [*self._in_round, *running] if r and r.sink.requests.get(r.request_id) is r}
        try:
            self._publish([r for r in reqs.values() if r.finished or r.error is not None])
        except Exception:
            log.exception("publishing the ends of a failed round's requests failed")
        for req in reqs.values():
            if req.sink.requests.pop(req.request_id, None) is not None:   # not published just now
                self.core.cancel(req)
                end_span(req, "failed")
                req.sink.out.put_nowait(wire.error_update(req.request_id, message, grpc.StatusCode.INTERNAL))

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
            self.core.attach(reqs, wire.draft_tokens(batch))
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

    def _path_for(self, reqs: list[Request]) -> str:
        """The path of a round with the draft up: the mode, or auto's pick for the batch. An auto
        target serving ar takes its sequences off the draft (its mirror would fall behind what
        ar commits); they join it again, whole, when speculation resumes."""
        path = self.policy.choose(len(reqs))
        if path == "ar" and self.mode == "auto":
            for r in self.core.requests.values():
                if r.on_draft:
                    self.core.removed.append(r.seq.seq_id)
                    r.on_draft = False
                    self.rejoin.left(r.seq.seq_id)
        return path

    def _observe_mode(self, reqs: list[Request], committed: int, round_s: float) -> None:
        """A round's tokens and time, for --mode auto's choice."""
        self.policy.observe_mode(self.last_path or self.mode, len(reqs), committed, round_s * 1e3)

    def _log_path(self, path: str) -> None:
        if path != self.last_path:
            log.info("round path", path=path, mode=self.mode)
            self.last_path = path

    def _build_round(self, reqs: list[Request]) -> draft_pb2.Round:
        if self.link.generation != self.draft_generation:   # a new draft mirror: all rejoin (rejoin.py)
            self.draft_generation = self.link.generation
            self.policy.seed_from_draft(dict(zip(self.link.info.step_batch_sizes, self.link.info.step_ms)),
                                        shared_gpu=self.mode != "auto" or self.link.shares_gpu(),
                                        draft_model=self.link.info.draft_model)
            for r in self.core.requests.values():
                r.on_draft = False
            self.rejoin.all_back(sid for sid, r in self.core.requests.items() if r.seq.num_kv)   # new ones: at once
            self.core.removed.clear()
        self.round_id += 1
        self.gamma = self.policy.gamma_for(len(reqs))
        adds = self.rejoin.adds(reqs, self.round_id)
        for r in adds:
            r.on_draft = True
        rnd = wire.round_message(self.round_id, self.gamma, self.core.removed, self.core.draft_verdicts(), adds,
                                 device_tokens=self.policy.path == "sd" and self.link.tokens_in is not None)
        self.core.removed = []
        return rnd

    def _publish(self, reqs: list[Request]) -> None:
        publish(reqs, self.last_path or "")
