"""Listener planning and diffing (pure), laptop address mapping and model rewrite."""

from __future__ import annotations

import ipaddress
import re

from proxy.endpoints.store import Store
from proxy.model import Model, PortSpec, Service, make_model
from proxy.userspace.addresses import pick_node_addresses
from proxy.userspace.laptop import (
    LaptopRewriter,
    laptop_address,
    laptop_addresses,
    rewrite_model_for_laptop,
    served_port,
)
from proxy.userspace.listeners import Plan, Target, diff_listeners, service_listeners

from .factories import endpoint, service, slice_

NODE = ("198.18.200.1",)


def svc(name="web", **kw) -> Service:
    kw.setdefault("cluster_ips", ("198.19.0.10",))
    kw.setdefault("ports", (PortSpec("http", "TCP", 80),))
    return Service("default", name, **kw)


def model_of(*services: Service) -> Model:
    return make_model({s.key: s for s in services}, {})


def test_clusterip_service_listens_on_its_ip_and_port_internal_scope():
    got, problems = service_listeners(svc(), NODE)
    assert got == {("198.19.0.10", 80, "TCP"): Target(("default", "web"), "http", "TCP", False, 4)}
    assert problems == ()


def test_nodeport_listens_on_every_node_address_with_external_scope():
    s = svc(type="NodePort", ports=(PortSpec("http", "TCP", 80, node_port=30080),))
    got, _ = service_listeners(s, ("198.18.200.1", "10.0.0.1"))
    assert set(got) == {
        ("198.19.0.10", 80, "TCP"),
        ("198.18.200.1", 30080, "TCP"),
        ("10.0.0.1", 30080, "TCP"),
    }
    assert got[("10.0.0.1", 30080, "TCP")].external
    assert not got[("198.19.0.10", 80, "TCP")].external


def test_nodeports_only_on_node_addresses_of_the_service_families():
    s = svc(type="NodePort", ports=(PortSpec("http", "TCP", 80, node_port=30080),))
    got, _ = service_listeners(s, ("198.18.200.1", "fd00:200::1"))
    assert ("fd00:200::1", 30080, "TCP") not in got
    dual = svc(
        "dual",
        type="NodePort",
        cluster_ips=("198.19.0.11", "fd00:19::11"),
        ports=(PortSpec("http", "TCP", 80, node_port=30081),),
    )
    got, _ = service_listeners(dual, ("198.18.200.1", "fd00:200::1"))
    assert got[("fd00:200::1", 30081, "TCP")].family == 6


def test_external_and_lb_ips_are_external_listeners():
    s = svc(
        type="LoadBalancer",
        external_ips=("203.0.113.5",),
        load_balancer_ips=("203.0.113.9",),
        ports=(PortSpec("", "UDP", 53),),
    )
    got, _ = service_listeners(s, ())
    assert got[("203.0.113.5", 53, "UDP")].external
    assert got[("203.0.113.9", 53, "UDP")].external
    assert got[("203.0.113.9", 53, "UDP")].label == "default/web"


def test_dual_stack_targets_are_per_family():
    s = svc(cluster_ips=("198.19.0.10", "fd00:19::10"))
    got, _ = service_listeners(s, ())
    assert got[("fd00:19::10", 80, "TCP")].family == 6
    assert got[("198.19.0.10", 80, "TCP")].family == 4


def test_unproxied_services_have_no_listeners():
    for s in (
        svc(headless=True, cluster_ips=()),
        svc(type="ExternalName", cluster_ips=(), external_name="example.com"),
        svc(proxy_name="someone-else"),
    ):
        assert service_listeners(s, NODE) == ({}, ())


def test_sctp_port_is_a_problem_not_a_listener():
    s = svc(ports=(PortSpec("a", "SCTP", 9), PortSpec("b", "TCP", 80)))
    got, problems = service_listeners(s, NODE)
    assert list(got) == [("198.19.0.10", 80, "TCP")]
    assert len(problems) == 1 and "SCTP" in problems[0]


def test_plan_conflict_first_service_by_key_wins_and_is_reported():
    a = svc("a", external_ips=("203.0.113.1",))
    b = svc("b", cluster_ips=("198.19.0.11",), external_ips=("203.0.113.1",))
    desired, problems = Plan().desired(model_of(b, a).services, NODE)
    assert desired[("203.0.113.1", 80, "TCP")].service == ("default", "a")
    assert desired[("198.19.0.11", 80, "TCP")].service == ("default", "b")
    assert [(k, "203.0.113.1:80/TCP" in m) for k, m in problems] == [(("default", "b"), True)]


