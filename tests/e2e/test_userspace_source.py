"""--proxy-mode=userspace on a node: endpoints see the client's address.

Two nodes: node-a runs the daemon (web-1, web-2 and a client pod live there), node-b
has web-b; an outside host reaches node-a's NodePorts. Backends record who connected:
HTTP `GET /client` answers the peer's IP, the UDP backend the peer's ip:port. Services
live in 198.19.60.0/24; --cluster-cidr 198.18.0.0/16 as on a real node.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from proxy.testbed import Host, Node, ProxyProcess, Testbed, http_request, start_backend

pytestmark = pytest.mark.kernel

NODE_A, NODE_B = "198.18.200.1", "198.18.200.2"
OUTSIDE = "198.18.200.100"
CLIENT = "198.18.1.100"
WEBS = {"web-1": "198.18.1.11", "web-2": "198.18.1.12", "web-b": "198.18.2.10"}
# IPv6 (the same IP_TRANSPARENT path, with ip6tables and `ip -6 rule`): web-1 and web-b.
CLIENT6 = "fd00:18::1:100"
WEBS6 = {"web-1": "fd00:18::1:11", "web-b": "fd00:18::2:10"}


@dataclass
class Site:
    tb: Testbed
    node: Node
    hosts: dict[str, Host]
    manifests: Path


def _udppeer(host: Host, port: int) -> None:
    p = host.python(
        ["-m", "tests.e2e.userspace_backends", "udppeer", str(port)],
        background=True, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().strip() == b"READY"


def svc(name: str, ip: str, tcp_np: int = 0, udp_np: int = 0) -> dict:
    kind = "NodePort" if tcp_np else "ClusterIP"
    ports: list[dict] = [
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "peer", "port": 7008, "protocol": "UDP"},
    ]
    if tcp_np:
        ports[0]["nodePort"], ports[1]["nodePort"] = tcp_np, udp_np
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": kind, "clusterIP": ip, "ports": ports},
    }


def eps(name: str, pods: list[str]) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-abc",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "peer", "port": 7008, "protocol": "UDP"},
        ],
        "endpoints": [
            {
                "addresses": [WEBS[p]],
                "conditions": {"ready": True},
                "nodeName": "node-b" if p == "web-b" else "node-a",
            }
            for p in pods
        ],
    }


def web6() -> list[dict]:
    """An IPv6 Service whose endpoints are web-1 (this node) and web-b (node-b)."""
    service = svc("web6", "fd00:19::60:10")
    service["spec"]["ipFamilies"] = ["IPv6"]
    slice_ = eps("web6", [])
    slice_["addressType"] = "IPv6"
    slice_["endpoints"] = [
        {"addresses": [ip], "conditions": {"ready": True},
         "nodeName": "node-b" if p == "web-b" else "node-a"}
        for p, ip in WEBS6.items()
    ]  # fmt: skip
    return [service, slice_]


OBJECTS = [
    svc("web", "198.19.60.10", 30080, 30708),
    eps("web", ["web-1", "web-2"]),
    svc("self", "198.19.60.11"),  # only web-1: web-1 reaching it is a hairpin
    eps("self", ["web-1"]),
    svc("remote", "198.19.60.12", 30081, 30709),  # its endpoint is on node-b
    eps("remote", ["web-b"]),
    *web6(),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("userspace-source")
    with Testbed(workdir=work) as tb:
        a = tb.add_node(
            "node-a", underlay_ip=NODE_A, pod_cidr="198.18.1.0/24",
            underlay_ipv6="fd00:200::1", pod_cidr_v6="fd00:18::1:0/112",
        )  # fmt: skip
        b = tb.add_node(
            "node-b", underlay_ip=NODE_B, pod_cidr="198.18.2.0/24",
            underlay_ipv6="fd00:200::2", pod_cidr_v6="fd00:18::2:0/112",
        )  # fmt: skip
        hosts = {
            "web-1": tb.add_pod(a, "web-1", WEBS["web-1"], ipv6=WEBS6["web-1"]),
            "web-2": tb.add_pod(a, "web-2", WEBS["web-2"]),
            "web-b": tb.add_pod(b, "web-b", WEBS["web-b"], ipv6=WEBS6["web-b"]),
            "client": tb.add_pod(a, "client", CLIENT, ipv6=CLIENT6),
            "outside": tb.add_external("outside", OUTSIDE),
        }
        hosts["outside"].route("198.19.60.0/24", via=NODE_A)
        for name in WEBS:
            start_backend(hosts[name], 8080, proto="http")
            _udppeer(hosts[name], 7008)
        manifests = work / "manifests"
        manifests.mkdir()
        (manifests / "all.yaml").write_text(yaml.safe_dump_all(OBJECTS))
        yield Site(tb, a, hosts, manifests)


def start(site: Site, *extra: str, env: dict[str, str] | None = None) -> ProxyProcess:
    px = site.node.start_proxy(
        [
            "--proxy-mode=userspace",
            "--manifests", str(site.manifests),
            "--hostname-override", "node-a",
            "--cluster-cidr", "198.18.0.0/16,fd00:18::/64",
            "--nodeport-addresses", "198.18.200.0/24",
            "--healthz-bind-address", "0.0.0.0:10256",
            *extra,
        ],
        env=env,
    )  # fmt: skip
    px.wait_ready()
    return px


@pytest.fixture(scope="module")
def daemon(site: Site) -> Iterator[ProxyProcess]:
    px = start(site)
    yield px
    px.stop()
    site.node.python(["-m", "proxy", "--cleanup"], timeout=60)


@pytest.fixture
def own_daemon(site: Site, daemon: ProxyProcess) -> Iterator[None]:
    """For tests that start their own daemon: the shared one is stopped first."""
    daemon.stop()
    site.node.python(["-m", "proxy", "--cleanup"], timeout=60)
    yield
    site.node.python(["-m", "proxy", "--cleanup"], timeout=60)


def tcp_peer(host: Host, ip: str, port: int) -> str:
    status, _, body = http_request(host, ip, port, "/client", timeout=5)
    assert status == 200
    return body.strip()


def udp_peer(host: Host, ip: str, port: int) -> tuple[str, int, int]:
    """(peer ip the backend saw, its port, our own source port)."""
    with host.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect((ip, port))
        s.send(b"who")
        ip_seen, _, port_seen = s.recv(100).decode().rpartition(":")
        return ip_seen, int(port_seen), s.getsockname()[1]


def node_addresses(node: Node) -> set[str]:
    out = node.exec(["ip", "-o", "-4", "address"]).stdout
    return set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out))


def test_endpoints_see_a_pod_clients_address(site: Site, daemon: ProxyProcess) -> None:
    assert "client addresses preserved" in daemon.logs()
    client = site.hosts["client"]
    # ClusterIP, endpoints on this node and on node-b (replies come back through node-a).
    assert {tcp_peer(client, "198.19.60.10", 80) for _ in range(4)} == {CLIENT}
    assert tcp_peer(client, "198.19.60.12", 80) == CLIENT
    for ip in ("198.19.60.10", "198.19.60.12"):
        seen, port, mine = udp_peer(client, ip, 7008)
        assert (seen, port) == (CLIENT, mine)  # the client's port too


def test_endpoints_see_a_pod_clients_ipv6_address(site: Site, daemon: ProxyProcess) -> None:
    client = site.hosts["client"]
    # Over ip6tables' mark and `ip -6 rule`: web-1 on this node, web-b on node-b.
    assert {tcp_peer(client, "fd00:19::60:10", 80) for _ in range(8)} == {CLIENT6}
    served = {http_request(client, "fd00:19::60:10", 80, "/")[2].strip() for _ in range(8)}
    assert served == {"web-1", "web-b"}, served  # both endpoints were reached
    for _ in range(4):  # UDP sessions, spread over both: the client's address and port
        seen, port, mine = udp_peer(client, "fd00:19::60:10", 7008)
        assert (seen, port) == (CLIENT6, mine)


def test_nodeport_from_outside(site: Site, daemon: ProxyProcess) -> None:
    outside = site.hosts["outside"]
    assert {tcp_peer(outside, NODE_A, 30080) for _ in range(4)} == {OUTSIDE}
    seen, port, mine = udp_peer(outside, NODE_A, 30708)
    assert (seen, port) == (OUTSIDE, mine)
    # An endpoint on another node would answer the outside host directly: the node's
    # address is used instead (as kube-proxy masquerades externalTrafficPolicy: Cluster).
    node_ips = node_addresses(site.node)
    assert tcp_peer(outside, NODE_A, 30081) in node_ips
    assert udp_peer(outside, NODE_A, 30709)[0] in node_ips


def test_hairpin_gets_the_node_address(site: Site, daemon: ProxyProcess) -> None:
    web1 = site.hosts["web-1"]
    node_ips = node_addresses(site.node)
    assert tcp_peer(web1, "198.19.60.11", 80) in node_ips  # not its own address
    assert udp_peer(web1, "198.19.60.11", 7008)[0] in node_ips
    # Another pod through the same Service keeps its own address.
    assert tcp_peer(site.hosts["web-2"], "198.19.60.11", 80) == WEBS["web-2"]


def test_fallback_to_the_node_address_where_the_kernel_refuses(
    site: Site, own_daemon: None, tmp_path: Path
) -> None:
    # A kernel without the `socket` match refuses the mangle rule: stand-ins for the
    # restore commands fail the way iptables does then.
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("iptables-nft-restore", "iptables-legacy-restore", "iptables-restore"):
        script = fake / name
        script.write_text(
            textwrap.dedent("""\
                #!/bin/sh
                cat >/dev/null  # it reads its input, then fails on the rule
                echo "iptables-restore v1.8.9 (nf_tables): Couldn't load match \\`socket':No such file or directory" >&2
                exit 2
            """)  # noqa: E501
        )
        script.chmod(0o755)
    px = start(site, env={"PATH": f"{fake}:{os.environ['PATH']}"})
    try:
        logs = px.logs()
        assert "client addresses not preserved: iptables-" in logs
        assert "Couldn't load match `socket'" in logs
        assert "endpoints see the node's address" in logs
        assert tcp_peer(site.hosts["client"], "198.19.60.10", 80) in node_addresses(site.node)
    finally:
        px.stop()
    mangle = site.node.exec(["iptables-save", "-t", "mangle"]).stdout
    assert "KUBE-USERSPACE-TRANSPARENT" not in mangle


def test_cleanup_removes_rules_and_routes(site: Site, own_daemon: None) -> None:
    px = start(site)
    px.stop()
    mangle = site.node.exec(["iptables-save", "-t", "mangle"]).stdout
    assert "KUBE-USERSPACE-TRANSPARENT" in mangle  # kept on SIGTERM, like rules
    assert "fwmark 0x2000/0x2000 lookup 107" in site.node.exec(["ip", "rule"]).stdout
    site.node.python(["-m", "proxy", "--cleanup"], timeout=60)
    assert "KUBE-USERSPACE" not in site.node.exec(["iptables-save", "-t", "mangle"]).stdout
    assert "0x2000" not in site.node.exec(["ip", "rule"]).stdout
    for fam in ("-4", "-6"):
        table = site.node.exec(["ip", fam, "route", "show", "table", "107"], check=False)
        assert table.stdout.strip() == ""
