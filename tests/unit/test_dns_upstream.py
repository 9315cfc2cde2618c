"""Forwarding and the cache, against a stub upstream on the loopback (no root needed)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from dnslib import QTYPE, DNSRecord

from proxy.dns import upstream as up
from proxy.dns.answer import Zone
from proxy.dns.server import Handler
from proxy.dns.stats import Stats
from proxy.dns.stub import StubServer
from proxy.dns.upstream import Forwarder, read_resolv_conf, without_self
from proxy.model import Model
from tests.unit.test_dns_handler import query

Z = "cluster.local"


class Clock:
    """A monotonic clock the test moves by hand (cache ages and expiry)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def scenario(
    body: Callable[[Handler, list[StubServer]], Awaitable[None]],
    *,
    n_stubs: int = 1,
    dead_first: bool = False,
    clock: Clock | None = None,
    **fwd_kw,
) -> None:
    """Run `body(handler, stubs)` with a Handler forwarding to fresh stub upstreams."""

    async def main() -> None:
        stubs = [StubServer(ttl=60) for _ in range(n_stubs)]
        ups = [("127.0.0.1", await s.start()) for s in stubs]
        if dead_first:  # a port nobody listens on: ICMP port unreachable
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", 0))
                ups.insert(0, ("127.0.0.1", s.getsockname()[1]))
        stats = Stats()
        fwd = Forwarder(ups, stats=stats, **fwd_kw)
        h = Handler(Zone(None, Z), fwd, stats=stats)
        try:
            await body(h, stubs)
        finally:
            await fwd.close()
            for s in stubs:
                await s.stop()

    if clock is not None:
        import proxy.dns.server as srv

        old_up, old_srv = up.time, srv._monotonic
        up.time = clock  # type: ignore[assignment]
        srv._monotonic = clock.monotonic
        try:
            asyncio.run(main())
        finally:
            up.time, srv._monotonic = old_up, old_srv
    else:
        asyncio.run(main())


async def ask(h: Handler, data: bytes, tcp: bool = False) -> DNSRecord:
    out = h.handle(data, tcp)
    if out is not None and not isinstance(out, bytes):
        out = await out
    assert out is not None
    return DNSRecord.parse(out)


def test_forwards_and_caches_with_aging_ttls() -> None:
    clock = Clock()

    async def body(h: Handler, stubs: list[StubServer]) -> None:
        rec = await ask(h, query("www.example.org", qid=1))
        assert [str(r.rdata) for r in rec.rr] == ["192.0.2.1"] and rec.rr[0].ttl == 60
        assert rec.header.id == 1 and rec.header.aa == 0 and rec.header.ra == 1
        clock.now += 10
        rec = await ask(h, query("WWW.example.org", qid=2))
        assert rec.rr[0].ttl == 50 and str(rec.q.qname) == "WWW.example.org."
        assert stubs[0].counts["www.example.org."] == 1  # the second came from the cache
        assert h.stats.cache_hits == 1 and h.stats.cache_misses == 1
        clock.now += 51  # expired: asked again
        rec = await ask(h, query("www.example.org", qid=3))
        assert rec.rr[0].ttl == 60 and stubs[0].counts["www.example.org."] == 2

    scenario(body, clock=clock)


def test_forwarded_replies_echo_id_rd_cd_and_question_case() -> None:
    async def body(h: Handler, stubs: list[StubServer]) -> None:
        for rd in (0, 1):
            for cd in (0, 1):
                for attempt in range(2):  # fresh from upstream, then from the cache
                    data = query("Flags.Example.org", qid=100 + rd * 2 + cd, rd=rd, cd=cd)
                    rec = await ask(h, data)
                    assert (rec.header.id, rec.header.rd, rec.header.cd) == (
                        100 + rd * 2 + cd,
                        rd,
                        cd,
                    )
                    assert str(rec.q.qname) == "Flags.Example.org." and rec.rr, attempt
        assert stubs[0].counts["flags.example.org."] == 2  # CD is part of the cache key

    scenario(body)