def test_plan_memoizes_unchanged_services_and_follows_changes():
    plan = Plan()
    a, b = svc("a"), svc("b", cluster_ips=("198.19.0.11",))
    d1, _ = plan.desired(model_of(a, b).services, NODE)
    b2 = svc("b", cluster_ips=("198.19.0.12",))
    d2, _ = plan.desired(model_of(a, b2).services, NODE)
    assert ("198.19.0.11", 80, "TCP") in d1 and ("198.19.0.11", 80, "TCP") not in d2
    assert ("198.19.0.12", 80, "TCP") in d2
    d3, _ = plan.desired(model_of(a).services, NODE)
    assert set(d3) == {("198.19.0.10", 80, "TCP")}


def test_diff_adds_removes_and_retargets():
    t1 = Target(("default", "a"), "http", "TCP", False, 4)
    t2 = Target(("default", "a"), "web", "TCP", False, 4)
    k1, k2, k3 = ("198.19.0.1", 80, "TCP"), ("198.19.0.2", 80, "TCP"), ("198.19.0.3", 80, "TCP")
    d = diff_listeners({k1: t1, k2: t1}, {k2: t2, k3: t1})
    assert d.add == {k3: t1}
    assert d.remove == (k1,)
    assert d.retarget == {k2: t2}
    assert not diff_listeners({k1: t1}, {k1: t1})


def test_diff_from_store_snapshots_end_to_end():
    store = Store()
    store.replace("Service", [service("web"), service("api", ip="198.19.0.11")])
    store.replace("EndpointSlice", [slice_("web", endpoints=[endpoint("198.18.1.10")])])
    plan = Plan()
    d1, _ = plan.desired(store.snapshot().model.services, NODE)
    store.delete("Service", service("api", ip="198.19.0.11"))
    d2, _ = plan.desired(store.snapshot().model.services, NODE)
    diff = diff_listeners(d1, d2)
    assert diff.remove == (("198.19.0.11", 80, "TCP"),)
    assert not diff.add and not diff.retarget


def test_nodeport_addresses_filter():
    ips = ["127.0.0.1", "198.18.200.1", "10.1.2.3", "fd00:200::1"]
    assert pick_node_addresses(ips, ()) == ("10.1.2.3", "127.0.0.1", "198.18.200.1", "fd00:200::1")
    assert pick_node_addresses(ips, ("198.18.200.0/24",)) == ("198.18.200.1",)
    assert pick_node_addresses(ips, ("fd00:200::/64", "10.0.0.0/8")) == ("10.1.2.3", "fd00:200::1")


# -- laptop mode -------------------------------------------------------------------------------


def test_laptop_address_is_deterministic_loopback_avoiding_special_ones():
    addrs = {laptop_address(svc(f"s{i}")) for i in range(2000)}
    for a in addrs:
        ip = ipaddress.ip_address(a)
        assert ip in ipaddress.ip_network("127.0.0.0/8")
        o = [int(x) for x in a.split(".")]
        assert 1 <= o[1] <= 254 and 1 <= o[3] <= 254
    assert laptop_address(svc("web")) == laptop_address(svc("web"))
    assert laptop_address(svc("web")) != laptop_address(Service("other", "web"))
    assert re.fullmatch(r"127\.\d+\.\d+\.\d+", laptop_address(svc("web")))


def test_laptop_addresses_resolve_collisions_deterministically():
    # Find two Services whose first choices collide (searching a small space quickly).
    seen: dict[str, str] = {}
    pair = None
    for i in range(200000):
        a = laptop_address(svc(f"s{i}"))
        if a in seen:
            pair = (seen[a], f"s{i}")
            break
        seen[a] = f"s{i}"
    assert pair is not None
    services = {(s.namespace, s.name): s for s in (svc(pair[0]), svc(pair[1]), svc("web"))}
    got = laptop_addresses(services)
    assert len(set(got.values())) == 3
    first = min(pair)  # the key sorting first keeps its address
    assert got[("default", first)] == laptop_address(svc(first))
    assert got == laptop_addresses(dict(reversed(list(services.items()))))


def test_served_port_maps_privileged_ports_only():
    assert served_port(80, 1024) == 10080
    assert served_port(443, 1024, 8000) == 8443
    assert served_port(8080, 1024) == 8080
    assert served_port(80, 0) == 80  # root or CAP_NET_BIND_SERVICE


def test_rewrite_model_for_laptop_points_cluster_ips_at_served_addresses():
    model = model_of(
        svc("web", ports=(PortSpec("http", "TCP", 80), PortSpec("alt", "TCP", 8080))),
        svc("db", cluster_ips=("198.19.0.20",), internal_traffic_local=True),
        Service("default", "hl", headless=True, ports=(PortSpec("", "TCP", 80),)),
        Service("default", "ext", type="ExternalName", external_name="example.com"),
    )
    rw = LaptopRewriter(port_start=1024)
    out = rw.rewrite(model)
    web = out.services[("default", "web")]
    assert web.cluster_ips == (laptop_address(web),)
    assert [p.port for p in web.ports] == [10080, 8080]
    assert out.services[("default", "db")].internal_traffic_local is False
    assert out.services[("default", "hl")] is model.services[("default", "hl")]
    assert out.services[("default", "ext")] is model.services[("default", "ext")]
    assert rw.rewrite(model) is out  # same model in → same model out (DNS and data plane)


