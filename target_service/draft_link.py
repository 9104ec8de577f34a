"""The target's side of Draft.Speculate: dial, handshake, one round at a time, re-dial.

The link is never required: while it is down the target serves autoregressively, and
`maintain()` re-dials with backoff. A refused handshake (another Speculate protocol version,
another tokenizer) is logged, counted and retried rarely; the target serves ar meanwhile.
"""
import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import torch

from pearl_runtime.pb import draft_pb2, draft_pb2_grpc
from pearl_runtime.rpc.ipc import IpcUnavailable, TokenImport
from pearl_runtime.rpc.round_datagrams import RoundSender
from pearl_runtime.rpc.identity import protocol_mismatch
from pearl_runtime.rpc.security import PLAINTEXT, Dialer
from pearl_runtime.rpc.server import host_id
from pearl_runtime.log import get_logger

log = get_logger(__name__)


ROUND_SLOWDOWN = 50.0   # a round this many times slower than usual: the draft is stalled
ROUND_FLOOR_S = 5.0     # never sooner: a new sequence's first round prefills its prompt on the draft
HEADERS_WAIT_S = 1.0    # the handshake waits this long for the draft's headers before its Hello


class DraftRefused(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind   # protocol | tokenizer | vocabulary | other: the metric's label


def _refusal_kind(reason: str) -> str:
    return next((k for k in ("protocol", "tokenizer", "vocabulary") if k in reason), "other")


@dataclass
class TransportSplit:
    """A round's transport in its two hops, summed over the rounds counted: the round written
    here -> off the draft's stream, and the whole batch handed to the draft's stream -> read
    here. Needs the draft's stamps (DraftBatch.received_at / sent_at) on this kernel's
    monotonic clock; a draft on another machine shows a negative hop and is not counted."""
    out_ms: float = 0.0
    back_ms: float = 0.0
    rounds: int = 0

    def add(self, written: float, batch: draft_pb2.DraftBatch, read: float, limit_s: float) -> None:
        out, back = batch.received_at - written, read - batch.sent_at
        if 0 <= out < limit_s and 0 <= back < limit_s:
            self.out_ms += out * 1e3
            self.back_ms += back * 1e3
            self.rounds += 1


class DraftLink:
    def __init__(self, address: str, hello: draft_pb2.Hello, round_timeout_s: float = 60.0,
                 device: torch.device | None = None):
        """device: this target's, where the draft's token buffer is opened (hello.device_tokens)."""
        self.address = address
        self.device = device or torch.device("cpu")
        self.tokens_in: TokenImport | None = None   # the draft's device token buffer, when opened
        self.datagrams: RoundSender | None = None   # Rounds also go here, ahead of the stream (hello.round_datagrams)
        self.hello = hello
        self.hello.host_id = self.hello.host_id or host_id()
        self.round_timeout_s = round_timeout_s
        self.channel: grpc.aio.Channel | None = None
        self.dialer = PLAINTEXT
        self.call = None
        self.connected = False
        self.generation = 0          # bumps on every (re)connect: the draft's mirror is new
        self.info: draft_pb2.HelloReply | None = None   # the draft's handshake answer
        self._lost = asyncio.Event()
        self._lost.set()
        self.split = TransportSplit()
        self.refused: Counter = Counter()   # refused handshakes by kind
        self.unreachable = 0                # dials that failed (no draft there, or not ready)
        self._round_s: float | None = None  # a running mean of round times, for the watchdog
        self._written = 0.0         # when the last Round went to the stream (time.monotonic)

    def use(self, dialer: Dialer) -> None:
        """Dial with `dialer`'s TLS and token (before `maintain`). A secured hop asks for no Round
        datagrams: they would go beside it in plaintext, unauthenticated (round_datagrams.py)."""
        self.dialer = dialer
        if dialer.tls or dialer.token:
            self.hello.round_datagrams = False

    async def _connect(self) -> None:
        self.channel = self.dialer.channel(self.address)
        stub = draft_pb2_grpc.DraftStub(self.channel)
        self.call = stub.Speculate(metadata=self.dialer.metadata)
        # the draft's headers first: a draft refusing the call (a wrong token) has then ended it,
        # and its status is what the read below raises. Written at once, the Hello can land after
        # that status, and grpc aio then reports INTERNAL "Internal error from Core" in its place
        # (grpc/grpc#36066). A draft that sends no early headers gets the Hello after HEADERS_WAIT_S.
        try:
            async with asyncio.timeout(HEADERS_WAIT_S):
                await self.call.initial_metadata()
        except TimeoutError:
            pass
        if not self.call.done():
            await self.call.write(draft_pb2.ToDraft(hello=self.hello))
        msg = await asyncio.wait_for(self.call.read(), timeout=10)
        if msg is grpc.aio.EOF or msg.WhichOneof("kind") != "hello":
            raise ConnectionError("draft closed the stream during the handshake")
        if not msg.hello.accepted:
            raise DraftRefused(_refusal_kind(msg.hello.reason), msg.hello.reason)
        if why := protocol_mismatch(self.hello.protocol_version, msg.hello.protocol_version):
            raise DraftRefused("protocol", why)
        self.generation += 1
        self.info = msg.hello
        self.tokens_in = self._open_tokens(msg.hello)
        self.datagrams = self._open_datagrams(msg.hello)
        self.connected = True
        self._lost.clear()
        log.info("draft connected; speculation on", draft=self.address, draft_model=msg.hello.draft_model,
                 generation=self.generation)

    def shares_gpu(self) -> bool:
        """Whether the draft shares this target's GPU (for --mode auto: pearl then pays nothing
        on sd): the GPU of the buffer it shares, where it shares one; else assumed, as on one GPU."""
        buffers = self.info.ipc_buffers if self.info is not None else ()
        if not buffers or not buffers[0].gpu_uuid or self.device.type != "cuda":
            return True
        from pearl_runtime.rpc.ipc import gpu_uuid
        return buffers[0].gpu_uuid == gpu_uuid(self.device)

    def _open_tokens(self, reply: draft_pb2.HelloReply) -> TokenImport | None:
        if not self.hello.device_tokens:
            return None
        if not reply.ipc_buffers:
            log.info("draft tokens travel inline: the draft shares no device buffer", draft=self.address)
            return None
        try:
            tokens_in = TokenImport(reply.ipc_buffers[0], self.device)
        except IpcUnavailable as e:   # expected on CPU (separate processes share no device memory)
            (log.info if self.device.type == "cpu" else log.warning)(
                "draft tokens travel inline", draft=self.address, reason=str(e)[:200])
            return None
        log.info("draft tokens of sd rounds stay on the device", draft=self.address, via=tokens_in.how)
        return tokens_in

    def _open_datagrams(self, reply: draft_pb2.HelloReply) -> RoundSender | None:
        if not self.hello.round_datagrams:
            return None
        if not reply.round_port:
            log.info("Rounds go by the stream alone: the draft has no datagram port", draft=self.address)
            return None
        host = self.address.rsplit(":", 1)[0] if ":" in self.address else self.address
        try:
            sender = RoundSender(host, reply.round_port, reply.round_key)
        except OSError as e:
            log.warning("Rounds go by the stream alone", draft=self.address, reason=str(e)[:200])
            return None
        log.info("Rounds go by datagram too, ahead of the stream", draft=self.address, port=reply.round_port)
        return sender

    async def maintain(self, backoff_s: float = 0.1, max_backoff_s: float = 0.5,
                       refused_backoff_s: float = 30.0, warn_every_s: float = 30.0) -> None:
        """Keep the link up. A dial that fails costs a refused connection or an UNAVAILABLE from
        a loading draft, so the retry stays short (a restarted draft is used within about
        `max_backoff_s` of its readiness); the warning repeats at most every `warn_every_s`."""
        delay, warned_at = backoff_s, None
        while True:
            await self._lost.wait()
            try:
                await self._connect()
                delay, warned_at = backoff_s, None
                await self._until_lost()
            except DraftRefused as e:
                self.refused[e.kind] += 1
                log.error("draft refused the handshake; serving ar", draft=self.address, reason=str(e),
                          refused=self.refused[e.kind])
                await self._close()
                await asyncio.sleep(refused_backoff_s)
            except (grpc.aio.AioRpcError, ConnectionError, asyncio.TimeoutError, OSError,
                    asyncio.InvalidStateError) as e:
                self.unreachable += 1
                if warned_at is None or time.monotonic() - warned_at >= warn_every_s:
                    warned_at = time.monotonic()
                    log.warning("draft unreachable; serving ar until it answers", draft=self.address,
                                error=str(e)[:200], retry_s=delay, failed_dials=self.unreachable)
                await self._close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_backoff_s)

    async def _until_lost(self) -> None:
        """Until the link is marked down or its channel leaves READY. A draft that dies while no
        round runs ends the stream with no read under way to see it; its channel sees it at once,
        so an idle target reports the draft gone (and dials again) rather than at its next round."""
        channel = self.channel
        lost, change = asyncio.ensure_future(self._lost.wait()), None
        try:
            while not lost.done() and self.connected and self.channel is channel:
                state = channel.get_state()
                if state != grpc.ChannelConnectivity.READY:
                    await self._lost_with(ConnectionError(f"the draft's channel went {state.name}"))
                    return
                change = asyncio.ensure_future(_state_change(channel, state))
                await asyncio.wait({lost, change}, return_when=asyncio.FIRST_COMPLETED)
        finally:   # also when maintain() is cancelled (the target stopping)
            for waiter in (lost, change):
                if waiter is not None:
                    waiter.cancel()

    async def exchange(self, rnd: draft_pb2.Round) -> draft_pb2.DraftBatch | None:
        """Send one Round and wait for its DraftBatch, or for its early part when the round asks
        for one (then `rest` reads the whole batch). None (and the link marked down) on failure."""
        return await self.receive(rnd) if await self.send(rnd) else None

    async def send(self, rnd: draft_pb2.Round) -> bool:
        """Write one Round to the stream (`receive` reads its answer). False, and the link
        marked down, on failure."""
        try:
            if self.call is None:
                raise ConnectionError("the draft link is down")
            self._written = time.monotonic()
            if self.datagrams is not None and not rnd.early:   # the draft sends early parts from the stream's copy
                self.datagrams.send(rnd)
            await self.call.write(draft_pb2.ToDraft(round=rnd))
        # InvalidStateError: the call already ended (the draft died while this target was idle);
        # grpc.aio raises it from write() instead of an AioRpcError
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, ConnectionError) as e:
            await self._lost_with(e)
            return False
        return True

    async def receive(self, rnd: draft_pb2.Round) -> draft_pb2.DraftBatch | None:
        """The answer to a Round that `send` wrote (its early part, when it asks for one)."""
        return await self._read(rnd.round_id, early=rnd.early > 0)

    def tokens_view(self, msg) -> torch.Tensor | None:
        """A batch's tokens in the draft's device buffer, as a view (read it once
        `tokens_written`); None when the buffer is gone (the link went down)."""
        return self.tokens_in.view(msg) if self.tokens_in is not None else None

    async def tokens_written(self) -> bool:
        """Whether the draft's last write to its device buffer has landed, once its event says
        so (polled, yielding to the event loop); False, and the link marked down, when the
        stream ends or the round's deadline passes first (a draft that died mid-round never
        records the event)."""
        tokens_in = self.tokens_in
        deadline = time.monotonic() + self.round_timeout_s
        while tokens_in is not None and not tokens_in.written():
            if self.call is None or self.call.done() or time.monotonic() > deadline:
                tokens_in = None
            else:
                await asyncio.sleep(0)
        if tokens_in is not None:
            return True
        await self._lost_with(ConnectionError("the draft went away before its device tokens were written"))
        return False

    async def rest(self, rnd: draft_pb2.Round) -> draft_pb2.DraftBatch | None:
        """The whole batch of a round whose early part `exchange` returned."""
        return await self._read(rnd.round_id, early=False)

    async def _read(self, round_id: int, early: bool) -> draft_pb2.DraftBatch | None:
        try:
            if self.call is None:   # marked down since the round's early part arrived
                raise ConnectionError("the draft link is down")
            # a timeout scope, not wait_for: wait_for wraps the read in a task of its own,
            # one more trip through the event loop every round
            async with asyncio.timeout(self.round_deadline_s()):
                msg = await self.call.read()
            if (msg is grpc.aio.EOF or msg.WhichOneof("kind") != "batch" or msg.batch.round_id != round_id
                    or msg.batch.early != early):
                raise ConnectionError("draft stream ended or answered out of order")
            if not msg.batch.early:
                took = time.monotonic() - self._written
                self._round_s = took if self._round_s is None else 0.9 * self._round_s + 0.1 * took
                self.split.add(self._written, msg.batch, time.monotonic(), self.round_timeout_s)
            return msg.batch
        except (grpc.aio.AioRpcError, ConnectionError, asyncio.TimeoutError, grpc.aio.UsageError,
                asyncio.InvalidStateError) as e:
            return await self._lost_with(e)

    def round_deadline_s(self) -> float:
        """The watchdog: a draft round taking ROUND_SLOWDOWN times its running mean (at least
        ROUND_FLOOR_S; `round_timeout_s` before any was timed) marks the link down, so a stalled
        draft costs the target one late round, then it serves ar."""
        if self._round_s is None:
            return self.round_timeout_s
        return min(self.round_timeout_s, max(ROUND_FLOOR_S, ROUND_SLOWDOWN * self._round_s))

    async def _lost_with(self, error: Exception) -> None:
        if self.connected:   # the first to see it says so: a round and the channel watch may both
            log.warning("draft link lost; falling back to ar", draft=self.address, error=str(error)[:200])
        await self.mark_down()
        return None

    async def mark_down(self) -> None:
        self.connected = False
        self.tokens_in = None
        await self._close()
        self._lost.set()

    async def _close(self) -> None:
        if self.datagrams is not None:
            self.datagrams.close()
            self.datagrams = None
        if self.call is not None:
            self.call.cancel()
            self.call = None
        if self.channel is not None:
            await self.channel.close()
            self.channel = None


async def _state_change(channel: grpc.aio.Channel, state: grpc.ChannelConnectivity) -> None:
    try:
        await channel.wait_for_state_change(state)
    except (grpc.aio.UsageError, RuntimeError):   # the channel closed under the wait: the link is going down
        pass
