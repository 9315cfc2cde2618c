"""Which conntrack entries are stale after a model change (pure)."""

from __future__ import annotations

from types import MappingProxyType

from proxy.iptables.conntrack import Entry, Flush, parse_list, reconcile, stale_flushes
from proxy.model import Endpoint, Model, PortSpec, Service, ServiceEndpoints, make_model

DNS = ("kube-system", "dns")


def svc(
    key=DNS,
    ip="198.19.0.10",
    proto="UDP",
    port=53,
    node_port=0,
    ext=(),
    lb=(),
    **kw,
) -> Service:
    return Service(
        key[0],
        key[1],
        type="NodePort" if node_port else "ClusterIP",
        cluster_ips=(ip,) if ip else (),
        ports=(PortSpec("dns", proto, port, node_port),),
        external_ips=ext,
        load_balancer_ips=lb,
        **kw,
    )


def eps(*ips: str, port=5353, proto="UDP", ready=True, serving=None) -> ServiceEndpoints:
    e = tuple(
        Endpoint(ip, port, ready=ready, serving=ready if serving is None else serving) for ip in ips
    )
    return ServiceEndpoints(ports=MappingProxyType({("dns", proto): e}))


def model(*pairs) -> Model:
    services = {s.key: s for s, _ in pairs}
    endpoints = {s.key: e for s, e in pairs if e is not None}
    return make_model(services, endpoints)


def test_newly_active_service_clears_all_its_frontends() -> None:
    s = svc(node_port=30053, ext=("203.0.113.7",), lb=("203.0.113.8",))
    old = model((s, None))
    new = model((s, eps("198.18.1.2")))
    assert stale_flushes(old, new) == sorted(
        [
            Flush(4, "udp", "198.19.0.10", 53),
            Flush(4, "udp", "203.0.113.7", 53),
            Flush(4, "udp", "203.0.113.8", 53),
            Flush(4, "udp", "", 30053),
        ]
    )


def test_removed_endpoint_clears_flows_dnated_to_it_only() -> None:
    s = svc(node_port=30053)
    old = model((s, eps("198.18.1.2", "198.18.1.3")))
    new = model((s, eps("198.18.1.3")))
    assert stale_flushes(old, new) == [
        Flush(4, "udp", "", 30053, "198.18.1.2", 5353),
        Flush(4, "udp", "198.19.0.10", 53, "198.18.1.2", 5353),
    ]


def test_endpoint_that_went_unready_is_stale_but_serving_terminating_is_not() -> None:
    s = svc()
    old = model((s, eps("198.18.1.2")))
    unready = model((s, eps("198.18.1.2", ready=False, serving=False)))
    assert stale_flushes(old, unready) == [Flush(4, "udp", "198.19.0.10", 53, "198.18.1.2", 5353)]
    terminating = model((s, eps("198.18.1.2", ready=False, serving=True)))
    assert stale_flushes(old, terminating) == []


def test_endpoint_port_change_is_stale() -> None:
    s = svc()
    old = model((s, eps("198.18.1.2", port=5353)))
    new = model((s, eps("198.18.1.2", port=5454)))
    assert stale_flushes(old, new) == [Flush(4, "udp", "198.19.0.10", 53, "198.18.1.2", 5353)]


def test_deleted_service_clears_its_frontends() -> None:
    s = svc(node_port=30053)
    old = model((s, eps("198.18.1.2")))
    new = model()
    assert stale_flushes(old, new) == [
        Flush(4, "udp", "", 30053, "198.18.1.2", 5353),
        Flush(4, "udp", "198.19.0.10", 53),
    ]


def test_cluster_ip_change_clears_the_old_ip() -> None:
    old = model((svc(ip="198.19.0.10"), eps("198.18.1.2")))
    new = model((svc(ip="198.19.0.11"), eps("198.18.1.2")))
    assert stale_flushes(old, new) == [Flush(4, "udp", "198.19.0.10", 53)]


def test_tcp_services_and_unchanged_services_need_nothing() -> None:
    t = svc(key=("default", "web"), proto="TCP", port=80)
    old = model((t, eps("198.18.1.2", proto="TCP")))
    new = model((t, eps("198.18.1.3", proto="TCP")))
    assert stale_flushes(old, new) == []
    same = model((svc(), eps("198.18.1.2")))
    assert stale_flushes(same, same) == []
    assert stale_flushes(None, model()) == []


