"""The DNS answerer as a pure function of (model, query): one test per rule.

Rules are those of Kubernetes DNS-Based Service Discovery 1.1.0 (and CoreDNS where the
specification leaves room), plus the negative-answer and protocol rules of the RFCs.
"""

from __future__ import annotations

from types import MappingProxyType

import pytest
from dnslib import CLASS, EDNS0, QTYPE, DNSHeader, DNSQuestion, DNSRecord

from proxy.dns.answer import (
    SCHEMA_VERSION,
    Forward,
    Reply,
    Zone,
    answer,
    ip_from_reverse,
    model_changes,
    question,
    reverse_labels,
)
from proxy.endpoints.store import Store
from proxy.model import (
    Endpoint,
    EndpointAddress,
    Model,
    PortSpec,
    Service,
    ServiceEndpoints,
    make_model,
)
from tests.unit.factories import endpoint, service, slice_

Z = "cluster.local"


def build(services: list[dict], slices: list[dict]) -> Model:
    st = Store()
    st.replace("Service", services)
    st.replace("EndpointSlice", slices)
    return st.snapshot().model


@pytest.fixture(scope="module")
def model() -> Model:
    return build(
        [
            service("web", ports=[{"name": "http", "port": 80}, {"port": 81, "name": ""}]),
            service(
                "dual",
                ip=None,
                clusterIPs=["198.19.0.20", "fd00:19::20"],
                ports=[{"name": "dns", "port": 53, "protocol": "UDP"}],
            ),
            service("v6", ip="fd00:19::30"),
            service(
                "db",
                ip="None",
                ports=[{"name": "pg", "port": 5432}, {"name": "metrics", "port": 9187}],
            ),
            service("pnr", ip="None", publishNotReadyAddresses=True),
            service("empty", ip="None"),
            service("down", ip="None"),
            service("ext", ip=None, type="ExternalName", externalName="www.example.com"),
            service("alias", ip=None, type="ExternalName", externalName=f"web.default.svc.{Z}"),
            service("api", ns="prod", ip="198.19.1.1"),
        ],
        [
            slice_(
                "db",
                ports=[
                    {"name": "pg", "port": 15432, "protocol": "TCP"},
                    {"name": "metrics", "port": 9187, "protocol": "TCP"},
                ],
                endpoints=[
                    endpoint("198.18.1.1", hostname="db-0"),
                    endpoint("198.18.1.2"),
                    endpoint("198.18.1.3", ready=False, hostname="db-2"),
                ],
            ),
            slice_(
                "db",
                name="db-v6",
                address_type="IPv6",
                ports=[{"name": "pg", "port": 15432, "protocol": "TCP"}],
                endpoints=[endpoint("fd00:18::1", hostname="db-0")],
            ),
            slice_(
                "pnr",
                endpoints=[endpoint("198.18.2.1", ready=False), endpoint("198.18.2.2")],
            ),
            slice_("down", endpoints=[endpoint("198.18.3.1", ready=False)]),
            slice_("web", endpoints=[endpoint("198.18.4.1")]),
        ],
    )


@pytest.fixture(scope="module")
def zone(model: Model) -> Zone:
    return Zone(model, Z, ttl=5, search_suffixes=["example.com", "corp.example"])


def ask(zone: Zone, name: str, qtype: str = "A", **kw) -> DNSRecord:
    res = answer(zone, question(name, getattr(QTYPE, qtype), **kw))
    assert isinstance(res, Reply), res
    return res.record


def rdatas(rec: DNSRecord, section: str = "rr") -> list[str]:
    return sorted(str(rr.rdata) for rr in getattr(rec, section))


def assert_nxdomain(rec: DNSRecord) -> None:
    assert rec.header.rcode == 3 and not rec.rr
    assert [QTYPE[rr.rtype] for rr in rec.auth] == ["SOA"]


def assert_nodata(rec: DNSRecord) -> None:
    assert rec.header.rcode == 0 and not rec.rr
    assert [QTYPE[rr.rtype] for rr in rec.auth] == ["SOA"]


# -- Services with a ClusterIP (spec 2.3) ----------------------------------------------------


