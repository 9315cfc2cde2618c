"""The virtual-node testbed itself: connectivity, backends, sockets, cleanup."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.testbed import (
    Cluster,
    ProxyExited,
    ProxyProcess,
    Testbed,
    cleanup_stale,
    client_request,
    start_backend,
)
from proxy.testbed import netns as _netns

pytestmark = pytest.mark.kernel


def ns_with_prefix(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix + "-")]


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- connectivity --------------------------------------------------------------------------


def test_pods_on_one_node_reach_each_other_and_the_node(two_node_cluster: Cluster) -> None:
    c = two_node_cluster
    for h in (c.web_a, c.client, c.a):
        start_backend(h, 7000)
    assert client_request(c.client, c.web_a.ip, 7000) == "a-web"
    assert client_request(c.web_a, c.client.ip, 7000) == "client"
    assert client_request(c.client, c.a.ip, 7000) == "node-a"
    assert client_request(c.a, c.client.ip, 7000) == "client"


def test_pod_reaches_pod_on_other_node_via_underlay(two_node_cluster: Cluster) -> None:
    c = two_node_cluster
    start_backend(c.web_b, 8080, proto="http")
    start_backend(c.client, 8080, proto="http")
    assert client_request(c.client, c.web_b.ip, 8080, "http") == "b-web"
    assert client_request(c.web_b, c.client.ip, 8080, "http") == "client"
    # Routed, not NATed: the backend sees the client pod's own address.
    assert client_request(c.client, c.web_b.ip, 8080, "http", path="/client") == c.client.ip
    # And the path is the underlay route to node-b.
    route = c.a.exec(["ip", "route", "get", c.web_b.ip]).stdout
    assert f"via {c.b.ip} dev eth0" in route


def test_outside_host_reaches_node_ips_but_not_pods(two_node_cluster: Cluster) -> None:
    c = two_node_cluster
    for node in c.nodes:
        start_backend(node, 30080, proto="udp")
        assert client_request(c.outside, node.ip, 30080, "udp") == node.name
    start_backend(c.web_a, 30080)
    with pytest.raises(OSError) as e:
        client_request(c.outside, c.web_a.ip, 30080, timeout=1)
    assert e.value.errno == errno.ENETUNREACH
    c.outside.route("198.18.1.0/24", via=c.a.ip)  # what tests do for Service ranges
    assert client_request(c.outside, c.web_a.ip, 30080) == "a-web"


def test_no_namespace_routes_out_of_the_machine(two_node_cluster: Cluster) -> None:
    c = two_node_cluster
    for h in (c.a, c.b, c.outside):
        assert h.exec(["ip", "route", "show", "default"]).stdout == ""
        p = h.exec(["ip", "route", "get", "192.0.2.1"], check=False)
        assert p.returncode != 0 and "unreachable" in p.stderr
    # Pods default to their node, which has nowhere further to send it.
    with pytest.raises(OSError) as e:
        client_request(c.client, "192.0.2.1", 9, timeout=1)
    assert e.value.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)


def test_dual_stack_pods_nodes_and_outside(two_node_cluster_dual: Cluster) -> None:
    c = two_node_cluster_dual
    for h in (c.web_a, c.web_b, c.a):
        start_backend(h, 7000)
    assert client_request(c.client, c.web_a.ipv6, 7000) == "a-web"
    assert client_request(c.client, c.web_b.ipv6, 7000) == "b-web"
    assert client_request(c.web_b, c.a.ipv6, 7000) == "node-a"
    assert client_request(c.outside, c.a.ipv6, 7000) == "node-a"
    assert client_request(c.client, c.web_b.ip, 7000) == "b-web"


# -- backends and sockets ------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["tcp", "udp", "http"])
def test_backends_answer_with_their_names(two_node_cluster: Cluster, proto: str) -> None:
    c = two_node_cluster
    start_backend(c.web_a, 5000, proto=proto)
    start_backend(c.web_b, 5000, proto=proto, reply="custom-b")
    assert client_request(c.client, c.web_a.ip, 5000, proto) == "a-web"
    assert client_request(c.client, c.web_b.ip, 5000, proto, payload=b"x" * 3000) == "custom-b"


def test_tcp_backend_echoes_and_refused_port_raises(two_node_cluster: Cluster) -> None:
    c = two_node_cluster
    start_backend(c.web_a, 5001)
    with c.client.socket() as s:
        s.settimeout(3)
        s.connect((c.web_a.ip, 5001))
        f = s.makefile("rwb")
        assert f.readline() == b"a-web\n"
        f.write(b"ping\n")
        f.flush()
        assert f.readline() == b"ping\n"
    with pytest.raises(ConnectionRefusedError):
        client_request(c.client, c.web_a.ip, 5002)
    with pytest.raises(ConnectionRefusedError):
        client_request(c.client, c.web_a.ip, 5002, "udp")


def test_socket_is_created_inside_the_namespace(two_node_cluster: Cluster) -> None:
    c = two_node_cluster
    # The pod IP exists only in the pod namespace: binding it works there, not here.
    with c.web_a.socket() as s:
        s.bind((c.web_a.ip, 0))
    with socket.socket() as s, pytest.raises(OSError) as e:
        s.bind((c.web_a.ip, 0))
    assert e.value.errno == errno.EADDRNOTAVAIL
    # An in-process server bound in a node namespace, reached from a pod.
    srv = c.a.socket()
    srv.bind((c.a.ip, 0))
    srv.listen()
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, addr = srv.accept()
        with conn:
            conn.sendall(f"hello {addr[0]}\n".encode())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert client_request(c.client, c.a.ip, port, payload=b"") == f"hello {c.client.ip}"
    t.join(5)
    srv.close()


def test_exec_python_and_errors(two_node_cluster: Cluster) -> None:
    c = two_node_cluster
    out = c.web_a.python("import socket; print(socket.if_nameindex())").stdout
    assert "eth0" in out
    assert c.web_a.exec(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout.count("/32") == 1
    with pytest.raises(subprocess.CalledProcessError) as e:
        c.web_a.exec(["ip", "link", "show", "nosuchdev"])
    assert "nosuchdev" in str(e.value)
    with pytest.raises(ValueError):
        c.tb.add_pod(c.a, "wrong-node", "198.18.2.99")
    with pytest.raises(ValueError):
        c.tb.add_pod(c.a, "a-web", "198.18.1.11")


# -- daemon handle (a stand-in daemon: the real one is tested by the data-plane tests) -----

FAKE_DAEMON = textwrap.dedent(
    """
    import http.server, signal, sys, threading, time
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (b"kubeproxy_sync_proxy_rules_last_timestamp_seconds 1\\n"
                    if self.path == "/metrics" else b'{"lastUpdated": "now"}')
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    for port in (10256, 10249):
        host = "0.0.0.0" if port == 10256 else "127.0.0.1"
        s = http.server.HTTPServer((host, port), H)
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("starting", flush=True)
    time.sleep(0.2)
    print("INFO synced 3 services", flush=True)
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)
    """
)


def _fake_proxy(node, tmp_path: Path, *extra: str) -> ProxyProcess:
    log = tmp_path / f"fake-{node.name}.log"
    args = ["--healthz-bind-address", "0.0.0.0:10256", *extra]
    with open(log, "ab") as out:
        p = node.run(
            [sys.executable, "-c", FAKE_DAEMON, *args], stdout=out, stderr=subprocess.STDOUT
        )
    return ProxyProcess(node, p, log, args)


def test_proxy_handle_ready_metrics_stop(two_node_cluster: Cluster, tmp_path: Path) -> None:
    c = two_node_cluster
    px = _fake_proxy(c.a, tmp_path)
    px.wait_ready(timeout=20)
    assert px.sync_count() == 1
    assert px.healthz()[0] == 200
    assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in px.metrics()
    assert px.stop() == -signal.SIGTERM
    assert not pid_alive(px.pid)

    stubborn = _fake_proxy(c.b, tmp_path, "--ignore-term")
    stubborn.wait_ready(timeout=20)
    assert stubborn.stop(timeout=0.5) == -signal.SIGKILL


def test_proxy_handle_reports_early_exit(testbed: Testbed, tmp_path: Path) -> None:
    node = testbed.add_node("n1", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
    log = tmp_path / "dies.log"
    with open(log, "ab") as out:
        p = node.run(
            [sys.executable, "-c", "print('boom: bad flag'); raise SystemExit(2)"], stdout=out
        )
    px = ProxyProcess(node, p, log, [])
    with pytest.raises(ProxyExited, match="boom: bad flag"):
        px.wait_ready(timeout=20)


# -- cleanup on every exit path --------------------------------------------------------------


def test_close_removes_namespaces_and_processes(tmp_path: Path) -> None:
    tb = Testbed(workdir=tmp_path)
    node = tb.add_node("n1", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
    pod = tb.add_pod(node, "p1", "198.18.1.2", ipv6="fd00:18::2")
    tb.add_external("out", "198.18.200.9")
    backend = start_backend(pod, 80)
    stray = pod.run(["sleep", "300"])
    sock = node.socket()
    assert len(ns_with_prefix(tb.prefix)) == 4
    inodes = {os.stat(f"/run/netns/{n}").st_ino for n in ns_with_prefix(tb.prefix)}
    tb.close()
    assert ns_with_prefix(tb.prefix) == []
    # Nothing in this process (e.g. a thread that entered a namespace) keeps one alive.
    ours = {os.stat(f"/proc/self/task/{t}/ns/net").st_ino for t in os.listdir("/proc/self/task")}
    assert not inodes & ours
    assert not pid_alive(backend.pid) and not pid_alive(stray.pid)
    assert sock.fileno() == -1
    tb.close()  # idempotent


def test_context_manager_cleans_up_on_error() -> None:
    with pytest.raises(RuntimeError, match="test failure"), Testbed() as tb:
        prefix = tb.prefix
        tb.add_node("n1", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
        raise RuntimeError("test failure")
    assert ns_with_prefix(prefix) == []


CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from proxy.testbed import Testbed, start_backend
    # A terminal's dispositions: a run started in the background or under nohup hands
    # its children SIGINT/SIGHUP ignored, and an ignored signal ends nothing to clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    tb = Testbed({prefix!r})
    {enter}
    n = tb.add_node("n1", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
    p = tb.add_pod(n, "p1", "198.18.1.2")
    b = start_backend(p, 80)
    print(b.pid, flush=True)
    {body}
    """
)


