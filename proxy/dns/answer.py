"""The pure answerer: (Zone, query) → reply or "forward", with no sockets (sans-IO).

`Zone` is one model snapshot seen as DNS (Kubernetes DNS-Based Service Discovery 1.1.0,
with CoreDNS's choices where the specification leaves room). `answer(zone, request)`
is CoreDNS's one lookup function: it either returns a complete reply (`Reply`) or says
that the name belongs to somebody else (`Forward`).

Names are handled as tuples of lower-cased label bytes, so comparisons are
case-insensitive and no string escaping is ever involved. Lookups are O(1) dict reads on
the model's own mappings; per-Service derived data (headless hostnames) and the reverse
(PTR) index are built lazily, once per snapshot, on first use.

Negative answers follow RFC 8020: NXDOMAIN only for names with nothing below them;
a name that exists (or has descendants) but lacks the asked type is NOERROR/NODATA.
Both carry the zone's SOA in the authority section, whose MINIMUM is the TTL.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from dnslib import (
    AAAA,
    CNAME,
    EDNS0,
    NS,
    PTR,
    RD,
    RR,
    SOA,
    SRV,
    TXT,
    A,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

from proxy.model import EMPTY_ENDPOINTS, Model, Service, ServiceKey, normalize_ip

from .wire import UDP_MAX

SCHEMA_VERSION = "1.1.0"

# Record types and codes (numbers, to keep dnslib's bimaps off the hot path).
T_A, T_NS, T_CNAME, T_SOA, T_PTR, T_HINFO, T_TXT, T_AAAA, T_SRV, T_OPT = (
    1, 2, 5, 6, 12, 13, 16, 28, 33, 41,
)  # fmt: skip
T_IXFR, T_AXFR, T_MAILB, T_MAILA, T_ANY, T_TKEY, T_TSIG = 251, 252, 253, 254, 255, 249, 250
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16

_PROTOS = {b"_tcp": "TCP", b"_udp": "UDP", b"_sctp": "SCTP"}
_IN_ADDR = (b"in-addr", b"arpa")
_IP6 = (b"ip6", b"arpa")
_HEX = frozenset(b"0123456789abcdef")
MAX_CHASE = 8  # CNAME chain length inside the zone (ExternalName → ExternalName …)

REVERSE = "reverse"  # dependency marker: the answer depends on the whole reverse index

Labels = tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete reply. `deps` says what in the model it depends on (for reuse across
    snapshots): Service keys, namespace names, REVERSE; None means "do not reuse"."""

    record: DNSRecord
    deps: frozenset | None = frozenset()


@dataclass(frozen=True, slots=True)
class Forward:
    """Not ours: ask upstream for (name, qtype) and prepend `prefix` (an ExternalName's
    CNAME) to what comes back."""

    name: Labels
    qtype: int
    prefix: tuple[RR, ...] = ()
    deps: frozenset = frozenset()


Answer = Reply | Forward


@dataclass(slots=True)
class _Result:
    rcode: int = NOERROR
    answers: list[RR] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    additional: list[RR] = field(default_factory=list)
    aa: bool = True
    deps: set = field(default_factory=set)
    forward: Forward | None = None


def endpoint_hostname(hostname: str, ip: str) -> str:
    """The spec's _hostname_: the endpoint's hostname, else CoreDNS's dashed IP."""
    if hostname:
        return hostname
    return ip.replace(".", "-") if "." in ip else ip.replace(":", "-")


