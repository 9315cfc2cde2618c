"""The iptables renderer: exact rulesets for representative Services (kube-proxy's layout)."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from proxy.endpoints.parse import merge_slices, parse_service, parse_slice
from proxy.iptables import names
from proxy.iptables.render import (
    BASE_JUMPS,
    RenderConfig,
    render,
    saved_chains,
    state_from_chains,
)
from proxy.model import Endpoint, PortSpec, Service, ServiceEndpoints, make_model
from tests.unit.factories import endpoint, service, slice_

CFG = RenderConfig(family=4, node_name="node-a", cluster_cidrs=("198.18.0.0/16",))
HTTP = PortSpec("http", "TCP", 80)


def ep(ip: str, port: int = 8080, node: str = "node-a", *, ready: bool = True, **kw) -> Endpoint:
    return Endpoint(
        ip,
        port,
        ready=ready,
        serving=kw.get("serving", ready),
        terminating=kw.get("terminating", False),
        node_name=node,
    )


def eps(*endpoints: Endpoint, name: str = "http", proto: str = "TCP") -> ServiceEndpoints:
    return ServiceEndpoints((), MappingProxyType({(name, proto): tuple(endpoints)}))


def render_one(svc: Service, e: ServiceEndpoints | None, cfg: RenderConfig = CFG) -> str:
    m = make_model({svc.key: svc}, {svc.key: e} if e is not None else {})
    return render(m, cfg).text


def ruleset(
    *,
    f_services=(),
    f_external=(),
    f_nodeports=(),
    f_firewall=(),
    decls=(),
    services=(),
    nodeports=(),
    chains=(),
    nodeport_match="-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8",
    random_fully=True,
) -> str:
    """The whole restore text: fixed top-level rules around the Service-specific lines."""
    masq = "-j MASQUERADE --random-fully" if random_fully else "-j MASQUERADE"
    lines = [
        "*filter",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-EXTERNAL-SERVICES - [0:0]",
        ":KUBE-FORWARD - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-PROXY-FIREWALL - [0:0]",
        *f_services,
        *f_external,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        "-m mark --mark 0x4000/0x4000 -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        *f_nodeports,
        *f_firewall,
        "COMMIT",
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
        *decls,
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        + masq,
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        *services,
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must '
        f'be the last rule in this chain" {nodeport_match} -j KUBE-NODEPORTS',
        *nodeports,
        *chains,
        "COMMIT",
        "",
    ]
    return "\n".join(lines)


# -- names ------------------------------------------------------------------------------


def test_chain_names_match_kube_proxy() -> None:
    # Values from kube-proxy's own proxier tests.
    assert names.service_chain("ns1/svc1:p80", "TCP") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert names.service_chain("ns2/svc2:p8080", "tcp") == "KUBE-SVC-2VJB64SDSIJUP5T6"
    assert names.firewall_chain("ns5/svc5:p80", "tcp") == "KUBE-FW-NUKIZ6OKUXPJNT4C"
    assert names.external_chain("ns2/svc2:p80", "tcp") == "KUBE-EXT-GNZBNJ2PO5MGZ6GT"
    assert names.local_chain("ns2/svc2:p80", "tcp") == "KUBE-SVL-GNZBNJ2PO5MGZ6GT"
    sep = names.endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80")
    assert sep == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert names.endpoint_chain("ns5/svc5:p80", "TCP", "10.180.0.3:80") == (
        "KUBE-SEP-I77PXRDZVX7PMWMN"
    )
    assert names.is_service_chain("KUBE-SEP-SXIVWICOYRO3J4NJ")
    assert not names.is_service_chain("KUBE-EXTERNAL-SERVICES")
    assert not names.is_service_chain("KUBE-FORWARD")


def test_hash_encoding_matches_base32_for_many_inputs() -> None:
    import base64
    import hashlib

    for i in range(500):
        text = f"ns{i}/svc{i}:p{i}tcp10.0.{i % 256}.{i // 256}:{i}"
        want = base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()
        assert names._hash16(text) == want


# -- whole rulesets ---------------------------------------------------------------------


def test_cluster_ip_two_endpoints_literal() -> None:
    svc = Service("ns1", "web", cluster_ips=("198.19.0.10",), ports=(HTTP,))
    text = render_one(svc, eps(ep("198.18.1.10"), ep("198.18.2.10", node="node-b")))
    assert text == (
        "*filter\n"
        ":KUBE-SERVICES - [0:0]\n"
        ":KUBE-EXTERNAL-SERVICES - [0:0]\n"
        ":KUBE-FORWARD - [0:0]\n"
        ":KUBE-NODEPORTS - [0:0]\n"
        ":KUBE-PROXY-FIREWALL - [0:0]\n"
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark '
        "0x4000/0x4000 -j ACCEPT\n"
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        "--ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        "COMMIT\n"
        "*nat\n"
        ":KUBE-SERVICES - [0:0]\n"
        ":KUBE-NODEPORTS - [0:0]\n"
        ":KUBE-POSTROUTING - [0:0]\n"
        ":KUBE-MARK-MASQ - [0:0]\n"
        ":KUBE-SVC-4LVCYZMTA5CQO6SX - [0:0]\n"
        ":KUBE-SEP-XDPDFWE2P7FYZVAN - [0:0]\n"
        ":KUBE-SEP-LDSLEV6NT2SBC47F - [0:0]\n"
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n"
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n"
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully\n"
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n"
        '-A KUBE-SERVICES -m comment --comment "ns1/web:http cluster IP" -m tcp -p tcp '
        "-d 198.19.0.10 --dport 80 -j KUBE-SVC-4LVCYZMTA5CQO6SX\n"
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be '
        'the last rule in this chain" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 '
        "-j KUBE-NODEPORTS\n"
        '-A KUBE-SVC-4LVCYZMTA5CQO6SX -m comment --comment "ns1/web:http cluster IP" -m tcp '
        "-p tcp -d 198.19.0.10 --dport 80 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ\n"
        '-A KUBE-SVC-4LVCYZMTA5CQO6SX -m comment --comment "ns1/web:http -> 198.18.1.10:8080" '
        "-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-XDPDFWE2P7FYZVAN\n"
        '-A KUBE-SVC-4LVCYZMTA5CQO6SX -m comment --comment "ns1/web:http -> 198.18.2.10:8080" '
        "-j KUBE-SEP-LDSLEV6NT2SBC47F\n"
        "-A KUBE-SEP-XDPDFWE2P7FYZVAN -m comment --comment ns1/web:http -s 198.18.1.10 "
        "-j KUBE-MARK-MASQ\n"
        "-A KUBE-SEP-XDPDFWE2P7FYZVAN -m comment --comment ns1/web:http -m tcp -p tcp -j DNAT "
        "--to-destination 198.18.1.10:8080\n"
        "-A KUBE-SEP-LDSLEV6NT2SBC47F -m comment --comment ns1/web:http -s 198.18.2.10 "
        "-j KUBE-MARK-MASQ\n"
        "-A KUBE-SEP-LDSLEV6NT2SBC47F -m comment --comment ns1/web:http -m tcp -p tcp -j DNAT "
        "--to-destination 198.18.2.10:8080\n"
        "COMMIT\n"
    )


def test_nodeport() -> None:
    svc = Service(
        "ns1",
        "np",
        type="NodePort",
        cluster_ips=("198.19.0.11",),
        ports=(PortSpec("http", "TCP", 80, 30080),),
    )
    s, x, e = "KUBE-SVC-YLAE7TD4E22QEDEQ", "KUBE-EXT-YLAE7TD4E22QEDEQ", "KUBE-SEP-HLXHUXVF5OXULYXA"
    assert render_one(svc, eps(ep("198.18.1.11"))) == ruleset(
        decls=[f":{x} - [0:0]", f":{s} - [0:0]", f":{e} - [0:0]"],
        services=[
            '-A KUBE-SERVICES -m comment --comment "ns1/np:http cluster IP" -m tcp -p tcp '
            f"-d 198.19.0.11 --dport 80 -j {s}"
        ],
        nodeports=[
            f"-A KUBE-NODEPORTS -m comment --comment ns1/np:http -m tcp -p tcp --dport 30080 -j {x}"
        ],
        chains=[
            f'-A {x} -m comment --comment "masquerade traffic for ns1/np:http external '
            'destinations" -j KUBE-MARK-MASQ',
            f"-A {x} -j {s}",
            f'-A {s} -m comment --comment "ns1/np:http cluster IP" -m tcp -p tcp -d 198.19.0.11 '
            "--dport 80 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
            f'-A {s} -m comment --comment "ns1/np:http -> 198.18.1.11:8080" -j {e}',
            f"-A {e} -m comment --comment ns1/np:http -s 198.18.1.11 -j KUBE-MARK-MASQ",
            f"-A {e} -m comment --comment ns1/np:http -m tcp -p tcp -j DNAT "
            "--to-destination 198.18.1.11:8080",
        ],
    )


def test_load_balancer_with_source_ranges() -> None:
    svc = Service(
        "ns1",
        "lb",
        type="LoadBalancer",
        cluster_ips=("198.19.0.12",),
        ports=(PortSpec("http", "TCP", 80, 30081),),
        load_balancer_ips=("198.19.200.1",),
        load_balancer_source_ranges=("203.0.113.0/25", "198.18.0.0/16"),
    )
    # The node's IP is inside a source range: the VIP looping back is let in too.
    cfg = RenderConfig(
        family=4, node_name="node-a", cluster_cidrs=("198.18.0.0/16",), node_ip="203.0.113.5"
    )
    h = "WGAMYJBFIGMUNUZG"
    s, x, fw, e = f"KUBE-SVC-{h}", f"KUBE-EXT-{h}", f"KUBE-FW-{h}", "KUBE-SEP-ILS525YU3RZ3TNKS"
    c = '-m comment --comment "ns1/lb:http loadbalancer IP"'
    assert render_one(svc, eps(ep("198.18.1.12")), cfg) == ruleset(
        f_firewall=[
            "-A KUBE-PROXY-FIREWALL -m comment --comment "
            f'"ns1/lb:http traffic not accepted by {fw}" -m tcp -p tcp -d 198.19.200.1 '
            "--dport 80 -j DROP"
        ],
        decls=[f":{x} - [0:0]", f":{fw} - [0:0]", f":{s} - [0:0]", f":{e} - [0:0]"],
        services=[
            '-A KUBE-SERVICES -m comment --comment "ns1/lb:http cluster IP" -m tcp -p tcp '
            f"-d 198.19.0.12 --dport 80 -j {s}",
            f"-A KUBE-SERVICES {c} -m tcp -p tcp -d 198.19.200.1 --dport 80 -j {fw}",
        ],
        nodeports=[
            f"-A KUBE-NODEPORTS -m comment --comment ns1/lb:http -m tcp -p tcp --dport 30081 -j {x}"
        ],
        chains=[
            f'-A {x} -m comment --comment "masquerade traffic for ns1/lb:http external '
            'destinations" -j KUBE-MARK-MASQ',
            f"-A {x} -j {s}",
            f"-A {fw} {c} -s 203.0.113.0/25 -j {x}",
            f"-A {fw} {c} -s 198.18.0.0/16 -j {x}",
            f"-A {fw} {c} -s 198.19.200.1 -j {x}",
            f'-A {fw} -m comment --comment "other traffic to ns1/lb:http will be dropped by '
            'KUBE-PROXY-FIREWALL"',
            f'-A {s} -m comment --comment "ns1/lb:http cluster IP" -m tcp -p tcp -d 198.19.0.12 '
            "--dport 80 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
            f'-A {s} -m comment --comment "ns1/lb:http -> 198.18.1.12:8080" -j {e}',
            f"-A {e} -m comment --comment ns1/lb:http -s 198.18.1.12 -j KUBE-MARK-MASQ",
            f"-A {e} -m comment --comment ns1/lb:http -m tcp -p tcp -j DNAT "
            "--to-destination 198.18.1.12:8080",
        ],
    )


def test_source_range_zero_cidr_means_no_firewall() -> None:
    svc = Service(
        "ns1",
        "lb",
        type="LoadBalancer",
        cluster_ips=("198.19.0.12",),
        ports=(HTTP,),
        load_balancer_ips=("198.19.200.1",),
        load_balancer_source_ranges=("203.0.113.0/25", "0.0.0.0/0"),
    )
    text = render_one(svc, eps(ep("198.18.1.12")))
    assert "KUBE-FW-" not in text
    assert "-d 198.19.200.1 --dport 80 -j KUBE-EXT-WGAMYJBFIGMUNUZG" in text


def test_external_ips_of_this_family_only() -> None:
    svc = Service(
        "ns1",
        "ext",
        cluster_ips=("198.19.0.13",),
        ports=(HTTP,),
        external_ips=("198.19.100.1", "fd00:19::100"),
    )
    h = "7IC6DOZC7IOBMWQF"
    s, x, e = f"KUBE-SVC-{h}", f"KUBE-EXT-{h}", "KUBE-SEP-KQTI6SX4WEIJ2SSX"
    assert render_one(svc, eps(ep("198.18.1.13"))) == ruleset(
        decls=[f":{x} - [0:0]", f":{s} - [0:0]", f":{e} - [0:0]"],
        services=[
            '-A KUBE-SERVICES -m comment --comment "ns1/ext:http cluster IP" -m tcp -p tcp '
            f"-d 198.19.0.13 --dport 80 -j {s}",
            '-A KUBE-SERVICES -m comment --comment "ns1/ext:http external IP" -m tcp -p tcp '
            f"-d 198.19.100.1 --dport 80 -j {x}",
        ],
        chains=[
            f'-A {x} -m comment --comment "masquerade traffic for ns1/ext:http external '
            'destinations" -j KUBE-MARK-MASQ',
            f"-A {x} -j {s}",
            f'-A {s} -m comment --comment "ns1/ext:http cluster IP" -m tcp -p tcp '
            "-d 198.19.0.13 --dport 80 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
            f'-A {s} -m comment --comment "ns1/ext:http -> 198.18.1.13:8080" -j {e}',
            f"-A {e} -m comment --comment ns1/ext:http -s 198.18.1.13 -j KUBE-MARK-MASQ",
            f"-A {e} -m comment --comment ns1/ext:http -m tcp -p tcp -j DNAT "
            "--to-destination 198.18.1.13:8080",
        ],
    )


def test_no_endpoints_rejects_every_frontend() -> None:
    svc = Service(
        "ns1",
        "dead",
        type="LoadBalancer",
        cluster_ips=("198.19.0.14",),
        ports=(PortSpec("http", "TCP", 80, 30082),),
        external_ips=("198.19.100.2",),
        load_balancer_ips=("198.19.200.2",),
    )
    c = '-m comment --comment "ns1/dead:http has no endpoints"'
    expected = ruleset(
        f_services=[f"-A KUBE-SERVICES {c} -m tcp -p tcp -d 198.19.0.14 --dport 80 -j REJECT"],
        f_external=[
            f"-A KUBE-EXTERNAL-SERVICES {c} -m tcp -p tcp -d 198.19.100.2 --dport 80 -j REJECT",
            f"-A KUBE-EXTERNAL-SERVICES {c} -m tcp -p tcp -d 198.19.200.2 --dport 80 -j REJECT",
            f"-A KUBE-EXTERNAL-SERVICES {c} -m addrtype --dst-type LOCAL -m tcp -p tcp "
            "--dport 30082 -j REJECT",
        ],
    )
    # An endpoint that is neither ready nor serving-terminating does not count.
    assert render_one(svc, eps(ep("198.18.1.14", ready=False))) == expected
    assert render_one(svc, None) == expected


def test_session_affinity() -> None:
    svc = Service(
        "ns1",
        "sticky",
        cluster_ips=("198.19.0.15",),
        ports=(HTTP,),
        session_affinity_timeout=10800,
    )
    s = "KUBE-SVC-R35JJSBTJKGQA2QM"
    e1, e2, e3 = (
        "KUBE-SEP-UK64STUGXTV627FZ",
        "KUBE-SEP-U27JNIGFA7ZBCYDG",
        "KUBE-SEP-XHS5KDNZAZRNWNGM",
    )
    text = render_one(svc, eps(ep("198.18.1.15"), ep("198.18.1.16"), ep("198.18.1.17")))
    chains = [
        f'-A {s} -m comment --comment "ns1/sticky:http cluster IP" -m tcp -p tcp '
        "-d 198.19.0.15 --dport 80 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
    ]
    for ip, sep in (("198.18.1.15", e1), ("198.18.1.16", e2), ("198.18.1.17", e3)):
        chains.append(
            f'-A {s} -m comment --comment "ns1/sticky:http -> {ip}:8080" -m recent --name {sep} '
            f"--rcheck --seconds 10800 --reap -j {sep}"
        )
    chains += [
        f'-A {s} -m comment --comment "ns1/sticky:http -> 198.18.1.15:8080" -m statistic '
        f"--mode random --probability 0.3333333333 -j {e1}",
        f'-A {s} -m comment --comment "ns1/sticky:http -> 198.18.1.16:8080" -m statistic '
        f"--mode random --probability 0.5000000000 -j {e2}",
        f'-A {s} -m comment --comment "ns1/sticky:http -> 198.18.1.17:8080" -j {e3}',
    ]
    for ip, sep in (("198.18.1.15", e1), ("198.18.1.16", e2), ("198.18.1.17", e3)):
        chains += [
            f"-A {sep} -m comment --comment ns1/sticky:http -s {ip} -j KUBE-MARK-MASQ",
            f"-A {sep} -m comment --comment ns1/sticky:http -m recent --name {sep} --set "
            f"-m tcp -p tcp -j DNAT --to-destination {ip}:8080",
        ]
    assert text == ruleset(
        decls=[f":{c} - [0:0]" for c in (s, e1, e2, e3)],
        services=[
            '-A KUBE-SERVICES -m comment --comment "ns1/sticky:http cluster IP" -m tcp -p tcp '
            f"-d 198.19.0.15 --dport 80 -j {s}"
        ],
        chains=chains,
    )


ETP_SVC = Service(
    "ns1",
    "local",
    type="LoadBalancer",
    cluster_ips=("198.19.0.16",),
    ports=(PortSpec("http", "TCP", 80, 30083),),
    load_balancer_ips=("198.19.200.3",),
    external_traffic_local=True,
    health_check_node_port=32000,
)
ETP_H = "7YWVY6I7R6FA3Z73"
ETP_COMMON = {
    "f_nodeports": [
        '-A KUBE-NODEPORTS -m comment --comment "ns1/local:http health check node port" '
        "-m tcp -p tcp --dport 32000 -j ACCEPT"
    ],
    "services": [
        '-A KUBE-SERVICES -m comment --comment "ns1/local:http cluster IP" -m tcp -p tcp '
        f"-d 198.19.0.16 --dport 80 -j KUBE-SVC-{ETP_H}",
        '-A KUBE-SERVICES -m comment --comment "ns1/local:http loadbalancer IP" -m tcp -p tcp '
        f"-d 198.19.200.3 --dport 80 -j KUBE-EXT-{ETP_H}",
    ],
    "nodeports": [
        "-A KUBE-NODEPORTS -m comment --comment ns1/local:http -m tcp -p tcp --dport 30083 "
        f"-j KUBE-EXT-{ETP_H}"
    ],
}


def _etp_ext_rules(x: str, s: str) -> list[str]:
    return [
        f'-A {x} -m comment --comment "pod traffic for ns1/local:http external destinations" '
        f"-s 198.18.0.0/16 -j {s}",
        f'-A {x} -m comment --comment "masquerade LOCAL traffic for ns1/local:http external '
        'destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ',
        f'-A {x} -m comment --comment "route LOCAL traffic for ns1/local:http external '
        f'destinations" -m addrtype --src-type LOCAL -j {s}',
    ]


def test_external_traffic_policy_local() -> None:
    s, x, svl = f"KUBE-SVC-{ETP_H}", f"KUBE-EXT-{ETP_H}", f"KUBE-SVL-{ETP_H}"
    here, there = "KUBE-SEP-5QIZ5WHXIHJJNNFY", "KUBE-SEP-QCXCPGXN7TRO222S"
    text = render_one(ETP_SVC, eps(ep("198.18.1.18"), ep("198.18.2.18", node="node-b")))
    assert text == ruleset(
        **ETP_COMMON,
        decls=[f":{c} - [0:0]" for c in (x, s, svl, here, there)],
        chains=[
            *_etp_ext_rules(x, s),
            f"-A {x} -j {svl}",  # outside traffic: this node's endpoints only
            f'-A {s} -m comment --comment "ns1/local:http cluster IP" -m tcp -p tcp '
            "-d 198.19.0.16 --dport 80 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
            f'-A {s} -m comment --comment "ns1/local:http -> 198.18.1.18:8080" -m statistic '
            f"--mode random --probability 0.5000000000 -j {here}",
            f'-A {s} -m comment --comment "ns1/local:http -> 198.18.2.18:8080" -j {there}',
            f'-A {svl} -m comment --comment "ns1/local:http -> 198.18.1.18:8080" -j {here}',
            f"-A {here} -m comment --comment ns1/local:http -s 198.18.1.18 -j KUBE-MARK-MASQ",
            f"-A {here} -m comment --comment ns1/local:http -m tcp -p tcp -j DNAT "
            "--to-destination 198.18.1.18:8080",
            f"-A {there} -m comment --comment ns1/local:http -s 198.18.2.18 -j KUBE-MARK-MASQ",
            f"-A {there} -m comment --comment ns1/local:http -m tcp -p tcp -j DNAT "
            "--to-destination 198.18.2.18:8080",
        ],
    )


def test_external_traffic_policy_local_without_local_endpoints() -> None:
    s, x, there = f"KUBE-SVC-{ETP_H}", f"KUBE-EXT-{ETP_H}", "KUBE-SEP-QCXCPGXN7TRO222S"
    c = '-m comment --comment "ns1/local:http has no local endpoints"'
    text = render_one(ETP_SVC, eps(ep("198.18.2.18", node="node-b")))
    assert text == ruleset(
        **ETP_COMMON,
        f_external=[
            f"-A KUBE-EXTERNAL-SERVICES {c} -m tcp -p tcp -d 198.19.200.3 --dport 80 -j DROP",
            f"-A KUBE-EXTERNAL-SERVICES {c} -m addrtype --dst-type LOCAL -m tcp -p tcp "
            "--dport 30083 -j DROP",
        ],
        decls=[f":{c} - [0:0]" for c in (x, s, there)],
        chains=[
            *_etp_ext_rules(x, s),  # pods and the node still get through, no jump to SVL
            f'-A {s} -m comment --comment "ns1/local:http cluster IP" -m tcp -p tcp '
            "-d 198.19.0.16 --dport 80 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
            f'-A {s} -m comment --comment "ns1/local:http -> 198.18.2.18:8080" -j {there}',
            f"-A {there} -m comment --comment ns1/local:http -s 198.18.2.18 -j KUBE-MARK-MASQ",
            f"-A {there} -m comment --comment ns1/local:http -m tcp -p tcp -j DNAT "
            "--to-destination 198.18.2.18:8080",
        ],
    )


def test_internal_traffic_policy_local() -> None:
    svc = Service(
        "ns1", "itp", cluster_ips=("198.19.0.17",), ports=(HTTP,), internal_traffic_local=True
    )
    svl, e = "KUBE-SVL-MIVVRWFFZDYEWVSR", "KUBE-SEP-P4EOOMJ54VRTGQUY"
    text = render_one(svc, eps(ep("198.18.1.19"), ep("198.18.2.19", node="node-b")))
    assert text == ruleset(
        decls=[f":{svl} - [0:0]", f":{e} - [0:0]"],
        services=[
            '-A KUBE-SERVICES -m comment --comment "ns1/itp:http cluster IP" -m tcp -p tcp '
            f"-d 198.19.0.17 --dport 80 -j {svl}"
        ],
        chains=[
            f'-A {svl} -m comment --comment "ns1/itp:http cluster IP" -m tcp -p tcp '
            "-d 198.19.0.17 --dport 80 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
            f'-A {svl} -m comment --comment "ns1/itp:http -> 198.18.1.19:8080" -j {e}',
            f"-A {e} -m comment --comment ns1/itp:http -s 198.18.1.19 -j KUBE-MARK-MASQ",
            f"-A {e} -m comment --comment ns1/itp:http -m tcp -p tcp -j DNAT "
            "--to-destination 198.18.1.19:8080",
        ],
    )
    # No endpoint on this node: ClusterIP traffic is dropped, not rejected.
    assert render_one(svc, eps(ep("198.18.2.19", node="node-b"))) == ruleset(
        f_services=[
            '-A KUBE-SERVICES -m comment --comment "ns1/itp:http has no local endpoints" '
            "-m tcp -p tcp -d 198.19.0.17 --dport 80 -j DROP"
        ]
    )


def test_terminating_fallback() -> None:
    svc = Service("ns1", "term", cluster_ips=("198.19.0.18",), ports=(HTTP,))
    s, e = "KUBE-SVC-MLH35PRU4E32VYVS", "KUBE-SEP-AJW2ABH5I5MOWLOS"
    text = render_one(
        svc,
        eps(
            ep("198.18.1.20", ready=False, serving=True, terminating=True),  # used
            ep("198.18.1.21", ready=False, serving=False, terminating=True),  # not serving
            ep("198.18.1.22", ready=False),  # not ready, not terminating
        ),
    )
    assert text == ruleset(
        decls=[f":{s} - [0:0]", f":{e} - [0:0]"],
        services=[
            '-A KUBE-SERVICES -m comment --comment "ns1/term:http cluster IP" -m tcp -p tcp '
            f"-d 198.19.0.18 --dport 80 -j {s}"
        ],
        chains=[
            f'-A {s} -m comment --comment "ns1/term:http cluster IP" -m tcp -p tcp '
            "-d 198.19.0.18 --dport 80 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
            f'-A {s} -m comment --comment "ns1/term:http -> 198.18.1.20:8080" -j {e}',
            f"-A {e} -m comment --comment ns1/term:http -s 198.18.1.20 -j KUBE-MARK-MASQ",
            f"-A {e} -m comment --comment ns1/term:http -m tcp -p tcp -j DNAT "
            "--to-destination 198.18.1.20:8080",
        ],
    )


def test_terminating_local_fallback_with_ready_remote() -> None:
    # ETP Local: no ready local endpoint, a serving-terminating one is used for outside
    # traffic while Cluster traffic keeps the ready remote one.
    svc = Service(
        "ns1",
        "term2",
        type="NodePort",
        cluster_ips=("198.19.0.19",),
        ports=(PortSpec("http", "TCP", 80, 30084),),
        external_traffic_local=True,
    )
    h = "WYZSYUE5G24ERDYZ"
    s, x, svl = f"KUBE-SVC-{h}", f"KUBE-EXT-{h}", f"KUBE-SVL-{h}"
    remote, local = "KUBE-SEP-AKSPTWOGOHXIUVW6", "KUBE-SEP-3EQEBSAIUV4D6HJW"
    text = render_one(
        svc,
        eps(
            ep("198.18.1.23", ready=False, serving=True, terminating=True),
            ep("198.18.2.23", node="node-b"),
        ),
    )
    assert f'-A {s} -m comment --comment "ns1/term2:http -> 198.18.2.23:8080" -j {remote}' in (text)
    assert f'-A {svl} -m comment --comment "ns1/term2:http -> 198.18.1.23:8080" -j {local}' in (
        text
    )
    assert f"-A {x} -j {svl}" in text
    assert text.count(f":{local} - [0:0]") == 1 and text.count(f":{remote} - [0:0]") == 1


def test_udp_and_tcp_ports_sorted() -> None:
    svc = Service(
        "kube-system",
        "dns",
        cluster_ips=("198.19.0.53",),
        ports=(PortSpec("dns", "UDP", 53), PortSpec("dns-tcp", "TCP", 53)),
    )
    e = ServiceEndpoints(
        (),
        MappingProxyType(
            {
                ("dns", "UDP"): (ep("198.18.1.53", 53),),
                ("dns-tcp", "TCP"): (ep("198.18.1.53", 53),),
            }
        ),
    )
    ts, te = "KUBE-SVC-3RVWGMRXZPMMAFG6", "KUBE-SEP-WGGKJSMDDKQFEPTX"
    us, ue = "KUBE-SVC-2KKYJRIGYGQNRODB", "KUBE-SEP-6XR2VQDB6MBHYP7G"
    tc, uc = "kube-system/dns:dns-tcp", "kube-system/dns:dns"
    assert render_one(svc, e) == ruleset(
        decls=[f":{c} - [0:0]" for c in (ts, te, us, ue)],
        services=[
            f'-A KUBE-SERVICES -m comment --comment "{tc} cluster IP" -m tcp -p tcp '
            f"-d 198.19.0.53 --dport 53 -j {ts}",
            f'-A KUBE-SERVICES -m comment --comment "{uc} cluster IP" -m udp -p udp '
            f"-d 198.19.0.53 --dport 53 -j {us}",
        ],
        chains=[
            f'-A {ts} -m comment --comment "{tc} cluster IP" -m tcp -p tcp -d 198.19.0.53 '
            "--dport 53 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
            f'-A {ts} -m comment --comment "{tc} -> 198.18.1.53:53" -j {te}',
            f"-A {te} -m comment --comment {tc} -s 198.18.1.53 -j KUBE-MARK-MASQ",
            f"-A {te} -m comment --comment {tc} -m tcp -p tcp -j DNAT "
            "--to-destination 198.18.1.53:53",
            f'-A {us} -m comment --comment "{uc} cluster IP" -m udp -p udp -d 198.19.0.53 '
            "--dport 53 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
            f'-A {us} -m comment --comment "{uc} -> 198.18.1.53:53" -j {ue}',
            f"-A {ue} -m comment --comment {uc} -s 198.18.1.53 -j KUBE-MARK-MASQ",
            f"-A {ue} -m comment --comment {uc} -m udp -p udp -j DNAT "
            "--to-destination 198.18.1.53:53",
        ],
    )


def test_sctp_unnamed_port() -> None:
    svc = Service("ns1", "sctp", cluster_ips=("198.19.0.20",), ports=(PortSpec("", "SCTP", 9999),))
    s, e = "KUBE-SVC-6IX7KDGL4JOZCYKP", "KUBE-SEP-BHRU7S5QJYC5BTZX"
    text = render_one(svc, eps(ep("198.18.1.24", 9999), name="", proto="SCTP"))
    assert text == ruleset(
        decls=[f":{s} - [0:0]", f":{e} - [0:0]"],
        services=[
            '-A KUBE-SERVICES -m comment --comment "ns1/sctp cluster IP" -m sctp -p sctp '
            f"-d 198.19.0.20 --dport 9999 -j {s}"
        ],
        chains=[
            f'-A {s} -m comment --comment "ns1/sctp cluster IP" -m sctp -p sctp -d 198.19.0.20 '
            "--dport 9999 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ",
            f'-A {s} -m comment --comment "ns1/sctp -> 198.18.1.24:9999" -j {e}',
            f"-A {e} -m comment --comment ns1/sctp -s 198.18.1.24 -j KUBE-MARK-MASQ",
            f"-A {e} -m comment --comment ns1/sctp -m sctp -p sctp -j DNAT "
            "--to-destination 198.18.1.24:9999",
        ],
    )


def test_ipv6_dual_stack_service() -> None:
    svc = Service(
        "ns1",
        "v6",
        type="NodePort",
        cluster_ips=("198.19.0.21", "fd00:19::21"),
        ports=(PortSpec("http", "TCP", 80, 30085),),
        external_ips=("fd00:19::100",),
    )
    e = eps(ep("198.18.1.25"), ep("fd00:18::25"), ep("fd00:18::a"))
    cfg6 = RenderConfig(
        family=6, node_name="node-a", cluster_cidrs=("198.18.0.0/16", "fd00:18::/64")
    )
    h = "BK7CJWWMR5PUPSXN"
    s, x = f"KUBE-SVC-{h}", f"KUBE-EXT-{h}"
    e1, e2 = "KUBE-SEP-PV5JOGBD2KVIDR7H", "KUBE-SEP-X4YBGCLAD5STXXLL"
    assert render_one(svc, e, cfg6) == ruleset(
        nodeport_match="-m addrtype --dst-type LOCAL ! -d ::1/128",
        decls=[f":{c} - [0:0]" for c in (x, s, e1, e2)],
        services=[
            '-A KUBE-SERVICES -m comment --comment "ns1/v6:http cluster IP" -m tcp -p tcp '
            f"-d fd00:19::21 --dport 80 -j {s}",
            '-A KUBE-SERVICES -m comment --comment "ns1/v6:http external IP" -m tcp -p tcp '
            f"-d fd00:19::100 --dport 80 -j {x}",
        ],
        nodeports=[
            f"-A KUBE-NODEPORTS -m comment --comment ns1/v6:http -m tcp -p tcp --dport 30085 -j {x}"
        ],
        chains=[
            f'-A {x} -m comment --comment "masquerade traffic for ns1/v6:http external '
            'destinations" -j KUBE-MARK-MASQ',
            f"-A {x} -j {s}",
            f'-A {s} -m comment --comment "ns1/v6:http cluster IP" -m tcp -p tcp '
            "-d fd00:19::21 --dport 80 ! -s fd00:18::/64 -j KUBE-MARK-MASQ",
            # ordered by kube-proxy's endpoint string: "[fd00:18::25]" < "[fd00:18::a]"
            f'-A {s} -m comment --comment "ns1/v6:http -> [fd00:18::25]:8080" -m statistic '
            f"--mode random --probability 0.5000000000 -j {e1}",
            f'-A {s} -m comment --comment "ns1/v6:http -> [fd00:18::a]:8080" -j {e2}',
            f"-A {e1} -m comment --comment ns1/v6:http -s fd00:18::25 -j KUBE-MARK-MASQ",
            f"-A {e1} -m comment --comment ns1/v6:http -m tcp -p tcp -j DNAT "
            "--to-destination [fd00:18::25]:8080",
            f"-A {e2} -m comment --comment ns1/v6:http -s fd00:18::a -j KUBE-MARK-MASQ",
            f"-A {e2} -m comment --comment ns1/v6:http -m tcp -p tcp -j DNAT "
            "--to-destination [fd00:18::a]:8080",
        ],
    )
    # The IPv4 ruleset sees only the IPv4 endpoint and no IPv6 external IP.
    text4 = render_one(svc, e)
    assert "fd00" not in text4 and "198.18.1.25:8080" in text4


# -- configuration knobs ----------------------------------------------------------------


def _web() -> tuple[Service, ServiceEndpoints]:
    return (
        Service("ns1", "web", cluster_ips=("198.19.0.10",), ports=(HTTP,)),
        eps(ep("198.18.1.10")),
    )


def test_masquerade_all_and_no_cluster_cidr() -> None:
    svc, e = _web()
    masq_all = render_one(
        svc, e, RenderConfig(family=4, node_name="node-a", cluster_cidrs=(), masquerade_all=True)
    )
    assert (
        '-A KUBE-SVC-4LVCYZMTA5CQO6SX -m comment --comment "ns1/web:http cluster IP" -m tcp '
        "-p tcp -d 198.19.0.10 --dport 80 -j KUBE-MARK-MASQ\n" in masq_all
    )
    # No cluster CIDR and no --masquerade-all: nothing to tell pods from outsiders by.
    none = render_one(svc, e, RenderConfig(family=4, node_name="node-a", cluster_cidrs=()))
    assert '-A KUBE-SVC-4LVCYZMTA5CQO6SX -m comment --comment "ns1/web:http cluster IP"' not in (
        none
    )
    assert "-j KUBE-SEP-XDPDFWE2P7FYZVAN" in none


def test_masquerade_mark_and_random_fully() -> None:
    svc, e = _web()
    cfg = RenderConfig(
        family=4,
        node_name="node-a",
        cluster_cidrs=("198.18.0.0/16",),
        masquerade_mark="0x8000",
        random_fully=False,
        conntrack_tcp_be_liberal=True,
    )
    text = render_one(svc, e, cfg)
    assert "-A KUBE-POSTROUTING -m mark ! --mark 0x8000/0x8000 -j RETURN\n" in text
    assert "-A KUBE-POSTROUTING -j MARK --xor-mark 0x8000\n" in text
    assert '"kubernetes service traffic requiring SNAT" -j MASQUERADE\n' in text
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x8000\n" in text
    assert "-m mark --mark 0x8000/0x8000 -j ACCEPT" in text
    assert "--ctstate INVALID" not in text


def test_nodeport_addresses_pick_local_ips() -> None:
    svc, e = _web()
    cfg = RenderConfig(
        family=4,
        node_name="node-a",
        cluster_cidrs=("198.18.0.0/16",),
        nodeport_addresses=("198.18.200.0/24", "127.0.0.0/8", "fd00::/8"),
        local_ips=("198.18.200.2", "127.0.0.1", "198.18.1.1", "198.18.200.1", "fd00::1"),
    )
    text = render_one(svc, e, cfg)
    last = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
    jumps = [ln for ln in text.splitlines() if last in ln]
    # Sorted, only addresses in the CIDRs, loopback skipped (no localhost NodePorts).
    assert jumps == [
        f"-A KUBE-SERVICES -m comment --comment {last} -d 198.18.200.1 -j KUBE-NODEPORTS",
        f"-A KUBE-SERVICES -m comment --comment {last} -d 198.18.200.2 -j KUBE-NODEPORTS",
    ]
    # A zero CIDR means every local address again.
    cfg0 = RenderConfig(
        family=4, node_name="node-a", cluster_cidrs=(), nodeport_addresses=("0.0.0.0/0",)
    )
    assert "-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS" in render_one(
        svc, e, cfg0
    )


def test_localhost_nodeports_write_kubelet_firewall() -> None:
    svc, e = _web()
    cfg = RenderConfig(
        family=4, node_name="node-a", cluster_cidrs=("198.18.0.0/16",), localhost_nodeports=True
    )
    text = render_one(svc, e, cfg)
    assert ":KUBE-FIREWALL - [0:0]\n" in text
    assert (
        '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" '
        "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
        "-j DROP\n" in text
    )
    assert "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS" in text
    res = render(make_model({svc.key: svc}, {svc.key: e}), cfg)
    assert ("filter", "KUBE-FIREWALL") not in res.state.chains  # kubelet's, never deleted


def test_large_cluster_drops_endpoint_comments() -> None:
    svc, e = _web()
    cfg = RenderConfig(
        family=4, node_name="node-a", cluster_cidrs=("198.18.0.0/16",), large_cluster_threshold=0
    )
    text = render_one(svc, e, cfg)
    assert "-A KUBE-SVC-4LVCYZMTA5CQO6SX -j KUBE-SEP-XDPDFWE2P7FYZVAN\n" in text
    assert "-A KUBE-SEP-XDPDFWE2P7FYZVAN -s 198.18.1.10 -j KUBE-MARK-MASQ\n" in text
    assert (
        "-A KUBE-SEP-XDPDFWE2P7FYZVAN -m tcp -p tcp -j DNAT --to-destination 198.18.1.10:8080\n"
        in text
    )
    # Other comments stay.
    assert '--comment "ns1/web:http cluster IP"' in text


def test_skipped_services() -> None:
    ok, e = _web()
    others = [
        Service("ns1", "mine-not", cluster_ips=("198.19.0.30",), ports=(HTTP,), proxy_name="x"),
        Service("ns1", "headless", headless=True, ports=(HTTP,)),
        Service("ns1", "extname", type="ExternalName", external_name="example.com"),
        Service("ns1", "v6only", cluster_ips=("fd00:19::30",), ports=(HTTP,)),
        Service("ns1", "noports", cluster_ips=("198.19.0.31",)),
    ]
    services = {s.key: s for s in [ok, *others]}
    text = render(make_model(services, {s.key: e for s in services.values()}), CFG).text
    assert render_one(ok, e) == text


def test_rule_counts() -> None:
    svc, e = _web()
    res = render(make_model({svc.key: svc}, {svc.key: e}), CFG)
    assert res.rules == {"filter": 3, "nat": 4 + 2 + 2 + 2}
    assert res.rules_written == res.rules
    assert res.full


def test_through_the_parser() -> None:
    """API objects → records → rules: whitespace in source ranges, slices merged."""
    obj = service(
        "lb",
        "ns5",
        ip="198.19.0.45",
        type="LoadBalancer",
        ports=[{"name": "p80", "port": 80, "nodePort": 30002}],
        loadBalancerSourceRanges=[" 203.0.113.0/25"],
        sessionAffinity="ClientIP",
    )
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "198.19.200.5"}]}}
    parsed = parse_service(obj).service
    sl = parse_slice(
        slice_(
            "lb",
            ns="ns5",
            endpoints=[endpoint("198.18.1.3")],
            ports=[{"name": "p80", "port": 80, "protocol": "TCP"}],
        )
    )
    m = make_model({parsed.key: parsed}, {parsed.key: merge_slices([sl])})
    text = render(m, CFG).text
    fw = names.firewall_chain("ns5/lb:p80", "tcp")
    assert f'-A {fw} -m comment --comment "ns5/lb:p80 loadbalancer IP" -s 203.0.113.0/25' in text
    assert "--rcheck --seconds 10800 --reap" in text


# -- partial renders and stale chains -----------------------------------------------------


def _two() -> tuple[dict, dict]:
    a = Service("ns1", "a", cluster_ips=("198.19.0.1",), ports=(HTTP,))
    b = Service("ns1", "b", cluster_ips=("198.19.0.2",), ports=(HTTP,))
    return {a.key: a, b.key: b}, {a.key: eps(ep("198.18.1.1")), b.key: eps(ep("198.18.1.2"))}


def test_partial_render_writes_only_changed_service() -> None:
    services, endpoints = _two()
    first = render(make_model(services, endpoints), CFG)
    a_svc, b_svc = (
        names.service_chain("ns1/a:http", "TCP"),
        names.service_chain("ns1/b:http", "TCP"),
    )
    endpoints[("ns1", "b")] = eps(ep("198.18.1.3"))
    old_sep = names.endpoint_chain("ns1/b:http", "tcp", "198.18.1.2:8080")
    new_sep = names.endpoint_chain("ns1/b:http", "tcp", "198.18.1.3:8080")
    res = render(
        make_model(services, endpoints),
        CFG,
        changed=frozenset({("ns1", "b")}),
        previous=first.state,
    )
    assert not res.full
    text = res.text
    assert f":{b_svc} - [0:0]" in text and f":{new_sep} - [0:0]" in text
    assert f":{a_svc} " not in text and f"-A {a_svc} " not in text  # untouched
    assert f"-j {a_svc}" in text  # but still reached from KUBE-SERVICES
    assert text.endswith(f"-X {old_sep}\nCOMMIT\n")
    assert f":{old_sep} - [0:0]" in text  # flushed before it is deleted
    assert ("nat", old_sep) not in res.state.chains
    assert ("nat", new_sep) in res.state.chains
    assert res.rules["nat"] == first.rules["nat"]
    assert res.rules_written["nat"] == first.rules["nat"] - 4  # a's SVC (2) + SEP (2) skipped


def test_partial_render_deletes_removed_service() -> None:
    services, endpoints = _two()
    first = render(make_model(services, endpoints), CFG)
    del services[("ns1", "b")]
    res = render(
        make_model(services, endpoints),
        CFG,
        changed=frozenset({("ns1", "b")}),
        previous=first.state,
    )
    b_chains = sorted(c for _, c in first.state.service_chains[("ns1", "b")])
    assert [ln for ln in res.text.splitlines() if ln.startswith("-X")] == [
        f"-X {c}" for c in b_chains
    ]
    assert ("ns1", "b") not in res.state.service_chains


def test_partial_render_heals_inconsistent_changed_set() -> None:
    services, endpoints = _two()
    first = render(make_model(services, endpoints), CFG)
    endpoints[("ns1", "a")] = eps(ep("198.18.1.9"))
    # The caller forgot to say that a changed: its records differ, so it is written anyway.
    res = render(make_model(services, endpoints), CFG, changed=frozenset(), previous=first.state)
    assert "--to-destination 198.18.1.9:8080" in res.text
    assert "-X " + names.endpoint_chain("ns1/a:http", "tcp", "198.18.1.1:8080") in res.text


def test_config_change_forces_full_render() -> None:
    services, endpoints = _two()
    first = render(make_model(services, endpoints), CFG)
    cfg = RenderConfig(family=4, node_name="node-a", cluster_cidrs=(), masquerade_all=True)
    res = render(make_model(services, endpoints), cfg, changed=frozenset(), previous=first.state)
    assert res.full
    assert res.text == render(make_model(services, endpoints), cfg).text


def test_full_render_deletes_stale_chains() -> None:
    services, endpoints = _two()
    first = render(make_model(services, endpoints), CFG)
    del services[("ns1", "a")]
    res = render(make_model(services, endpoints), CFG, previous=first.state)
    gone = sorted(c for _, c in first.state.service_chains[("ns1", "a")])
    assert [ln for ln in res.text.splitlines() if ln.startswith("-X")] == [f"-X {c}" for c in gone]
    assert res.state.chains == first.state.chains - set(first.state.service_chains[("ns1", "a")])


def test_full_render_with_previous_matches_fresh_render() -> None:
    services, endpoints = _two()
    first = render(make_model(services, endpoints), CFG)
    m = make_model(services, endpoints)
    assert render(m, CFG, previous=first.state).text == render(m, CFG).text


def test_leftovers_from_iptables_save_are_deleted() -> None:
    services, endpoints = _two()
    saved = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n"
        ":KUBE-SVC-OLDOLDOLDOLDOLD1 - [0:0]\n"
        ":KUBE-SEP-OLDOLDOLDOLDOLD2 - [0:0]\n:DOCKER - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n"
        "COMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n"
        "COMMIT\n"
    )
    chains = saved_chains(saved)
    assert ("nat", "DOCKER") in chains and ("filter", "INPUT") in chains
    prev = state_from_chains(chains)
    assert prev.chains == {
        ("nat", "KUBE-SERVICES"),
        ("nat", "KUBE-SVC-OLDOLDOLDOLDOLD1"),
        ("nat", "KUBE-SEP-OLDOLDOLDOLDOLD2"),
        ("filter", "KUBE-FORWARD"),
    }
    res = render(make_model(services, endpoints), CFG, changed=frozenset(), previous=prev)
    assert res.full
    xs = [ln for ln in res.text.splitlines() if ln.startswith("-X")]
    assert xs == ["-X KUBE-SEP-OLDOLDOLDOLDOLD2", "-X KUBE-SVC-OLDOLDOLDOLDOLD1"]


# -- jumps from built-in chains -----------------------------------------------------------


def test_base_jumps_are_kube_proxys() -> None:
    by_target = {(t, b, c): args for t, b, c, args in BASE_JUMPS}
    assert by_target[("nat", "PREROUTING", "KUBE-SERVICES")] == (
        "-m",
        "comment",
        "--comment",
        "kubernetes service portals",
        "-j",
        "KUBE-SERVICES",
    )
    assert by_target[("filter", "INPUT", "KUBE-PROXY-FIREWALL")] == (
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "comment",
        "--comment",
        "kubernetes load balancer firewall",
        "-j",
        "KUBE-PROXY-FIREWALL",
    )
    assert set(by_target) == {
        ("filter", "INPUT", "KUBE-EXTERNAL-SERVICES"),
        ("filter", "FORWARD", "KUBE-EXTERNAL-SERVICES"),
        ("filter", "INPUT", "KUBE-NODEPORTS"),
        ("filter", "FORWARD", "KUBE-SERVICES"),
        ("filter", "OUTPUT", "KUBE-SERVICES"),
        ("filter", "FORWARD", "KUBE-FORWARD"),
        ("filter", "INPUT", "KUBE-PROXY-FIREWALL"),
        ("filter", "OUTPUT", "KUBE-PROXY-FIREWALL"),
        ("filter", "FORWARD", "KUBE-PROXY-FIREWALL"),
        ("nat", "OUTPUT", "KUBE-SERVICES"),
        ("nat", "PREROUTING", "KUBE-SERVICES"),
        ("nat", "POSTROUTING", "KUBE-POSTROUTING"),
    }
    # ctstate NEW exactly where kube-proxy has it.
    new = {k for k, a in by_target.items() if "NEW" in a}
    assert new == {
        ("filter", "INPUT", "KUBE-EXTERNAL-SERVICES"),
        ("filter", "FORWARD", "KUBE-EXTERNAL-SERVICES"),
        ("filter", "FORWARD", "KUBE-SERVICES"),
        ("filter", "OUTPUT", "KUBE-SERVICES"),
        ("filter", "INPUT", "KUBE-PROXY-FIREWALL"),
        ("filter", "OUTPUT", "KUBE-PROXY-FIREWALL"),
        ("filter", "FORWARD", "KUBE-PROXY-FIREWALL"),
    }


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000])
def test_probability_format(n: int) -> None:
    from proxy.iptables.render import probability

    assert probability(n) == f"{1 / n:.10f}"
    assert probability(3) == "0.3333333333"
    assert probability(7) == "0.1428571429"


def test_partial_render_rewrites_changed_service_with_same_chains() -> None:
    services, endpoints = _two()
    first = render(make_model(services, endpoints), CFG)
    a = services[("ns1", "a")]
    services[a.key] = Service(
        "ns1", "a", cluster_ips=a.cluster_ips, ports=a.ports, session_affinity_timeout=60
    )
    res = render(
        make_model(services, endpoints), CFG, changed=frozenset({a.key}), previous=first.state
    )
    svc = names.service_chain("ns1/a:http", "TCP")
    sep = names.endpoint_chain("ns1/a:http", "TCP", "198.18.1.1:8080")
    assert f":{svc} - [0:0]" in res.text and f":{sep} - [0:0]" in res.text
    assert f"-m recent --name {sep} --rcheck --seconds 60 --reap -j {sep}" in res.text
    assert "-X " not in res.text
    assert res.state.service_chains == first.state.service_chains


def test_comment_flavour_follows_cluster_size_when_reusing_fragments() -> None:
    services, endpoints = _two()
    cfg = RenderConfig(
        family=4, node_name="node-a", cluster_cidrs=("198.18.0.0/16",), large_cluster_threshold=2
    )
    first = render(make_model(services, endpoints), cfg)
    assert '"ns1/a:http -> 198.18.1.1:8080"' in first.text
    # A third endpoint crosses the threshold: a full render drops the endpoint comments
    # everywhere, also for the unchanged Service a (whose text is otherwise reused).
    endpoints[("ns1", "b")] = eps(ep("198.18.1.2"), ep("198.18.1.3"))
    m = make_model(services, endpoints)
    res = render(m, cfg, previous=first.state)
    assert "->" not in res.text
    assert res.text == render(m, cfg).text
    # And back.
    endpoints[("ns1", "b")] = eps(ep("198.18.1.2"))
    m = make_model(services, endpoints)
    again = render(m, cfg, previous=res.state)
    assert '"ns1/a:http -> 198.18.1.1:8080"' in again.text
    assert render(m, cfg, previous=again.state).text == render(m, cfg).text


def test_partial_render_survives_top_level_config_changes() -> None:
    services, endpoints = _two()
    cfg = RenderConfig(
        family=4,
        node_name="node-a",
        cluster_cidrs=("198.18.0.0/16",),
        nodeport_addresses=("198.18.200.0/24",),
        local_ips=("198.18.200.1",),
    )
    first = render(make_model(services, endpoints), cfg)
    cfg2 = RenderConfig(
        family=4,
        node_name="node-a",
        cluster_cidrs=("198.18.0.0/16",),
        nodeport_addresses=("198.18.200.0/24",),
        local_ips=("198.18.200.1", "198.18.200.7"),
        masquerade_mark="0x8000",
    )
    res = render(make_model(services, endpoints), cfg2, changed=frozenset(), previous=first.state)
    assert not res.full  # per-Service chains do not depend on these settings
    assert "-d 198.18.200.7 -j KUBE-NODEPORTS" in res.text
    assert "--or-mark 0x8000" in res.text
    assert ":KUBE-SVC-" not in res.text and ":KUBE-SEP-" not in res.text
    # The node name changes which endpoints are local: that needs a full render.
    cfg3 = RenderConfig(family=4, node_name="node-b", cluster_cidrs=("198.18.0.0/16",))
    assert render(
        make_model(services, endpoints), cfg3, changed=frozenset(), previous=res.state
    ).full


# -- kube-proxy's TestOverallIPTablesRules, literally ----------------------------------------
# Its addresses are kept (not the test ranges): the expected text is kube-proxy's own, and
# the SEP chain names hash the endpoint addresses. Nothing here reaches a kernel.

KP_EXPECTED = """
*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3003 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3002 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
COMMIT
"""  # noqa: E501

KP_CFG = RenderConfig(
    family=4,
    node_name="test-node",
    cluster_cidrs=("10.0.0.0/8",),
    node_ip="192.168.0.2",
    random_fully=False,
    localhost_nodeports=True,
    nfacct_counters=frozenset({"ct_state_invalid_dropped_pkts", "localhost_nps_accepted_pkts"}),
)


def _kp_objects() -> list[dict]:
    p80 = [{"name": "p80", "port": 80, "protocol": "TCP"}]

    def svc(ns: str, name: str, ip: str, **spec) -> dict:
        status = spec.pop("status", None)
        obj = service(name, ns, ip=ip, ports=spec.pop("ports", p80), **spec)
        return obj | {"status": status} if status else obj

    def eps(ns: str, name: str, *endpoints: dict) -> dict:
        return slice_(name, f"{name}-1", ns, endpoints=list(endpoints), ports=p80)

    def lb(ip: str) -> dict:
        return {"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}}

    return [
        svc("ns1", "svc1", "172.30.0.41"),
        svc(
            "ns2",
            "svc2",
            "172.30.0.42",
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            ports=[{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}],
            externalIPs=["192.168.99.22"],
            healthCheckNodePort=30000,
            **lb("1.2.3.4"),
        ),
        svc(
            "ns3",
            "svc3",
            "172.30.0.43",
            type="NodePort",
            ports=[{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3003}],
        ),
        svc("ns4", "svc4", "172.30.0.44", type="NodePort", externalIPs=["192.168.99.33"]),
        svc(
            "ns5",
            "svc5",
            "172.30.0.45",
            type="LoadBalancer",
            externalTrafficPolicy="Cluster",
            ports=[{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3002}],
            healthCheckNodePort=30000,
            loadBalancerSourceRanges=[" 203.0.113.0/25"],
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}},
            **lb("5.6.7.8"),
        ),
        svc("ns6", "svc6", "172.30.0.46"),
        eps("ns1", "svc1", {"addresses": ["10.180.0.1"]}),
        eps("ns2", "svc2", {"addresses": ["10.180.0.2"]}),
        eps("ns3", "svc3", {"addresses": ["10.180.0.3"]}),
        eps(
            "ns4",
            "svc4",
            {"addresses": ["10.180.0.4"]},
            {"addresses": ["10.180.0.5"], "nodeName": "test-node"},
        ),
        eps("ns5", "svc5", {"addresses": ["10.180.0.3"]}),
    ]


def _kp_model():
    services, endpoints = {}, {}
    objs = _kp_objects()
    for o in objs:
        if o["kind"] == "Service":
            s = parse_service(o).service
            services[s.key] = s
    for o in objs:
        if o["kind"] == "EndpointSlice":
            sl = parse_slice(o)
            endpoints[sl.service] = merge_slices([sl])
    return make_model(services, endpoints)


def by_chain(text: str) -> dict[str, tuple[set[str], dict[str, list[str]]]]:
    """Restore text → per table: (declared chains, rules per chain in order). kube-proxy's
    assertIPTablesRulesEqual compares like this: chain and line order across chains is
    free, rule order within a chain is not."""
    out: dict[str, tuple[set[str], dict[str, list[str]]]] = {}
    table = ""
    for line in text.strip().splitlines():
        if line.startswith("*"):
            table = line[1:]
            out[table] = (set(), {})
        elif line.startswith(":"):
            out[table][0].add(line.split()[0][1:])
        elif line.startswith("-A "):
            out[table][1].setdefault(line.split()[1], []).append(line)
    return out


def test_kube_proxy_overall_rules_with_localhost_nodeports_and_nfacct() -> None:
    res = render(_kp_model(), KP_CFG)
    assert by_chain(res.text) == by_chain(KP_EXPECTED)
    # Rule metrics as kube-proxy counts them (every -A line of the restore).
    assert res.rules["nat"] == KP_EXPECTED.split("*nat", 1)[1].count("\n-A ")
    assert res.rules["filter"] == KP_EXPECTED.split("*nat", 1)[0].count("\n-A ")
    # ns2/svc2 has endpoints, but none here for its externalTrafficPolicy: Local.
    assert res.no_local_endpoints == (0, 1)


def test_nfacct_rules_only_with_the_counters() -> None:
    """Without the nfacct counters (no kernel module), the same rules without `-m nfacct`
    (a rule naming a missing counter would fail the whole restore)."""
    cfg = RenderConfig(**{**KP_CFG.__dict__, "nfacct_counters": frozenset()})
    text = render(_kp_model(), cfg).text
    assert "nfacct" not in text
    assert "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n" in text
    assert "-d 127.0.0.0/8 --dport" not in text
    # Localhost NodePorts still work (the general KUBE-NODEPORTS rule catches 127.0.0.1).
    assert (
        '"kubernetes service nodeports; NOTE: this must be the last rule in this chain" '
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS" in text
    )


def test_localhost_nodeports_off_or_not_in_nodeport_addresses() -> None:
    model = _kp_model()
    off = render(model, RenderConfig(**{**KP_CFG.__dict__, "localhost_nodeports": False})).text
    assert "KUBE-FIREWALL" not in off and "127.0.0.0/8 --dport" not in off
    assert "-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS" in off
    # --nodeport-addresses without loopback (e.g. `primary`): localhost NodePorts are off.
    primary = RenderConfig(
        **{
            **KP_CFG.__dict__,
            "nodeport_addresses": ("192.168.0.2/32",),
            "local_ips": ("192.168.0.2", "127.0.0.1"),
        }
    )
    text = render(model, primary).text
    assert "KUBE-FIREWALL" not in text and "127.0.0.0/8" not in text
    assert "-d 192.168.0.2 -j KUBE-NODEPORTS" in text
    v6 = render(model, RenderConfig(**{**KP_CFG.__dict__, "family": 6})).text
    assert "KUBE-FIREWALL" not in v6 and "nfacct-name localhost" not in v6


def test_changing_nfacct_counters_replans_services() -> None:
    model = _kp_model()
    cfg0 = RenderConfig(**{**KP_CFG.__dict__, "nfacct_counters": frozenset()})
    first = render(model, cfg0)
    again = render(model, KP_CFG, changed=frozenset(), previous=first.state)
    assert again.full and "--nfacct-name localhost_nps_accepted_pkts" in again.text


def test_topology_hints_pick_this_zones_endpoints() -> None:
    svc = parse_service(
        service("web", "ns1", type="NodePort", trafficDistribution="PreferSameZone")
    )
    hinted = [
        endpoint("198.18.1.10", zone="zone-a", hints={"forZones": [{"name": "zone-a"}]}),
        endpoint("198.18.2.10", zone="zone-b", hints={"forZones": [{"name": "zone-b"}]}),
    ]
    sl = parse_slice(slice_("web", ns="ns1", endpoints=hinted))
    model = make_model({svc.service.key: svc.service}, {svc.service.key: merge_slices([sl])})
    in_a = render(model, RenderConfig(**{**CFG.__dict__, "node_zone": "zone-a"}))
    assert '"ns1/web:http -> 198.18.1.10:8080"' in in_a.text
    assert "198.18.2.10" not in in_a.text
    # Another zone: another endpoint; a zone no endpoint is hinted for: all of them.
    in_b = render(
        model,
        RenderConfig(**{**CFG.__dict__, "node_zone": "zone-b"}),
        changed=frozenset(),
        previous=in_a.state,
    )
    assert in_b.full  # the zone decides every Service's endpoints
    assert "198.18.2.10:8080" in in_b.text and "198.18.1.10" not in in_b.text
    in_c = render(model, RenderConfig(**{**CFG.__dict__, "node_zone": "zone-c"})).text
    assert "198.18.1.10:8080" in in_c and "198.18.2.10:8080" in in_c


def test_load_balancer_ip_mode_proxy_gets_no_rules() -> None:
    obj = service("lb", "ns1", type="LoadBalancer") | {
        "status": {
            "loadBalancer": {
                "ingress": [
                    {"ip": "198.19.100.1", "ipMode": "Proxy"},
                    {"ip": "198.19.100.2", "ipMode": "VIP"},
                ]
            }
        }
    }
    svc = parse_service(obj).service
    e = merge_slices([parse_slice(slice_("lb", ns="ns1"))])
    text = render_one(svc, e)
    assert "-d 198.19.100.2 --dport 80 -j KUBE-EXT-" in text
    assert "198.19.100.1" not in text  # goes out to the load balancer, like any IP
