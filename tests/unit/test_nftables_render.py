"""The nftables renderer: expected rulesets for representative Services, and properties
over random models (every Service reachable with equal shares, nothing referenced that is
not declared, partial transactions converging to exactly what a full one makes)."""

from __future__ import annotations

import re
from collections import Counter
from types import MappingProxyType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.model import (
    Endpoint,
    Model,
    PortSpec,
    Service,
    ServiceEndpoints,
    make_model,
)
from proxy.nftables.render import NftConfig, is_picker, no_local_endpoints, render
from proxy.selection import usable_endpoints

from .nft_fake import FakeNft, Refused

NODE = "node-a"
CFG = NftConfig(family=4, node_name=NODE, cluster_cidrs=("198.18.0.0/16",))
CFG6 = NftConfig(family=6, node_name=NODE, cluster_cidrs=("fd00:18::/64",))


def ep(ip: str, port: int = 8080, node: str = NODE, **kw) -> Endpoint:
    return Endpoint(ip, port, node_name=node, **kw)


def eps(*e: Endpoint, name: str = "http", proto: str = "TCP") -> ServiceEndpoints:
    return ServiceEndpoints(ports=MappingProxyType({(name, proto): tuple(e)}))


def svc(name: str, ip: str, port: int = 80, *, node_port: int = 0, proto="TCP", **kw) -> Service:
    typ = kw.pop("type", "NodePort" if node_port else "ClusterIP")
    ports = (PortSpec("http", proto, port, node_port),)
    return Service("default", name, type=typ, cluster_ips=(ip,), ports=ports, **kw)


def model(*pairs: tuple[Service, ServiceEndpoints | None]) -> Model:
    return make_model({s.key: s for s, _ in pairs}, {s.key: e for s, e in pairs if e})


