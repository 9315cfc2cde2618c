"""The packet handler (bytes in, bytes out): fast path, templates, truncation, EDNS.

The fast path serves precomputed templates patched with the client's ID, flags and
question; these tests check that it answers exactly as the slow path and the pure
answerer do, for every kind of name, case, flag and EDNS variant.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from dnslib import EDNS0, QTYPE, DNSHeader, DNSLabel, DNSQuestion, DNSRecord, EDNSOption

from proxy.dns.answer import Forward, Reply, Zone, answer
from proxy.dns.server import Handler
from proxy.dns.stats import Stats
from proxy.dns.upstream import Forwarder
from proxy.dns.wire import EV_EDNS, EV_EDNS_DO, EV_NONE, UDP_MAX, parse_fast
from proxy.endpoints.store import Store
from proxy.model import Model
from tests.unit.factories import endpoint, service, slice_

Z = "cluster.local"


def build(n_headless: int = 3) -> Model:
    st = Store()
    st.replace(
        "Service",
        [
            service("web"),
            service("big", ip="None", ports=[{"name": "p", "port": 1}]),
            service("db", ip="None", ports=[{"name": "pg", "port": 5432}]),
            service("ext", ip=None, type="ExternalName", externalName="www.example.com"),
        ],
    )
    st.replace(
        "EndpointSlice",
        [
            slice_(
                "big",
                ports=[{"name": "p", "port": 1, "protocol": "TCP"}],
                endpoints=[endpoint(f"198.18.{i // 250}.{i % 250 + 1}") for i in range(n_headless)],
            ),
            slice_(
                "db",
                ports=[{"name": "pg", "port": 5432, "protocol": "TCP"}],
                endpoints=[endpoint(f"198.18.9.{i}", hostname=f"db-{i}") for i in range(1, 4)],
            ),
        ],
    )
    return st.snapshot().model


def handler(model: Model | None = None, **kw) -> Handler:
    m = model if model is not None else build()
    return Handler(Zone(m, Z, search_suffixes=["example.com"]), Forwarder([]), stats=Stats(), **kw)


def query(
    name: str,
    qtype: str = "A",
    *,
    qid: int = 4242,
    rd: int = 1,
    cd: int = 0,
    edns: int | None = None,
    do: bool = False,
    opts: list | None = None,
) -> bytes:
    q = DNSRecord(DNSHeader(id=qid, rd=rd, cd=cd), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns, flags="do" if do else "", opts=opts or []))
    return bytes(q.pack())


def run(h: Handler, data: bytes, tcp: bool = False) -> bytes | None:
    out = h.handle(data, tcp)
    if out is None or isinstance(out, bytes):
        return out
    return asyncio.run(out)


def same(a: DNSRecord, b: DNSRecord) -> None:
    """Equal as DNS messages (names compared case-insensitively, TTLs exactly)."""
    ha, hb = a.header, b.header
    assert (ha.id, ha.bitmap, ha.q, ha.a, ha.auth, ha.ar) == (
        hb.id,
        hb.bitmap,
        hb.q,
        hb.a,
        hb.auth,
        hb.ar,
    )
    assert str(a.q.qname) == str(b.q.qname) and a.q.qtype == b.q.qtype

    def rrs(rec: DNSRecord) -> list:
        return [
            (str(r.rname).lower(), r.rtype, r.rclass, r.ttl, str(r.rdata).lower())
            for r in (*rec.rr, *rec.auth, *rec.ar)
        ]

    assert rrs(a) == rrs(b)


NAMES = [
    (f"web.default.svc.{Z}", "A"),
    (f"web.default.svc.{Z}", "AAAA"),
    (f"db.default.svc.{Z}", "A"),
    (f"_pg._tcp.db.default.svc.{Z}", "SRV"),
    (f"db-2.db.default.svc.{Z}", "A"),
    (f"nope.default.svc.{Z}", "A"),
    (f"default.svc.{Z}", "A"),
    (f"dns-version.{Z}", "TXT"),
    (f"ext.default.svc.{Z}", "CNAME"),
    ("10.0.19.198.in-addr.arpa", "PTR"),
    (f"web.default.svc.{Z}.example.com", "A"),
    (f"web.default.svc.{Z}", "ANY"),
    (f"{Z}", "SOA"),
]


def random_case(name: str, rnd: random.Random) -> str:
    return "".join(c.upper() if rnd.random() < 0.5 else c for c in name)


@pytest.mark.parametrize(("name", "qtype"), NAMES)
def test_fast_path_equals_slow_path_and_the_answerer(name: str, qtype: str) -> None:
    h = handler()
    rnd = random.Random(name + qtype)
    for edns, do in ((None, False), (1232, False), (4096, True), (600, True)):
        for rd in (0, 1):
            for cd in (0, 1):
                qname = random_case(name, rnd)
                data = query(qname, qtype, qid=rnd.randrange(65536), rd=rd, cd=cd, edns=edns, do=do)
                first = run(h, data)  # may build the template
                second = run(h, data)  # served from the template
                assert first == second
                ref = answer(h.zone, DNSRecord.parse(data))
                assert isinstance(ref, Reply)
                got = DNSRecord.parse(first)
                same(got, ref.record)
                assert str(got.q.qname) == qname + "."  # the client's case is echoed


def test_fast_path_is_taken_for_plain_queries() -> None:
    h = handler()
    data = query(f"web.default.svc.{Z}", edns=1232)
    key, qe, ev, limit = parse_fast(data)  # type: ignore[misc]
    assert (qe, ev, limit) == (len(data) - 11, EV_EDNS, UDP_MAX)
    run(h, data)
    assert key in h.fast
    assert parse_fast(query("x.y", edns=512, do=True))[2:] == (EV_EDNS_DO, 512)  # type: ignore[index]
    assert parse_fast(query("x.y", edns=100))[3] == 512  # type: ignore[index]
    assert parse_fast(query("x.y"))[2:] == (EV_NONE, 512)  # type: ignore[index]
    assert parse_fast(query("x.y", edns=1232, opts=[EDNSOption(10, b"12345678")])) is None


def test_queries_with_edns_options_get_the_same_answer() -> None:
    """e.g. dig's COOKIE: ignored (RFC 7873 allows a server without cookies)."""
    h = handler()
    plain = query(f"web.default.svc.{Z}", edns=1232)
    cookie = query(f"web.default.svc.{Z}", edns=1232, opts=[EDNSOption(10, b"12345678")])
    assert run(h, plain) == run(h, cookie)


