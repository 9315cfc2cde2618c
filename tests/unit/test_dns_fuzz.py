"""Fuzzing the packet boundary: whatever arrives, the handler never raises.

Random bytes and mutated valid queries must produce nothing (too short to carry an ID,
or a response), a FORMERR no larger than the query, or a well-formed reply with the
query's ID that fits the transport.
"""

from __future__ import annotations

import asyncio

from dnslib import EDNS0, QTYPE, DNSHeader, DNSQuestion, DNSRecord, EDNSOption
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.dns.server import Handler
from proxy.endpoints.store import Store
from tests.unit.factories import endpoint, service, slice_
from tests.unit.test_dns_handler import handler

Z = "cluster.local"
_LOOP = asyncio.new_event_loop()


def _handler() -> Handler:
    s = Store()
    s.replace(
        "Service",
        [
            service("web"),
            service("db", ip="None", ports=[{"name": "pg", "port": 5432}]),
            service("ext", ip=None, type="ExternalName", externalName="example.org"),
        ],
    )
    s.replace(
        "EndpointSlice",
        [
            slice_(
                "db",
                ports=[{"name": "pg", "port": 5432, "protocol": "TCP"}],
                endpoints=[endpoint(f"198.18.0.{i}", hostname=f"db-{i}") for i in range(1, 60)],
            )
        ],
    )
    # No upstreams: forwarded names end in SERVFAIL without any socket.
    return handler(s.snapshot().model)


H = _handler()


def _q(name: str, qtype: str, edns: int | None = None, opts: list | None = None) -> bytes:
    r = DNSRecord(DNSHeader(id=0xBEEF, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        r.add_ar(EDNS0(udp_len=edns, flags="do", opts=opts or []))
    return bytes(r.pack())


VALID = [
    _q(f"web.default.svc.{Z}", "A"),
    _q(f"db.default.svc.{Z}", "A", 4096),
    _q(f"_pg._tcp.db.default.svc.{Z}", "SRV", 1232),
    _q(f"ext.default.svc.{Z}", "A"),
    _q("1.0.18.198.in-addr.arpa", "PTR"),
    _q("example.org", "AAAA", 1232, [EDNSOption(10, b"01234567")]),
    _q(f"web.default.svc.{Z}.example.com", "ANY"),
]


def check(data: bytes, tcp: bool) -> None:
    out = H.handle(data, tcp)
    if out is not None and not isinstance(out, bytes):
        out = _LOOP.run_until_complete(out)
    if len(data) < 12 or data[2] & 0x80:
        assert out is None
        return
    assert out is not None
    rec = DNSRecord.parse(out)  # whatever we send parses
    assert rec.header.qr == 1 and out[:2] == data[:2]
    try:
        DNSRecord.parse(data)
        parses = True
    except Exception:
        parses = False
    if not parses:
        assert rec.header.rcode == 1 and len(out) == 12  # FORMERR: never amplified
    if not tcp:
        assert len(out) <= 1232
        if rec.header.tc:
            assert not rec.rr
    else:
        assert len(out) <= 65535


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700), st.booleans())
def test_random_bytes_never_crash(data: bytes, tcp: bool) -> None:
    check(data, tcp)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    b = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "dup"]))
        if not b:
            break
        i = draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            b[i] = draw(st.sampled_from([0x00, 0x01, 0x3F, 0x40, 0x7F, 0xC0, 0xFF, 0x29]))
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[i]
        else:
            b += b[i:]
    return bytes(b)


# Found by this test: dnslib reads label lengths 64-191 as plain lengths ("web" lost its
# length octet, so 'w' = 119 became one); such names must get FORMERR, not a crash or a
# forward of a name that cannot be written back.
_LONG_LABEL = (
    b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00web\x07default\x03svc\x07cluster"
    b"\x05local\x00\x00\x01\x00\x01" + b"\x00" * 120 + b"\x00\x01\x00\x01"
)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.booleans())
@example(_LONG_LABEL, False)
@example(bytes([0xBE, 0xEF, 0x08, 0x00]) + _LONG_LABEL[4:], True)  # opcode 1: NOTIMP path
def test_mutated_queries_never_crash(data: bytes, tcp: bool) -> None:
    check(data, tcp)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(VALID),
    st.integers(0, 11),
    st.integers(0, 255),
)
def test_header_bits_and_counts(data: bytes, pos: int, value: int) -> None:
    b = bytearray(data)
    b[pos] = value
    check(bytes(b), False)