def test_a_record_of_cluster_ip_service(zone: Zone) -> None:
    rec = ask(zone, f"web.default.svc.{Z}")
    assert rdatas(rec) == ["198.19.0.10"]
    assert rec.header.aa == 1 and rec.rr[0].ttl == 5


def test_aaaa_record_of_ipv6_and_dual_stack_services(zone: Zone) -> None:
    assert rdatas(ask(zone, f"v6.default.svc.{Z}", "AAAA")) == ["fd00:19::30"]
    assert rdatas(ask(zone, f"dual.default.svc.{Z}", "A")) == ["198.19.0.20"]
    assert rdatas(ask(zone, f"dual.default.svc.{Z}", "AAAA")) == ["fd00:19::20"]


def test_missing_family_is_nodata_not_nxdomain(zone: Zone) -> None:
    assert_nodata(ask(zone, f"web.default.svc.{Z}", "AAAA"))
    assert_nodata(ask(zone, f"v6.default.svc.{Z}", "A"))
    assert_nodata(ask(zone, f"web.default.svc.{Z}", "MX"))


def test_names_are_case_insensitive_and_the_question_is_echoed(zone: Zone) -> None:
    rec = ask(zone, "WeB.DeFaulT.SVC.Cluster.LOCAL")
    assert rdatas(rec) == ["198.19.0.10"]
    assert str(rec.q.qname) == "WeB.DeFaulT.SVC.Cluster.LOCAL."


def test_srv_record_of_named_port(zone: Zone) -> None:
    rec = ask(zone, f"_http._tcp.web.default.svc.{Z}", "SRV")
    assert [(r.rdata.port, str(r.rdata.target)) for r in rec.rr] == [(80, f"web.default.svc.{Z}.")]
    assert rdatas(rec, "ar") == ["198.19.0.10"]  # the target's address, as a hint


def test_srv_of_udp_port_and_dual_stack_additional(zone: Zone) -> None:
    rec = ask(zone, f"_dns._udp.dual.default.svc.{Z}", "SRV")
    assert [r.rdata.port for r in rec.rr] == [53]
    assert rdatas(rec, "ar") == ["198.19.0.20", "fd00:19::20"]


def test_no_srv_for_unnamed_ports_or_wrong_protocol(zone: Zone) -> None:
    assert_nxdomain(ask(zone, f"_._tcp.web.default.svc.{Z}", "SRV"))
    assert_nxdomain(ask(zone, f"_http._udp.web.default.svc.{Z}", "SRV"))
    assert_nxdomain(ask(zone, f"_nope._tcp.web.default.svc.{Z}", "SRV"))
    assert_nxdomain(ask(zone, f"_http._xyz.web.default.svc.{Z}", "SRV"))


def test_srv_name_with_other_type_and_proto_node_are_nodata(zone: Zone) -> None:
    assert_nodata(ask(zone, f"_http._tcp.web.default.svc.{Z}", "A"))
    assert_nodata(ask(zone, f"_tcp.web.default.svc.{Z}", "SRV"))  # empty non-terminal
    assert_nxdomain(ask(zone, f"_udp.web.default.svc.{Z}", "SRV"))


def test_ptr_of_cluster_ips_v4_and_v6(zone: Zone) -> None:
    rec = ask(zone, "10.0.19.198.in-addr.arpa", "PTR")
    assert rdatas(rec) == [f"web.default.svc.{Z}."]
    v6 = ".".join(reversed("fd000019000000000000000000000030")) + ".ip6.arpa"
    assert rdatas(ask(zone, v6, "PTR")) == [f"v6.default.svc.{Z}."]


def test_reverse_helpers_round_trip() -> None:
    # "::192.168.0.1": the model's canonical text (inet_ntop), not ipaddress's "::c0a8:1".
    for ip in ("198.19.0.10", "fd00:19::30", "::1", "0.0.0.0", "::192.168.0.1"):
        assert ip_from_reverse(reverse_labels(ip)) == ip
    assert ip_from_reverse((b"010", b"0", b"19", b"198", b"in-addr", b"arpa")) is None
    assert ip_from_reverse((b"0", b"19", b"198", b"in-addr", b"arpa")) is None


# -- headless Services (spec 2.4) ---------------------------------------------------------------