def test_udp_answers_too_big_are_truncated_and_complete_over_tcp() -> None:
    h = handler(build(n_headless=120))  # 120 A records: ~1.9 kB
    name = f"big.default.svc.{Z}"
    for edns in (None, 1232, 4096):
        rec = DNSRecord.parse(run(h, query(name, edns=edns)))  # type: ignore[arg-type]
        assert rec.header.tc == 1 and not rec.rr and str(rec.q.qname) == name + "."
        assert bool([r for r in rec.ar if r.rtype == 41]) == (edns is not None)
    full = run(h, query(name, edns=1232), tcp=True)
    rec = DNSRecord.parse(full)  # type: ignore[arg-type]
    assert rec.header.tc == 0 and len(rec.rr) == 120


def test_answer_fitting_the_client_size_is_not_truncated() -> None:
    h = handler(build(n_headless=40))  # 40 A records: ~700 octets
    name = f"big.default.svc.{Z}"
    assert DNSRecord.parse(run(h, query(name))).header.tc == 1  # 512 without EDNS
    for size in (1232, 65000):
        rec = DNSRecord.parse(run(h, query(name, edns=size)))  # type: ignore[arg-type]
        assert rec.header.tc == 0 and len(rec.rr) == 40
    assert DNSRecord.parse(run(h, query(name, edns=600))).header.tc == 1


def test_additional_records_are_dropped_before_truncating() -> None:
    # 16 SRV (targets are never compressed, RFC 2782) + 16 A hints: ~1.5 kB, ~1.1 kB
    # without the hints.
    h = handler(build(n_headless=16))
    data = query(f"_p._tcp.big.default.svc.{Z}", "SRV")
    rec = DNSRecord.parse(run(h, data))  # type: ignore[arg-type]
    assert rec.header.tc == 1  # the SRV records alone exceed 512
    rec = DNSRecord.parse(run(h, query(f"_p._tcp.big.default.svc.{Z}", "SRV", edns=1232)))
    assert rec.header.tc == 0 and len(rec.rr) == 16
    assert [r.rtype for r in rec.ar] == [41]  # only our OPT: the hints did not fit


def test_forwarded_name_without_upstreams_is_servfail() -> None:
    h = handler()
    for edns in (None, 1232):
        rec = DNSRecord.parse(run(h, query("www.example.org", qid=77, edns=edns)))
        assert rec.header.rcode == 2 and rec.header.id == 77 and rec.header.ra == 1
        assert str(rec.q.qname) == "www.example.org."


def test_formerr_for_garbage_after_a_valid_header() -> None:
    h = handler()
    data = query(f"web.default.svc.{Z}")[:20]
    out = run(h, data)
    assert out is not None and len(out) == 12
    rec = DNSRecord.parse(out)
    assert rec.header.rcode == 1 and rec.header.id == 4242 and rec.header.qr == 1


