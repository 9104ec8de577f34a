"""--targets names resolved by the gateway itself, every --resolve-interval seconds.

Each --targets entry is HOST:PORT. A literal IP (or `localhost`) is one replica, dialed as given.
A DNS name (compose's `target` service scaled to N, a Kubernetes headless Service) stands for
every address it resolves to: the gateway keeps one connection per address (its own health watch,
resubmission and per-target metrics), adds addresses that appear and retires those that vanish.
gRPC's `dns:///` round-robin is not used: it would hide the replicas behind one channel.

A failed lookup keeps the addresses the name had (a DNS hiccup must not drop live replicas);
the failure is one warning per outage.
"""
import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pearl_runtime.log import get_logger

log = get_logger(__name__)
LOOKUP_TIMEOUT_S = 5.0
STATIC_NAMES = ("localhost",)     # dialed as given: gRPC tries its addresses itself

GetAddrInfo = Callable[..., Awaitable[list]]


@dataclass(frozen=True)
class Entry:
    host: str
    port: int

    @property
    def text(self) -> str:
        return join(self.host, self.port)

    @property
    def static(self) -> bool:
        return is_ip(self.host) or self.host in STATIC_NAMES


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_entry(text: str) -> Entry:
    """HOST:PORT (HOST a name, an IPv4 address or a bracketed IPv6 one)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--targets entry {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"--targets entry {text!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    return Entry(host, int(port))


def parse_targets(targets) -> list[Entry]:
    """--targets as a comma-separated string or a list of entries."""
    if isinstance(targets, str):
        targets = targets.split(",")
    entries = [parse_entry(t) for t in targets if t and t.strip()]
    if not entries:
        raise ValueError("at least one target address is required (--targets HOST:PORT[,HOST:PORT...])")
    return entries


class Resolver:
    """Keeps `router`'s replicas equal to what the entries resolve to (router.add / router.remove)."""

    def __init__(self, entries: list[Entry], router, interval_s: float = 5.0,
                 getaddrinfo: GetAddrInfo | None = None):
        self.entries = entries
        self.resolved: dict[Entry, list[str]] = {}      # entry -> its addresses, in answer order
        self._router = router
        self._interval_s = interval_s
        self._getaddrinfo = getaddrinfo
        self._failing: set[Entry] = set()
        self._task: asyncio.Task | None = None

    @property
    def dynamic(self) -> bool:
        return any(not e.static for e in self.entries)

    async def start(self) -> None:
        """Resolve once now, then every interval while any entry is a name."""
        await self.refresh()
        if self.dynamic and self._interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="target resolver")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.refresh()
            except Exception:           # never let one bad round end the re-resolution
                log.exception("resolving targets failed")

    async def refresh(self) -> None:
        for entry in self.entries:
            addresses = await self._lookup(entry)
            if addresses is not None:
                old = self.resolved.get(entry, [])
                if set(addresses) != set(old) and not entry.static:
                    log.info("target name resolved", dns_name=entry.text, addresses=addresses,
                             added=[a for a in addresses if a not in old],
                             removed=[a for a in old if a not in addresses])
                self.resolved[entry] = addresses
        self._apply()

    def _apply(self) -> None:
        wanted: list[str] = []
        for entry in self.entries:
            wanted += [a for a in self.resolved.get(entry, []) if a not in wanted]
        current = self._router.addresses
        for address in wanted:
            if address not in current:
                log.info("target added", target=address, dns_name=self._name_of(address))
                self._router.add(address)
        for address in current:
            if address not in wanted:
                log.info("target retiring", target=address, reason="gone from its name's DNS answer")
                self._router.remove(address)

    def _name_of(self, address: str) -> str:
        return next((e.text for e, addrs in self.resolved.items() if address in addrs), address)

    async def _lookup(self, entry: Entry) -> list[str] | None:
        """The entry's addresses; None when the lookup failed (keep what it had)."""
        if entry.static:
            return [entry.text]
        lookup = self._getaddrinfo or asyncio.get_running_loop().getaddrinfo
        try:
            infos = await asyncio.wait_for(lookup(entry.host, entry.port, type=socket.SOCK_STREAM),
                                           LOOKUP_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            if entry not in self._failing:
                self._failing.add(entry)
                log.warning("cannot resolve target name; keeping its last addresses", dns_name=entry.text,
                            error=str(e) or type(e).__name__, addresses=self.resolved.get(entry, []))
            return None
        if entry in self._failing:
            self._failing.discard(entry)
            log.info("target name resolves again", dns_name=entry.text)
        out: list[str] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = join(sockaddr[0], sockaddr[1])
            if address not in out:
                out.append(address)
        return out