def test_headless_answers_with_ready_endpoints_only(zone: Zone) -> None:
    assert rdatas(ask(zone, f"db.default.svc.{Z}")) == ["198.18.1.1", "198.18.1.2"]
    assert rdatas(ask(zone, f"db.default.svc.{Z}", "AAAA")) == ["fd00:18::1"]


def test_headless_publish_not_ready_addresses_includes_not_ready(zone: Zone) -> None:
    assert rdatas(ask(zone, f"pnr.default.svc.{Z}")) == ["198.18.2.1", "198.18.2.2"]


def test_headless_without_ready_endpoints_is_nxdomain(zone: Zone) -> None:
    assert_nxdomain(ask(zone, f"down.default.svc.{Z}"))  # endpoints, none ready
    assert_nxdomain(ask(zone, f"empty.default.svc.{Z}"))  # no endpoints at all
    assert_nxdomain(ask(zone, f"empty.default.svc.{Z}", "AAAA"))


def test_headless_srv_has_one_record_per_ready_endpoint_and_port(zone: Zone) -> None:
    rec = ask(zone, f"_pg._tcp.db.default.svc.{Z}", "SRV")
    got = sorted((r.rdata.port, str(r.rdata.target)) for r in rec.rr)
    assert got == [
        (15432, f"198-18-1-2.db.default.svc.{Z}."),  # no hostname: CoreDNS's dashed IP
        (15432, f"db-0.db.default.svc.{Z}."),  # v4 and v6 endpoints with hostname db-0: once
    ]
    assert rdatas(rec, "ar") == ["198.18.1.1", "198.18.1.2", "fd00:18::1"]
    metrics = ask(zone, f"_metrics._tcp.db.default.svc.{Z}", "SRV")
    assert sorted(str(r.rdata.target) for r in metrics.rr) == [
        f"198-18-1-2.db.default.svc.{Z}.",
        f"db-0.db.default.svc.{Z}.",
    ]


def test_endpoints_sharing_a_hostname_give_each_record_once() -> None:
    """RFC 2181 §5: no duplicate RRs in an RRset (CoreDNS's `dup-name` case)."""
    z = Zone(
        build(
            [service("hdls", ip="None", ports=[{"name": "http", "port": 80}])],
            [
                slice_(
                    "hdls",
                    ports=[{"name": "http", "port": 80, "protocol": "TCP"}],
                    endpoints=[
                        endpoint("198.18.7.2"),
                        endpoint("198.18.7.4", hostname="dup-name"),
                        endpoint("198.18.7.5", hostname="dup-name"),
                    ],
                ),
                # The same pod listed again by a second slice (a slice being replaced).
                slice_(
                    "hdls",
                    name="hdls-second",
                    ports=[{"name": "http", "port": 80, "protocol": "TCP"}],
                    endpoints=[endpoint("198.18.7.4", hostname="dup-name")],
                ),
            ],
        ),
        Z,
    )
    rec = ask(z, f"_http._tcp.hdls.default.svc.{Z}", "SRV")
    assert sorted((r.rdata.port, str(r.rdata.target)) for r in rec.rr) == [
        (80, f"198-18-7-2.hdls.default.svc.{Z}."),
        (80, f"dup-name.hdls.default.svc.{Z}."),
    ]
    assert sorted((str(r.rname), str(r.rdata)) for r in rec.ar) == [
        (f"198-18-7-2.hdls.default.svc.{Z}.", "198.18.7.2"),
        (f"dup-name.hdls.default.svc.{Z}.", "198.18.7.4"),
        (f"dup-name.hdls.default.svc.{Z}.", "198.18.7.5"),
    ]
    assert rdatas(ask(z, f"dup-name.hdls.default.svc.{Z}")) == ["198.18.7.4", "198.18.7.5"]
    assert rdatas(ask(z, f"hdls.default.svc.{Z}")) == ["198.18.7.2", "198.18.7.4", "198.18.7.5"]


