"""Port-forward: the userspace mode's tunnels next to `kubectl port-forward`.

    kube-proxy-py-bench portforward [--quick] [--rounds N]

One virtual cluster: node-a with a pod serving a bulk download (9000) and a greeting
(7070: a line, then an echo); the test API server (proxy/testbed/apiserver.py, its own
process) on an "apiserver" host that routes to the pod and serves pods/portforward to
both clients (WebSocket v4.channel.k8s.io for ours, SPDY/3.1 for kubectl; one pod
connection code behind both); a "laptop" host that reaches only the API server, and a
"devbox" host that also routes the pod range.

Contenders (each proxy process pinned to CPU 1, everything else to CPU 0):

  userspace port-forward   the daemon on the laptop, --userspace-endpoint-access=port-forward
  kubectl port-forward     `kubectl port-forward pod/bulk` on the laptop (Go, SPDY through the
                           API server): the reference for throughput
  kubectl …, WebSocket     the same with KUBECTL_PORT_FORWARD_WEBSOCKETS=true: SPDY tunnelled
                           in a WebSocket (kubectl ≥ 1.31 against API servers ≥ 1.31)
  userspace direct         the daemon on the devbox, --userspace-endpoint-access=direct: a
                           connection through the userspace proxy straight to the pod, the
                           reference for what a new connection costs

Figures, alternating each round (medians; ratios are medians of same-round ratios):

  download            one connection, the client sends a byte, the pod sends SIZE bytes;
                      timed until the last byte arrives (not until the tunnel closes: the
                      kubelet's close grace is no throughput matter)
  new connection      connect, the pod's greeting line, "ping" and its echo; sequential,
                      paced 2 ms apart (an interactive client), p50
  round trip          a second request on that connection: the path's own latency (through
                      port-forward it crosses the API server)
  set-up cost         new connection minus round trip, per connection: what the pool's warm
                      tunnels make small
  first connection    the first one after start (port-forward opens a tunnel for it)
  connections/s       new connections back to back (the pool refills as fast as it can)
  CPU per connection  the proxy process's CPU time over that run, per connection: through
                      port-forward it includes opening the tunnel that replaces the one
                      used (kubectl: its SPDY streams)

Targets (issue 12): download at least 0.5 of kubectl's; a new connection at most 2 of a
direct one's. Uses kubectl from PATH (a contender without it is reported missing).
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.testbed import Testbed

from .core import Run, SuiteResult, Target, alternate
from .machine import cpu_seconds

NODE_IP, POD_IP = "198.18.200.1", "198.18.1.11"
API_IP, API_PORT = "198.18.200.50", 6443
LAPTOP_IP, DEVBOX_IP = "198.18.200.60", "198.18.200.61"
BULK_PORT, HELLO_PORT = 9000, 7070
KUBECTL_BULK, KUBECTL_HELLO = 19000, 17070  # kubectl's local ports in the laptop
PROXY_CPU, LOAD_CPU = "1", "0"
PF, KUBECTL, DIRECT = "userspace port-forward", "kubectl port-forward", "userspace direct"
KUBECTL_WS = "kubectl port-forward, WebSocket tunnel"  # KUBECTL_PORT_FORWARD_WEBSOCKETS=true
CONTENDERS = (PF, KUBECTL, KUBECTL_WS, DIRECT)

BULK_SERVER = """
import socket, sys, threading
n = int(sys.argv[2]); block = bytes(range(256)) * 4096
s = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=256)
print("READY", flush=True)
def serve(c):
    with c:
        if not c.recv(1):
            return  # a warm tunnel that was never used
        left = n
        while left:
            left -= c.send(memoryview(block)[: min(left, len(block))])
        c.recv(1)  # until the client closes
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def objects() -> list[dict]:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bulk", "namespace": "default"},
        "spec": {"nodeName": "node-a", "containers": [{"name": "bulk", "image": "bulk"}]},
        "status": {"phase": "Running", "podIP": POD_IP, "podIPs": [{"ip": POD_IP}]},
    }
    ports = [
        {"name": "bulk", "port": BULK_PORT, "protocol": "TCP"},
        {"name": "hello", "port": HELLO_PORT, "protocol": "TCP"},
    ]
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "bulk", "namespace": "default"},
        "spec": {"clusterIP": "198.19.70.10", "ports": ports},
    }
    eps = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "bulk-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "bulk"},
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": [
            {
                "addresses": [POD_IP],
                "conditions": {"ready": True},
                "nodeName": "node-a",
                "targetRef": {"kind": "Pod", "namespace": "default", "name": "bulk"},
            }
        ],
    }
    return [pod, svc, eps]


@dataclass
class Endpoint:
    """Where a contender serves the pod's two ports, in which namespace."""

    host: Any  # proxy.testbed Host
    ip: str
    bulk: int
    hello: int


