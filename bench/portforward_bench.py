"""Port-forward benchmark: the userspace mode's tunnels next to `kubectl port-forward`.

    sudo .venv/bin/python bench/portforward_bench.py [--rounds 5] [--size-mb 100] [--quick]

One virtual cluster (proxy.testbed): node-a with a pod serving a bulk download (9000)
and a greeting (7070, one line per connection); the test API server
(proxy/testbed/apiserver.py, its own process) on an "apiserver" host that routes to the
pod, serving pods/portforward to both clients: WebSocket v4.channel.k8s.io for ours,
SPDY/3.1 for kubectl (the same pod connection code behind both); a "laptop" host that
reaches only the API server, and a "devbox" host that also routes the pod range.

Contenders (each proxy process pinned to CPU 1, everything else to CPU 0):

  port-forward  the daemon in the laptop, --userspace-endpoint-access=port-forward
  kubectl       `kubectl port-forward pod/bulk` in the laptop (Go, SPDY through the API
                server): the reference for throughput
  direct        the daemon in the devbox, --userspace-endpoint-access=direct: a direct
                connection through the userspace proxy, the reference for set-up cost

Figures, per alternating round (medians and per-round ratios kept):

  download MB/s       one connection, the client sends a byte, the pod sends SIZE bytes;
                      timed until the last byte arrives (not until the tunnel closes:
                      the kubelet's close grace is not a throughput matter)
  connection ms       a new connection until it answered a request (connect, the pod's
                      greeting line, "ping" and its echo), then closed; sequential, paced
                      2 ms apart (an interactive client), p50 of N
  round trip ms       a second request on that connection (p50): the path's own latency;
                      through port-forward it crosses the API server
  setup ms            connection ms minus round trip ms, per connection (p50): what a
                      new connection costs; the pool's warm tunnels make it small
  first connection    the first one after start: port-forward opens a tunnel for it
  connections/s       the same back to back (the pool refills as fast as it can)

Targets (issue 12): download at least 0.5 of kubectl's; connection ms at most 2 of direct's.
Writes bench/results/portforward.json and bench/results/portforward.png.
The reusable part is `measure()`; `main()` is the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NODE_IP, POD_IP = "198.18.200.1", "198.18.1.11"
API_IP, API_PORT = "198.18.200.50", 6443
LAPTOP_IP, DEVBOX_IP = "198.18.200.60", "198.18.200.61"
BULK_PORT, HELLO_PORT = 9000, 7070
KUBECTL_BULK, KUBECTL_HELLO = 19000, 17070  # kubectl's local ports in the laptop
PROXY_CPU, LOAD_CPU = "1", "0"
CONTENDERS = ("port-forward", "kubectl", "direct")

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

    host: object  # proxy.testbed Host
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
    def __init__(self, tb, size: int) -> None:
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

        log = self.work / f"{name}.log"
        if name == "kubectl":
            argv = ["taskset", "-c", PROXY_CPU, "kubectl", "--kubeconfig", str(self.kubeconfig),
                    "port-forward", "pod/bulk", f"{KUBECTL_BULK}:{BULK_PORT}",
                    f"{KUBECTL_HELLO}:{HELLO_PORT}"]  # fmt: skip
            with open(log, "wb") as out:
                p = self.laptop.run(argv, stdout=out, stderr=subprocess.STDOUT)
            text = lambda: log.read_text(errors="replace")  # noqa: E731
            _wait(lambda: text().count("Forwarding from 127.0.0.1") >= 2, name, p, log)
            ep = Endpoint(self.laptop, "127.0.0.1", KUBECTL_BULK, KUBECTL_HELLO)
        else:
            host = self.laptop if name == "port-forward" else self.devbox
            access = "port-forward" if name == "port-forward" else "direct"
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
    with ep.host.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # type: ignore[attr-defined]
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
    with ep.host.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # type: ignore[attr-defined]
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


def _read(s: socket.socket, done, data: bytes = b"") -> bytes:
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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(tb, *, rounds: int, size: int, conns: int, log=print) -> dict:
    """Every contender in every round, alternating; returns per-round samples."""
    cluster = Cluster(tb, size)
    samples: dict[str, dict[str, list[float]]] = {c: {} for c in CONTENDERS}

    def add(c: str, key: str, v: float) -> None:
        samples[c].setdefault(key, []).append(v)

    for r in range(rounds):
        for name in CONTENDERS:
            with cluster.contender(name) as (ep, pid):
                first = exchange(ep)[0]  # port-forward: a tunnel opened for it (cold)
                add(name, "first_connection_ms", first * 1e3)
                for _ in range(3):  # the pool learns the endpoint is used
                    exchange(ep)
                time.sleep(0.2)
                if name != "direct":
                    c0 = cpu_seconds(pid)
                    mbps = download(ep, size)
                    add(name, "download_mb_s", mbps)
                    add(name, "cpu_ms_per_100mb", (cpu_seconds(pid) - c0) * 1e3 * 1e8 / size)
                paced = connections(ep, conns, 0.002)
                firsts = [f for f, _ in paced]
                add(name, "connection_ms_p50", statistics.median(firsts) * 1e3)
                add(name, "connection_ms_p90", statistics.quantiles(firsts, n=10)[-1] * 1e3)
                add(name, "round_trip_ms_p50", statistics.median(r for _, r in paced) * 1e3)
                add(name, "setup_ms_p50", statistics.median(f - r for f, r in paced) * 1e3)
                t0 = time.perf_counter()
                connections(ep, conns, 0)
                add(name, "connections_per_s", conns / (time.perf_counter() - t0))
                log(f"round {r + 1} {name}: " + json.dumps(
                    {k: round(v[-1], 2) for k, v in samples[name].items()}))  # fmt: skip
    return samples


def ratio(samples: dict, key: str, a: str, b: str) -> float | None:
    xs, ys = samples[a].get(key, []), samples[b].get(key, [])
    if not xs or len(xs) != len(ys):
        return None
    return statistics.median(x / y for x, y in zip(xs, ys, strict=True))


def targets(samples: dict) -> dict:
    dl = ratio(samples, "download_mb_s", "port-forward", "kubectl")
    conn = ratio(samples, "connection_ms_p50", "port-forward", "direct")
    setup = ratio(samples, "setup_ms_p50", "port-forward", "direct")
    rate = ratio(samples, "connections_per_s", "port-forward", "direct")
    return {
        "download_vs_kubectl": {"ratio": dl, "target": ">= 0.5", "met": bool(dl and dl >= 0.5)},
        "connection_vs_direct": {"ratio": conn, "target": "<= 2", "met": bool(conn and conn <= 2)},
        "setup_vs_direct": {"ratio": setup, "target": "<= 2", "met": bool(setup and setup <= 2)},
        "connections_per_s_vs_direct": rate,
    }


def plot(median: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("download_mb_s", "download, MB/s (higher is better)"),
            ("connection_ms_p50", "new connection + request, p50 ms (lower is better)"),
            ("setup_ms_p50", "set-up cost of a connection, p50 ms (lower is better)"),
            ("connections_per_s", "connections/s back to back (higher is better)")]  # fmt: skip
    colors = {"port-forward": "#55a868", "kubectl": "#4c72b0", "direct": "#999999"}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, label) in zip(axes, keys, strict=True):
        xs = [c for c in CONTENDERS if median[c].get(key) is not None]
        ys = [median[c][key] for c in xs]
        bars = ax.bar(xs, ys, color=[colors[c] for c in xs])
        ax.set_title(label, fontsize=10)
        for b, v in zip(bars, ys, strict=True):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
    fig.suptitle("userspace port-forward vs kubectl port-forward (same test API server)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def kubectl_version() -> str:
    out = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True)
    m = re.search(r"Client Version: (\S+)", out.stdout)
    return m[1] if m else out.stdout.strip()[:80]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=100, help="download size (MB)")
    ap.add_argument("--conns", type=int, default=300, help="connections per set-up run")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 20 MB, 100 connections")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.size_mb, a.conns = 2, 20, 100
    from proxy.testbed import Testbed

    os.sched_setaffinity(0, {int(LOAD_CPU)})  # the clients (this process) on the load CPU
    started = time.time()
    with Testbed() as tb:
        samples = measure(tb, rounds=a.rounds, size=a.size_mb * 1_000_000, conns=a.conns)
    median = {c: {k: statistics.median(v) for k, v in s.items()} for c, s in samples.items()}
    doc = {
        "command": " ".join(["python", "bench/portforward_bench.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "kubectl": kubectl_version(),
            "pinning": f"daemon / kubectl on CPU {PROXY_CPU}; API server, pod, clients on "
            f"CPU {LOAD_CPU}",
        },
        "settings": {"rounds": a.rounds, "size_mb": a.size_mb, "conns": a.conns},
        "median": median,
        "targets": targets(samples),
        "samples": samples,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "portforward.json").write_text(json.dumps(doc, indent=2) + "\n")
    with contextlib.suppress(ImportError):
        plot(median, out / "portforward.png")
    print(json.dumps({"median": median, "targets": doc["targets"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