def test_a_model_repeating_an_address_still_gives_each_record_once() -> None:
    """The answerer does not lean on the parser's de-duplication: a model that lists an
    address twice (built by hand, or by a future source) gives A/AAAA, SRV and PTR once."""
    hdls = Service("default", "hdls", headless=True, ports=(PortSpec("p", "TCP", 80),))
    web = Service("default", "web", cluster_ips=("198.19.9.9", "198.19.9.9"))
    addr = EndpointAddress("fd00:18::7", hostname="h")
    ep = Endpoint("fd00:18::7", 80)
    model = make_model(
        {hdls.key: hdls, web.key: web},
        {hdls.key: ServiceEndpoints((addr, addr), MappingProxyType({("p", "TCP"): (ep, ep)}))},
    )
    z = Zone(model, Z)
    assert rdatas(ask(z, f"hdls.default.svc.{Z}", "AAAA")) == ["fd00:18::7"]
    assert rdatas(ask(z, f"h.hdls.default.svc.{Z}", "AAAA")) == ["fd00:18::7"]
    srv = ask(z, f"_p._tcp.hdls.default.svc.{Z}", "SRV")
    assert len(srv.rr) == 1 and rdatas(srv, "ar") == ["fd00:18::7"]
    assert rdatas(ask(z, f"web.default.svc.{Z}")) == ["198.19.9.9"]
    assert rdatas(ask(z, "9.9.19.198.in-addr.arpa", "PTR")) == [f"web.default.svc.{Z}."]
    v6 = ".".join(reversed("fd000018000000000000000000000007")) + ".ip6.arpa"
    assert rdatas(ask(z, v6, "PTR")) == [f"h.hdls.default.svc.{Z}."]


def test_endpoint_hostname_records(zone: Zone) -> None:
    assert rdatas(ask(zone, f"db-0.db.default.svc.{Z}")) == ["198.18.1.1"]
    assert rdatas(ask(zone, f"db-0.db.default.svc.{Z}", "AAAA")) == ["fd00:18::1"]
    assert rdatas(ask(zone, f"198-18-1-2.db.default.svc.{Z}")) == ["198.18.1.2"]
    assert_nxdomain(ask(zone, f"db-2.db.default.svc.{Z}"))  # not ready
    assert_nxdomain(ask(zone, f"nobody.db.default.svc.{Z}"))
    assert_nxdomain(ask(zone, f"198-18-4-1.web.default.svc.{Z}"))  # not headless


def test_ptr_of_headless_endpoint_names_its_hostname(zone: Zone) -> None:
    assert rdatas(ask(zone, "1.1.18.198.in-addr.arpa", "PTR")) == [f"db-0.db.default.svc.{Z}."]
    assert rdatas(ask(zone, "2.1.18.198.in-addr.arpa", "PTR")) == [
        f"198-18-1-2.db.default.svc.{Z}."
    ]
    v6 = ".".join(reversed("fd000018000000000000000000000001")) + ".ip6.arpa"
    assert rdatas(ask(zone, v6, "PTR")) == [f"db-0.db.default.svc.{Z}."]


def test_unknown_reverse_names_are_forwarded(zone: Zone) -> None:
    assert isinstance(answer(zone, question("3.1.18.198.in-addr.arpa", QTYPE.PTR)), Forward)
    assert isinstance(answer(zone, question("1.1.1.1.in-addr.arpa", QTYPE.PTR)), Forward)
    assert isinstance(answer(zone, question("19.198.in-addr.arpa", QTYPE.PTR)), Forward)


def test_known_reverse_name_with_other_type_is_nodata(zone: Zone) -> None:
    rec = ask(zone, "10.0.19.198.in-addr.arpa", "A")
    assert rec.header.rcode == 0 and not rec.rr and str(rec.auth[0].rname) == "in-addr.arpa."


# -- ExternalName (spec 2.5) -----------------------------------------------------------------


def test_external_name_is_a_cname_resolved_upstream(zone: Zone) -> None:
    res = answer(zone, question(f"ext.default.svc.{Z}", QTYPE.A))
    assert isinstance(res, Forward)
    assert res.name == (b"www", b"example", b"com") and res.qtype == QTYPE.A
    assert [str(rr.rdata) for rr in res.prefix] == ["www.example.com."]
    assert str(res.prefix[0].rname) == f"ext.default.svc.{Z}."


