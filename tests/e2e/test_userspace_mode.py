"""--proxy-mode=userspace end to end: the real daemon in a node namespace, real traffic.

One testbed for the module: node-a with pods web-1..3 (http/8080, udp/7007, tcp/7070
backends; a bulk backend on web-1:9000 and a half-close backend on web-2:9001), a client
pod, and an outside host routed to the Service range via the node. Every test starts its
own daemon on its own manifests directory and the node is cleaned with
`python -m proxy --cleanup` afterwards. Services live in 198.19.40.0/24.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import resource
import selectors
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from proxy.testbed import Host, Node, ProxyProcess, Testbed, client_request, start_backend
from proxy.userspace.tcp import fd_headroom

from .userspace_backends import bulk_block

pytestmark = pytest.mark.kernel

NODE_IP = "198.18.200.1"
BULK = 100 * 1024 * 1024
IFNAME = "kube-proxy-py0"


@dataclass
class Site:
    tb: Testbed
    node: Node
    webs: list[Host]
    client: Host
    outside: Host


def _start_special(host: Host, *args: str) -> subprocess.Popen:
    p = host.python(
        ["-m", "tests.e2e.userspace_backends", *args], background=True, stdout=subprocess.PIPE
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == b"READY", f"backend {args} did not start: {line!r}"
    return p


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    # Children (daemon, backends) inherit this; 10,000 client sockets live in this process.
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (old[1], old[1]))
    try:
        with Testbed(workdir=tmp_path_factory.mktemp("userspace-mode")) as tb:
            node = tb.add_node("node-a", underlay_ip=NODE_IP, pod_cidr="198.18.1.0/24")
            webs = [tb.add_pod(node, f"web-{i}", f"198.18.1.1{i}") for i in (1, 2, 3)]
            client = tb.add_pod(node, "client", "198.18.1.100")
            outside = tb.add_external("outside", "198.18.200.100")
            outside.route("198.19.40.0/24", via=NODE_IP)
            for w in webs:
                start_backend(w, 8080, proto="http")
                start_backend(w, 7007, proto="udp")
                start_backend(w, 7070, proto="tcp")
            _start_special(webs[0], "bulk", "9000", str(BULK))
            _start_special(webs[1], "halfclose", "9001")
            yield Site(tb, node, webs, client, outside)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


# -- manifests ---------------------------------------------------------------------------------


def svc(name: str, ip: str | list[str], ports: list[tuple], **spec) -> dict:
    """ports: (name, port, protocol[, nodePort])."""
    ips = [ip] if isinstance(ip, str) else ip
    s = {
        "clusterIP": ips[0],
        "clusterIPs": ips,
        "ports": [
            {"name": p[0], "port": p[1], "protocol": p[2], **({"nodePort": p[3]} if p[3:] else {})}
            for p in ports
        ],
        **spec,
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": s,
    }


def eps(service: str, name: str, ports: list[tuple], ips: list[str]) -> dict:
    """ports: (name, port, protocol); one ready endpoint per ip on node-a."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": p[0], "port": p[1], "protocol": p[2]} for p in ports],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-a"} for ip in ips
        ],
    }


WEB_IPS = ["198.18.1.11", "198.18.1.12", "198.18.1.13"]


class Manifests:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def write(self, *objs: dict) -> None:
        tmp = self.path / ".all.yaml.tmp"
        tmp.write_text(yaml.safe_dump_all(objs))
        os.replace(tmp, self.path / "all.yaml")


Start = Callable[..., ProxyProcess]


@pytest.fixture
def manifests(tmp_path: Path) -> Manifests:
    return Manifests(tmp_path / "manifests")


@pytest.fixture
def start(site: Site, manifests: Manifests) -> Iterator[Start]:
    started: list[ProxyProcess] = []

    def _start(*extra: str) -> ProxyProcess:
        px = site.node.start_proxy(
            [
                "--proxy-mode=userspace",
                "--manifests",
                str(manifests.path),
                "--hostname-override",
                "node-a",
                "--iptables-min-sync-period",
                "0.2",
                "--healthz-bind-address",
                "0.0.0.0:10256",
                *extra,
            ]
        )
        started.append(px)
        px.wait_ready()
        return px

    yield _start
    for px in started:
        if px.alive():
            px.stop()
    site.node.python(["-m", "proxy", "--cleanup"], timeout=60)
    assert IFNAME not in site.node.exec(["ip", "link"]).stdout


def resync(px: ProxyProcess, manifests: Manifests, *objs: dict) -> None:
    n = px.sync_count()
    manifests.write(*objs)
    px.wait_synced(n)


def metric(px: ProxyProcess, name: str, **labels: str) -> float:
    total = 0.0
    for line in px.metrics().splitlines():
        head = line.split("{")[0].split(" ")[0]
        if head == name and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def addresses_on_interface(node: Node) -> set[str]:
    p = node.exec(["ip", "-o", "address", "show", "dev", IFNAME], check=False)
    return set(re.findall(r"inet6? ([0-9a-f.:]+)/(?:32|128)", p.stdout))


def socket_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def wait_for(pred: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


WEB = svc("web", "198.19.40.10", [("http", 80, "TCP")])
WEB_EPS = eps("web", "web-1", [("http", 8080, "TCP")], WEB_IPS)


# -- tests -------------------------------------------------------------------------------------


def test_clusterip_spreads_across_endpoints_without_nat_rules(site: Site, manifests, start):
    manifests.write(WEB, WEB_EPS)
    px = start()
    got = Counter(client_request(site.client, "198.19.40.10", 80, "http") for _ in range(30))
    assert set(got) == {"web-1", "web-2", "web-3"}
    assert min(got.values()) >= 5, got
    assert "198.19.40.10" in addresses_on_interface(site.node)
    rules = site.node.exec(["iptables-save"]).stdout
    assert "KUBE-SVC" not in rules and "KUBE-SEP" not in rules and "198.19.40.10" not in rules
    assert metric(px, "kubeproxy_userspace_connections_total", service="default/web:http") == 30


def test_nodeport_and_external_ip_from_outside(site: Site, manifests, start):
    manifests.write(
        svc(
            "web",
            "198.19.40.10",
            [("http", 80, "TCP", 30080)],
            type="NodePort",
            externalIPs=["198.19.40.200"],
        ),
        WEB_EPS,
    )
    start("--nodeport-addresses", "198.18.200.0/24")
    names = {client_request(site.outside, NODE_IP, 30080, "http") for _ in range(9)}
    assert names == {"web-1", "web-2", "web-3"}
    assert client_request(site.outside, "198.19.40.200", 80, "http") in names
    listening = site.node.exec(["ss", "-Hltn"]).stdout
    assert f"{NODE_IP}:30080" in listening
    assert "127.0.0.1:30080" not in listening  # not allowed by --nodeport-addresses


def test_udp_through_a_service_port(site: Site, manifests, start):
    manifests.write(
        svc("dns", "198.19.40.53", [("dns", 53, "UDP")]),
        eps("dns", "dns-1", [("dns", 7007, "UDP")], WEB_IPS),
    )
    px = start()
    names = {client_request(site.client, "198.19.40.53", 53, "udp", payload=b"q") for _ in range(9)}
    assert names == {"web-1", "web-2", "web-3"}
    assert metric(px, "kubeproxy_userspace_udp_sessions_created_total") >= 9


def test_100mb_transfer_arrives_intact_both_ways(site: Site, manifests, start):
    manifests.write(
        svc("bulk", "198.19.40.20", [("data", 9000, "TCP")]),
        eps("bulk", "bulk-1", [("data", 9000, "TCP")], ["198.18.1.11"]),
    )
    start()
    data = random.Random(1).randbytes(BULK)
    with site.client.socket() as s:
        s.settimeout(60)
        s.connect(("198.19.40.20", 9000))
        sender = threading.Thread(target=s.sendall, args=(data,))
        sender.start()
        received = bytearray()
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            received += chunk
        sender.join()
    head, _, rest = bytes(received).partition(b"\n")
    assert head.decode() == hashlib.sha256(data).hexdigest()  # client → endpoint intact
    body, trailer = rest[:BULK], rest[BULK:]
    block = bulk_block()
    assert trailer.decode() == hashlib.sha256(body).hexdigest()  # endpoint → client intact
    assert body[: len(block)] == block and len(body) == BULK


def test_half_close_keeps_the_reply_direction_open(site: Site, manifests, start):
    manifests.write(
        svc("hc", "198.19.40.21", [("hc", 9001, "TCP")]),
        eps("hc", "hc-1", [("hc", 9001, "TCP")], ["198.18.1.12"]),
    )
    start()
    with site.client.socket() as s:
        s.settimeout(10)
        s.connect(("198.19.40.21", 9001))
        s.sendall(b"z" * 123456)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply == b"got 123456"


def test_failover_when_endpoints_refuse_or_never_answer(site: Site, manifests, start):
    # web-3 answers nothing on 8088 (SYNs dropped in its own namespace) and refuses 8089.
    site.webs[2].exec(["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "8088", "-j", "DROP"])
    try:
        manifests.write(
            WEB,
            eps("web", "web-good", [("http", 8080, "TCP")], WEB_IPS[:2]),
            eps("web", "web-refuse", [("http", 8089, "TCP")], WEB_IPS[2:]),
            eps("web", "web-blackhole", [("http", 8088, "TCP")], WEB_IPS[2:]),
        )
        px = start()
        names = [
            client_request(site.client, "198.19.40.10", 80, "http", timeout=5) for _ in range(20)
        ]
        assert set(names) == {"web-1", "web-2"}
        assert metric(px, "kubeproxy_userspace_connect_failures_total") >= 2
        assert metric(px, "kubeproxy_userspace_connect_retries_total") >= 2
        log = px.logs()
        assert "198.18.1.13:8089 failed (Connection refused)" in log
        assert "198.18.1.13:8088 failed (Connection timed out)" in log
    finally:
        site.webs[2].exec(["iptables", "-F", "INPUT"])


def test_endpoint_removal_drains_established_connection(site: Site, manifests, start):
    echo = svc("echo", "198.19.40.30", [("tcp", 7070, "TCP")])
    manifests.write(echo, eps("echo", "echo-1", [("tcp", 7070, "TCP")], WEB_IPS))
    px = start()
    held = None
    for _ in range(6):
        s = site.client.socket()
        s.settimeout(5)
        s.connect(("198.19.40.30", 7070))
        if s.recv(64).strip() == b"web-1":
            held = s
            break
        s.close()
    assert held is not None
    resync(px, manifests, echo, eps("echo", "echo-1", [("tcp", 7070, "TCP")], WEB_IPS[1:]))
    new = {client_request(site.client, "198.19.40.30", 7070, "tcp") for _ in range(8)}
    assert new == {"web-2", "web-3"}  # removed endpoint gets no new connections
    held.sendall(b"still-draining")
    assert held.recv(64) == b"still-draining"  # the established one keeps working
    held.close()


def test_session_affinity_client_ip(site: Site, manifests, start):
    manifests.write(
        svc(
            "sticky",
            "198.19.40.40",
            [("http", 80, "TCP")],
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}},
        ),
        eps("sticky", "sticky-1", [("http", 8080, "TCP")], WEB_IPS),
    )
    start()
    names = {client_request(site.client, "198.19.40.40", 80, "http") for _ in range(10)}
    assert len(names) == 1
    outside = {client_request(site.outside, "198.19.40.40", 80, "http") for _ in range(5)}
    assert len(outside) == 1


def test_stop_leaves_addresses_and_cleanup_releases_every_one(site: Site, manifests, start):
    manifests.write(
        WEB,
        WEB_EPS,
        svc("dual", ["198.19.40.50", "fd00:19::50"], [("http", 80, "TCP")]),
        svc("ext", "198.19.40.51", [("http", 80, "TCP")], externalIPs=["198.19.40.201"]),
    )
    px = start()
    want = {"198.19.40.10", "198.19.40.50", "fd00:19::50", "198.19.40.51", "198.19.40.201"}
    assert addresses_on_interface(site.node) == want
    px.stop()
    assert addresses_on_interface(site.node) == want  # SIGTERM leaves them, like rules
    out = site.node.python(["-m", "proxy", "--cleanup"], timeout=60)
    assert "released 5 Service addresses" in out.stderr + out.stdout
    assert IFNAME not in site.node.exec(["ip", "link"]).stdout


def test_service_removal_releases_its_address(site: Site, manifests, start):
    other = svc("other", "198.19.40.60", [("http", 80, "TCP")])
    manifests.write(WEB, WEB_EPS, other)
    px = start()
    assert "198.19.40.60" in addresses_on_interface(site.node)
    resync(px, manifests, WEB, WEB_EPS)
    assert addresses_on_interface(site.node) == {"198.19.40.10"}
    with pytest.raises(OSError):  # no longer local: the node has no route for it
        client_request(site.client, "198.19.40.60", 80, "http", timeout=1)
    assert client_request(site.client, "198.19.40.10", 80, "http") in {"web-1", "web-2", "web-3"}


def test_port_in_use_and_refused_address_are_logged_and_the_rest_served(
    site: Site, manifests, start
):
    busy = svc("busy", "198.19.40.70", [("http", 80, "TCP", 30081)], type="NodePort")
    dual = svc("dual", ["198.19.40.71", "fd00:19::71"], [("http", 80, "TCP")])
    objs = (
        WEB,
        WEB_EPS,
        busy,
        eps("busy", "busy-1", [("http", 8080, "TCP")], WEB_IPS),
        dual,
        eps("dual", "dual-1", [("http", 8080, "TCP")], WEB_IPS),
    )
    manifests.write(*objs)
    squatter = site.node.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind((NODE_IP, 30081))
    squatter.listen(1)
    # IPv6 off for new links in the node: the proxy's interface cannot take fd00:19::71.
    site.node.exec(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
    try:
        px = start("--nodeport-addresses", "198.18.200.0/24")
        log = px.logs()
        assert (
            f"default/busy:http: cannot listen on {NODE_IP}:30081/TCP: port already in use" in log
        )
        assert "cannot add Service address fd00:19::71" in log
        for ip in ("198.19.40.10", "198.19.40.70", "198.19.40.71"):
            assert client_request(site.client, ip, 80, "http") in {"web-1", "web-2", "web-3"}
        squatter.close()
        resync(px, manifests, *objs, svc("nudge", "198.19.40.72", [("http", 80, "TCP")]))
        assert client_request(site.outside, NODE_IP, 30081, "http") in {"web-1", "web-2", "web-3"}
        assert px.logs().count("port already in use") == 1  # logged once, not every sync
        assert metric(px, "kubeproxy_userspace_listen_failures_total") >= 1
        assert metric(px, "kubeproxy_userspace_address_failures_total") >= 1
    finally:
        squatter.close()
        site.node.exec(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=0"])


def nofile_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit")


def test_10000_concurrent_connections_and_no_descriptor_leak(site: Site, manifests, start):
    """10,000 clients at once. Each proxied connection takes two descriptors; where the
    hard limit is below that (20,000 on this machine, and it cannot be raised here) the
    ones beyond it wait in the accept queue, unharmed, until others close."""
    echo = svc("echo", "198.19.40.30", [("tcp", 7070, "TCP")])
    manifests.write(echo, eps("echo", "echo-1", [("tcp", 7070, "TCP")], WEB_IPS))
    px = start()
    client_request(site.client, "198.19.40.30", 7070, "tcp")  # warm up
    wait_for(lambda: metric(px, "kubeproxy_userspace_active_connections") == 0, what="idle")
    base = socket_fds(px.pid)
    n, batch = 10000, 500
    limit = nofile_limit(px.pid)
    capacity = (limit - fd_headroom(limit) - len(os.listdir(f"/proc/{px.pid}/fd"))) // 2
    socks: list[socket.socket] = []
    greeted: set[socket.socket] = set()
    sel = selectors.DefaultSelector()

    def pump(until: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(greeted) < until and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                s = key.fileobj
                assert s.recv(64).startswith(b"web-")  # greeted, not reset
                sel.unregister(s)
                greeted.add(s)

    try:
        for _ in range(0, n, batch):
            for _ in range(batch):
                s = site.client.socket()
                s.setblocking(False)
                s.connect_ex(("198.19.40.30", 7070))
                sel.register(s, selectors.EVENT_READ)
                socks.append(s)
            pump(min(len(socks), capacity - 40), 30)
        pump(n, 3)
        assert len(greeted) >= min(n, capacity - 40), (len(greeted), capacity)
        if len(greeted) < n:  # the limit: the rest wait, a log line says why
            assert "out of file descriptors" in px.logs()
            done = list(greeted)[:200]
            for s in done:
                s.close()
                greeted.discard(s)
                socks.remove(s)
            pump(len(socks), 30)
        assert len(greeted) == len(socks) >= n - 200
        assert metric(px, "kubeproxy_userspace_active_connections") == len(socks)
        assert socket_fds(px.pid) >= base + 2 * len(socks)
        for s in socks:
            s.setblocking(True)
            s.settimeout(10)
        for i in range(0, len(socks), 97):  # a sample of them still forwards both ways
            socks[i].sendall(b"e%d" % i)
            assert socks[i].recv(64) == b"e%d" % i
    finally:
        for s in socks:
            s.close()
        sel.close()
    wait_for(lambda: metric(px, "kubeproxy_userspace_active_connections") == 0, 30, "drain")
    wait_for(lambda: socket_fds(px.pid) == base, 10, f"{base} sockets in the proxy")
    assert client_request(site.client, "198.19.40.30", 7070, "tcp") in {"web-1", "web-2", "web-3"}
    assert px.alive()


def test_descriptor_exhaustion_pauses_accepts_logs_once_and_recovers(site: Site, manifests, start):
    echo = svc("echo", "198.19.40.30", [("tcp", 7070, "TCP")])
    manifests.write(echo, eps("echo", "echo-1", [("tcp", 7070, "TCP")], WEB_IPS))
    px = start()
    client_request(site.client, "198.19.40.30", 7070, "tcp")
    wait_for(lambda: metric(px, "kubeproxy_userspace_active_connections") == 0, what="idle")
    base = socket_fds(px.pid)
    top = max(int(fd) for fd in os.listdir(f"/proc/{px.pid}/fd"))
    limit = top + 1 + fd_headroom(top) + 40  # room for ~20 proxied connections
    subprocess.run(["prlimit", f"--pid={px.pid}", f"--nofile={limit}:{limit}"], check=True)
    silent = []
    try:
        for _ in range(80):
            s = site.client.socket()
            s.settimeout(5)
            s.connect(("198.19.40.30", 7070))  # completes in the kernel backlog
            silent.append(s)
        wait_for(lambda: "out of file descriptors" in px.logs(), 10, "the EMFILE log line")
        time.sleep(1.0)  # several accept pauses happen meanwhile
        assert px.alive()
    finally:
        for s in silent:
            s.close()
    wait_for(lambda: metric(px, "kubeproxy_userspace_active_connections") == 0, 15, "drain")
    assert client_request(site.client, "198.19.40.30", 7070, "tcp") in {"web-1", "web-2", "web-3"}
    assert px.logs().count("out of file descriptors") == 1
    assert metric(px, "kubeproxy_userspace_accept_pauses_total") >= 1
    wait_for(lambda: socket_fds(px.pid) == base, 10, f"{base} sockets in the proxy")


def test_local_route_address_mode_and_its_cleanup(site: Site):
    """Where no interface can be made, Service IPs are `local` routes on lo (proto 107)."""
    code = """
import sys
from proxy.userspace.addresses import AddressOwner
o = AddressOwner("local-route")
print(o.start())
o.add("198.19.40.90"); o.add("fd00:19::90")
print(sorted(o.current()))
from proxy.userspace.listeners import open_listener
for ip in ("198.19.40.90", "fd00:19::90"):
    open_listener((ip, 8000, "TCP"), freebind=":" in ip).close()
print("bound")
o.remove("198.19.40.90")
print(sorted(o.current()))
"""
    out = site.node.python(code).stdout.split("\n")
    assert out[0] == "local-route"
    assert out[1] == "['198.19.40.90', 'fd00:19::90']"
    assert out[2] == "bound"
    assert out[3] == "['fd00:19::90']"
    assert "fd00:19::90" in site.node.exec(["ip", "-6", "route", "show", "table", "local"]).stdout
    site.node.python(["-m", "proxy", "--cleanup"], timeout=60)
    routes = site.node.exec(["ip", "-6", "route", "show", "table", "local", "proto", "107"]).stdout
    assert routes.strip() == ""
