"""The packet handler (bytes in → bytes out, no sockets) and the asyncio UDP/TCP servers.

`Handler.handle(data, tcp)` returns the reply bytes, None (send nothing), or a coroutine
that yields the reply later (a name that had to be asked upstream). Everything that can
be answered from the zone or the cache is answered synchronously, on the fast path when
the query is plain (see wire.py), so a cached answer costs one dict lookup and a few
byte concatenations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

from dnslib import EDNS0, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from .answer import SERVFAIL, Forward, Reply, Zone, answer
from .stats import BUCKETS, STATS, Stats
from .upstream import Forwarder
from .wire import (
    EV_EDNS,
    EV_EDNS_DO,
    EV_NONE,
    OPT,
    QTYPE_NAMES,
    RCODE_NAMES,
    TCP_MAX,
    UDP_MAX,
    Entry,
    encode_name,
    entry_from_record,
    formerr,
    parse_fast,
    simple_reply,
    udp_limit,
)

log = logging.getLogger("proxy.dns")

Result = bytes | None | Coroutine[Any, Any, bytes | None]
_monotonic = time.monotonic
_B0 = BUCKETS[0]
UDP_RECV = 65535  # read whole datagrams: a cut one would parse as garbage


class _Fwd:
    """Fast-path marker: this question goes to the forwarder (its cache first)."""

    __slots__ = ("deps", "labels", "qclass", "qtype")

    def __init__(self, labels: tuple[bytes, ...], qtype: int, qclass: int, deps: frozenset):
        self.labels, self.qtype, self.qclass, self.deps = labels, qtype, qclass, deps


class Handler:
    """The DNS engine between the sockets and the answerer: templates, forwarding, stats.

    `fast` holds a reply template (or a forward marker) per question seen in the current
    zone; `set_zone` swaps the zone and keeps the templates the change cannot affect.
    """

    def __init__(
        self, zone: Zone, forwarder: Forwarder, *, stats: Stats = STATS, fast_max: int = 50_000
    ) -> None:
        self.zone = zone
        self.fwd = forwarder
        self.stats = stats
        self.fast_max = fast_max
        # key (lower-case question + EDNS variant) → reply template or _Fwd marker.
        self.fast: dict[bytes, Entry | _Fwd] = {}
        self._queries = stats.queries
        self._zone_hist = stats.hist["zone"]
        self._cache_hist = stats.hist["cache"]
        self._sums = stats.sums

    def set_zone(self, zone: Zone, changed: set | None) -> None:
        """Serve `zone` from now on; keep the templates that `changed` cannot affect."""
        if changed is None or not self.zone.ready or not zone.ready:
            self.fast = {}
        elif changed:
            self.fast = {
                k: e
                for k, e in self.fast.items()
                if e.deps is not None and e.deps.isdisjoint(changed)
            }
        self.zone = zone

    def _remember(self, key: bytes, e: Entry | _Fwd) -> None:
        if e.deps is None:
            return
        if len(self.fast) >= self.fast_max:  # bounded: start over (rebuilt on demand)
            self.fast = {}
        self.fast[key] = e

    # -- the hot path ----------------------------------------------------------------------

    def handle(self, data: bytes, tcp: bool = False) -> Result:
        """The reply bytes, None (send nothing), or a coroutine that yields the reply.

        This is the one fast path, for UDP and TCP alike: a plain query (wire.parse_fast)
        whose question has a template or a cached upstream answer is served by patching
        bytes, with no dnslib object. Everything else takes the slow path, which is also
        what makes the templates.
        """
        t0 = _monotonic()
        if data.__class__ is not bytes:
            data = bytes(data)
        fp = parse_fast(data)
        if fp is not None:
            key, qe, ev, limit = fp
            e = self.fast.get(key)
            if e is not None:
                fidx = (data[2] & 1) | ((data[3] >> 3) & 2)
                return self._serve(
                    key, e, ev, data[:2], fidx, data[12:qe], TCP_MAX if tcp else limit, t0
                )
        return self._slow(data, tcp, t0)

    def _serve(
        self,
        key: bytes,
        e: Entry | _Fwd,
        ev: int,
        qid: bytes,
        fidx: int,
        question: bytes,
        limit: int,
        t0: float,
    ) -> Result:
        """Answer from a template, or from the upstream cache for a forward marker, else
        ask upstream."""
        hist, si = self._zone_hist, 0
        if e.__class__ is not Entry:
            f: _Fwd = e  # type: ignore[assignment]
            ukey = key[:-1] + bytes(((ev == EV_EDNS_DO) | (fidx & 2),))
            ce = self.fwd.get(ukey, t0)
            if ce is None:
                return self._upstream(ukey, f, ev, qid, fidx, question, limit, t0)
            self.stats.cache_hits += 1
            e = ce.entry(ev, t0)
            hist, si = self._cache_hist, 1
        if e.size <= limit:  # type: ignore[union-attr]
            out = qid + e.heads[fidx] + question + e.tail  # type: ignore[union-attr]
        else:
            out = e.serve(qid, fidx, question, limit)  # type: ignore[union-attr]
        dt = _monotonic() - t0
        q, mk = self._queries, e.mkey  # type: ignore[union-attr]
        q[mk] = q.get(mk, 0) + 1
        hist[0 if dt < _B0 else bisect_left(BUCKETS, dt)] += 1
        self._sums[si] += dt
        return out

    async def _upstream(
        self,
        ukey: bytes,
        f: _Fwd,
        ev: int,
        qid: bytes,
        fidx: int,
        question: bytes,
        limit: int,
        t0: float,
        prefix: tuple = (),
        qlabels: tuple[bytes, ...] | None = None,
    ) -> bytes | None:
        ce = await self.fwd.resolve(
            ukey, f.labels, f.qtype, f.qclass, ev == EV_EDNS_DO, bool(fidx & 2)
        )
        if ce is None:
            out = simple_reply(qid, fidx, question, SERVFAIL, ev)
            mkey = (QTYPE_NAMES.get(f.qtype, "other"), "SERVFAIL")
            self.stats.query(mkey, "upstream", _monotonic() - t0)
            return out
        if prefix:
            e = ce.render(ev, int(_monotonic() - ce.stored), prefix, qlabels)
        else:
            e = ce.entry(ev, _monotonic())
        out = e.serve(qid, fidx, question, limit)
        self.stats.query(e.mkey, "upstream", _monotonic() - t0)
        return out

    # -- everything else -------------------------------------------------------------------

    def _slow(self, data: bytes, tcp: bool, t0: float) -> Result:
        if len(data) < 12:
            self.stats.drop("short")
            return None
        if data[2] & 0x80:
            self.stats.drop("response")  # never answer a response (loops, reflection)
            return None
        try:
            req = DNSRecord.parse(data)
            # dnslib reads label lengths 64-191 as lengths; the wire format does not.
            ok = all(_name_ok(q.qname.label) for q in req.questions)
        except Exception:
            ok = False
        if not ok:
            self.stats.query(("other", "FORMERR"), "zone", _monotonic() - t0)
            return formerr(data)
        opts = [rr for rr in req.ar if rr.rtype == OPT]
        limit = TCP_MAX if tcp else udp_limit(opts[0].rclass if len(opts) == 1 else None)
        canon = _canonical(req, opts)
        if canon is None:  # protocol errors: answered as they are, never cached
            res = answer(self.zone, req)
            if not isinstance(res, Reply):  # cannot happen: these are all errors
                return formerr(data)
            out = bytes(res.record.pack())  # small: header, question, OPT at most
            q = res.record.q if res.record.questions else None
            rcode = res.record.header.rcode
            if res.record.ar and res.record.ar[-1].rtype == OPT:
                rcode |= (res.record.ar[-1].ttl >> 24) << 4
            mkey = (
                QTYPE_NAMES.get(q.qtype, "other") if q else "other",
                RCODE_NAMES.get(rcode, str(rcode)),
            )
            self.stats.query(mkey, "zone", _monotonic() - t0)
            return out
        key, creq, qwire, ev = canon
        h = req.header
        fidx = h.rd | (h.cd << 1)
        qid = data[:2]
        e = self.fast.get(key)
        if e is None:
            res = answer(self.zone, creq)
            if isinstance(res, Reply):
                e = entry_from_record(res.record, res.deps)
                self._remember(key, e)
            elif isinstance(res, Forward) and not res.prefix:
                q = creq.q
                e = _Fwd(res.name, res.qtype, q.qclass, res.deps)
                self._remember(key, e)
            elif isinstance(res, Forward):  # ExternalName → a name outside the zone
                q = creq.q
                f = _Fwd(res.name, res.qtype, q.qclass, res.deps)
                ukey = (
                    encode_name(res.name)
                    + struct.pack("!HH", res.qtype, q.qclass)
                    + bytes(((ev == EV_EDNS_DO) | (fidx & 2),))
                )
                return self._upstream(
                    ukey, f, ev, qid, fidx, qwire, limit, t0, res.prefix, q.qname.label
                )
            else:
                return None
        return self._serve(key, e, ev, qid, fidx, qwire, limit, t0)


def _name_ok(labels: tuple[bytes, ...]) -> bool:
    return all(0 < len(lb) <= 63 for lb in labels) and sum(len(lb) + 1 for lb in labels) < 256


def _canonical(req: DNSRecord, opts: list) -> tuple[bytes, DNSRecord, bytes, int] | None:
    """(key, canonical request, client's question bytes, EDNS variant), or None when the
    reply depends on more than the question and the EDNS variant (protocol errors)."""
    h = req.header
    if h.opcode != 0 or len(req.questions) != 1 or len(opts) > 1:
        return None
    ev = EV_NONE
    if opts:
        o = opts[0]
        if o.rname.label != () or (o.ttl >> 16) & 0xFF:
            return None
        ev = EV_EDNS_DO if o.ttl & 0x8000 else EV_EDNS
    q = req.q
    labels = q.qname.label
    name = encode_name(labels)  # valid: checked by _name_ok
    tail = struct.pack("!HH", q.qtype, q.qclass)
    lower = tuple(lb.lower() for lb in labels)
    creq = DNSRecord(DNSHeader(id=0, rd=0), q=DNSQuestion(DNSLabel(lower), q.qtype, q.qclass))
    if ev != EV_NONE:
        creq.add_ar(EDNS0(udp_len=UDP_MAX, flags="do" if ev == EV_EDNS_DO else ""))
    # Length octets (<= 63) are below "A": lower() of the wire name is the lower-cased name.
    return name.lower() + tail + bytes((ev,)), creq, name + tail, ev


# -- sockets ---------------------------------------------------------------------------------


class UdpServer:
    """DNS over UDP on a non-blocking socket read straight from the loop's reader callback.

    Cheaper per datagram than a DatagramProtocol transport (no transport machinery, and
    one readiness event drains up to `batch` datagrams); works the same on uvloop.
    """

    def __init__(
        self, handler: Handler, sock: socket.socket, *, batch: int = 64, max_pending: int = 2048
    ) -> None:
        self.h = handler
        self.sock = sock
        self.batch = batch
        self.max_pending = max_pending
        self.tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        recv, send, handle = self.sock.recvfrom, self.sock.sendto, self.h.handle
        stats = self.h.stats
        for _ in range(self.batch):
            try:
                data, addr = recv(UDP_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. an ICMP error queued on the socket
            try:
                out = handle(data, False)
            except Exception:  # a bug must cost one answer, never the server
                log.exception("DNS: internal error answering a %d-byte query", len(data))
                stats.drop("internal_error")
                continue
            if out is None:
                continue
            if out.__class__ is bytes:
                try:
                    send(out, addr)  # type: ignore[arg-type]
                except OSError:
                    stats.drop("udp_send_failed")
                continue
            if len(self.tasks) >= self.max_pending:
                out.close()  # type: ignore[union-attr]
                stats.drop("udp_pending_limit")
                continue
            t = asyncio.ensure_future(self._later(out, addr))  # type: ignore[arg-type]
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _later(self, coro: Coroutine, addr) -> None:
        try:
            out = await coro
        except Exception:
            log.exception("DNS: internal error forwarding a query")
            self.h.stats.drop("internal_error")
            return
        if out is not None and self.sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                self.sock.sendto(out, addr)

    def close(self) -> None:
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for t in list(self.tasks):
            t.cancel()


def client_key(peer: Any) -> bytes:
    """Whose connection this is, for the per-client limit: an IPv4 address, an IPv6 /64
    (one host's share of a network; it can pick any address inside it)."""
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    try:
        if ":" in host:
            return socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])[:8]
        return socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return b""


