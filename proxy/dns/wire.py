"""Wire-format helpers for the hot path: hand parsing of plain queries and reply templates.

Most queries are one question, no EDNS options. For those we read the header and the
question by hand (no dnslib objects) and serve a precomputed reply *template*: the reply
to the same question asked in lower case with ID 0, RD 0 and CD 0. Serving patches in
the client's ID, RD and CD bits and its question bytes (so its 0x20 case is echoed); the
answer owner names are compression pointers into the question and follow along. The
slow path builds every reply through the same templates, so both paths are equal by
construction (tests check it anyway).
"""

from __future__ import annotations

import copy
import struct

OPT = 41
UDP_CLASSIC = 512  # payload limit without EDNS (RFC 1035)
UDP_MAX = 1232  # our EDNS payload size (DNS flag day 2020): answers never fragment
TCP_MAX = 65535

# EDNS variant of a query: the reply differs only by whether it carries an OPT and its DO.
EV_NONE, EV_EDNS, EV_EDNS_DO = 0, 1, 2

RCODE_NAMES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    16: "BADVERS",
}
QTYPE_NAMES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    64: "SVCB",
    65: "HTTPS",
    255: "ANY",
}

_HDR = struct.Struct("!HBBHHHH")


def opt_rr(ev: int, ext_rcode: int = 0) -> bytes:
    """Our OPT record: root name, payload UDP_MAX, version 0, DO copied, no options."""
    return (
        b"\x00\x00\x29"
        + UDP_MAX.to_bytes(2, "big")
        + bytes((ext_rcode, 0, 0x80 if ev == EV_EDNS_DO else 0, 0))
        + b"\x00\x00"
    )


PLAIN_COUNTS = b"\x00\x01\x00\x00\x00\x00\x00"  # QD=1, AN=NS=0, AR high octet 0
_OPT_HEAD = b"\x00\x00\x29"
_ZERO2 = b"\x00\x00"
_EV_BYTES = (b"\x00", b"\x01", b"\x02")


def parse_fast(data: bytes) -> tuple[bytes, int, int, int] | None:
    """(key, end of question, EDNS variant, UDP payload limit) of a plain query, else None.

    A plain query: QR=0, opcode QUERY, TC=0, one question, no answer or authority
    records, and either nothing after the question or exactly one OPT (version 0, no
    options) filling the rest. The key is the lower-cased question plus the variant.

    The question's labels are not walked: the key is only ever compared with keys that
    `encode_name` made from parsed labels, and an uncompressed name has one encoding, so
    a dict hit proves the bytes are a well-formed question (lower() cannot turn an
    invalid length octet, >63, into a valid one). A miss takes the dnslib path.
    """
    n = len(data)
    if n < 17 or data[2] & 0xFA or data[4:11] != PLAIN_COUNTS:
        return None
    ar = data[11]
    if ar == 0:
        return data[12 : n - 4].lower() + data[n - 4 :] + b"\x00", n, EV_NONE, UDP_CLASSIC
    if ar != 1 or n < 28:
        return None
    qe = n - 11
    # The OPT: root name, type 41, size, extended RCODE 0 and version 0, flags, rdlen 0.
    if data[qe : qe + 3] != _OPT_HEAD or data[qe + 5 : qe + 7] != _ZERO2 or data[n - 2 :] != _ZERO2:
        return None
    ev = EV_EDNS_DO if data[qe + 7] & 0x80 else EV_EDNS
    size = (data[qe + 3] << 8) | data[qe + 4]
    limit = UDP_MAX if size >= UDP_MAX else (size if size > UDP_CLASSIC else UDP_CLASSIC)
    return data[12 : qe - 4].lower() + data[qe - 4 : qe] + _EV_BYTES[ev], qe, ev, limit


def udp_limit(edns_size: int | None) -> int:
    if edns_size is None:
        return UDP_CLASSIC
    return max(UDP_CLASSIC, min(edns_size, UDP_MAX))


def encode_name(labels: tuple[bytes, ...]) -> bytes:
    return b"".join(bytes((len(lb),)) + lb for lb in labels) + b"\x00"


class Entry:
    """A reply template (see the module doc) and what it takes to serve it."""

    __slots__ = ("deps", "full", "heads", "mkey", "noadd", "qlen", "size", "tail")

    def __init__(
        self,
        full: bytes,
        qlen: int,
        *,
        noadd: bytes | None = None,
        deps: frozenset | None = None,
        mkey: tuple[str, str] = ("other", "NOERROR"),
    ) -> None:
        self.full = full
        self.qlen = qlen
        self.noadd = noadd
        self.deps = deps  # what in the model this answer depends on (None: anything)
        self.mkey = mkey  # (qtype, rcode) metric labels
        self.size = len(full)
        f2, f3 = full[2], full[3]
        mid = full[4:12]
        # Flag bytes for each (RD, CD) of the query, with the fixed counts after them.
        self.heads = tuple(
            bytes((f2 | (idx & 1), f3 | (0x10 if idx & 2 else 0))) + mid for idx in range(4)
        )
        self.tail = full[12 + qlen :]

    def serve(self, qid: bytes, fidx: int, question: bytes, limit: int) -> bytes:
        """The reply for a query with ID `qid`, (RD, CD) index `fidx` and its question."""
        if self.size <= limit:
            return qid + self.heads[fidx] + question + self.tail
        return patch(self.fit(limit), qid, fidx, question, self.qlen)

    def fit(self, limit: int) -> bytes:
        """A template no longer than `limit`: without additional records, else TC."""
        if self.noadd is not None and len(self.noadd) <= limit:
            return self.noadd
        return truncated(self.full, self.qlen)

    def aged(self, age: int) -> Entry:
        """The same reply with every TTL lowered by `age` seconds (not below 0).

        Patches the TTL fields in place (their offsets found by walking the message once)
        instead of rendering again: a cached upstream answer is re-aged every second.
        """
        return Entry(
            _age(self.full, age),
            self.qlen,
            noadd=_age(self.noadd, age) if self.noadd is not None else None,
            deps=self.deps,
            mkey=self.mkey,
        )