def test_external_name_cname_query_is_answered_locally(zone: Zone) -> None:
    rec = ask(zone, f"ext.default.svc.{Z}", "CNAME")
    assert [(QTYPE[r.rtype], str(r.rdata)) for r in rec.rr] == [("CNAME", "www.example.com.")]


def test_external_name_into_the_zone_is_chased_here(zone: Zone) -> None:
    rec = ask(zone, f"alias.default.svc.{Z}")
    assert [(QTYPE[r.rtype], str(r.rdata)) for r in rec.rr] == [
        ("CNAME", f"web.default.svc.{Z}."),
        ("A", "198.19.0.10"),
    ]


# -- the rest of the zone -------------------------------------------------------------------------


def test_dns_version_txt(zone: Zone) -> None:
    rec = ask(zone, f"dns-version.{Z}", "TXT")
    assert [str(r.rdata) for r in rec.rr] == [f'"{SCHEMA_VERSION}"'] and SCHEMA_VERSION == "1.1.0"


def test_soa_and_ns_at_the_apex(zone: Zone) -> None:
    soa = ask(zone, Z, "SOA").rr[0].rdata
    assert str(soa.mname) == f"ns.dns.{Z}." and soa.times[4] == 5
    assert [str(r.rdata) for r in ask(zone, Z, "NS").rr] == [f"ns.dns.{Z}."]
    assert_nodata(ask(zone, Z, "A"))


def test_nxdomain_for_names_that_do_not_exist(zone: Zone) -> None:
    for name in (
        f"nope.default.svc.{Z}",
        f"web.nope.svc.{Z}",
        f"x.y.web.default.svc.{Z}",
        f"web.default.svc.{Z}.default.svc.{Z}",  # search-path expansion inside the zone
        f"web.default.svc.{Z}.svc.{Z}",
        f"google.com.{Z}",
        f"x.{Z}",
    ):
        assert_nxdomain(ask(zone, name))


def test_empty_non_terminals_are_nodata(zone: Zone) -> None:
    """RFC 8020: NXDOMAIN would say nothing exists below them."""
    for name in (f"default.svc.{Z}", f"prod.svc.{Z}", f"svc.{Z}", f"pod.{Z}"):
        assert_nodata(ask(zone, name))


def test_no_name_that_exists_has_an_nxdomain_ancestor(zone: Zone, model: Model) -> None:
    """RFC 8020 over the whole fixture: every ancestor of a positive name exists."""
    names = [f"dns-version.{Z}"]
    for (ns, name), svc in model.services.items():
        names.append(f"{name}.{ns}.svc.{Z}")
        names += [f"_{p.name}._{p.protocol.lower()}.{name}.{ns}.svc.{Z}" for p in svc.ports]
    names.append(f"db-0.db.default.svc.{Z}")
    positive = 0
    for name in names:
        for qtype in ("A", "AAAA", "SRV", "TXT", "CNAME"):
            res = answer(zone, question(name, getattr(QTYPE, qtype)))
            if isinstance(res, Reply) and res.record.rr:
                positive += 1
                labels = name.split(".")
                for i in range(1, len(labels) - 1):
                    anc = ".".join(labels[i:])
                    assert ask(zone, anc).header.rcode == 0, f"{anc} is NXDOMAIN above {name}"
    assert positive > 10


def test_negative_answers_carry_the_soa_with_the_ttl_as_minimum(model: Model) -> None:
    z = Zone(model, Z, ttl=30)
    rec = ask(z, f"nope.default.svc.{Z}")
    soa = rec.auth[0]
    assert soa.ttl == 30 and soa.rdata.times[4] == 30 and str(soa.rname) == f"{Z}."


def test_ttl_is_configurable(model: Model) -> None:
    z = Zone(model, Z, ttl=42)
    assert {rr.ttl for rr in ask(z, f"_pg._tcp.db.default.svc.{Z}", "SRV").rr} == {42}
    assert ask(z, "10.0.19.198.in-addr.arpa", "PTR").rr[0].ttl == 42


def test_other_cluster_domain(model: Model) -> None:
    z = Zone(model, "k8s.example.net")
    assert rdatas(ask(z, "web.default.svc.k8s.example.net")) == ["198.19.0.10"]
    assert isinstance(answer(z, question(f"web.default.svc.{Z}", QTYPE.A)), Forward)


