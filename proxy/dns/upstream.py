"""Forwarding names the cluster zone does not own, with a bounded TTL-respecting cache.

- UDP first, over a few connected sockets per upstream (the kernel drops datagrams from
  anyone else); random IDs; a reply counts only if its ID and question match ours.
  Sockets are replaced every few hundred queries so the source port keeps changing.
- A truncated UDP reply is asked again over TCP.
- Upstreams are tried in turn, starting with the one that answered last, each with a
  timeout and all within an overall deadline; SERVFAIL/REFUSED/NOTIMP/FORMERR, timeouts
  and ICMP errors move on to the next. None answering → the caller says SERVFAIL.
- Identical questions in flight share one upstream exchange.
- The cache keeps positive answers for their smallest TTL and negative ones for the SOA
  minimum (RFC 2308), both capped, bounded by entry count and bytes (LRU); replies are
  served with TTLs lowered by their age.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Sequence

from dnslib import EDNS0, RR, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from proxy.config import parse_hostport

from .stats import STATS, Stats
from .wire import (
    EV_EDNS_DO,
    EV_NONE,
    OPT,
    RCODE_NAMES,
    UDP_MAX,
    Entry,
    encode_name,
    entry_from_record,
)

log = logging.getLogger("proxy.dns")

RESOLV_CONF = "/etc/resolv.conf"
POSITIVE_TTL_MAX = 3600
NEGATIVE_TTL_MAX = 300
CACHEABLE_MAX = 16384  # larger replies are not cached
CHANNEL_USES = 500  # queries per UDP socket before a fresh one (fresh source port)
CHANNEL_AGE = 60.0

Upstream = tuple[str, int]


def upstream_name(up: Upstream) -> str:
    return f"[{up[0]}]:{up[1]}" if ":" in up[0] else f"{up[0]}:{up[1]}"


def read_resolv_conf(path: str = RESOLV_CONF) -> tuple[list[Upstream], list[str]]:
    """(nameservers, search domains) of a resolv.conf; missing file → nothing."""
    servers: list[Upstream] = []
    search: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return [], []
    for line in lines:
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) < 2:
            continue
        if parts[0] == "nameserver":
            host = parts[1].split("%", 1)[0]  # drop an IPv6 zone index
            try:
                servers.append((str(ipaddress.ip_address(host)), 53))
            except ValueError:
                continue
        elif parts[0] in ("search", "domain"):
            search = [s.strip(".").lower() for s in parts[1:] if s.strip(".")]
    return servers, search


def parse_upstreams(specs: Sequence[str]) -> list[Upstream]:
    out = []
    for s in specs:
        hp = parse_hostport(s, "--dns-upstream")
        assert hp is not None
        out.append(hp)
    return out


def _is_local(host: str) -> bool:
    """True when `host` is an address of this network namespace (so it could be us)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def without_self(upstreams: list[Upstream], bind: Upstream | None) -> list[Upstream]:
    """Drop upstreams that are this server itself: forwarding there would loop."""
    if bind is None:
        return upstreams
    bhost, bport = bind
    wildcard = ipaddress.ip_address(bhost).is_unspecified
    out = []
    for up in upstreams:
        if up[1] == bport and (up[0] == bhost or (wildcard and _is_local(up[0]))):
            log.warning("DNS upstream %s is this server itself; not used", upstream_name(up))
            continue
        out.append(up)
    return out


def _aged(rr: RR, age: int) -> RR:
    return RR(rr.rname, rr.rtype, rr.rclass, max(0, rr.ttl - age), rr.rdata)


def cache_ttl(resp: DNSRecord) -> int:
    """Seconds a reply may be cached (0: not at all)."""
    h = resp.header
    if h.tc:
        return 0
    if h.rcode == 0 and resp.rr:
        rrs = [rr for rr in (*resp.rr, *resp.auth) if rr.rtype != OPT]
        return min(min(rr.ttl for rr in rrs), POSITIVE_TTL_MAX)
    if h.rcode in (0, 3):  # NODATA or NXDOMAIN: the SOA says for how long (RFC 2308)
        for rr in resp.auth:
            if rr.rtype == 6:
                return min(rr.ttl, rr.rdata.times[4], NEGATIVE_TTL_MAX)
    return 0