def test_sctp_is_cleared_like_udp() -> None:
    s = svc(proto="SCTP")
    old = model((s, eps("198.18.1.2", proto="SCTP")))
    new = model((s, eps(proto="SCTP")))
    assert stale_flushes(old, new) == [Flush(4, "sctp", "198.19.0.10", 53, "198.18.1.2", 5353)]


def test_changed_limits_the_comparison() -> None:
    a, b = svc(), svc(key=("default", "b"), ip="198.19.0.11")
    old = model((a, eps("198.18.1.2")), (b, eps("198.18.1.3")))
    new = model((a, eps("198.18.1.4")), (b, eps("198.18.1.5")))
    only_b = stale_flushes(old, new, changed=[("default", "b")])
    assert only_b == [Flush(4, "udp", "198.19.0.11", 53, "198.18.1.3", 5353)]
    assert len(stale_flushes(old, new)) == 2


def test_ipv6_families_do_not_mix() -> None:
    s = Service(
        "default",
        "v6",
        cluster_ips=("198.19.0.20", "fd00:19::20"),
        ports=(PortSpec("dns", "UDP", 53),),
    )
    old = model((s, eps("198.18.1.2", "fd00:18::2")))
    new = model((s, eps()))
    assert stale_flushes(old, new) == [
        Flush(4, "udp", "198.19.0.20", 53, "198.18.1.2", 5353),
        Flush(6, "udp", "fd00:19::20", 53, "fd00:18::2", 5353),
    ]


def test_services_of_another_proxy_are_ignored() -> None:
    s = svc(proxy_name="other")
    assert stale_flushes(model((s, None)), model((s, eps("198.18.1.2")))) == []


def test_flush_argv() -> None:
    f = Flush(4, "udp", "198.19.0.10", 53, "198.18.1.2", 5353)
    assert f.argv() == [
        "-D",
        "-f",
        "ipv4",
        "-p",
        "udp",
        "--orig-dst",
        "198.19.0.10",
        "--orig-port-dst",
        "53",
        "--reply-src",
        "198.18.1.2",
        "--reply-port-src",
        "5353",
    ]
    assert Flush(6, "udp", "", 30053).argv() == [
        "-D",
        "-f",
        "ipv6",
        "-p",
        "udp",
        "--orig-port-dst",
        "30053",
    ]


LISTING = """\
udp      17 27 src=198.18.1.9 dst=198.19.0.10 sport=40000 dport=53 src=198.18.1.2 dst=198.18.1.9 sport=5353 dport=40000 mark=0 use=1
udp      17 20 src=198.18.1.9 dst=198.19.0.10 sport=40001 dport=53 [UNREPLIED] src=198.18.1.7 dst=198.18.1.9 sport=5353 dport=40001 mark=0 use=1
udp      17 20 src=198.18.200.9 dst=198.18.200.1 sport=40002 dport=30053 src=198.18.1.7 dst=198.18.200.1 sport=5353 dport=40002 mark=0 use=1
udp      17 20 src=198.18.200.9 dst=203.0.113.1 sport=40003 dport=30053 src=203.0.113.1 dst=198.18.200.9 sport=30053 dport=40003 mark=0 use=1
ipv6     10 udp      17 20 src=fd00:18::9 dst=fd00:19::10 sport=1 dport=53 src=fd00:18::2 dst=fd00:18::9 sport=5353 dport=1 mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 5 flow entries have been shown.
"""  # noqa: E501


def test_parse_list() -> None:
    entries = parse_list(LISTING)
    assert len(entries) == 5
    assert entries[0] == Entry("udp", 4, "198.19.0.10", 53, "198.18.1.2", 5353)
    assert entries[4] == Entry("udp", 6, "fd00:19::10", 53, "fd00:18::2", 5353)


def test_reconcile_removes_entries_not_pointing_at_a_serving_endpoint() -> None:
    m = model((svc(node_port=30053), eps("198.18.1.2")))
    assert reconcile(parse_list(LISTING), m) == [
        Flush(4, "udp", "", 30053, "198.18.1.7"),  # NodePort flow DNATed to a gone pod
        Flush(4, "udp", "198.19.0.10", 53, "198.18.1.7"),
    ]
    # the un-NATed flow to some other host's port 30053 survives; so does the good one


def test_reconcile_leaves_services_without_endpoints_alone() -> None:
    assert reconcile(parse_list(LISTING), model((svc(), None))) == []