def test_short_packets_and_responses_get_nothing() -> None:
    h = handler()
    assert run(h, b"") is None and run(h, b"\x00" * 11) is None
    resp = bytearray(query(f"web.default.svc.{Z}"))
    resp[2] |= 0x80
    assert run(h, bytes(resp)) is None


def test_templates_survive_snapshots_that_do_not_touch_them() -> None:
    st = Store()
    st.replace("Service", [service("web"), service("other", ip="198.19.0.11")])
    st.replace("EndpointSlice", [])
    m1 = st.snapshot().model
    h = handler(m1)
    web, other = query(f"web.default.svc.{Z}"), query(f"other.default.svc.{Z}")
    miss, ext = query(f"new.default.svc.{Z}"), query("www.example.org")
    for q in (web, other, miss, ext):
        run(h, q)
    keys = {q: parse_fast(q)[0] for q in (web, other, miss, ext)}  # type: ignore[index]
    st.upsert("Service", service("other", ip="198.19.0.12"))
    st.upsert("Service", service("new", ip="198.19.0.13"))
    m2 = st.snapshot().model
    from proxy.dns.answer import model_changes

    h.set_zone(Zone(m2, Z), model_changes(m1, m2))
    assert keys[web] in h.fast and keys[ext] in h.fast
    assert keys[other] not in h.fast and keys[miss] not in h.fast
    assert DNSRecord.parse(run(h, other)).rr[0].rdata.toZone() == "198.19.0.12"  # type: ignore[arg-type]
    assert DNSRecord.parse(run(h, miss)).rr[0].rdata.toZone() == "198.19.0.13"  # type: ignore[arg-type]


def test_template_cache_is_bounded() -> None:
    h = handler(fast_max=50)
    for i in range(200):
        run(h, query(f"n{i}.default.svc.{Z}"))
        assert len(h.fast) <= 50


def test_metrics_count_queries_by_type_and_rcode() -> None:
    h = handler()
    for _ in range(3):
        run(h, query(f"web.default.svc.{Z}"))
    run(h, query(f"nope.default.svc.{Z}", "AAAA"))
    assert h.stats.queries[("A", "NOERROR")] == 3
    assert h.stats.queries[("AAAA", "NXDOMAIN")] == 1
    assert sum(h.stats.hist["zone"]) == 4


def test_external_name_chase_prefixes_the_cname() -> None:
    """ExternalName → forwarder; with none reachable the client gets SERVFAIL."""
    h = handler()
    res = answer(h.zone, DNSRecord.parse(query(f"ext.default.svc.{Z}")))
    assert isinstance(res, Forward) and res.prefix
    rec = DNSRecord.parse(run(h, query(f"ext.default.svc.{Z}")))  # type: ignore[arg-type]
    assert rec.header.rcode == 2


def test_label_case_does_not_leak_between_clients() -> None:
    h = handler()
    a = DNSRecord.parse(run(h, query(f"WEB.default.svc.{Z}")))  # type: ignore[arg-type]
    b = DNSRecord.parse(run(h, query(f"web.default.svc.{Z}")))  # type: ignore[arg-type]
    assert str(a.q.qname).startswith("WEB.") and str(b.q.qname).startswith("web.")
    assert a.rr[0].rname == DNSLabel(f"WEB.default.svc.{Z}")


def test_aging_a_template_lowers_every_ttl_but_not_the_opt_flags() -> None:
    from dnslib import NS, RR, A

    from proxy.dns.wire import entry_from_record

    rec = DNSRecord(DNSHeader(id=0, qr=1, rd=0, ra=1), q=DNSQuestion("a.example.org"))
    rec.add_answer(RR("a.example.org", QTYPE.A, rdata=A("192.0.2.1"), ttl=30))
    rec.add_auth(RR("example.org", QTYPE.NS, rdata=NS("ns.example.org"), ttl=5))
    rec.add_ar(RR("ns.example.org", QTYPE.A, rdata=A("192.0.2.2"), ttl=100))
    rec.add_ar(EDNS0(udp_len=1232, flags="do"))
    e = entry_from_record(rec).aged(10)
    got = DNSRecord.parse(e.full)
    assert [r.ttl for r in (*got.rr, *got.auth)] == [20, 0]
    assert [(r.rtype, r.ttl) for r in got.ar] == [(1, 90), (41, 0x8000)]
    assert DNSRecord.parse(e.noadd).ar[0].ttl == 0x8000  # type: ignore[arg-type]