def test_deprecated_pod_records(zone: Zone) -> None:
    assert rdatas(ask(zone, f"198-18-1-7.default.pod.{Z}")) == ["198.18.1.7"]
    assert rdatas(ask(zone, f"fd00-18--7.default.pod.{Z}", "AAAA")) == ["fd00:18::7"]
    assert_nxdomain(ask(zone, f"not-an-ip.default.pod.{Z}"))
    assert_nxdomain(ask(zone, f"198-18-1-999.default.pod.{Z}"))
    assert_nxdomain(ask(zone, f"fe80--1%eth0.default.pod.{Z}", "AAAA"))  # no scope IDs
    assert_nodata(ask(zone, f"198-18-1-7.default.pod.{Z}", "AAAA"))


# -- ANY, forwarding and search paths ----------------------------------------------------------


def test_any_is_answered_minimally_never_forwarded(zone: Zone) -> None:
    """RFC 8482: one synthesized HINFO; no amplification, no upstream ANY."""
    for name in (f"web.default.svc.{Z}", "example.org"):
        rec = ask(zone, name, "ANY")
        assert [QTYPE[r.rtype] for r in rec.rr] == ["HINFO"]
        assert rec.rr[0].rdata.data == b"\x07RFC8482\x00"  # CPU "RFC8482", OS ""
    assert_nxdomain(ask(zone, f"nope.default.svc.{Z}", "ANY"))


def test_names_outside_the_zone_are_forwarded(zone: Zone) -> None:
    res = answer(zone, question("www.Example.ORG", QTYPE.AAAA))
    assert isinstance(res, Forward)
    assert res.name == (b"www", b"example", b"org") and res.qtype == QTYPE.AAAA


def test_search_path_expansion_of_a_cluster_name_is_nxdomain_locally(zone: Zone) -> None:
    for name in (
        f"web.default.svc.{Z}.example.com",  # exists in the zone: the client goes on to it
        f"nope.default.svc.{Z}.corp.example",  # does not: NXDOMAIN either way
        f"{Z}.example.com",
    ):
        rec = ask(zone, name)
        assert rec.header.rcode == 3 and rec.header.aa == 0
        assert str(rec.auth[0].rname) == f"{Z}."


def test_search_path_rule_only_for_host_search_domains_and_cluster_names(zone: Zone) -> None:
    for name in (
        f"web.default.svc.{Z}.other.org",  # not a search domain of this host
        "google.com.example.com",  # not a cluster name before the suffix
        "example.com",
        f"web.default.svc.{Z}x.example.com",
    ):
        assert isinstance(answer(zone, question(name, QTYPE.A)), Forward), name


def test_before_the_first_sync_cluster_names_get_servfail() -> None:
    z = Zone(None, Z)
    assert ask(z, f"web.default.svc.{Z}").header.rcode == 2
    assert isinstance(answer(z, question("example.org", QTYPE.A)), Forward)


# -- protocol -------------------------------------------------------------------------------------


def test_responses_are_not_answered(zone: Zone) -> None:
    q = question(f"web.default.svc.{Z}")
    q.header.qr = 1
    assert answer(zone, q) is None


def test_opcodes_other_than_query_are_notimp(zone: Zone) -> None:
    q = question(f"web.default.svc.{Z}")
    q.header.opcode = 4  # NOTIFY
    rec = answer(zone, q).record  # type: ignore[union-attr]
    assert rec.header.rcode == 4 and rec.header.opcode == 4


def test_zero_or_two_questions_are_formerr(zone: Zone) -> None:
    two = question(f"web.default.svc.{Z}")
    two.add_question(DNSQuestion("example.org"))
    none = DNSRecord(DNSHeader(id=7))
    for q in (two, none):
        rec = answer(zone, q).record  # type: ignore[union-attr]
        assert rec.header.rcode == 1 and rec.header.id == q.header.id