class _Conn:
    """One TCP client connection, as the server's limits see it."""

    __slots__ = ("client", "closed", "deadline", "pending", "writer")

    def __init__(self, client: bytes, writer: asyncio.StreamWriter) -> None:
        self.client = client
        self.writer = writer
        self.pending: set[asyncio.Task] = set()  # answers being fetched upstream
        self.deadline: asyncio.Timeout | None = None  # of the read in progress
        self.closed = False


class TcpServer:
    """DNS over TCP (RFC 7766): pipelined queries, bounded connections and work.

    Connection slots are what an idle client can hoard (RFC 7766 §6.2.3, §10), so:
    - one client (an IPv4 address, an IPv6 /64) holds at most `max_per_client` of them;
    - once more than half of `max_connections` are open, the idle timeout drops from
      `idle_timeout` to `busy_idle_timeout`, for the reads already waiting too (unbound
      shrinks its tcp-idle-timeout under pressure the same way);
    - when every slot is taken, a new connection displaces the least recently active one
      that has no answer in progress (unbound and BIND shed idle connections likewise);
      only when every connection is busy is the new one refused.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_connections: int = 256,
        max_per_client: int = 32,
        idle_timeout: float = 10.0,
        busy_idle_timeout: float = 0.5,
        max_pending: int = 32,
        write_buffer: int = 256 << 10,
    ) -> None:
        self.h = handler
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.idle_timeout = idle_timeout
        self.busy_idle_timeout = busy_idle_timeout
        self.max_pending = max_pending
        self.write_buffer = write_buffer
        # Open connections, least recently active first (a query read or sent moves one
        # to the end): the shedding order.
        self.conns: OrderedDict[_Conn, asyncio.Task] = OrderedDict()
        self.per_client: dict[bytes, int] = {}
        self.busy = False

    def _admit(self, conn: _Conn) -> str | None:
        """Take a slot for `conn`, shedding an idle connection if need be; else why not."""
        if self.per_client.get(conn.client, 0) >= self.max_per_client:
            return "tcp_client_limit"
        if len(self.conns) >= self.max_connections:
            victim = next((c for c in self.conns if not c.pending), None)
            if victim is None:
                return "tcp_connection_limit"
            self._release(victim)
            victim.writer.close()  # its reader sees EOF; its task ends by itself
            self.h.stats.drop("tcp_shed_idle")
        task = asyncio.current_task()
        assert task is not None
        self.conns[conn] = task
        self.per_client[conn.client] = self.per_client.get(conn.client, 0) + 1
        self._pressure()
        return None

    def _release(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        del self.conns[conn]
        left = self.per_client[conn.client] - 1
        if left:
            self.per_client[conn.client] = left
        else:
            del self.per_client[conn.client]
        self._pressure()

    def _pressure(self) -> None:
        """Switch between the normal and the busy idle timeout as slots fill and free."""
        busy = len(self.conns) * 2 > self.max_connections
        if busy and not self.busy:  # cut the waits already running short as well
            when = asyncio.get_running_loop().time() + self.busy_idle_timeout
            for c in self.conns:
                d = c.deadline
                if d is not None and (d.when() or when) > when:
                    d.reschedule(when)
        self.busy = busy

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(client_key(writer.get_extra_info("peername")), writer)
        refused = self._admit(conn)
        if refused is not None:
            self.h.stats.drop(refused)
            writer.close()
            return
        try:
            await self._serve(reader, writer, conn)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            pending = conn.pending
            if pending and not conn.closed:  # let answers being fetched reach the client
                with contextlib.suppress(Exception):
                    await asyncio.wait(pending, timeout=self.idle_timeout)
            for t in pending:
                t.cancel()
            self._release(conn)
            writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        pending = conn.pending
        while not conn.closed:
            if len(pending) >= self.max_pending:  # stop reading until one is answered
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                continue
            timeout = self.busy_idle_timeout if self.busy else self.idle_timeout
            async with asyncio.timeout(timeout) as conn.deadline:
                n = int.from_bytes(await reader.readexactly(2), "big")
                msg = await reader.readexactly(n)
            conn.deadline = None
            if conn.closed:  # shed while the message was arriving
                return
            self.conns.move_to_end(conn)
            try:
                out = self.h.handle(msg, True)
            except Exception:
                log.exception("DNS: internal error answering a %d-byte TCP query", n)
                self.h.stats.drop("internal_error")
                return
            if out is None:
                self.h.stats.drop("tcp_closed_bad_message")
                return  # not a query we can answer: end the connection
            if out.__class__ is bytes:
                writer.write(len(out).to_bytes(2, "big") + out)  # type: ignore[arg-type]
            else:
                t = asyncio.ensure_future(self._later(out, writer))  # type: ignore[arg-type]
                pending.add(t)
                t.add_done_callback(pending.discard)
            if writer.transport.get_write_buffer_size() > self.write_buffer:
                async with asyncio.timeout(self.idle_timeout):  # a client that does not read
                    await writer.drain()

    async def _later(self, coro: Coroutine, writer: asyncio.StreamWriter) -> None:
        try:
            out = await coro
        except Exception:
            log.exception("DNS: internal error forwarding a TCP query")
            self.h.stats.drop("internal_error")
            return
        if out is not None and not writer.is_closing():
            writer.write(len(out).to_bytes(2, "big") + out)

    async def close(self) -> None:
        tasks = list(self.conns.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