def test_negative_answers_are_cached_for_the_soa_minimum() -> None:
    clock = Clock()

    async def body(h: Handler, stubs: list[StubServer]) -> None:
        for _ in range(3):
            rec = await ask(h, query("nx-a.example.org"))
            assert rec.header.rcode == 3 and rec.auth[0].rtype == QTYPE.SOA
        rec = await ask(h, query("nodata-a.example.org", "AAAA"))
        assert rec.header.rcode == 0 and not rec.rr
        assert stubs[0].counts["nx-a.example.org."] == 1
        clock.now += 61
        await ask(h, query("nx-a.example.org"))
        assert stubs[0].counts["nx-a.example.org."] == 2

    scenario(body, clock=clock)


def test_edns_and_do_variants_are_cached_separately_by_do() -> None:
    async def body(h: Handler, stubs: list[StubServer]) -> None:
        a = await ask(h, query("v.example.org"))
        b = await ask(h, query("v.example.org", edns=1232))
        c = await ask(h, query("v.example.org", edns=1232, do=True))
        assert not [r for r in a.ar if r.rtype == 41]
        assert [r.rclass for r in b.ar if r.rtype == 41] == [1232]
        assert [bool(r.ttl & 0x8000) for r in c.ar if r.rtype == 41] == [True]
        assert stubs[0].counts["v.example.org."] == 2  # DO=0 shared, DO=1 asked apart

    scenario(body)


def test_truncated_upstream_reply_is_retried_over_tcp() -> None:
    async def body(h: Handler, stubs: list[StubServer]) -> None:
        rec = await ask(h, query("big-1.example.org"), tcp=True)
        assert rec.header.tc == 0 and len(rec.rr) == 60
        udp = await ask(h, query("big-1.example.org"))
        assert udp.header.tc == 1 and not udp.rr  # our client's UDP limit still applies
        assert stubs[0].counts["big-1.example.org."] == 2  # UDP (TC), then TCP; then cached

    scenario(body)


def test_next_upstream_on_servfail_refusal_and_unreachable() -> None:
    async def body(h: Handler, stubs: list[StubServer]) -> None:
        rec = await ask(h, query("www.example.org"))
        assert rec.header.rcode == 0 and rec.rr
        assert sum(h.stats.upstream_failures.values()) == 1  # the dead one, once
        rec = await ask(h, query("other.example.org"))  # preferred is now the live one
        assert rec.rr and sum(h.stats.upstream_failures.values()) == 1

    scenario(body, dead_first=True)


def test_servfail_when_no_upstream_answers() -> None:
    async def body(h: Handler, stubs: list[StubServer]) -> None:
        rec = await ask(h, query("fail-1.example.org", qid=9))
        assert rec.header.rcode == 2 and rec.header.id == 9
        assert sum(v for (u, why), v in h.stats.upstream_failures.items() if why == "servfail") == 2
        rec = await ask(h, query("fail-1.example.org"))
        assert rec.header.rcode == 2  # failures are not cached
        assert stubs[0].counts["fail-1.example.org."] == 2

    scenario(body, n_stubs=2)


def test_timeouts_end_in_servfail_within_the_deadline() -> None:
    async def body(h: Handler, stubs: list[StubServer]) -> None:
        rec = await ask(h, query("drop-1.example.org"))
        assert rec.header.rcode == 2
        assert (f"127.0.0.1:{stubs[0].port}", "timeout") in h.stats.upstream_failures

    scenario(body, n_stubs=2, timeout=0.2, deadline=0.5)


def test_identical_questions_in_flight_share_one_upstream_query() -> None:
    async def body(h: Handler, stubs: list[StubServer]) -> None:
        recs = await asyncio.gather(*(ask(h, query("same.example.org", qid=i)) for i in range(20)))
        assert [r.header.id for r in recs] == list(range(20))
        assert all(str(r.rr[0].rdata) == "192.0.2.1" for r in recs)
        assert stubs[0].counts["same.example.org."] == 1

    scenario(body)