def test_edns_reply_carries_opt_with_do_copied(zone: Zone) -> None:
    plain = ask(zone, f"web.default.svc.{Z}")
    assert not [r for r in plain.ar if r.rtype == QTYPE.OPT]
    for do in (False, True):
        rec = ask(zone, f"web.default.svc.{Z}", edns=True, do=do)
        opt = [r for r in rec.ar if r.rtype == QTYPE.OPT]
        assert len(opt) == 1 and opt[0].rclass == 1232
        assert bool(opt[0].ttl & 0x8000) == do


def test_unknown_edns_version_is_badvers(zone: Zone) -> None:
    q = question(f"web.default.svc.{Z}")
    q.add_ar(EDNS0(version=1, udp_len=4096))
    rec = answer(zone, q).record  # type: ignore[union-attr]
    opt = next(r for r in rec.ar if r.rtype == QTYPE.OPT)
    assert (opt.ttl >> 24) << 4 | rec.header.rcode == 16 and not rec.rr


def test_two_opt_records_are_formerr(zone: Zone) -> None:
    q = question(f"web.default.svc.{Z}", edns=True)
    q.add_ar(EDNS0(udp_len=512))
    assert answer(zone, q).record.header.rcode == 1  # type: ignore[union-attr]


def test_other_classes_and_transfers_are_refused(zone: Zone) -> None:
    q = DNSRecord(DNSHeader(id=3), q=DNSQuestion("version.bind", QTYPE.TXT, CLASS.CH))
    assert answer(zone, q).record.header.rcode == 5  # type: ignore[union-attr]
    assert ask(zone, Z, "AXFR").header.rcode == 5
    assert ask(zone, Z, "IXFR").header.rcode == 5


# -- snapshots ------------------------------------------------------------------------------------


def test_answers_follow_a_new_snapshot() -> None:
    st = Store()
    st.replace("Service", [service("web")])
    st.replace("EndpointSlice", [])
    m1 = st.snapshot().model
    st.upsert("Service", service("web", ip="198.19.0.99"))
    st.upsert("Service", service("new"))
    m2 = st.snapshot().model
    assert rdatas(ask(Zone(m1, Z), f"web.default.svc.{Z}")) == ["198.19.0.10"]
    assert rdatas(ask(Zone(m2, Z), f"web.default.svc.{Z}")) == ["198.19.0.99"]
    assert_nxdomain(ask(Zone(m1, Z), f"new.default.svc.{Z}"))
    changed = model_changes(m1, m2)
    assert {("default", "web"), ("default", "new"), "default"} <= changed
    assert model_changes(m2, m2) == set()


def test_reply_dependencies_name_what_they_read(zone: Zone) -> None:
    res = answer(zone, question(f"web.default.svc.{Z}"))
    assert isinstance(res, Reply) and ("default", "web") in res.deps
    res = answer(zone, question(f"a.b.c.web.default.svc.{Z}.x"))
    assert isinstance(res, Forward) and res.deps == frozenset()


def test_dns_follows_the_model_for_semantics_that_do_not_change_it() -> None:
    """Leading-zero IPs are answered in their canonical form (as programmed); topology
    hints and LoadBalancer ipMode change which endpoint gets traffic, never DNS (the
    specification answers ClusterIPs and, for headless Services, every ready endpoint)."""
    m = build(
        [
            service("old", ip="198.19.000.010"),
            service("hl", ip="None", trafficDistribution="PreferSameNode"),
            service("lb", type="LoadBalancer")
            | {"status": {"loadBalancer": {"ingress": [{"ip": "198.19.9.9", "ipMode": "Proxy"}]}}},
        ],
        [
            slice_(
                "hl",
                endpoints=[
                    endpoint("198.18.001.001", hints={"forNodes": [{"name": "node-b"}]}),
                    endpoint("198.18.1.2", node="node-b", hints={"forNodes": [{"name": "x"}]}),
                ],
            ),
        ],
    )
    zone = Zone(m, Z, ttl=5)
    assert rdatas(ask(zone, f"old.default.svc.{Z}")) == ["198.19.0.10"]
    assert rdatas(ask(zone, f"hl.default.svc.{Z}")) == ["198.18.1.1", "198.18.1.2"]
    assert rdatas(ask(zone, f"lb.default.svc.{Z}")) == ["198.19.0.10"]