def _skip_name(msg: bytes, i: int) -> int:
    while True:
        ln = msg[i]
        if ln == 0:
            return i + 1
        if ln >= 0xC0:
            return i + 2
        i += ln + 1


def ttl_offsets(msg: bytes) -> list[int]:
    """Offsets of the TTL fields of every record except OPT (whose "TTL" is flags)."""
    _, _, _, qd, an, ns, ar = _HDR.unpack_from(msg)
    i = 12
    for _ in range(qd):
        i = _skip_name(msg, i) + 4
    out = []
    for _ in range(an + ns + ar):
        i = _skip_name(msg, i)
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", msg, i)
        if rtype != OPT:
            out.append(i + 4)
        i += 10 + rdlen
    return out


def _age(msg: bytes, age: int) -> bytes:
    if age <= 0:
        return msg
    b = bytearray(msg)
    for off in ttl_offsets(msg):
        ttl = struct.unpack_from("!I", b, off)[0]
        struct.pack_into("!I", b, off, max(0, ttl - age))
    return bytes(b)


def flag_index(b2: int, b3: int) -> int:
    """(RD, CD) bits of a query's flag bytes → index into Entry.heads."""
    return (b2 & 1) | ((b3 >> 3) & 2)


def patch(tpl: bytes, qid: bytes, fidx: int, question: bytes, qlen: int) -> bytes:
    rd_cd = bytes((tpl[2] | (fidx & 1), tpl[3] | (0x10 if fidx & 2 else 0)))
    return qid + rd_cd + tpl[4:12] + question + tpl[12 + qlen :]


def truncated(tpl: bytes, qlen: int) -> bytes:
    """TC=1 reply template: header and question, no records but our OPT if it had one."""
    _, f2, f3, qd, _, _, ar = _HDR.unpack_from(tpl)
    opt = b""
    if ar:
        # Our OPT is always the last record and has no options: the last 11 octets.
        tail = tpl[-11:]
        if tail[:3] == b"\x00\x00\x29":
            opt = tail
    hdr = _HDR.pack(0, f2 | 0x02, f3, qd, 0, 0, 1 if opt else 0)
    return hdr + tpl[12 : 12 + qlen] + opt


def simple_reply(
    qid: bytes, fidx: int, question: bytes, rcode: int, ev: int | None, *, aa: bool = False
) -> bytes:
    """A reply with no records (SERVFAIL, REFUSED, …) echoing the question and EDNS."""
    f2 = 0x80 | (0x04 if aa else 0) | (fidx & 1)
    f3 = 0x80 | (0x10 if fidx & 2 else 0) | (rcode & 0x0F)
    opt = b"" if ev is None or ev == EV_NONE else opt_rr(ev, rcode >> 4)
    counts = struct.pack("!HHHH", 1 if question else 0, 0, 0, 1 if opt else 0)
    return qid + bytes((f2, f3)) + counts + question + opt


def formerr(data: bytes) -> bytes | None:
    """FORMERR for a query whose header is readable but whose body is not (else None).

    The reply is a bare 12-octet header (never larger than the query: no amplification).
    """
    if len(data) < 12 or data[2] & 0x80:
        return None
    opcode = data[2] & 0x78
    return data[:2] + bytes((0x80 | opcode | (data[2] & 1), 0x81)) + b"\x00" * 8


def entry_from_record(record, deps: frozenset | None = frozenset()) -> Entry:
    """Render a dnslib reply (lower-case question, ID/RD/CD 0) into a template Entry.

    Also renders the same reply without its additional records (kept for UDP clients
    with little room), and keeps any reply within the 64 KiB a message can hold.
    """
    from dnslib import DNSRecord

    qtype, rcode = record.q.qtype, record.header.rcode
    qlen = len(encode_name(record.q.qname.label)) + 4
    opt = [rr for rr in record.ar if rr.rtype == OPT]

    def render(answers: list, ar: list) -> bytes:
        hdr = copy.copy(record.header)
        return DNSRecord(hdr, record.questions, answers, auth=record.auth, ar=ar).pack()

    full = record.pack()
    noadd = render(record.rr, opt) if len(opt) != len(record.ar) else None
    if len(full) > TCP_MAX:  # a Service with thousands of endpoints: keep what fits
        answers = list(record.rr)
        full = noadd or full
        while len(full) > TCP_MAX and answers:
            answers = answers[: len(answers) * 9 // 10]
            full = render(answers, opt)
        full = full[:2] + bytes((full[2] | 0x02,)) + full[3:]  # TC: this is not all
        noadd = None
    return Entry(
        full,
        qlen,
        noadd=noadd,
        deps=deps,
        mkey=(QTYPE_NAMES.get(qtype, "other"), RCODE_NAMES.get(rcode, str(rcode))),
    )