def elements(text: str, name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in re.finditer(rf"^add element ip6? kube-proxy {name} \{{ (.*) \}}$", text, re.M):
        for e in m.group(1).split(", "):
            k, _, v = e.partition(" : ")
            out[k] = v
    return out


def kernel(*texts: str) -> FakeNft:
    k = FakeNft()
    for t in texts:
        k.run(t)
    return k


# -- expected rulesets --------------------------------------------------------------------


def test_cluster_ip_is_map_elements_and_one_picker_chain():
    m = model((svc("web", "198.19.0.10"), eps(ep("198.18.1.2"), ep("198.18.1.10"))))
    text = render(m, CFG).text
    # kube-proxy's endpoint order ("ip:port" strings): 198.18.1.10 sorts before 198.18.1.2
    assert elements(text, "service-ips") == {"198.19.0.10 . tcp . 80": "goto pick-2"}
    assert elements(text, "service-endpoints") == {
        "198.19.0.10 . tcp . 80 . 0": "198.18.1.10 . 8080",
        "198.19.0.10 . tcp . 80 . 1": "198.18.1.2 . 8080",
    }
    assert elements(text, "ip-policies") == {"198.19.0.10 . tcp . 80": "jump cluster-ip-masquerade"}
    assert elements(text, "hairpin-endpoints") == {
        "198.18.1.10 . 198.18.1.10": "",
        "198.18.1.2 . 198.18.1.2": "",
    }
    assert (
        "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map "
        "@service-endpoints" in text
    )
    assert "ip saddr != 198.18.0.0/16 jump mark-for-masquerade" in text
    # a Service costs no chain of its own
    assert "default/web" not in text
    k = kernel(text)
    assert set(k.tables["ip"].chains) >= {"pick-2", "services", "nat-prerouting"}


def test_no_endpoints_rejects_and_local_policy_without_local_endpoints_drops():
    m = model(
        (svc("empty", "198.19.0.1", node_port=30001), None),
        (
            svc(
                "lb",
                "198.19.0.2",
                node_port=30002,
                type="LoadBalancer",
                load_balancer_ips=("198.19.100.2",),
                external_traffic_local=True,
            ),
            eps(ep("198.18.2.2", node="node-b")),
        ),
    )
    text = render(m, CFG).text
    assert elements(text, "no-endpoint-services") == {
        "198.19.0.1 . tcp . 80": "goto reject-chain",
        "198.19.100.2 . tcp . 80": "drop",
    }
    assert elements(text, "no-endpoint-nodeports") == {
        "tcp . 30001": "goto reject-chain",
        "tcp . 30002": "drop",
    }
    # pods and the node still reach the remote endpoint through the Cluster policy
    assert elements(text, "external-fallback") == {"198.19.100.2 . tcp . 80": "goto pick-1"}
    assert elements(text, "nodeport-fallback") == {"tcp . 30002": "goto pick-nodeport-1"}
    assert "198.19.100.2 . tcp . 80" not in elements(text, "service-ips")
    assert elements(text, "service-ips") == {"198.19.0.2 . tcp . 80": "goto pick-1"}


def test_no_local_endpoints_counted_as_kube_proxy_does():
    """sync_proxy_rules_no_local_endpoints_total: a Local policy with endpoints, none on
    this node (external: etp Local and externally reachable; internal: itp Local); a
    Service without any endpoint is not counted. Partial renders keep the count."""
    remote, here = eps(ep("198.18.2.2", node="node-b")), eps(ep("198.18.1.4"))
    m = model(
        (svc("empty", "198.19.0.1", node_port=30001, external_traffic_local=True), None),
        (svc("etp", "198.19.0.2", node_port=30002, external_traffic_local=True), remote),
        (svc("itp", "198.19.0.3", internal_traffic_local=True), remote),
        (svc("etp-here", "198.19.0.4", node_port=30004, external_traffic_local=True), here),
        (svc("etp-no-np", "198.19.0.5", external_traffic_local=True), remote),  # not external
    )
    full = render(m, CFG)
    assert no_local_endpoints(full.state) == (1, 1)
    m2 = model(
        *[(s, m.endpoints.get(s.key)) for s in m.services.values()],
        (svc("new", "198.19.0.9"), remote),
    )
    part = render(m2, CFG, changed=frozenset({("default", "new")}), previous=full.state)
    assert not part.full and no_local_endpoints(part.state) == (1, 1)


def test_external_traffic_local_uses_local_endpoints_and_keeps_the_source():
    s = svc(
        "lb",
        "198.19.0.2",
        node_port=30002,
        type="LoadBalancer",
        load_balancer_ips=("198.19.100.2",),
        external_traffic_local=True,
    )
    m = model((s, eps(ep("198.18.1.1"), ep("198.18.2.2", node="node-b"))))
    text = render(m, CFG).text
    assert elements(text, "service-ips")["198.19.100.2 . tcp . 80"] == "goto pick-local-1"
    assert elements(text, "service-local-endpoints") == {
        "198.19.100.2 . tcp . 80 . 0": "198.18.1.1 . 8080"
    }
    assert elements(text, "ip-policies")["198.19.100.2 . tcp . 80"] == "jump external-local"
    assert elements(text, "service-nodeports") == {"tcp . 30002": "goto pick-nodeport-local-1"}
    assert elements(text, "nodeport-policies") == {"tcp . 30002": "jump nodeport-local"}
    assert (
        "ip saddr 198.18.0.0/16 ip daddr . meta l4proto . th dport vmap @external-fallback" in text
    )
    assert "fib saddr type local jump mark-for-masquerade" in text


def test_internal_traffic_local_uses_only_this_nodes_endpoints():
    s = svc("itp", "198.19.0.3", internal_traffic_local=True)
    m = model((s, eps(ep("198.18.1.1"), ep("198.18.2.2", node="node-b"))))
    text = render(m, CFG).text
    assert elements(text, "service-ips") == {"198.19.0.3 . tcp . 80": "goto pick-local-1"}
    assert elements(text, "service-local-endpoints") == {
        "198.19.0.3 . tcp . 80 . 0": "198.18.1.1 . 8080"
    }
    m2 = model((s, eps(ep("198.18.2.2", node="node-b"))))
    assert elements(render(m2, CFG).text, "no-endpoint-services") == {
        "198.19.0.3 . tcp . 80": "drop"
    }


def test_source_ranges_merge_and_admit_the_lb_ip_when_the_node_is_in_range():
    s = svc(
        "fw",
        "198.19.0.4",
        type="LoadBalancer",
        load_balancer_ips=("198.19.100.4",),
        load_balancer_source_ranges=("10.0.0.0/8", "10.1.0.0/16", "198.18.200.0/24"),
    )
    cfg = NftConfig(
        family=4, node_name=NODE, cluster_cidrs=("198.18.0.0/16",), node_ip="198.18.200.1"
    )
    text = render(model((s, eps(ep("198.18.1.1")))), cfg).text
    assert elements(text, "firewall-ips") == {"198.19.100.4 . tcp . 80": ""}
    assert set(elements(text, "firewall-allow")) == {
        "198.19.100.4 . tcp . 80 . 10.0.0.0/8",
        "198.19.100.4 . tcp . 80 . 198.18.200.0/24",
        "198.19.100.4 . tcp . 80 . 198.19.100.4/32",
    }
    rule = "ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow drop"
    assert rule in text


def test_session_affinity_gets_kube_proxys_chains_and_sets():
    s = svc("aff", "198.19.0.5", session_affinity_timeout=600)
    text = render(model((s, eps(ep("198.18.1.1"), ep("198.18.1.2")))), CFG).text
    target = elements(text, "service-ips")["198.19.0.5 . tcp . 80"]
    assert re.fullmatch(r"goto service-[A-Z2-7]{8}-default/aff/tcp/http", target)
    assert "flags dynamic,timeout; timeout 600s;" in text
    assert re.search(r"update @affinity-\S+__198\.18\.1\.1/8080 \{ ip saddr \}", text)
    assert "meta l4proto tcp dnat to 198.18.1.2:8080" in text
    assert "numgen random mod 2 vmap { 0 : goto endpoint-" in text
    kernel(text)


def test_terminating_endpoints_are_used_only_when_none_is_ready():
    s = svc("t", "198.19.0.6")
    both = eps(ep("198.18.1.1"), ep("198.18.1.2", ready=False, serving=True, terminating=True))
    assert len(elements(render(model((s, both)), CFG).text, "service-endpoints")) == 1
    only = eps(ep("198.18.1.2", ready=False, serving=True, terminating=True))
    got = elements(render(model((s, only)), CFG).text, "service-endpoints")
    assert got == {"198.19.0.6 . tcp . 80 . 0": "198.18.1.2 . 8080"}


def test_ipv6_table_and_nodeport_addresses():
    s = Service(
        "default",
        "v6",
        type="NodePort",
        cluster_ips=("198.19.0.7", "fd00:19::7"),
        ports=(PortSpec("http", "UDP", 53, 30053),),
    )
    e = eps(ep("198.18.1.1"), ep("fd00:18::1"), proto="UDP")
    cfg = NftConfig(
        family=6,
        node_name=NODE,
        cluster_cidrs=("fd00:18::/64",),
        nodeport_addresses=("fd00:200::/64",),
        local_ips=("fd00:200::1", "198.18.200.1", "::1"),
    )
    text = render(model((s, e)), cfg).text
    assert text.startswith("add table ip6 kube-proxy\ndelete table ip6 kube-proxy\n")
    assert elements(text, "service-endpoints") == {"fd00:19::7 . udp . 53 . 0": "fd00:18::1 . 8080"}
    assert elements(text, "nodeport-ips") == {"fd00:200::1": ""}
    assert "ip6 daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports" in text
    assert "198.18" not in text.split("}\n", 1)[1].split("nodeport-ips")[0]
    kernel(text)


def test_other_proxies_headless_and_external_name_are_skipped():
    m = model(
        (svc("other", "198.19.0.8", proxy_name="foo"), eps(ep("198.18.1.1"))),
        (Service("default", "headless", headless=True), None),
        (Service("default", "ext", type="ExternalName", external_name="x.example"), None),
    )
    res = render(m, CFG)
    assert res.elements == 0
    assert "198.19.0.8" not in res.text


def test_partial_is_a_few_element_changes():
    s = svc("web", "198.19.0.10")
    old = render(model((s, eps(ep("198.18.1.1"), ep("198.18.1.2")))), CFG)
    new_model = model((s, eps(ep("198.18.1.1"), ep("198.18.1.3"))))
    part = render(new_model, CFG, changed=frozenset({s.key}), previous=old.state)
    assert not part.full
    assert part.text.splitlines() == [
        "delete element ip kube-proxy service-endpoints { 198.19.0.10 . tcp . 80 . 1 }",
        "delete element ip kube-proxy hairpin-endpoints { 198.18.1.2 . 198.18.1.2 }",
        "add element ip kube-proxy service-endpoints { 198.19.0.10 . tcp . 80 . 1 : "
        "198.18.1.3 . 8080 }",
        "add element ip kube-proxy hairpin-endpoints { 198.18.1.3 . 198.18.1.3 }",
    ]
    kernel(old.text, part.text)
    nothing = render(new_model, CFG, changed=frozenset(), previous=part.state)
    assert nothing.text == ""


def test_conflicting_cluster_ips_keep_the_first_service_and_hand_over():
    a = svc("a", "198.19.0.9")
    b = svc("b", "198.19.0.9")
    m = model((a, eps(ep("198.18.1.1"))), (b, eps(ep("198.18.1.2"), ep("198.18.1.3"))))
    full = render(m, CFG)
    assert elements(full.text, "service-ips") == {"198.19.0.9 . tcp . 80": "goto pick-1"}
    m2 = model((b, eps(ep("198.18.1.2"), ep("198.18.1.3"))))
    part = render(m2, CFG, changed=frozenset({a.key}), previous=full.state)
    k = kernel(full.text, part.text)
    assert k.tables["ip"].maps["service-ips"] == {"198.19.0.9 . tcp . 80": "goto pick-2"}


# -- properties ---------------------------------------------------------------------------

IPS = [f"198.18.{n}.{h}" for n in (1, 2) for h in range(1, 6)]
NODES = [NODE, "node-b"]


@st.composite
def services(draw, i: int):
    name = f"s{i}"
    n_ports = draw(st.integers(1, 2))
    ports = []
    for p in range(n_ports):
        proto = draw(st.sampled_from(["TCP", "UDP"]))
        node_port = draw(st.sampled_from([0, 30000 + i * 10 + p]))
        ports.append(PortSpec(f"p{p}", proto, 80 + p, node_port))
    lb = draw(st.booleans())
    svc_ = Service(
        "ns",
        name,
        type="LoadBalancer"
        if lb
        else ("NodePort" if any(p.node_port for p in ports) else "ClusterIP"),
        cluster_ips=(f"198.19.0.{i + 1}",),
        ports=tuple(ports),
        external_ips=(f"198.19.200.{i + 1}",) if draw(st.booleans()) else (),
        load_balancer_ips=(f"198.19.100.{i + 1}",) if lb else (),
        load_balancer_source_ranges=("10.0.0.0/8",) if lb and draw(st.booleans()) else (),
        session_affinity_timeout=draw(st.sampled_from([0, 0, 0, 300])),
        external_traffic_local=draw(st.booleans()),
        internal_traffic_local=draw(st.booleans()),
    )
    by_port = {}
    for p in ports:
        picked = draw(st.lists(st.sampled_from(IPS), max_size=5, unique=True))
        by_port[(p.name, p.protocol)] = tuple(
            Endpoint(
                ip,
                8080,
                ready=draw(st.booleans()) or draw(st.booleans()),
                serving=True,
                terminating=draw(st.booleans()),
                node_name=draw(st.sampled_from(NODES)),
            )
            for ip in picked
        )
    return svc_, ServiceEndpoints(ports=MappingProxyType(by_port))


@st.composite
def models(draw):
    n = draw(st.integers(0, 6))
    pairs = [draw(services(i)) for i in range(n)]
    return model(*pairs)


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _dispatch(k: FakeNft, key: str) -> list[str] | None:
    """Endpoints a packet to frontend `key` (a "ip . proto . port") can reach, by slot, or
    None when there is no dispatch for it."""
    t = k.tables["ip"]
    verdict = t.maps["service-ips"].get(key)
    if verdict is None:
        return None
    chain = verdict.split()[1]
    if is_picker(chain):
        n = int(chain.rsplit("-", 1)[1])
        emap = "service-local-endpoints" if "local" in chain else "service-endpoints"
        return [t.maps[emap][f"{key} . {i}"] for i in range(n)]
    rule = t.chains[chain][-1]  # affinity: numgen random mod n vmap { i : goto endpoint }
    out = []
    for target in re.findall(r"goto (\S+?)(?:,| \})", rule):
        dnat = t.chains[target][-1]
        out.append(dnat.rsplit(" ", 1)[1].replace(":", " . "))
    return out


@SETTINGS
@given(models())
def test_every_service_reachable_with_equal_shares(m):
    k = kernel(render(m, CFG).text)
    for key, s in m.services.items():
        for port in s.ports:
            fkey = f"{s.cluster_ips[0]} . {port.protocol.lower()} . {port.port}"
            raw = m.endpoints_for(s, port)
            want = usable_endpoints(raw, NODE, local_only=s.internal_traffic_local)
            got = _dispatch(k, fkey)
            if not want:
                assert got is None, key
                assert fkey in k.tables["ip"].maps["no-endpoint-services"]
                continue
            assert got is not None, f"{key} {port} not dispatched"
            # each usable endpoint exactly once: numgen mod n gives each slot 1/n
            assert Counter(got) == Counter(f"{e.ip} . {e.port}" for e in want), key


@SETTINGS
@given(models(), models(), st.data())
def test_partial_converges_to_the_full_ruleset(m1, m2, data):
    first = render(m1, CFG)
    k = kernel(first.text)
    keys = set(m1.services) | set(m2.services)
    # the store's change set: every Service whose records changed (maybe more)
    changed = {
        key
        for key in keys
        if m1.services.get(key) != m2.services.get(key)
        or m1.endpoints.get(key) != m2.endpoints.get(key)
    }
    extra = data.draw(st.sets(st.sampled_from(sorted(keys)))) if keys else set()
    part = render(m2, CFG, changed=frozenset(changed | extra), previous=first.state)
    assert not part.full
    k.run(part.text)
    fresh = kernel(render(m2, CFG).text)
    # affinity sets persist with their dynamic contents; everything else must be equal
    assert k.tables["ip"].maps == fresh.tables["ip"].maps
    assert k.tables["ip"].chains == fresh.tables["ip"].chains
    # and a wrong (empty) change set still converges: records are compared
    again = render(m1, CFG, changed=frozenset(), previous=part.state)
    k.run(again.text)
    assert k.tables["ip"].maps == kernel(first.text).tables["ip"].maps


def test_fake_kernel_refuses_what_nft_refuses():
    full = render(model((svc("web", "198.19.0.10"), eps(ep("198.18.1.1")))), CFG)
    k = kernel(full.text)
    try:
        k.run("delete element ip kube-proxy service-ips { 198.19.0.99 . tcp . 80 }\n")
    except Refused:
        pass
    else:
        raise AssertionError("delete of an absent element was accepted")
    try:
        k.run("delete chain ip kube-proxy pick-1\n")
    except Refused:
        pass
    else:
        raise AssertionError("delete of a non-empty, referenced chain was accepted")


def test_hairpin_only_for_this_nodes_endpoints():
    m = model((svc("web", "198.19.0.10"), eps(ep("198.18.1.1"), ep("198.18.2.1", node="node-b"))))
    assert elements(render(m, CFG).text, "hairpin-endpoints") == {"198.18.1.1 . 198.18.1.1": ""}


def test_nft_errors_become_one_line():
    from proxy.nftables.nft import first_error

    err = (
        "/dev/stdin:3:30-45: Error: Could not process rule: No such file or directory\n"
        "add element ip kube-proxy service-ips { 198.19.0.1 . tcp . 80 : goto pick-9 }\n"
        "                             ^^^^^^^^^^^^^^^^\n"
    )
    line = first_error(err, "")
    assert line.startswith("Could not process rule: No such file or directory (/dev/stdin:3")
    assert "goto pick-9" in line and "\n" not in line


def test_picker_chains_are_declared_by_full_renders_only():
    # nft 1.0.6 cannot add a rule naming the endpoint maps after they were created, so
    # partial transactions never create pickers: full renders declare 1..16 (or up to the
    # next power of two), and a count beyond them makes the render full.
    s = svc("web", "198.19.0.10")
    first = render(model((s, eps(ep("198.18.1.1")))), CFG)
    assert {f"pick-{n}" for n in range(1, 17)} <= set(kernel(first.text).tables["ip"].chains)
    many = eps(*(ep(f"198.18.1.{i}") for i in range(1, 21)))
    grown = render(model((s, many)), CFG, changed=frozenset({s.key}), previous=first.state)
    assert grown.full
    assert "pick-32" in kernel(grown.text).tables["ip"].chains
    back = render(model((s, eps(ep("198.18.1.1")))), CFG, changed=frozenset({s.key}),
                  previous=grown.state)  # fmt: skip
    assert not back.full and "chain" not in back.text
