"""Raw API objects → model records: validation, defaults, merging of slices."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.endpoints.parse import BadObject, merge_slices, parse_node, parse_service, parse_slice
from proxy.model import NodeInfo, PortSpec
from proxy.selection import usable_endpoints
from tests.unit.factories import endpoint, service, slice_


def test_clusterip_service_defaults() -> None:
    svc = parse_service(service()).service
    assert svc.key == ("default", "web")
    assert svc.type == "ClusterIP"
    assert svc.cluster_ips == ("198.19.0.10",)
    assert svc.ports == (PortSpec("http", "TCP", 80, 0, 80),)
    assert svc.session_affinity_timeout == 0
    assert not svc.headless and not svc.external_ips and not svc.load_balancer_ips


def test_dual_stack_and_ipv6_normalized() -> None:
    svc = parse_service(service(ip=None, clusterIPs=["198.19.0.10", "FD00:19:0::000a"])).service
    assert svc.cluster_ips == ("198.19.0.10", "fd00:19::a")


def test_headless_and_externalname() -> None:
    assert parse_service(service(ip="None")).service.headless
    ext = parse_service(service(ip=None, type="ExternalName", externalName="Foo.Example.COM."))
    assert ext.service.external_name == "foo.example.com"
    assert ext.service.cluster_ips == ()


def test_session_affinity_and_policies() -> None:
    svc = parse_service(
        service(
            type="LoadBalancer",
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
            externalTrafficPolicy="Local",
            internalTrafficPolicy="Local",
            healthCheckNodePort=32000,
            loadBalancerSourceRanges=["10.0.0.0/8", "bogus"],
        )
        | {"status": {"loadBalancer": {"ingress": [{"ip": "198.19.100.1"}, {"hostname": "x"}]}}}
    )
    s = svc.service
    assert s.session_affinity_timeout == 60
    assert s.external_traffic_local and s.internal_traffic_local
    assert s.health_check_node_port == 32000
    assert s.load_balancer_ips == ("198.19.100.1",)
    assert s.load_balancer_source_ranges == ("10.0.0.0/8",)
    assert any("bogus" in p for p in svc.problems)


def test_affinity_default_timeout() -> None:
    s = parse_service(service(sessionAffinity="ClientIP")).service
    assert s.session_affinity_timeout == 10800


@pytest.mark.parametrize(
    "ports, reason",
    [
        ([{"port": 70000}], "out of range"),
        ([{"port": 80, "protocol": "ICMP"}], "unknown protocol"),
        ([{"port": "eighty"}], "not an integer"),
        ([{"name": "a", "port": 80}, {"name": "b", "port": 80}], "duplicate port"),
        ([{"name": "Bad_Name", "port": 80}], "invalid port name"),
    ],
)
def test_bad_ports_are_dropped_with_a_reason(ports: list, reason: str) -> None:
    parsed = parse_service(service(ports=ports))
    assert any(reason in p for p in parsed.problems), parsed.problems
    assert len(parsed.service.ports) < len(ports) or not parsed.service.ports


@pytest.mark.parametrize(
    "obj, reason",
    [
        (service(ip="300.1.1.1"), "not an IP"),
        (service(name="x" * 70), "invalid Service name"),
        (service(type="Weird"), "unknown Service type"),
        ({"kind": "Service"}, "no metadata"),
        ({"metadata": {"name": "a"}}, "no spec"),
        (service(ip=None, clusterIPs=["198.19.0.1", "198.19.0.2"]), "two addresses"),
        ("not-a-dict", "not an object"),
    ],
)
def test_unusable_services_raise(obj: object, reason: str) -> None:
    with pytest.raises(BadObject, match=reason):
        parse_service(obj)


def test_proxy_name_label_is_kept() -> None:
    obj = service()
    obj["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other"}
    assert parse_service(obj).service.proxy_name == "other"


def test_slice_conditions_semantics() -> None:
    sl = parse_slice(
        slice_(
            endpoints=[
                {"addresses": ["198.18.1.1"]},  # nil ready → ready
                endpoint("198.18.1.2", ready=False, serving=True, terminating=True),
                endpoint("198.18.1.3", ready=False),  # nil serving → same as ready
            ]
        )
    )
    e1, e2, e3 = sl.endpoints
    assert (e1.ready, e1.serving, e1.terminating) == (True, True, False)
    assert (e2.ready, e2.serving, e2.terminating) == (False, True, True)
    assert (e3.ready, e3.serving) == (False, False)


def test_slice_bad_parts_skipped() -> None:
    sl = parse_slice(
        slice_(
            endpoints=[endpoint("198.18.1.1"), endpoint("nonsense"), endpoint("fd00::1"), {}],
            ports=[{"name": "http", "port": 8080}, {"name": "x", "port": -1}],
        )
    )
    assert [e.ip for e in sl.endpoints] == ["198.18.1.1"]
    assert sl.ports == (("http", "TCP", 8080),)
    assert len(sl.problems) == 4


def test_slice_without_service_label_or_fqdn() -> None:
    obj = slice_()
    del obj["metadata"]["labels"]
    with pytest.raises(BadObject, match="service-name"):
        parse_slice(obj)
    with pytest.raises(BadObject, match="FQDN"):
        parse_slice(slice_(address_type="FQDN"))


def test_target_ref_names_the_pod_for_port_forward() -> None:
    sl = parse_slice(
        slice_(
            ns="shop",
            endpoints=[
                endpoint("198.18.1.1", targetRef={"kind": "Pod", "name": "web-7d9-x2", "uid": "u"}),
                endpoint("198.18.1.2", targetRef={"kind": "Pod", "namespace": "o", "name": "p"}),
                endpoint("198.18.1.3", targetRef={"kind": "Node", "name": "node-a"}),
                endpoint("198.18.1.4", targetRef={"kind": "Pod", "name": "Bad_Name"}),
                endpoint("198.18.1.5"),
            ],
        )
    )
    assert [e.pod for e in sl.endpoints] == ["shop/web-7d9-x2", "o/p", "", "", ""]
    bad = "endpoints[3].targetRef ignored: invalid Pod reference 'shop'/'Bad_Name'"
    assert sl.problems == (bad,)
    eps = merge_slices([sl]).ports[("http", "TCP")]
    assert [e.pod for e in eps] == ["shop/web-7d9-x2", "o/p", "", "", ""]


def test_trigger_time_annotation() -> None:
    sl = parse_slice(
        slice_(
            annotations={"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-02T03:04:05Z"}
        )
    )
    assert sl.trigger_time == 1767323045.0


def test_merge_dedupes_and_prefers_ready_copy() -> None:
    a = parse_slice(
        slice_(
            name="web-a", endpoints=[endpoint("198.18.1.2", ready=False), endpoint("198.18.1.1")]
        )
    )
    b = parse_slice(
        slice_(name="web-b", endpoints=[endpoint("198.18.1.2"), endpoint("198.18.1.3")])
    )
    se = merge_slices([b, a])
    eps = se.ports[("http", "TCP")]
    assert [(e.ip, e.port, e.ready) for e in eps] == [
        ("198.18.1.1", 8080, True),
        ("198.18.1.2", 8080, True),
        ("198.18.1.3", 8080, True),
    ]
    assert [x.ip for x in se.addresses] == ["198.18.1.1", "198.18.1.2", "198.18.1.3"]
    assert merge_slices([a, b]) == se  # order of arrival does not matter


def test_usable_endpoints_terminating_fallback_and_local() -> None:
    svc = parse_service(service()).service
    se = merge_slices(
        [
            parse_slice(
                slice_(
                    endpoints=[
                        endpoint(
                            "198.18.1.1", ready=False, serving=True, terminating=True, node="n1"
                        ),
                        endpoint(
                            "198.18.1.2", ready=False, serving=False, terminating=True, node="n1"
                        ),
                        endpoint("198.18.2.1", ready=True, node="n2"),
                    ]
                )
            )
        ]
    )
    eps = se.for_port(svc.ports[0])
    assert [e.ip for e in usable_endpoints(eps, "n2", local_only=False)] == ["198.18.2.1"]
    # On n1 only local ones count: none ready → the serving+terminating one.
    assert [e.ip for e in usable_endpoints(eps, "n1", local_only=True)] == ["198.18.1.1"]
    assert usable_endpoints(eps, "n3", local_only=True) == ()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(spec=json_values, status=json_values, eps=json_values, ports=json_values)
def test_parsers_never_crash_on_garbage(spec, status, eps, ports) -> None:
    """Any JSON shape either parses or raises BadObject, never anything else."""
    svc = {"metadata": {"name": "web", "namespace": "default"}, "spec": spec, "status": status}
    sl = slice_()
    sl["endpoints"], sl["ports"] = eps, ports
    for fn, obj in ((parse_service, svc), (parse_slice, sl)):
        with contextlib.suppress(BadObject):
            fn(obj)


def test_hints_parsed_and_shared() -> None:
    hinted = endpoint(
        "198.18.1.1",
        zone="zone-a",
        hints={"forZones": [{"name": "zone-b"}, {"name": "zone-a"}], "forNodes": [{"name": "n1"}]},
    )
    plain = endpoint("198.18.1.2", hints={"forZones": "garbage", "forNodes": [{"nom": "x"}]})
    sl = parse_slice(slice_(endpoints=[hinted, dict(hinted, addresses=["198.18.1.3"]), plain]))
    a, b, c = sl.endpoints
    assert a.zone_hints == ("zone-a", "zone-b") and a.node_hints == ("n1",)
    assert a.zone_hints is b.zone_hints  # one tuple per distinct hint set
    assert c.zone_hints == () and c.node_hints == ()
    merged = merge_slices([sl]).for_port(PortSpec("http", "TCP", 80))
    assert merged[0].zone_hints == ("zone-a", "zone-b") and merged[0].node_hints == ("n1",)


def test_leading_zero_ips_read_as_decimal_with_a_warning() -> None:
    p = parse_service(
        service(
            ip="198.19.0.010",
            type="LoadBalancer",
            externalIPs=["198.019.1.1"],
            loadBalancerSourceRanges=["010.0.0.0/8"],
        )
        | {"status": {"loadBalancer": {"ingress": [{"ip": "198.19.100.01"}]}}}
    )
    s = p.service
    assert s.cluster_ips == ("198.19.0.10",)
    assert s.external_ips == ("198.19.1.1",)
    assert s.load_balancer_ips == ("198.19.100.1",)
    assert s.load_balancer_source_ranges == ("10.0.0.0/8",)
    assert not p.problems
    assert len(p.warnings) == 4 and "'198.19.0.010' has leading zeros" in p.warnings[0]
    sl = parse_slice(slice_(endpoints=[endpoint("198.18.001.010")]))
    assert [e.ip for e in sl.endpoints] == ["198.18.1.10"] and len(sl.warnings) == 1
    # Still invalid: out of range, too few octets, not digits.
    for bad in ("198.19.0.256", "198.19.0", "198.19.0.1a", "0x1.0.0.1"):
        with pytest.raises(BadObject):
            parse_service(service(ip=bad))
    assert parse_service(service(ip="198.19.0.10")).warnings == ()


def test_load_balancer_ip_mode_proxy_is_not_short_circuited() -> None:
    ingress = [
        {"ip": "198.19.100.1", "ipMode": "VIP"},
        {"ip": "198.19.100.2", "ipMode": "Proxy"},
        {"ip": "198.19.100.3"},
    ]
    s = parse_service(
        service(type="LoadBalancer") | {"status": {"loadBalancer": {"ingress": ingress}}}
    ).service
    assert s.load_balancer_ips == ("198.19.100.1", "198.19.100.3")


def test_node_zone_and_node_ips() -> None:
    node = {
        "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {
            "addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "203.0.113.9"},
                {"type": "InternalIP", "address": "fd00:200::1"},
                {"type": "InternalIP", "address": "198.18.200.001"},
                {"type": "InternalIP", "address": "198.18.200.2"},
                {"type": "InternalIP", "address": "bogus"},
            ]
        },
    }
    info = parse_node(node)
    assert info.zone == "zone-a"
    # InternalIPs first, the first of each family, the first address leading.
    assert info.addresses == ("fd00:200::1", "198.18.200.1")
    assert info.ip(4) == "198.18.200.1" and info.ip(6) == "fd00:200::1"
    assert parse_node({"metadata": {"name": "n2"}}) == parse_node(None) == NodeInfo()
