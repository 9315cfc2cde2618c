"""DnsServer over real sockets on the loopback: UDP, TCP, limits, bind errors, metrics."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest
from dnslib import DNSRecord
from prometheus_client import generate_latest

from proxy.config import Config, UsageError
from proxy.dns import DnsServer
from proxy.dns.server import client_key
from proxy.dns.stub import StubServer
from proxy.endpoints.store import Store
from proxy.model import Model
from tests.unit.factories import service
from tests.unit.test_dns_handler import query

Z = "cluster.local"


def model(ip: str = "198.19.0.10") -> Model:
    st = Store()
    st.replace("Service", [service("web", ip=ip)])
    st.replace("EndpointSlice", [])
    return st.snapshot().model


def with_server(body: Callable[[DnsServer, StubServer], Awaitable[None]], **cfg_kw) -> None:
    async def main() -> None:
        stub = StubServer(ttl=60)
        port = await stub.start()
        cfg = Config(dns_bind=("127.0.0.1", 0), dns_upstream=(f"127.0.0.1:{port}",), **cfg_kw)
        srv = DnsServer(cfg)
        srv.update(model())
        await srv.start()
        try:
            await body(srv, stub)
        finally:
            await srv.stop()
            await stub.stop()

    asyncio.run(main())


async def udp(addr: tuple[str, int], data: bytes, timeout: float = 2.0) -> DNSRecord:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, d: bytes, a) -> None:
            if not fut.done():
                fut.set_result(d)

        def error_received(self, exc: Exception) -> None:
            if not fut.done():
                fut.set_exception(exc)

    t, _ = await loop.create_datagram_endpoint(P, remote_addr=addr)
    try:
        t.sendto(data)
        return DNSRecord.parse(await asyncio.wait_for(fut, timeout))
    finally:
        t.close()


async def tcp_exchange(
    addr: tuple[str, int],
    msgs: list[bytes],
    *,
    raw: bytes | None = None,
    n_replies: int | None = None,
) -> list[DNSRecord]:
    r, w = await asyncio.open_connection(*addr)
    try:
        w.write(raw if raw is not None else b"".join(len(m).to_bytes(2, "big") + m for m in msgs))
        await w.drain()
        out = []
        for _ in range(len(msgs) if n_replies is None else n_replies):
            n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 3), "big")
            out.append(DNSRecord.parse(await r.readexactly(n)))
        return out
    finally:
        w.close()


def test_answers_over_udp_and_tcp_and_tracks_updates() -> None:
    async def body(srv: DnsServer, stub: StubServer) -> None:
        assert srv.address is not None
        rec = await udp(srv.address, query(f"web.default.svc.{Z}"))
        assert str(rec.rr[0].rdata) == "198.19.0.10"
        [rec] = await tcp_exchange(srv.address, [query(f"web.default.svc.{Z}")])
        assert str(rec.rr[0].rdata) == "198.19.0.10"
        srv.update(model("198.19.0.77"))
        rec = await udp(srv.address, query(f"web.default.svc.{Z}"))
        assert str(rec.rr[0].rdata) == "198.19.0.77"
        await srv.follow(model("198.19.0.78"))  # the daemon's way: indexing off the loop
        rec = await udp(srv.address, query(f"web.default.svc.{Z}"))
        assert str(rec.rr[0].rdata) == "198.19.0.78"

    with_server(body)


def test_pipelined_tcp_queries_on_one_connection() -> None:
    async def body(srv: DnsServer, stub: StubServer) -> None:
        assert srv.address is not None
        msgs = [
            query(f"web.default.svc.{Z}", qid=1),
            query("www.example.org", qid=2),  # forwarded: may come back out of order
            query(f"nope.default.svc.{Z}", qid=3),
            query("big-1.example.org", qid=4),  # needs TCP upstream too
        ]
        recs = await tcp_exchange(srv.address, msgs)
        by_id = {r.header.id: r for r in recs}
        assert sorted(by_id) == [1, 2, 3, 4]
        assert str(by_id[2].rr[0].rdata) == "192.0.2.1"
        assert by_id[3].header.rcode == 3
        assert len(by_id[4].rr) == 60 and by_id[4].header.tc == 0

    with_server(body)


async def until(pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait for a state (never for a time): poll `pred` until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def closed_by_server(r: asyncio.StreamReader, timeout: float = 20.0) -> bool:
    """True when the server closes the connection (EOF) before `timeout`."""
    try:
        return await asyncio.wait_for(r.read(1), timeout) == b""
    except TimeoutError:
        return False


async def idle_connections(
    srv: DnsServer, n: int, source: str = "127.0.0.1"
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    assert srv.address is not None
    return [await asyncio.open_connection(*srv.address, local_addr=(source, 0)) for _ in range(n)]


def test_tcp_client_key_is_the_address_or_the_ipv6_64() -> None:
    v4 = client_key(("198.18.1.10", 40000))
    assert v4 == client_key(("198.18.1.10", 40001)) != client_key(("198.18.1.11", 40000))
    a = client_key(("fd00:18::1:10", 40000, 0, 0))
    assert a == client_key(("fd00:18::ffff:1", 1, 0, 0))  # one /64: one client
    assert a != client_key(("fd00:18:0:1::1", 1, 0, 0))
    assert client_key(("fe80::1%eth0", 1, 0, 2)) == client_key(("fe80::2", 1, 0, 2))
    assert client_key(None) == client_key(("not an ip", 1)) == b""


def test_tcp_idle_connections_are_closed_after_the_idle_timeout() -> None:
    async def body(srv: DnsServer, stub: StubServer) -> None:
        srv._tcp.idle_timeout = 0.3
        conns = await idle_connections(srv, 2)
        for r, _ in conns:
            assert await closed_by_server(r)
        for _, w in conns:
            w.close()
        await until(lambda: not srv._tcp.conns, "the slots to be freed")

    with_server(body)


def test_tcp_one_client_cannot_take_every_connection() -> None:
    """Per-client limit: 127.0.0.1 gets `max_per_client` connections, 127.0.0.2 is served."""

    async def body(srv: DnsServer, stub: StubServer) -> None:
        assert srv.address is not None
        srv._tcp.max_per_client = 3
        hoard = await idle_connections(srv, 3)
        await until(lambda: len(srv._tcp.conns) == 3, "3 connections admitted")
        r4, w4 = (await idle_connections(srv, 1))[0]
        assert await closed_by_server(r4)  # over its limit: closed at once
        w4.close()
        for _ in range(5):
            [rec] = await tcp_exchange_from("127.0.0.2", srv.address, query(f"web.default.svc.{Z}"))
            assert str(rec.rr[0].rdata) == "198.19.0.10"
        assert len(srv._tcp.conns) >= 3 and srv._handler.stats.dropped["tcp_client_limit"] == 1
        for _, w in hoard:
            w.close()

    with_server(body)


def test_tcp_full_server_sheds_the_least_recently_active_idle_connection() -> None:
    """Every slot taken: a new client displaces the oldest idle connection, never one
    whose answer is still being fetched."""

    async def body(srv: DnsServer, stub: StubServer) -> None:
        assert srv.address is not None
        srv._tcp.max_connections = 3
        srv._tcp.busy_idle_timeout = 3600.0  # only shedding may free a slot here
        # The oldest connection waits for an upstream that never answers (SERVFAIL ~4 s).
        rb, wb = await asyncio.open_connection(*srv.address)
        slow = query("drop-slow.example.org", qid=77)
        wb.write(len(slow).to_bytes(2, "big") + slow)
        await until(lambda: any(c.pending for c in srv._tcp.conns), "the upstream query")
        idle = await idle_connections(srv, 2)
        await until(lambda: len(srv._tcp.conns) == 3, "3 connections admitted")
        [rec] = await tcp_exchange_from("127.0.0.2", srv.address, query(f"web.default.svc.{Z}"))
        assert str(rec.rr[0].rdata) == "198.19.0.10"
        assert await closed_by_server(idle[0][0])  # the oldest idle one went
        assert srv._handler.stats.dropped["tcp_shed_idle"] >= 1
        # The busy one was kept and gets its answer.
        n = int.from_bytes(await asyncio.wait_for(rb.readexactly(2), 20), "big")
        late = DNSRecord.parse(await rb.readexactly(n))
        assert late.header.id == 77 and late.header.rcode == 2
        for _, w in [(rb, wb), *idle]:
            w.close()

    with_server(body)


def test_tcp_idle_timeout_shrinks_when_more_than_half_the_slots_are_taken() -> None:
    async def body(srv: DnsServer, stub: StubServer) -> None:
        srv._tcp.max_connections = 4
        srv._tcp.idle_timeout = 3600.0  # never, in this test
        srv._tcp.busy_idle_timeout = 0.2
        first = await idle_connections(srv, 2)  # half: normal timeout
        await until(lambda: len(srv._tcp.conns) == 2, "2 connections admitted")
        assert not srv._tcp.busy
        third = await idle_connections(srv, 1, "127.0.0.3")  # more than half: busy
        for r, _ in [*first, *third]:  # the waits already running were cut short too
            assert await closed_by_server(r)
        await until(lambda: not srv._tcp.conns and not srv._tcp.busy, "all slots free")
        for _, w in [*first, *third]:
            w.close()

    with_server(body)


async def tcp_exchange_from(source: str, addr: tuple[str, int], msg: bytes) -> list[DNSRecord]:
    r, w = await asyncio.open_connection(*addr, local_addr=(source, 0))
    try:
        w.write(len(msg).to_bytes(2, "big") + msg)
        n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 10), "big")
        return [DNSRecord.parse(await r.readexactly(n))]
    finally:
        w.close()


def test_tcp_garbage_gets_formerr_and_a_response_closes_the_connection() -> None:
    async def body(srv: DnsServer, stub: StubServer) -> None:
        assert srv.address is not None
        garbage = query(f"web.default.svc.{Z}", qid=5)[:20]
        good = query(f"web.default.svc.{Z}", qid=6)
        recs = await tcp_exchange(srv.address, [garbage, good])
        assert [(r.header.id, r.header.rcode) for r in recs] == [(5, 1), (6, 0)]
        resp = bytearray(good)
        resp[2] |= 0x80
        r, w = await asyncio.open_connection(*srv.address)
        w.write(len(resp).to_bytes(2, "big") + resp)
        assert await asyncio.wait_for(r.read(2), 3) == b""
        w.close()

    with_server(body)


def test_upstream_down_gives_servfail() -> None:
    async def body(srv: DnsServer, stub: StubServer) -> None:
        assert srv.address is not None
        rec = await udp(srv.address, query("up.example.org"))
        assert str(rec.rr[0].rdata) == "192.0.2.1"
        await stub.stop()
        rec = await udp(srv.address, query("down.example.org"))
        assert rec.header.rcode == 2
        rec = await udp(srv.address, query("up.example.org"))  # still cached
        assert str(rec.rr[0].rdata) == "192.0.2.1"

    with_server(body)


def test_udp_fast_path_serves_cached_upstream_answers_with_aged_ttls(monkeypatch) -> None:
    """The UDP loop serves cached upstream answers as the handler does, TTLs counting down."""
    import time as _time

    import proxy.dns.server as srv_mod
    import proxy.dns.upstream as up_mod

    now = [_time.monotonic()]

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    monkeypatch.setattr(up_mod, "time", FakeTime)
    monkeypatch.setattr(srv_mod, "_monotonic", FakeTime.monotonic)

    async def body(srv: DnsServer, stub: StubServer) -> None:
        assert srv.address is not None
        first = await udp(srv.address, query("aged.example.org", qid=1))
        assert first.rr[0].ttl == 60
        now[0] += 7
        hits = srv._handler.stats.cache_hits
        rec = await udp(srv.address, query("AGED.example.org", qid=2, rd=0))
        assert rec.rr[0].ttl == 53 and str(rec.q.qname) == "AGED.example.org."
        assert rec.header.rd == 0 and rec.header.id == 2
        assert srv._handler.stats.cache_hits == hits + 1
        assert stub.counts["aged.example.org."] == 1
        # Byte for byte what the handler itself answers.
        data = query("AGED.example.org", qid=2, rd=0)
        assert DNSRecord.parse(srv._handler.handle(data)).pack() == rec.pack()  # type: ignore[arg-type]

    with_server(body)


def test_only_the_given_address_answers() -> None:
    """Bound to 127.0.0.1: the same port on 127.0.0.2 (also loopback) gets nothing."""

    async def body(srv: DnsServer, stub: StubServer) -> None:
        assert srv.address is not None
        with pytest.raises((ConnectionRefusedError, TimeoutError)):
            await udp(("127.0.0.2", srv.address[1]), query(f"web.default.svc.{Z}"), 0.5)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.2", srv.address[1])

    with_server(body)


def test_metrics_are_on_the_default_registry() -> None:
    async def body(srv: DnsServer, stub: StubServer) -> None:
        assert srv.address is not None
        await udp(srv.address, query(f"web.default.svc.{Z}"))
        await udp(srv.address, query("m.example.org"))
        await udp(srv.address, query("m.example.org"))
        await udp(srv.address, query("fail-m.example.org"))

    with_server(body)
    text = generate_latest().decode()
    for needle in (
        'kubeproxy_dns_queries_total{qtype="A",rcode="NOERROR"}',
        'kubeproxy_dns_queries_total{qtype="A",rcode="SERVFAIL"}',
        'kubeproxy_dns_request_duration_seconds_bucket{le="0.00025",source="zone"}',
        'kubeproxy_dns_request_duration_seconds_count{source="upstream"}',
        "kubeproxy_dns_cache_hits_total",
        "kubeproxy_dns_cache_misses_total",
        'kubeproxy_dns_upstream_failures_total{reason="servfail"',
        "kubeproxy_dns_cache_entries",
    ):
        assert needle in text, needle


def run_start(cfg: Config) -> None:
    async def main() -> None:
        srv = DnsServer(cfg)
        try:
            await srv.start()
        finally:
            await srv.stop()

    asyncio.run(main())


def test_port_in_use_is_a_one_line_usage_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(UsageError) as e:
            run_start(Config(dns_bind=("127.0.0.1", port)))
    msg = str(e.value)
    assert msg.startswith(f"--dns-bind-address 127.0.0.1:{port}: address already in use")
    assert "\n" not in msg


def test_address_not_on_this_node_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="cannot assign requested address"):
        run_start(Config(dns_bind=("192.0.2.55", 5353)))


def test_privileged_port_without_root_is_a_usage_error() -> None:
    code = (
        "import asyncio; from proxy.config import Config, UsageError; from proxy.dns import "
        "DnsServer\nasync def m():\n s = DnsServer(Config(dns_bind=('127.0.0.1', 53)))\n"
        " try:\n  await s.start()\n except UsageError as e:\n  print(e)\n await s.stop()\n"
        "asyncio.run(m())"
    )
    argv = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # drop to nobody to see what an unprivileged user gets
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run this as non-root"
        argv = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, cwd=os.getcwd(), check=False
    )
    assert "--dns-bind-address 127.0.0.1:53: permission denied" in out.stdout, out.stderr