def reverse_labels(ip: str) -> Labels:
    """in-addr.arpa / ip6.arpa name of an address, as labels."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return (*(p.encode() for p in reversed(ip.split("."))), *_IN_ADDR)
    nibbles = addr.exploded.replace(":", "")
    return (*(c.encode() for c in reversed(nibbles)), *_IP6)


def ip_from_reverse(labels: Labels) -> str | None:
    """The address a reverse name stands for (normalized), None when it is not a full one."""
    if labels[-2:] == _IN_ADDR and len(labels) == 6:
        parts = labels[3::-1]
        canonical = all(
            p.isdigit() and len(p) <= 3 and (p == b"0" or p[0] != 48) for p in parts
        )  # no leading zeros: one name per address
        if canonical and all(int(p) <= 255 for p in parts):
            return ".".join(p.decode() for p in parts)
        return None
    if labels[-2:] == _IP6 and len(labels) == 34:
        nib = labels[31::-1]
        if all(len(c) == 1 and c[0] in _HEX for c in nib):
            # The model's canonical form (normalize_ip), so the index lookup matches.
            return socket.inet_ntop(socket.AF_INET6, bytes.fromhex(b"".join(nib).decode()))
    return None


class _Headless:
    """A headless Service's ready endpoints, by hostname and by address."""

    __slots__ = ("by_host", "host_of", "ips")

    def __init__(self, svc: Service, model: Model) -> None:
        eps = model.endpoints_of(svc.key)
        pnr = svc.publish_not_ready_addresses
        self.ips: list[str] = []
        self.by_host: dict[bytes, list[str]] = {}
        self.host_of: dict[str, bytes] = {}
        for a in eps.addresses:
            if not (a.ready or pnr):
                continue
            host = endpoint_hostname(a.hostname, a.ip).encode()
            self.ips.append(a.ip)
            self.by_host.setdefault(host, []).append(a.ip)
            self.host_of[a.ip] = host


