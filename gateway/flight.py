"""Flight: one request in flight: its job, every token a target committed for it, its update queue.

The gateway keeps each request's prompt and every token a target committed for it; when a
target's stream breaks, the request continues elsewhere as prompt + those tokens with the
remaining budget, so the client sees neither a duplicate nor a gap.
"""
import asyncio

from gateway.job import Job, Progress


class Flight:
    """One request in flight; iterate it for its Progress until the one that finishes it."""

    def __init__(self, job: Job):
        self.job = job
        self.received: list[int] = []   # every committed token, from whichever target
        self.forwards = 0               # reported by the current target (cumulative there)
        self.forwards_before = 0        # spent on targets that since failed
        self.target = None                  # the TargetConnection serving it
        self.resubmits = 0
        self.done = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._stashed: BaseException | None = None
        self._exhausted = False
        self.park_timer: asyncio.TimerHandle | None = None

    @property
    def request_id(self) -> str:
        return self.job.request_id

    def continuation(self) -> tuple[list[int], int]:
        """What a target must run: prompt + tokens already committed, and the budget left."""
        return list(self.job.prompt_ids) + self.received, self.job.params.max_tokens - len(self.received)

    def deliver(self, token_ids: list[int], finish: str | None, forwards: int, mode: str) -> None:
        # recorded on arrival, not on consumption: a resubmission must include queued tokens too
        self.received.extend(token_ids)
        self.forwards = forwards
        self.done = self.done or finish is not None
        self._queue.put_nowait(Progress(token_ids, finish, self.forwards_before + forwards, mode))

    def fail(self, exc: BaseException) -> None:
        self.done = True
        self._queue.put_nowait(exc)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Progress:
        """The next Progress, merged with any already queued behind it (one client message)."""
        if self._stashed is not None:
            raise self._stashed
        if self._exhausted:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        while item.finish_reason is None and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if isinstance(nxt, BaseException):
                self._stashed = nxt
                break
            item = Progress(item.token_ids + nxt.token_ids, nxt.finish_reason, nxt.target_forwards, nxt.mode)
        self._exhausted = item.finish_reason is not None
        return item