class CacheEntry:
    """One upstream reply, rendered on demand per EDNS variant with aged TTLs."""

    __slots__ = (
        "_base",
        "_tpl",
        "expires",
        "labels",
        "qclass",
        "qtype",
        "record",
        "size",
        "stored",
    )

    def __init__(
        self, record: DNSRecord, labels: tuple[bytes, ...], qtype: int, qclass: int, size: int
    ) -> None:
        self.record = record
        self.labels = labels
        self.qtype = qtype
        self.qclass = qclass
        self.size = size
        self.stored = time.monotonic()
        self.expires = self.stored + cache_ttl(record)
        self._tpl: dict[int, tuple[int, Entry]] = {}  # ev → (age, aged template)
        self._base: dict[int, Entry] = {}  # ev → template with the upstream's TTLs

    def entry(self, ev: int, now: float) -> Entry:
        """The reply template for EDNS variant `ev`, TTLs aged to `now` (whole seconds)."""
        age = int(now - self.stored)
        hit = self._tpl.get(ev)
        if hit is not None and hit[0] == age:
            return hit[1]
        base = self._base.get(ev)
        if base is None:
            base = self._base[ev] = self.render(ev, 0)
        e = base.aged(age)
        self._tpl[ev] = (age, e)
        return e

    def render(
        self, ev: int, age: int, prefix: Sequence[RR] = (), qlabels: tuple[bytes, ...] | None = None
    ) -> Entry:
        """The reply template; `prefix` (CNAME records) goes before the upstream's answers,
        and `qlabels` (the client's name, when it is not the one asked upstream)."""
        r = self.record
        hdr = DNSHeader(id=0, qr=1, rd=0, ra=1, rcode=r.header.rcode)  # RD comes from the query
        q = DNSQuestion(DNSLabel(qlabels or self.labels), self.qtype, self.qclass)
        rec = DNSRecord(hdr, [q])
        for rr in prefix:
            rec.add_answer(rr)
        for rr in r.rr:
            rec.add_answer(_aged(rr, age))
        for rr in r.auth:
            rec.add_auth(_aged(rr, age))
        for rr in r.ar:
            if rr.rtype != OPT:
                rec.add_ar(_aged(rr, age))
        if ev != EV_NONE:
            rec.add_ar(EDNS0(udp_len=UDP_MAX, flags="do" if ev == EV_EDNS_DO else ""))
        return entry_from_record(rec, None)