def test_replies_with_the_wrong_question_are_ignored() -> None:
    async def body(h: Handler, stubs: list[StubServer]) -> None:
        rec = await ask(h, query("spoof-1.example.org"))
        assert [str(r.rdata) for r in rec.rr] == ["192.0.2.1"]

    scenario(body)


def test_cache_is_bounded_by_entries_and_bytes() -> None:
    async def body(h: Handler, stubs: list[StubServer]) -> None:
        for i in range(10):
            await ask(h, query(f"n{i}.example.org"))
            assert len(h.fwd.cache) <= 3
        # The most recently used survive.
        assert stubs[0].counts["n9.example.org."] == 1
        await ask(h, query("n9.example.org"))
        assert stubs[0].counts["n9.example.org."] == 1
        await ask(h, query("n0.example.org"))
        assert stubs[0].counts["n0.example.org."] == 2

    scenario(body, cache_entries=3)

    async def small(h: Handler, stubs: list[StubServer]) -> None:
        for i in range(10):
            await ask(h, query(f"m{i}.example.org"))
            assert h.fwd.cached_bytes <= 200

    scenario(small, cache_bytes=200)


def test_inflight_limit_answers_servfail_instead_of_queueing() -> None:
    async def body(h: Handler, stubs: list[StubServer]) -> None:
        recs = await asyncio.gather(*(ask(h, query(f"drop-{i}.example.org")) for i in range(4)))
        assert all(r.header.rcode == 2 for r in recs)
        assert h.stats.dropped["upstream_overload"] == 2

    scenario(body, max_inflight=2, timeout=0.1, deadline=0.2)


def test_external_name_answer_is_cname_plus_upstream_records() -> None:
    from proxy.endpoints.store import Store
    from tests.unit.factories import service

    async def body(h: Handler, stubs: list[StubServer]) -> None:
        st = Store()
        st.replace(
            "Service",
            [
                service("ext", ip=None, type="ExternalName", externalName="www.example.org"),
                service("gone", ip=None, type="ExternalName", externalName="nx-x.example.org"),
            ],
        )
        st.replace("EndpointSlice", [])
        h.set_zone(Zone(st.snapshot().model, Z), None)
        rec = await ask(h, query(f"EXT.default.svc.{Z}"))
        assert [(QTYPE[r.rtype], str(r.rdata)) for r in rec.rr] == [
            ("CNAME", "www.example.org."),
            ("A", "192.0.2.1"),
        ]
        assert str(rec.q.qname) == f"EXT.default.svc.{Z}."
        rec = await ask(h, query(f"gone.default.svc.{Z}"))
        assert rec.header.rcode == 3 and [QTYPE[r.rtype] for r in rec.rr] == ["CNAME"]

    scenario(body)


def test_reverse_names_we_do_not_know_are_forwarded() -> None:
    async def body(h: Handler, stubs: list[StubServer]) -> None:
        h.set_zone(Zone(Model(), Z), None)
        rec = await ask(h, query("4.3.2.1.in-addr.arpa", "PTR"))
        assert rec.header.rcode == 0  # the stub's NODATA, not ours
        assert stubs[0].counts["4.3.2.1.in-addr.arpa."] == 1

    scenario(body)


def test_resolv_conf_parsing(tmp_path) -> None:
    p = tmp_path / "resolv.conf"
    p.write_text(
        "# comment\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\n"
        "search Example.COM corp.example.\noptions ndots:5\n"
    )
    servers, search = read_resolv_conf(str(p))
    assert servers == [("10.0.0.2", 53), ("fe80::1", 53)]
    assert search == ["example.com", "corp.example"]
    assert read_resolv_conf(str(tmp_path / "missing")) == ([], [])


def test_upstream_that_is_this_server_is_dropped() -> None:
    ups = [("127.0.0.1", 53), ("10.9.9.9", 53), ("127.0.0.1", 5353)]
    assert without_self(ups, ("0.0.0.0", 53)) == [("10.9.9.9", 53), ("127.0.0.1", 5353)]
    assert without_self(ups, ("127.0.0.1", 53)) == ups[1:]
    assert without_self(ups, ("10.9.9.9", 53)) == [ups[0], ups[2]]