class Zone:
    """One model snapshot as DNS data, with the configuration that shapes answers."""

    def __init__(
        self,
        model: Model | None,
        domain: str = "cluster.local",
        ttl: int = 5,
        *,
        serial: int = 1,
        search_suffixes: Iterable[str] = (),
        pod_records: bool = True,
        ns_ips: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.ready = model is not None  # before the first sync, in-zone names SERVFAIL
        self.labels: Labels = tuple(p.encode() for p in domain.strip(".").lower().split("."))
        self.ttl = ttl
        self.pod_records = pod_records
        self.ns_ips = tuple(ns_ips)
        zlen = len(self.labels)
        self._zlen = zlen
        # Host search domains a pod's resolver appends (see `_search_path_miss`).
        suffixes = []
        for s in search_suffixes:
            lab = tuple(p.encode() for p in s.strip(".").lower().split(".") if p)
            if lab and lab[-zlen:] != self.labels:
                suffixes.append(lab)
        self.search_suffixes: tuple[Labels, ...] = tuple(suffixes)
        self.services = model.services if model is not None else {}
        self.namespaces = frozenset(k[0] for k in self.services)
        self._headless: dict[ServiceKey, _Headless] = {}
        self._reverse: dict[str, list[Labels]] | None = None
        z = self.labels
        self.ns_name: Labels = (b"ns", b"dns", *z)
        soa = SOA(
            DNSLabel(self.ns_name),
            DNSLabel((b"hostmaster", *z)),
            (serial & 0xFFFFFFFF, 7200, 1800, 86400, ttl),
        )
        self.soa = RR(DNSLabel(z), T_SOA, rdata=soa, ttl=ttl)
        self._rev_soa = {k: RR(DNSLabel(k), T_SOA, rdata=soa, ttl=ttl) for k in (_IN_ADDR, _IP6)}

    # -- indexes -------------------------------------------------------------------------

    def headless(self, svc: Service) -> _Headless:
        h = self._headless.get(svc.key)
        if h is None:
            assert self.model is not None
            h = self._headless[svc.key] = _Headless(svc, self.model)
        return h

    def reverse(self) -> dict[str, list[Labels]]:
        """address → PTR targets (each once): ClusterIPs, else ready endpoints of headless
        Services."""
        if self._reverse is None:
            svc_ptr: dict[str, dict[Labels, None]] = {}
            ep_ptr: dict[str, set[Labels]] = {}
            z = self.labels
            for svc in self.services.values():
                base = (svc.name.encode(), svc.namespace.encode(), b"svc", *z)
                for ip in svc.cluster_ips:
                    svc_ptr.setdefault(ip, {})[base] = None
                if svc.headless and svc.type != "ExternalName":
                    for ip, host in self.headless(svc).host_of.items():
                        ep_ptr.setdefault(ip, set()).add((host, *base))
            rev = {ip: list(names) for ip, names in svc_ptr.items()}
            for ip, eps in ep_ptr.items():
                if ip not in rev:  # a ClusterIP wins, as in CoreDNS
                    rev[ip] = sorted(eps)
            self._reverse = rev
        return self._reverse

    # -- lookup --------------------------------------------------------------------------

    def in_zone(self, name: Labels) -> bool:
        return len(name) >= self._zlen and name[len(name) - self._zlen :] == self.labels

    def lookup(self, name: Labels, qtype: int) -> _Result:
        """Records for (name, qtype); `name` lower-cased labels."""
        if self.in_zone(name):
            if not self.ready:
                return _Result(SERVFAIL, aa=False)
            return self._zone_lookup(name, qtype, 0)
        if name[-2:] in (_IN_ADDR, _IP6):
            ip = ip_from_reverse(name)
            targets = self.reverse().get(ip) if ip is not None else None
            if targets:
                r = _Result(deps={REVERSE})
                if qtype == T_PTR:
                    r.answers = [self._rr(name, T_PTR, PTR(DNSLabel(t))) for t in targets]
                elif qtype == T_ANY:
                    r.answers = [self._hinfo(name)]
                else:
                    r.authority = [self._rev_soa[name[-2:]]]
                return r
            # Not one of ours: the upstream owns the reverse tree. This decision depends
            # on the reverse index, hence the dependency.
            return self._forward(name, qtype, deps={REVERSE})
        if self._search_path_miss(name):
            return _Result(NXDOMAIN, authority=[self.soa], aa=False)
        return self._forward(name, qtype, deps=set())

    def _forward(self, name: Labels, qtype: int, *, deps: set) -> _Result:
        if qtype == T_ANY:  # RFC 8482: never fetch ANY upstream; answer minimally here
            return _Result(answers=[self._hinfo(name)], aa=False, deps=deps)
        return _Result(forward=Forward(name, qtype), deps=deps)

    def _search_path_miss(self, name: Labels) -> bool:
        """`<cluster name>.<host search domain>`: a pod resolver's search-list expansion of
        a name that is already inside the cluster zone (ndots:5 makes it try
        web.ns.svc.cluster.local.example.com before web.ns.svc.cluster.local.).

        Answered NXDOMAIN here, without a round trip, when the suffix is one of the host
        search domains pods inherit and what precedes it ends in the cluster zone. The
        client then goes on to the next candidate and finally to the name as written,
        which this zone answers. Only the upstream could make such a name exist (a
        wildcard in the search domain) and then it would shadow the cluster name the
        user asked for, which is never what was meant. Other names in foreign domains
        are always forwarded: nothing here knows about them.
        """
        z, zlen = self.labels, self._zlen
        for suf in self.search_suffixes:
            n = len(suf)
            if len(name) >= n + zlen and name[-n:] == suf and name[-n - zlen : -n] == z:
                return True
        return False

    def _rr(self, name: Labels, rtype: int, rdata, ttl: int | None = None) -> RR:
        return RR(DNSLabel(name), rtype, rdata=rdata, ttl=self.ttl if ttl is None else ttl)

    def _hinfo(self, name: Labels) -> RR:
        return self._rr(name, T_HINFO, RD(b"\x07RFC8482\x00"))

    def _addr_rrs(self, name: Labels, ips: Iterable[str], qtype: int) -> list[RR]:
        """The A or AAAA RRset of `name`: one record per distinct address (RFC 2181 §5)."""
        if qtype == T_A:
            return [self._rr(name, T_A, A(ip)) for ip in dict.fromkeys(ips) if ":" not in ip]
        return [self._rr(name, T_AAAA, AAAA(ip)) for ip in dict.fromkeys(ips) if ":" in ip]

    def _nodata(self, r: _Result) -> _Result:
        r.authority = [self.soa]
        return r

    def _nx(self, r: _Result) -> _Result:
        r.rcode = NXDOMAIN
        r.answers = []
        r.authority = [self.soa]
        return r

    def _zone_lookup(self, name: Labels, qtype: int, depth: int) -> _Result:
        rel = name[: len(name) - self._zlen]
        r = _Result()
        if not rel:  # the apex
            if qtype == T_SOA:
                r.answers = [self.soa]
            elif qtype == T_NS:
                r.answers = [self._rr(name, T_NS, NS(DNSLabel(self.ns_name)))]
                r.additional = self._addr_rrs(self.ns_name, self.ns_ips, T_A)
                r.additional += self._addr_rrs(self.ns_name, self.ns_ips, T_AAAA)
            elif qtype == T_ANY:
                r.answers = [self._hinfo(name)]
            else:
                return self._nodata(r)
            return r
        last = rel[-1]
        if last == b"svc":
            return self._svc_lookup(name, rel[:-1], qtype, r, depth)
        if last == b"pod" and self.pod_records:
            return self._pod_lookup(name, rel[:-1], qtype, r)
        if rel == (b"dns-version",):
            return self._typed(r, name, qtype, T_TXT, lambda: TXT(SCHEMA_VERSION))
        if rel == (b"dns",):
            return self._nodata(r)  # empty non-terminal above ns.dns
        if rel == (b"ns", b"dns"):
            return self._addresses(r, name, self.ns_ips, qtype)
        return self._nx(r)

    def _typed(self, r: _Result, name: Labels, qtype: int, rtype: int, make) -> _Result:
        """A name holding one record of `rtype`: the record, HINFO for ANY, else NODATA."""
        if qtype == rtype:
            r.answers = [self._rr(name, rtype, make())]
        elif qtype == T_ANY:
            r.answers = [self._hinfo(name)]
        else:
            return self._nodata(r)
        return r

    def _pod_lookup(self, name: Labels, parts: Labels, qtype: int, r: _Result) -> _Result:
        """Deprecated pod records (spec 2.6): <a-b-c-d>.<ns>.pod.<zone> → the address."""
        if not parts:
            return self._nodata(r)  # pod.<zone>: empty non-terminal
        if len(parts) == 1:
            return self._nodata(r)  # <ns>.pod.<zone>: every namespace has pod names below
        if len(parts) != 2:
            return self._nx(r)
        label = parts[0].decode("ascii", "replace")
        if label.count("-") == 3 and "--" not in label:
            text = label.replace("-", ".")
        else:
            text = label.replace("-", ":")
        try:
            ip = normalize_ip(text)
        except ValueError:
            return self._nx(r)
        if ip.replace(".", "-").replace(":", "-") != label and ":" not in ip:
            return self._nx(r)  # e.g. leading zeros: not the canonical name of an address
        return self._addresses(r, name, (ip,), qtype)

    def _svc_lookup(
        self, name: Labels, parts: Labels, qtype: int, r: _Result, depth: int
    ) -> _Result:
        if not parts:
            return self._nodata(r)  # svc.<zone>
        try:
            ns = parts[-1].decode("ascii")
        except UnicodeDecodeError:
            return self._nx(r)
        if len(parts) == 1:
            r.deps.add(ns)
            return self._nodata(r) if ns in self.namespaces else self._nx(r)
        try:
            key = (ns, parts[-2].decode("ascii"))
        except UnicodeDecodeError:
            return self._nx(r)
        r.deps.add(key)
        svc = self.services.get(key)
        if svc is None or len(parts) > 4:
            return self._nx(r)
        if len(parts) == 2:
            return self._service(name, svc, qtype, r, depth)
        if len(parts) == 3:
            first = parts[0]
            if first[:1] == b"_":  # _<proto>.<svc>: exists when an SRV name is below it
                proto = _PROTOS.get(first)
                if proto is None or not any(
                    self._srv_exists(svc, p.name, proto) for p in svc.ports if p.name
                ):
                    return self._nx(r)
                return self._typed(r, name, qtype, -1, None)
            return self._endpoint(name, svc, first, qtype, r)
        return self._srv(name, svc, parts[0], parts[1], qtype, r)

    def _service(self, name: Labels, svc: Service, qtype: int, r: _Result, depth: int) -> _Result:
        if svc.type == "ExternalName":
            target = tuple(p.encode() for p in svc.external_name.split(".") if p)
            cname = self._rr(name, T_CNAME, CNAME(DNSLabel(target)))
            if qtype in (T_CNAME, T_ANY):
                r.answers = [cname]
                return r
            if self.in_zone(target) and depth < MAX_CHASE:
                sub = self._zone_lookup(target, qtype, depth + 1)
                sub.answers.insert(0, cname)
                sub.deps |= r.deps
                if sub.forward is not None:  # an in-zone CNAME to an out-of-zone one
                    f = sub.forward
                    sub.forward = Forward(f.name, f.qtype, (cname, *f.prefix))
                return sub
            if self.in_zone(target):  # a CNAME loop inside the zone
                r.answers = [cname]
                return r
            r.answers = [cname]
            r.forward = Forward(target, qtype, (cname,))
            return r
        if svc.headless:
            ips = self.headless(svc).ips
            if not ips:
                return self._nx(r)  # spec 2.4.1: no ready endpoint → NXDOMAIN
        else:
            ips = list(svc.cluster_ips)
        return self._addresses(r, name, ips, qtype)

    def _addresses(self, r: _Result, name: Labels, ips: Iterable[str], qtype: int) -> _Result:
        """A name holding addresses: those of the asked family, HINFO for ANY, else NODATA."""
        if qtype in (T_A, T_AAAA):
            r.answers = self._addr_rrs(name, ips, qtype)
            return r if r.answers else self._nodata(r)
        if qtype == T_ANY:
            r.answers = [self._hinfo(name)]
            return r
        return self._nodata(r)

    def _endpoint(self, name: Labels, svc: Service, host: bytes, qtype: int, r: _Result) -> _Result:
        """<hostname>.<svc>.<ns>.svc.<zone>: a ready endpoint of a headless Service."""
        if not svc.headless or svc.type == "ExternalName":
            return self._nx(r)
        ips = self.headless(svc).by_host.get(host)
        if not ips:
            return self._nx(r)
        return self._addresses(r, name, ips, qtype)

    def _srv_targets(self, svc: Service, pname: str, proto: str) -> list[tuple[int, Labels]]:
        """(port, target) of the SRV records of one named port of a Service, each once.

        Endpoints sharing a hostname (a v4 and a v6 address of one pod, or two pods given
        the same hostname) name one target: one record, as RFC 2181 §5 wants (and CoreDNS
        answers); the target's addresses all go to the additional section.
        """
        port = next((p for p in svc.ports if p.name == pname and p.protocol == proto), None)
        if port is None or svc.type == "ExternalName":
            return []
        base = (svc.name.encode(), svc.namespace.encode(), b"svc", *self.labels)
        if not svc.headless:
            return [(port.port, base)]
        assert self.model is not None
        hl = self.headless(svc)
        out: dict[tuple[int, Labels], None] = {}
        for ep in self.model.endpoints.get(svc.key, EMPTY_ENDPOINTS).for_port(port):
            host = hl.host_of.get(ep.ip)
            if host is not None:
                out[(ep.port, (host, *base))] = None
        return list(out)

    def _srv_exists(self, svc: Service, pname: str, proto: str) -> bool:
        return bool(self._srv_targets(svc, pname, proto))

    def _srv(
        self, name: Labels, svc: Service, plabel: bytes, tlabel: bytes, qtype: int, r: _Result
    ) -> _Result:
        proto = _PROTOS.get(tlabel)
        if proto is None or plabel[:1] != b"_" or len(plabel) < 2:
            return self._nx(r)
        try:
            pname = plabel[1:].decode("ascii")
        except UnicodeDecodeError:
            return self._nx(r)
        targets = self._srv_targets(svc, pname, proto)
        if not targets:
            return self._nx(r)
        if qtype == T_ANY:
            r.answers = [self._hinfo(name)]
            return r
        if qtype != T_SRV:
            return self._nodata(r)
        r.answers = [self._rr(name, T_SRV, SRV(0, 100, port, DNSLabel(t))) for port, t in targets]
        # Additional section: the addresses of the targets (spec 2.3.2 / 2.4.2).
        seen: set[Labels] = set()
        hl = self.headless(svc) if svc.headless else None
        for _, t in targets:
            if t in seen:
                continue
            seen.add(t)
            ips = hl.by_host.get(t[0], []) if hl is not None else svc.cluster_ips
            r.additional += self._addr_rrs(t, ips, T_A) + self._addr_rrs(t, ips, T_AAAA)
        return r


# -- the request/response layer -------------------------------------------------------


def _opts(request: DNSRecord) -> list[RR]:
    return [rr for rr in request.ar if rr.rtype == T_OPT]


def _reply(request: DNSRecord, rcode: int, *, aa: bool = False, echo_q: bool = True) -> DNSRecord:
    h = request.header
    hdr = DNSHeader(
        id=h.id, qr=1, opcode=h.opcode, aa=int(aa), rd=h.rd, ra=1, cd=h.cd, rcode=rcode & 0xF
    )
    rec = DNSRecord(hdr)
    if echo_q and len(request.questions) == 1:
        rec.add_question(request.questions[0])
    return rec


def _add_opt(rec: DNSRecord, opt: RR | None, ext_rcode: int = 0) -> None:
    if opt is not None:
        do = "do" if (opt.ttl >> 15) & 1 else ""
        rec.add_ar(EDNS0(udp_len=UDP_MAX, flags=do, ext_rcode=ext_rcode))


def answer(zone: Zone, request: DNSRecord) -> Answer | None:
    """The reply to `request`, or Forward for names outside what the zone decides.

    None means "send nothing" (the message is itself a response). Transport limits
    (UDP size, truncation) are the caller's business.
    """
    h = request.header
    if h.qr:
        return None
    opts = _opts(request)
    if len(opts) > 1 or (opts and opts[0].rname.label != ()):
        return Reply(_reply(request, FORMERR, echo_q=False), None)
    opt = opts[0] if opts else None
    if h.opcode != 0:
        rec = _reply(request, NOTIMP)
        _add_opt(rec, opt)
        return Reply(rec, None)
    if len(request.questions) != 1:
        rec = _reply(request, FORMERR, echo_q=False)
        _add_opt(rec, opt)
        return Reply(rec, None)
    if opt is not None and (opt.ttl >> 16) & 0xFF != 0:  # EDNS version we do not speak
        rec = _reply(request, BADVERS)
        _add_opt(rec, opt, ext_rcode=BADVERS >> 4)
        return Reply(rec, None)
    q = request.q
    rcode = NOERROR
    if q.qclass != 1:
        rcode = REFUSED  # only the IN class exists here
    elif q.qtype == T_OPT:
        rcode = FORMERR
    elif q.qtype in (T_AXFR, T_IXFR):
        rcode = REFUSED  # no zone transfers
    elif q.qtype in (T_MAILA, T_MAILB, T_TKEY, T_TSIG):
        rcode = NOTIMP
    if rcode:
        rec = _reply(request, rcode)
        _add_opt(rec, opt)
        return Reply(rec, frozenset())
    name = tuple(lb.lower() for lb in q.qname.label)
    res = zone.lookup(name, q.qtype)
    if res.forward is not None:
        f = res.forward
        return Forward(f.name, f.qtype, f.prefix, frozenset(res.deps))
    rec = _reply(request, res.rcode, aa=res.aa)
    for rr in res.answers:
        rec.add_answer(rr)
    for rr in res.authority:
        rec.add_auth(rr)
    for rr in res.additional:
        rec.add_ar(rr)
    _add_opt(rec, opt)
    return Reply(rec, frozenset(res.deps))


def model_changes(old: Model, new: Model) -> set:
    """Dependency markers (see Reply.deps) touched between two snapshots.

    Relies on the model's promise that unchanged records are shared between snapshots,
    so an identity check per Service is enough: O(Services), no deep comparison.
    """
    out: set = set()
    for a, b in ((old.services, new.services), (old.endpoints, new.endpoints)):
        for k, v in b.items():
            if a.get(k) is not v:
                out.add(k)
                out.add(k[0])
        for k in a:
            if k not in b:
                out.add(k)
                out.add(k[0])
    if out:
        out.add(REVERSE)
    return out


def question(name: str, qtype: int = T_A, *, edns: bool = False, do: bool = False) -> DNSRecord:
    """A query record (for tests and tools)."""
    rec = DNSRecord(DNSHeader(id=1, rd=1), q=DNSQuestion(name, qtype))
    if edns:
        rec.add_ar(EDNS0(udp_len=UDP_MAX, flags="do" if do else ""))
    return rec
