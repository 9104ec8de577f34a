"""Continuous batching for autoregressive generation: admit, preempt, retire.
Reasons about sequences and blocks only; never touches tensors."""
from collections import deque

from pearl_runtime.engine.block_manager import BlockManager
from pearl_runtime.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_prefill_tokens: int = 0):
        """max_prefill_tokens: the prompt tokens (whole sequences, one at least) a step admits; 0: no
        limit. A burst of long sequences (a restart's resubmissions) then prefills over several
        steps, the first of them streaming after one step's worth instead of after all of it."""
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """Sequences to feed this step. Each running sequence needs room in the cache for all
        its tokens (a speculating target appends its pending draft tokens first); when the
        cache is full the newest sequence is preempted and recomputed later."""
        for seq in list(self.running):
            while seq in self.running and not self.blocks.ensure_capacity(seq, len(seq)):
                self.preempt(self.running[-1])
        admitted = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.blocks.blocks_needed(len(seq)) > self.blocks.num_free:
                break
            if admitted and self.max_prefill_tokens and admitted + len(seq) > self.max_prefill_tokens:
                break
            admitted += len(seq)
            self.waiting.popleft()
            self.blocks.allocate(seq)          # blocks for every token, cached prefix reused
            seq.status = Status.RUNNING
            self.running.append(seq)
        return list(self.running)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.FINISHED

    def drop(self, seq: Sequence) -> None:
        """Cancel: forget the sequence wherever it is."""
        if seq in self.running:
            self.finish(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED
