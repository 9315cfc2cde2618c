"""Faults survived, userspace mode: endpoints dying, connection churn, endpoint removal.

One daemon (`--proxy-mode=userspace`) for the module on node-a, pods web-1 198.18.1.11
and web-2 198.18.1.12 (http :8080, tcp echo :7070, bulk :9000), a streaming backend on
web-1 :9100 started per test, a client pod. Every case runs client traffic through the
`web` Service (tests/e2e/loadgen.py) and counts what was lost. Services: 198.19.55.0/24.
"""

from __future__ import annotations

import hashlib
import random
import selectors
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from proxy.testbed import Host, Node, ProxyProcess, Testbed, client_request, start_backend

from .fault_helpers import Load, report, wait_until
from .test_userspace_mode import Manifests, eps, metric, socket_fds, svc
from .userspace_backends import bulk_block

__all__ = ["report"]

pytestmark = pytest.mark.kernel

NODE_IP = "198.18.200.1"
WEB_IPS = ["198.18.1.11", "198.18.1.12"]
END_BOUND = 5.0  # a killed endpoint's stream must end for the client this soon
BULK = 16 << 20


@dataclass
class Site:
    tb: Testbed
    node: Node
    webs: list[Host]
    client: Host
    manifests: Manifests
    proxy: ProxyProcess
    objs: list[dict]

    def apply(self, *objs: dict) -> None:
        """Replace the manifests and wait for the sync that follows."""
        n = self.proxy.sync_count()
        self.manifests.write(*objs)
        self.proxy.wait_synced(n)


