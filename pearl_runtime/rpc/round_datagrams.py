"""Rounds ahead of the stream: a target also sends each small Round as one UDP datagram.

On a shared GPU the GPU idles from the end of the verify to the draft's first step, and the
Round's trip over the gRPC stream (Python on both ends) is a sizeable share of that. A datagram to the draft's host gets there sooner. The draft
drafts the round the moment its datagram arrives and answers the stream's copy, when that
comes, with the batch it already has. The stream stays the one source of truth: whichever
copy of a round arrives first is the one applied, the other is ignored. A lost datagram costs
only the head start, and a round too big for one (long prompts in its adds) goes by the
stream alone. The datagram cuts the Round's hop to a fraction of the stream's (measured:
benchmarks/journal/BENCHMARKS.md).

The draft opens one socket beside its gRPC port and gives each target stream a random key
(HelloReply.round_port / round_key); a datagram is the key, then the serialized Round.

A secured hop has no datagrams: with a bearer token or TLS on the draft, it opens no port,
and a target dialing with either does not ask for one. The stream's TLS cannot cover a
datagram (its token ids would travel in the clear), and a key sent once, seen on the wire,
would let anyone on the path forge rounds: an HMAC per datagram fixes the second but not the
first, and the datagram only ever saves a fraction of a round's hop.
"""
import asyncio
import os
import socket
import time
from collections.abc import Callable


from pearl_runtime.pb import draft_pb2
from pearl_runtime.log import get_logger

log = get_logger(__name__)

KEY_BYTES = 8
MAX_DATAGRAM = 8192   # a steady sd round is ~50 bytes; one whose adds carry long prompts goes by the stream


def datagram_host(host: str, auth_token: str | None, credentials) -> str | None:
    """Where the draft opens its datagram port: beside its gRPC port, unless the hop is secured."""
    return None if auth_token or credentials is not None else host


class RoundSender:
    """The target's side: one connected UDP socket to the draft's inbox."""

    def __init__(self, host: str, port: int, key: bytes):
        family, kind, proto, _, addr = _resolve(host, port)
        self.sock = socket.socket(family, kind, proto)
        self.sock.setblocking(False)
        self.sock.connect(addr)
        self.key = key
        self.sent = 0
        self.failed = 0

    def send(self, rnd: draft_pb2.Round) -> bool:
        """Send the Round if it fits one datagram; never blocks or raises."""
        payload = self.key + rnd.SerializeToString()
        if len(payload) > MAX_DATAGRAM:
            return False
        try:
            self.sock.send(payload)
        except OSError as e:   # a full buffer, an unreachable port: the stream's copy still goes
            self.failed += 1
            if self.failed in (1, 100, 10000):
                log.warning("round datagram not sent; the stream carries the round", error=str(e)[:200],
                            failed=self.failed)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self.sock.close()


class RoundInbox(asyncio.DatagramProtocol):
    """The draft's side: one socket for all its target streams, each datagram handed to its
    stream's callback (on the event loop) as (Round, arrival time.monotonic())."""

    def __init__(self):
        self.transport = None
        self.handlers: dict[bytes, Callable[[draft_pb2.Round, float], None]] = {}
        self.port = 0

    @classmethod
    async def open(cls, host: str) -> "RoundInbox":
        family, kind, proto, _, addr = _resolve(host or "0.0.0.0", 0)
        inbox = cls()
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: inbox, local_addr=addr, family=family)
        inbox.port = inbox.transport.get_extra_info("sockname")[1]
        return inbox

    def connection_made(self, transport) -> None:
        self.transport = transport

    def register(self, handler: Callable[[draft_pb2.Round, float], None]) -> bytes:
        key = os.urandom(KEY_BYTES)
        self.handlers[key] = handler
        return key

    def unregister(self, key: bytes) -> None:
        self.handlers.pop(key, None)

    def datagram_received(self, data: bytes, addr) -> None:
        arrived = time.monotonic()
        handler = self.handlers.get(data[:KEY_BYTES])
        if handler is None:   # a stream that has ended, or a stranger
            return
        try:
            rnd = draft_pb2.Round.FromString(data[KEY_BYTES:])
        except Exception:   # protobuf's DecodeError: not a Round, ignore it
            log.debug("round datagram does not parse", size=len(data))
            return
        handler(rnd, arrived)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _resolve(host: str, port: int):
    """IPv4 first: a draft bound on 127.0.0.1 is not reached through localhost's ::1."""
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_DGRAM)
    return sorted(infos, key=lambda info: info[0] != socket.AF_INET)[0]