def _wait(pred, what: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Cluster:
    def __init__(self, tb: Testbed, size: int) -> None:
        from proxy.testbed.apiserver import ApiServerClient

        self.tb = tb
        self.work = Path(tb.workdir)
        node = tb.add_node("node-a", underlay_ip=NODE_IP, pod_cidr="198.18.1.0/24")
        self.pod = tb.add_pod(node, "bulk", POD_IP)
        p = self.pod.run(
            ["taskset", "-c", LOAD_CPU, sys.executable, "-c", BULK_SERVER, str(BULK_PORT),
             str(size)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert p.stdout is not None and p.stdout.readline().strip() == b"READY"
        from proxy.testbed import start_backend

        start_backend(self.pod, HELLO_PORT, proto="tcp")
        self.apihost = tb.add_external("apiserver", API_IP)
        self.apihost.route("198.18.1.0/24", via=NODE_IP)
        self.laptop = tb.add_external("laptop", LAPTOP_IP)
        self.devbox = tb.add_external("devbox", DEVBOX_IP)
        self.devbox.route("198.18.1.0/24", via=NODE_IP)
        conf_dir = Path(tempfile.mkdtemp(prefix="kpt-pfbench-", dir=self.work))
        self.kubeconfig = conf_dir / "kubeconfig"
        api_log = self.work / "apiserver.log"
        with open(api_log, "wb") as out:
            self.api_proc = self.apihost.run(
                ["taskset", "-c", LOAD_CPU, sys.executable, "-m", "proxy.testbed.apiserver",
                 "--listen", f"{API_IP}:{API_PORT}", "--kubeconfig", str(self.kubeconfig)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait(self.kubeconfig.exists, "API server start", self.api_proc, api_log)
        self.api = ApiServerClient(self.apihost.ns, f"{API_IP}:{API_PORT}")
        self.api.wait_ready()
        self.api.apply(*objects())

    @contextlib.contextmanager
    def contender(self, name: str) -> Iterator[tuple[Endpoint, int]]:
        """Start a contender; yields where it serves and its pid (for CPU time)."""
        from proxy.model import Service
        from proxy.userspace.laptop import laptop_address

        log = self.work / f"{name.replace(' ', '-')}.log"
        if name in (KUBECTL, KUBECTL_WS):
            argv = ["taskset", "-c", PROXY_CPU, "kubectl", "--kubeconfig", str(self.kubeconfig),
                    "port-forward", "pod/bulk", f"{KUBECTL_BULK}:{BULK_PORT}",
                    f"{KUBECTL_HELLO}:{HELLO_PORT}"]  # fmt: skip
            # kubectl ≥ 1.31 can tunnel its SPDY session in a WebSocket (what API servers
            # ≥ 1.31 translate); this kubectl still defaults to the SPDY upgrade.
            ws = "true" if name == KUBECTL_WS else "false"
            with open(log, "wb") as out:
                p = self.laptop.run(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={"KUBECTL_PORT_FORWARD_WEBSOCKETS": ws},
                )
            text = lambda: log.read_text(errors="replace")  # noqa: E731
            _wait(lambda: text().count("Forwarding from 127.0.0.1") >= 2, name, p, log)
            ep = Endpoint(self.laptop, "127.0.0.1", KUBECTL_BULK, KUBECTL_HELLO)
        else:
            host = self.laptop if name == PF else self.devbox
            access = "port-forward" if name == PF else "direct"
            argv = ["taskset", "-c", PROXY_CPU, sys.executable, "-m", "proxy",
                    "--proxy-mode=userspace", "--userspace-laptop=on",
                    f"--userspace-endpoint-access={access}",
                    "--kubeconfig", str(self.kubeconfig),
                    "--healthz-bind-address", "", "--metrics-bind-address", ""]  # fmt: skip
            with open(log, "wb") as out:
                p = host.run(argv, stdout=out, stderr=subprocess.STDOUT)
            _wait(lambda: "synced 1 services" in log.read_text(errors="replace"), name, p, log)
            ip = laptop_address(Service("default", "bulk"))
            ep = Endpoint(host, ip, BULK_PORT, HELLO_PORT)
        try:
            yield ep, p.pid
        finally:
            _stop(p)


def download(ep: Endpoint, size: int) -> float:
    """MB/s of one SIZE-byte download (timed from connect to the last byte)."""
    buf = bytearray(1 << 20)
    with ep.host.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        t0 = time.perf_counter()
        s.connect((ep.ip, ep.bulk))
        s.sendall(b"g")
        got = 0
        while got < size:
            n = s.recv_into(buf)
            if not n:
                raise RuntimeError(f"download ended after {got} of {size} bytes")
            got += n
        return size / (time.perf_counter() - t0) / 1e6


def exchange(ep: Endpoint) -> tuple[float, float]:
    """A new connection: seconds until it answered its first request (connect, the pod's
    greeting line, "ping" and its echo), and for a second request on it (a round trip
    on an established connection). Their difference is what the new connection cost."""
    with ep.host.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        t0 = time.perf_counter()
        s.connect((ep.ip, ep.hello))
        rest = _read(s, lambda d: b"\n" in d).partition(b"\n")[2]
        s.sendall(b"ping")
        if _read(s, lambda d: len(d) >= 4, rest) != b"ping":
            raise RuntimeError("the echo did not come back")
        t1 = time.perf_counter()
        s.sendall(b"pong")
        if _read(s, lambda d: len(d) >= 4) != b"pong":
            raise RuntimeError("the echo did not come back")
        return t1 - t0, time.perf_counter() - t1


def _read(s: socket.socket, done: Any, data: bytes = b"") -> bytes:
    while not done(data):
        chunk = s.recv(256)
        if not chunk:
            raise RuntimeError(f"connection closed early ({data!r})")
        data += chunk
    return data


def connections(ep: Endpoint, count: int, pause: float) -> list[tuple[float, float]]:
    out = []
    for _ in range(count):
        out.append(exchange(ep))
        if pause:
            time.sleep(pause)
    return out


def run(ctx: Run) -> SuiteResult:
    o = ctx.options
    rounds = o.rounds or (2 if ctx.quick else 5)
    size = (20 if ctx.quick else 100) * 1_000_000
    conns = 100 if ctx.quick else 300
    res = SuiteResult(
        settings={
            "rounds": rounds,
            "download_bytes": size,
            "connections_per_run": conns,
            "pacing_ms": 2,
            "pinning": f"daemon / kubectl on CPU {PROXY_CPU}; API server, pod and clients "
            f"on CPU {LOAD_CPU}",
        }
    )
    names = list(CONTENDERS)
    if subprocess.run(["which", "kubectl"], capture_output=True).returncode != 0:
        for k in (KUBECTL, KUBECTL_WS):
            res.missing[k] = "kubectl not found on PATH"
            names.remove(k)
    res.notes.append(
        "The test API server is Python and local: through port-forward a round trip crosses "
        "it (two thread hops), where a real cluster adds network round trips to the API "
        "server and the kubelet instead."
    )

    def fig(name: str, unit: str, ref: str, better: str = "higher", **kw: Any) -> Any:
        return res.figure(name, unit=unit, product=PF, reference=ref, better=better, **kw)

    f_dl = fig(f"download, {size // 1_000_000} MB", "MB/s", KUBECTL, target=Target(">=", 0.5))
    f_cpu = fig("proxy CPU per 100 MB downloaded", "ms", KUBECTL, "lower")
    f_new = fig("new connection + request, p50", "ms", DIRECT, "lower", target=Target("<=", 2))
    f_rt = fig("round trip on an open connection, p50", "ms", DIRECT, "lower")
    f_setup = fig("set-up cost of a new connection, p50", "ms", DIRECT, "lower")
    f_first = fig("first connection after start", "ms", DIRECT, "lower")
    f_rate = fig("new connections/s, back to back", "conn/s", DIRECT)
    f_conn_cpu = fig("proxy CPU per new connection (tunnel refill included)", "µs", DIRECT, "lower")
    os.sched_setaffinity(0, {int(LOAD_CPU)})  # the clients (this process) on the load CPU
    step = ctx.task("port-forward", total=rounds * len(names))
    try:
        with Testbed(workdir=ctx.out / "work" / "portforward") as tb:
            cluster = Cluster(tb, size)
            for r, name in alternate(names, rounds):
                step(f"port-forward: {name}, round {r + 1}")
                try:
                    with cluster.contender(name) as (ep, pid):
                        f_first.add(name, exchange(ep)[0] * 1e3)
                        for _ in range(3):  # the pool learns that the endpoint is used
                            exchange(ep)
                        time.sleep(0.2)
                        if name != DIRECT:
                            c0 = cpu_seconds(pid)
                            f_dl.add(name, download(ep, size))
                            f_cpu.add(name, (cpu_seconds(pid) - c0) * 1e3 * 1e8 / size)
                        paced = connections(ep, conns, 0.002)
                        f_new.add(name, statistics.median(f for f, _ in paced) * 1e3)
                        f_rt.add(name, statistics.median(r for _, r in paced) * 1e3)
                        f_setup.add(name, statistics.median(f - r for f, r in paced) * 1e3)
                        c0, t0 = cpu_seconds(pid), time.perf_counter()
                        connections(ep, conns, 0)
                        f_rate.add(name, conns / (time.perf_counter() - t0))
                        f_conn_cpu.add(name, (cpu_seconds(pid) - c0) * 1e6 / conns)
                except Exception as e:  # one contender failing must not lose the others
                    res.missing.setdefault(name, f"failed: {e}".splitlines()[0][:300])
                step.done()
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return res
