"""Drafting over mirrors of the target's sequences. A mirror's state is a pure function of
what its target said (adds, removes, verdicts), so a restarted draft is rebuilt by replay."""
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.block_manager import BlockManager
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.engine.tp_group import make_runner
from pearl_runtime.sampling import SamplingParams, probabilities, sample_from
from pearl_runtime.log import get_logger

log = get_logger(__name__)


@dataclass
class Mirror:
    """One target stream's sequences, by the target's seq id."""
    seqs: dict[int, Sequence] = field(default_factory=dict)


@dataclass
class DraftResult:
    seq_ids: list[int]
    tokens: torch.Tensor | None      # int32 [n, gamma]; -1 where nothing was drafted
    probs: torch.Tensor | None       # float32 [n, gamma, vocab] when any sequence samples
    device_tokens: torch.Tensor | None = None   # [n, gamma] still on the device (tokens is None)


class Drafter:
    def __init__(self, cfg: EngineConfig):
        self.runner = make_runner(cfg)   # TP group when cfg.tp_size > 1
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.model_cfg.vocab_size
        self.blocks = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_cache)
        self.paths = Counter()   # rounds drafted by each path, for logs and tests
        self._last_path = None
        self._on_device = None   # a round whose tokens were left on the device: (seqs, host copy, events)
        self.last_device_ms = None   # the device time of the last such round, once taken

    def take_device_tokens(self) -> None:
        """Give the sequences of a round drafted with its tokens left on the device those
        tokens (its copy to the host has long finished by the time the next round comes)."""
        if self._on_device is None:
            return
        seqs, host, start, done = self._on_device
        self._on_device = None
        if done is not None:
            done.synchronize()
            self.last_device_ms = start.elapsed_time(done)
        self.runner.commit_chain(seqs, host.tolist())

    def close(self, mirror: Mirror) -> None:
        self.take_device_tokens()
        for seq in mirror.seqs.values():
            self.blocks.free_seq(seq)
        mirror.seqs.clear()

    def apply(self, mirror: Mirror, adds: list[tuple[int, list[int], SamplingParams]], removes: list[int],
              verdicts: list[list[int]]) -> None:
        """verdicts: (seq_id, length, last token, keep) rows; keep 0 drops the drafts past
        `length` (the target trimmed what it carries), -1 keeps them."""
        self.take_device_tokens()
        for sid in removes:
            seq = mirror.seqs.pop(sid, None)
            if seq is not None:
                self.blocks.free_seq(seq)
        for sid, num, last, *rest in verdicts:
            seq = mirror.seqs.get(sid)
            if seq is None:
                continue
            if len(seq) >= num and seq.token_ids[num - 1] == last:
                # accepted: the tokens drafted past it (PEARL drafts on while the target
                # verifies) and their K/V stand; dropping the K/V made the next round re-feed up
                # to gamma tokens in an eager step outside the draft's graphs
                if rest and rest[0] >= 0 and len(seq) > num + rest[0]:
                    del seq.token_ids[num + rest[0]:]   # past what the target carries: drafted again
                    self.blocks.truncate(seq, min(seq.num_kv, len(seq) - 1))
                continue
            del seq.token_ids[num - 1:]            # rejected: roll back, take the target's token
            seq.token_ids.append(last)
            if seq.block_table:
                self.blocks.truncate(seq, min(seq.num_kv, num - 1))
        for sid, tokens, params in adds:
            old = mirror.seqs.pop(sid, None)
            if old is not None:
                self.blocks.free_seq(old)
            seq = Sequence(tokens, params, seq_id=sid)
            if params.seed is not None:   # independent of the target's acceptance draws
                seq.generator = torch.Generator().manual_seed((params.seed * 0x9E3779B1 + 1) % 2**63)
            mirror.seqs[sid] = seq

    def _ready(self, seq: Sequence, steps: int = 1) -> bool:
        """Room in the cache and the window for `steps` more draft tokens."""
        if len(seq) + steps > self.max_model_len:
            return False
        if not seq.block_table:
            if not self.blocks.can_allocate(seq):
                return False
            self.blocks.allocate(seq)
        return self.blocks.ensure_capacity(seq, len(seq) + steps - 1)

    def _path(self, name: str) -> None:
        self.paths[name] += 1
        if name != self._last_path:
            log.info("draft path: %s", name)
            self._last_path = name

    def draft(self, mirror: Mirror, gamma: int, early: int = 0,
              on_early: Callable[[DraftResult], None] | None = None) -> DraftResult:
        """Draft gamma tokens per sequence. With `early` > 0, `on_early` gets the first `early`
        tokens of every sequence as soon as they exist (always exactly once, before this
        returns), so the target can start verifying them while the rest are drafted."""
        parts = self.parts(mirror, gamma, early if on_early is not None else 0)
        if 0 < early < gamma and on_early is not None:
            on_early(next(parts))
        return next(parts)

    def parts(self, mirror: Mirror, gamma: int, early: int = 0, on_device: bool = False) -> Iterator[DraftResult]:
        """`draft` as a generator: with 0 < early < gamma it first yields the first `early`
        tokens of every sequence, then (when resumed, from any thread) the whole round. The
        caller picks where each part runs: the draft service sends the early part from its
        event loop before it drafts the rest. `on_device` (no early part): where the round
        chains on the device, its tokens stay there (DraftResult.device_tokens, no sync) and
        the sequences get them at the next call (`take_device_tokens`)."""
        self.take_device_tokens()
        seq_ids = list(mirror.seqs)
        seqs = [mirror.seqs[s] for s in seq_ids]
        early = early if 0 < early < gamma else 0
        # all greedy and room for every token: the steps chain on the device, one sync a round
        # (two with an early part)
        if (seqs and self.runner.chains_on_device and all(s.params.greedy for s in seqs)
                and all(self._ready(s, gamma) for s in seqs)):
            if on_device and not early:
                self._path("chained, tokens left on the device")
                yield DraftResult(seq_ids, None, None, device_tokens=self._defer(seqs, gamma))
                return
            self._path("chained")
            out = self.runner.greedy_chain(seqs, early) if early else [[] for _ in seqs]
            if early:
                yield DraftResult(seq_ids, torch.tensor(out, dtype=torch.int32), None)
            out = [a + b for a, b in zip(out, self.runner.greedy_chain(seqs, gamma - early))]
            yield DraftResult(seq_ids, torch.tensor(out, dtype=torch.int32), None)
            return
        self._path("stepwise")
        tokens = torch.full((len(seqs), gamma), -1, dtype=torch.int32)
        sampled = any(not s.params.greedy for s in seqs)
        probs = torch.zeros(len(seqs), gamma, self.vocab_size) if sampled else None

        def head():
            return DraftResult(seq_ids, tokens[:, :early].clone(), None if probs is None else probs[:, :early].clone())

        active = list(range(len(seqs)))
        for step in range(gamma):
            if early and step == early:
                yield head()
            ready = [i for i in active if self._ready(seqs[i])]
            if len(ready) < len(active):   # those sequences get no more draft tokens this round
                log.warning("draft KV cache or window full: %d sequence(s) stop drafting at step %d",
                            len(active) - len(ready), step)
            active = ready
            if not active:
                break
            logits = self.runner.run([seqs[i] for i in active])
            best = logits.argmax(-1).tolist()     # one device sync per step, not one per sequence
            for row, i in enumerate(active):
                seq = seqs[i]
                if seq.params.greedy:
                    tok = best[row]
                else:
                    q = probabilities(logits[row], seq.params)
                    probs[i, step] = q.cpu()
                    tok = sample_from(q, seq.generator)
                seq.token_ids.append(tok)
                tokens[i, step] = tok
        else:
            step = gamma
        if early and step < early:   # stopped before the early part was complete: send what exists
            yield head()
        yield DraftResult(seq_ids, tokens, probs)

    def _defer(self, seqs: list[Sequence], gamma: int) -> torch.Tensor:
        timed = self.runner.device.type == "cuda"
        if timed:   # the round's device time, read when the tokens are taken (the host is done long before)
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        tokens = self.runner.greedy_chain(seqs, gamma, defer=True)
        if timed:   # their way to the host starts now and is awaited next round
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            done.record()
        else:
            host, start, done = tokens, None, None
        self._on_device = (seqs, host, start, done)
        return tokens