def _special(host: Host, *args: str) -> subprocess.Popen:
    p = host.python(
        ["-m", "tests.e2e.userspace_backends", *args], background=True, stdout=subprocess.PIPE
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == b"READY", f"backend {args} did not start"
    return p


BASE = [
    svc("web", "198.19.55.10", [("http", 80, "TCP")]),
    eps("web", "web-1", [("http", 8080, "TCP")], WEB_IPS),
    svc("echo", "198.19.55.12", [("tcp", 70, "TCP")]),
    eps("echo", "echo-1", [("tcp", 7070, "TCP")], WEB_IPS),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("faults-userspace")
    with Testbed(workdir=work) as tb:
        node = tb.add_node("node-a", underlay_ip=NODE_IP, pod_cidr="198.18.1.0/24")
        webs = [tb.add_pod(node, f"web-{i}", ip) for i, ip in ((1, WEB_IPS[0]), (2, WEB_IPS[1]))]
        client = tb.add_pod(node, "client", "198.18.1.100")
        for w in webs:
            start_backend(w, 8080, proto="http")
            start_backend(w, 7070, proto="tcp")
            _special(w, "bulk", "9000", str(BULK))
        manifests = Manifests(work / "manifests")
        manifests.write(*BASE)
        px = node.start_proxy(
            [
                "--proxy-mode=userspace",
                "--manifests", str(manifests.path),
                "--hostname-override", "node-a",
                "--iptables-min-sync-period", "0.2",
                "--healthz-bind-address", f"{NODE_IP}:10256",
            ]
        )  # fmt: skip
        try:
            px.wait_ready()
            yield Site(tb, node, webs, client, manifests, px, list(BASE))
        finally:
            px.stop()
            node.python(["-m", "proxy", "--cleanup"], timeout=60)
            assert "Traceback" not in px.logs(), px.log_tail()


@pytest.fixture
def load(site: Site) -> Iterator[Load]:
    ld = Load(site.client, "198.19.55.10", 80)
    ld.wait_ok(10)
    yield ld
    ld.stop()


def test_endpoint_killed_mid_stream(site: Site, load: Load, report) -> None:
    """The endpoint process dies (kill -9) while streaming to a client through the
    proxy: the client sees its stream end within END_BOUND, not a hang."""
    streamer = _special(site.webs[0], "stream", "9100")
    site.apply(
        *site.objs,
        svc("stream", "198.19.55.11", [("s", 9100, "TCP")]),
        eps("stream", "stream-1", [("s", 9100, "TCP")], WEB_IPS[:1]),
    )
    with site.client.socket() as s:
        s.settimeout(30)
        s.connect(("198.19.55.11", 9100))
        got = 0
        while got < 1 << 20:  # the stream flows
            chunk = s.recv(1 << 16)
            assert chunk, "stream ended early"
            got += len(chunk)
        streamer.kill()
        killed = time.monotonic()
        streamer.wait(10)
        s.settimeout(END_BOUND)
        ended = ""
        try:
            while s.recv(1 << 16):
                pass
            ended = "EOF"
        except ConnectionResetError:
            ended = "reset"
        except TimeoutError:
            pytest.fail(f"the client saw no end of the stream within {END_BOUND}s")
        seen = time.monotonic() - killed
    wait_until(
        lambda: metric(site.proxy, "kubeproxy_userspace_active_connections") == 0,
        "the proxied connection to close",
    )
    load.wait_ok(5)
    traffic = load.summary()
    report("userspace_endpoint_killed_mid_stream", end_seen_s=round(seen, 3), end=ended, **traffic)
    assert traffic["lost"] == 0, traffic
    site.apply(*site.objs)


def test_3000_connections_opened_and_closed(site: Site, load: Load, report) -> None:
    """3,000 connections through the proxy, 500 at a time, each greeted then closed:
    every one is served and the proxy's sockets come back to their baseline."""
    px = site.proxy
    client_request(site.client, "198.19.55.12", 70, "tcp")
    wait_until(lambda: metric(px, "kubeproxy_userspace_active_connections") == 0, "idle")
    base = socket_fds(px.pid)
    served = 0
    t0 = time.monotonic()
    for _ in range(3000 // 500):
        socks = []
        sel = selectors.DefaultSelector()
        for _ in range(500):
            s = site.client.socket()
            s.setblocking(False)
            s.connect_ex(("198.19.55.12", 70))
            sel.register(s, selectors.EVENT_READ)
            socks.append(s)
        waiting = len(socks)
        deadline = time.monotonic() + 60
        while waiting and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                assert s.recv(64).startswith(b"web-"), "not greeted"
                sel.unregister(s)
                waiting -= 1
                served += 1
        sel.close()
        for s in socks:
            s.close()
        assert not waiting, f"{waiting} of 500 connections were not served"
    took = time.monotonic() - t0
    wait_until(lambda: metric(px, "kubeproxy_userspace_active_connections") == 0, "drain")
    wait_until(lambda: socket_fds(px.pid) == base, f"{base} sockets in the proxy")
    load.wait_ok(5)
    traffic = load.summary()
    report(
        "userspace_3000_connections",
        connections=served,
        seconds=round(took, 1),
        fd_baseline=base,
        **traffic,
    )
    assert served == 3000
    assert traffic["lost"] == 0, traffic


def established(host: Host, port: int) -> int:
    out = host.exec(["ss", "-Htn", "state", "established", f"( sport = :{port} )"]).stdout
    return len(out.splitlines())


def test_removed_endpoints_transfer_drains(site: Site, load: Load, report) -> None:
    """A 16 MiB transfer each way is in progress through web-1 when web-1 is removed
    from the Service: new connections go to web-2 only, the transfer completes intact."""
    objs = [
        *site.objs,
        svc("bulk", "198.19.55.13", [("data", 9000, "TCP")]),
        eps("bulk", "bulk-1", [("data", 9000, "TCP")], WEB_IPS[:1]),
    ]
    site.apply(*objs)
    data = random.Random(3).randbytes(BULK)
    with site.client.socket() as s:
        s.settimeout(60)
        s.connect(("198.19.55.13", 9000))
        s.sendall(data[: BULK // 2])
        removed = [*objs[:-1], eps("bulk", "bulk-1", [("data", 9000, "TCP")], WEB_IPS[1:])]
        site.apply(*removed)  # web-1 is no longer an endpoint
        with site.client.socket() as fresh:  # a new connection goes to web-2
            fresh.settimeout(10)
            fresh.connect(("198.19.55.13", 9000))
            wait_until(lambda: established(site.webs[1], 9000) == 1, "a connection on web-2")
            assert established(site.webs[0], 9000) == 1  # only the draining one
        s.sendall(data[BULK // 2 :])
        received = bytearray()
        while chunk := s.recv(1 << 20):
            received += chunk
    head, _, rest = bytes(received).partition(b"\n")
    assert head.decode() == hashlib.sha256(data).hexdigest()  # the upload arrived intact
    body, trailer = rest[:BULK], rest[BULK:]
    assert len(body) == BULK and trailer.decode() == hashlib.sha256(body).hexdigest()
    assert body[: 1 << 20] == bulk_block()
    load.wait_ok(5)
    traffic = load.summary()
    report("userspace_removed_endpoint_drains", transfer_bytes=2 * BULK, intact=True, **traffic)
    assert traffic["lost"] == 0, traffic
    site.apply(*site.objs)