def test_rewrite_model_for_laptop_default_entry_point():
    out = rewrite_model_for_laptop(model_of(svc("web", ports=(PortSpec("", "TCP", 8080),))))
    s = out.services[("default", "web")]
    assert s.cluster_ips == (laptop_address(s),) and s.ports[0].port == 8080


def test_laptop_listeners_from_rewritten_model():
    s = svc("web", type="NodePort", ports=(PortSpec("http", "TCP", 80, node_port=30080),))
    out = LaptopRewriter(port_start=1024).rewrite(model_of(s))
    plan = Plan(any_family=True)
    desired, _ = plan.desired(out.services, ("127.0.0.1",))
    addr = laptop_address(s)
    assert set(desired) == {(addr, 10080, "TCP"), ("127.0.0.1", 30080, "TCP")}
    assert all(t.family == 0 for t in desired.values())


# -- localhost NodePorts ---------------------------------------------------------------------


def test_loopback_nodeports_serve_only_nodeports_with_the_cluster_policy():
    s = svc(
        type="NodePort",
        cluster_ips=("198.19.0.10", "fd00:19::a"),
        external_ips=("198.19.1.1",),
        ports=(PortSpec("http", "TCP", 80, 30080), PortSpec("dns", "UDP", 53, 30053)),
        external_traffic_local=True,
    )
    got, _ = service_listeners(s, ("127.0.0.1", "::1"), nodeports_only=True)
    key = ("default", "web")
    assert got == {
        ("127.0.0.1", 30080, "TCP"): Target(key, "http", "TCP", True, 4, from_node=True),
        ("::1", 30080, "TCP"): Target(key, "http", "TCP", True, 6, from_node=True),
        ("127.0.0.1", 30053, "UDP"): Target(key, "dns", "UDP", True, 4, from_node=True),
        ("::1", 30053, "UDP"): Target(key, "dns", "UDP", True, 6, from_node=True),
    }
    # In the userspace mode, loopback NodePorts come from the node too; others do not.
    full, _ = service_listeners(s, ("198.18.200.1", "127.0.0.1"))
    assert full[("127.0.0.1", 30080, "TCP")].from_node
    assert not full[("198.18.200.1", 30080, "TCP")].from_node
    assert ("198.19.1.1", 80, "TCP") in full


def test_loopback_addresses_per_mode_and_flags():
    from proxy.config import Config
    from proxy.userspace.localhost import loopback_addresses

    c = Config(hostname="n")
    assert loopback_addresses(c, (4, 6), nat=(4,)) == ("::1",)  # iptables mode
    assert loopback_addresses(c, (4, 6)) == ("127.0.0.1", "::1")  # nftables mode
    assert loopback_addresses(c, (4,), nat=(4,)) == ()
    c.localhost_nodeports = False
    assert loopback_addresses(c, (4, 6)) == ()
    c.localhost_nodeports = True
    c.nodeport_addresses = ("198.18.200.0/24", "fd00::/8")  # loopback of neither family
    assert loopback_addresses(c, (4, 6)) == ()
    c.nodeport_addresses = ("198.18.200.0/24", "::1/128")
    assert loopback_addresses(c, (4, 6)) == ("::1",)
    c.nodeport_addresses, c.nodeport_primary = (), True
    assert loopback_addresses(c, (4, 6)) == ()


def test_node_addresses_leave_loopback_out_when_the_flag_is_off():
    local = ["127.0.0.1", "::1", "198.18.200.1", "fd00:200::1"]
    assert pick_node_addresses(local, ()) == ("127.0.0.1", "198.18.200.1", "::1", "fd00:200::1")
    assert pick_node_addresses(local, (), loopback=False) == ("198.18.200.1", "fd00:200::1")


def test_primary_nodeport_addresses():
    from proxy.config import Config
    from proxy.model import NodeInfo
    from proxy.userspace.addresses import nodeport_cidrs

    c = Config(hostname="n", nodeport_primary=True)
    local = ["127.0.0.1", "198.18.200.1", "198.18.201.1", "fe80::1", "fd00:200::1"]
    assert nodeport_cidrs(c, NodeInfo(), local) == ("198.18.200.1/32", "fd00:200::1/128")
    node = NodeInfo(addresses=("198.18.201.1",))
    assert nodeport_cidrs(c, node, local) == ("198.18.201.1/32", "fd00:200::1/128")
    plain = Config(hostname="n", nodeport_addresses=("10.0.0.0/8",))
    assert nodeport_cidrs(plain, node, local) == ("10.0.0.0/8",)