class _UdpChannel(asyncio.DatagramProtocol):
    """A connected UDP socket to one upstream, shared by concurrent queries."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[bytes, asyncio.Future]] = {}
        self.uses = 0
        self.born = time.monotonic()
        self.closed = False
        self.retired = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < 12 or not data[0x2] & 0x80:
            return
        p = self.pending.get((data[0] << 8) | data[1])
        if p is None:
            return
        qsec, fut = p
        if data[4:6] != b"\x00\x01" or data[12 : 12 + len(qsec)].lower() != qsec:
            return  # not the answer to our question: ignore (spoofing, late junk)
        if not fut.done():
            fut.set_result(data)

    def _fail_all(self, exc: BaseException) -> None:
        for _, fut in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable etc.
        self._fail_all(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_all(exc or ConnectionResetError("upstream socket closed"))

    def usable(self) -> bool:
        return (
            not self.closed
            and not self.retired
            and self.uses < CHANNEL_USES
            and time.monotonic() - self.born < CHANNEL_AGE
        )

    async def exchange(self, wire: bytes, qsec: bytes, timeout: float) -> bytes:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        qid = secrets.randbits(16)
        while qid in self.pending:
            qid = secrets.randbits(16)
        fut = loop.create_future()
        self.pending[qid] = (qsec, fut)
        self.uses += 1
        try:
            self.transport.sendto(qid.to_bytes(2, "big") + wire[2:])
            return await asyncio.wait_for(fut, timeout)
        finally:
            del self.pending[qid]
            if not self.pending and not self.usable() and not self.closed:
                self.transport.close()

    def close(self) -> None:
        self.retired = True
        if self.transport is not None and not self.pending:
            self.transport.close()


class Forwarder:
    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        timeout: float = 2.0,
        deadline: float = 4.0,
        cache_entries: int = 10000,
        cache_bytes: int = 16 << 20,
        max_inflight: int = 1024,
        stats: Stats = STATS,
    ) -> None:
        self.upstreams = list(upstreams)
        self.timeout = timeout
        self.deadline = deadline
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes
        self.max_inflight = max_inflight
        self.stats = stats
        self.cache: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self.cached_bytes = 0
        self.inflight: dict[bytes, asyncio.Future] = {}
        self._channels: dict[Upstream, _UdpChannel] = {}
        self._channel_locks: dict[Upstream, asyncio.Lock] = {}
        self._preferred = 0
        self._down: dict[str, str] = {}  # upstreams failing since their last answer

    # -- cache ---------------------------------------------------------------------------

    def get(self, key: bytes, now: float) -> CacheEntry | None:
        ce = self.cache.get(key)
        if ce is None:
            return None
        if ce.expires <= now:
            self._evict(key)
            return None
        self.cache.move_to_end(key)
        return ce

    def _evict(self, key: bytes) -> None:
        ce = self.cache.pop(key)
        self.cached_bytes -= ce.size

    def _store(self, key: bytes, ce: CacheEntry) -> None:
        if ce.expires <= ce.stored or ce.size > CACHEABLE_MAX:
            return
        if key in self.cache:
            self._evict(key)
        self.cache[key] = ce
        self.cached_bytes += ce.size
        while len(self.cache) > self.cache_entries or self.cached_bytes > self.cache_bytes:
            self._evict(next(iter(self.cache)))

    # -- resolving -------------------------------------------------------------------------

    async def resolve(
        self, key: bytes, labels: tuple[bytes, ...], qtype: int, qclass: int, do: bool, cd: bool
    ) -> CacheEntry | None:
        """The cached or fresh upstream reply for a question; None when nobody answered."""
        ce = self.get(key, time.monotonic())
        if ce is not None:
            self.stats.cache_hits += 1
            return ce
        self.stats.cache_misses += 1
        fut = self.inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        if len(self.inflight) >= self.max_inflight:
            self.stats.drop("upstream_overload")
            return None
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        ce = None
        try:
            got = await self._ask(labels, qtype, qclass, do, cd)
            if got is not None:
                resp, size = got
                ce = CacheEntry(resp, labels, qtype, qclass, size)
                self._store(key, ce)
        finally:
            del self.inflight[key]
            if not fut.done():
                fut.set_result(ce)
        return ce

    async def _channel(self, up: Upstream) -> _UdpChannel:
        ch = self._channels.get(up)
        if ch is not None and ch.usable():
            return ch
        lock = self._channel_locks.setdefault(up, asyncio.Lock())
        async with lock:
            ch = self._channels.get(up)
            if ch is not None and ch.usable():
                return ch
            if ch is not None:
                ch.close()
            loop = asyncio.get_running_loop()
            fam = socket.AF_INET6 if ":" in up[0] else socket.AF_INET
            _, ch = await loop.create_datagram_endpoint(_UdpChannel, remote_addr=up, family=fam)
            self._channels[up] = ch
            return ch

    async def _tcp(self, up: Upstream, wire: bytes, qsec: bytes, timeout: float) -> bytes:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(up[0], up[1])
            try:
                qid = secrets.randbits(16).to_bytes(2, "big")
                msg = qid + wire[2:]
                writer.write(len(msg).to_bytes(2, "big") + msg)
                await writer.drain()
                while True:
                    n = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(n)
                    if data[:2] == qid and data[12 : 12 + len(qsec)].lower() == qsec:
                        return data
            finally:
                writer.close()

    async def _ask(
        self, labels: tuple[bytes, ...], qtype: int, qclass: int, do: bool, cd: bool
    ) -> tuple[DNSRecord, int] | None:
        if not self.upstreams:
            self.stats.upstream_failure("none", "no_upstream")
            return None
        q = DNSRecord(
            DNSHeader(id=0, rd=1, cd=int(cd)), q=DNSQuestion(DNSLabel(labels), qtype, qclass)
        )
        q.add_ar(EDNS0(udp_len=UDP_MAX, flags="do" if do else ""))
        wire = q.pack()
        qsec = wire[12 : 12 + len(encode_name(labels)) + 4].lower()
        loop = asyncio.get_running_loop()
        end = loop.time() + self.deadline
        n = len(self.upstreams)
        start = self._preferred
        for k in range(n):
            i = (start + k) % n
            up = self.upstreams[i]
            left = end - loop.time()
            if left <= 0:
                break
            name = upstream_name(up)
            try:
                ch = await self._channel(up)
                data = await ch.exchange(wire, qsec, min(self.timeout, left))
                resp = DNSRecord.parse(data)
                if resp.header.tc:
                    left = max(0.05, end - loop.time())
                    data = await self._tcp(up, wire, qsec, min(self.timeout, left))
                    resp = DNSRecord.parse(data)
            except TimeoutError:
                self._failed(name, "timeout")
                continue
            except ConnectionRefusedError:
                self._failed(name, "refused")
                continue
            except (OSError, EOFError):
                self._failed(name, "error")
                continue
            except Exception:  # unparseable reply
                self._failed(name, "malformed")
                continue
            rcode = resp.header.rcode
            if rcode not in (0, 3):  # SERVFAIL, REFUSED, NOTIMP, FORMERR: try the next
                self._failed(name, RCODE_NAMES.get(rcode, str(rcode)).lower())
                continue
            self._preferred = i
            if self._down.pop(name, None) is not None:
                log.info("DNS upstream %s answers again", name)
            return resp, len(data)
        log.debug("no upstream answered %s type %d", DNSLabel(labels), qtype)
        return None

    def _failed(self, name: str, reason: str) -> None:
        self.stats.upstream_failure(name, reason)
        if name not in self._down:  # one line when an upstream starts failing
            self._down[name] = reason
            log.warning("DNS upstream %s failed (%s); trying the next, if any", name, reason)

    async def close(self) -> None:
        for ch in self._channels.values():
            ch.retired = True
            if ch.transport is not None:
                ch.transport.close()
        self._channels.clear()