def _child(prefix: str, *, enter: str = "", body: str = "time.sleep(60)") -> subprocess.Popen:
    code = CHILD.format(prefix=prefix, enter=enter, body=body)
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )


@pytest.fixture
def child_prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A prefix for a testbed in a child process; its leftovers go even if the test fails."""
    prefix = f"kpt{os.getpid():x}{request.node.name.split('[')[-1].strip(']').lower()}"
    prefix = re.sub(r"[^a-z0-9]", "", prefix)[:30]
    yield prefix
    cleanup_stale(prefix + "-*", force=True)


@pytest.mark.parametrize(
    ("sig", "enter"),
    [(signal.SIGTERM, ""), (signal.SIGINT, "tb.__enter__()"), (signal.SIGHUP, "")],
)
def test_signals_clean_up(sig: int, enter: str, child_prefix: str) -> None:
    prefix = child_prefix
    child = _child(prefix, enter=enter)
    try:
        backend_pid = int(child.stdout.readline())
        assert len(ns_with_prefix(prefix)) == 3
        child.send_signal(sig)
        child.wait(20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert ns_with_prefix(prefix) == []
    assert not pid_alive(backend_pid)


def test_cleanup_stale_removes_crashed_run_only(child_prefix: str) -> None:
    prefix = child_prefix
    child = _child(prefix, body="import os; os._exit(1)")
    backend_pid = int(child.stdout.readline())
    child.wait(20)
    assert len(ns_with_prefix(prefix)) == 3  # os._exit skips every handler: a crash
    with Testbed(f"kpt{os.getpid():x}live") as live:
        live.add_node("n1", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
        removed = cleanup_stale(f"kpt{os.getpid():x}*")
        assert set(removed) == {f"{prefix}-{n}" for n in ("net", "n1", "p1")}
        assert ns_with_prefix(prefix) == []
        assert not pid_alive(backend_pid)
        assert len(ns_with_prefix(live.prefix)) == 2  # a live owner's namespaces stay
    assert not any(n.startswith(prefix) for n in _netns.list_names())


def test_fixed_prefix_reuses_leftovers_of_dead_run(child_prefix: str) -> None:
    prefix = child_prefix
    child = _child(prefix, body="import os; os._exit(1)")
    child.stdout.readline()
    child.wait(20)
    with Testbed(prefix) as tb:
        node = tb.add_node("n1", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
        start_backend(node, 80)
        assert client_request(node, node.ip, 80) == "n1"
    assert ns_with_prefix(prefix) == []
