"""Data-plane benchmark on virtual nodes: direct vs iptables vs HAProxy vs userspace mode.

    sudo .venv/bin/python bench/dataplane_bench.py [--duration 5] [--rounds 3]

One virtual node (network namespaces, proxy.testbed) with a server pod and a client pod.
The client reaches the server's iperf3 (5201) and an HTTP responder (HAProxy's
`http-request return`, a fast C backend, on 8081) through each data plane in turn:

  direct          client → pod IP (the ceiling: no proxy at all)
  iptables        the daemon in --proxy-mode=iptables: kernel DNAT to the pod
  haproxy         HAProxy 2.x in TCP mode (nbthread 1), the reference userspace proxy
  haproxy-tuned   the same with 256 KiB buffers (tune.bufsize) and `option splice-auto`
  userspace       the daemon in --proxy-mode=userspace, default TCP engine (auto: copy,
                  then splice once a flow fills the read buffer)
  userspace-splice / userspace-copy   the same with the engine forced (does splice pay?)
  userspace-nodeaddr  the default engine with --userspace-preserve-client-ip=off: the
                  endpoint sees the node's address, as before client addresses were kept
                  (the cost of IP_TRANSPARENT: compare with `userspace`)

Figures per data plane: single-stream and 32-stream throughput (iperf3), new connections
per second (HTTP/1.0 request per connection, 64 in flight), p50/p99 latency of a small
request/response on a kept-alive connection, and memory per idle proxied connection
(RSS delta of the proxy process over N idle connections; kernel modes have no process),
and for the proxy processes their CPU time per GB forwarded and per connection, which
compares proxies even where the load generators (one Python process, one core) are the
bottleneck.
The proxy process (daemon or HAProxy) is pinned to CPU 1, everything else to CPU 0, so
the two userspace proxies get exactly one core each. Rounds go through all data planes in
turn and the median per figure is kept (these machines are noisy). Writes
bench/results/dataplane.json and bench/results/dataplane.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SERVICE_IP = "198.19.0.10"
NODE_IP = "198.18.200.1"
SERVER_IP = "198.18.1.10"
CLIENT_IP = "198.18.1.100"
IPERF_PORT = 5201
HTTP_PORT = 8081  # on the server pod
SVC_HTTP_PORT = 80  # on the Service / proxies
PROXY_CPU, LOAD_CPU = "1", "0"
MODES = (
    "direct",
    "iptables",
    "haproxy",
    "haproxy-tuned",
    "userspace",
    "userspace-splice",
    "userspace-copy",
    "userspace-nodeaddr",
)
REQ = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
KREQ = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

# The daemon with a chosen TCP engine: until the integrator adds a flag for it, a shim
# sets the Config field after flag parsing (bench only).
DAEMON_SHIM = """
import sys
import proxy.config as c
_parse = c.parse_args
def parse(argv=None):
    cfg = _parse(argv)
    cfg.userspace_engine = {engine!r}
    return cfg
c.parse_args = parse
from proxy.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


# -- load generators (run inside the client pod: `--loadgen KIND ...`) ----------------------------


def loadgen_cps(ip: str, port: int, seconds: float, inflight: int) -> dict:
    """New connections per second: connect, send a request, read to EOF, close."""
    sel = selectors.DefaultSelector()
    done = errors = 0
    end = time.monotonic() + seconds

    def launch() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((ip, port))
        sel.register(s, selectors.EVENT_WRITE, "connecting")

    t0 = time.monotonic()
    for _ in range(inflight):
        launch()
    while True:
        now = time.monotonic()
        if now >= end and not sel.get_map():
            break
        for key, _ in sel.select(1.0):
            s = key.fileobj
            try:
                if key.data == "connecting":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    s.send(REQ)
                    sel.modify(s, selectors.EVENT_READ, "reading")
                    continue
                if s.recv(65536):
                    continue
                done += 1
            except OSError:
                errors += 1
            sel.unregister(s)
            s.close()
            if time.monotonic() < end:
                launch()
    elapsed = time.monotonic() - t0
    return {"conns": done, "errors": errors, "seconds": elapsed, "per_second": done / elapsed}


def loadgen_latency(ip: str, port: int, count: int) -> dict:
    """Round trips of a small HTTP request on one kept-alive connection."""
    s = socket.create_connection((ip, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []

    def one() -> None:
        s.sendall(KREQ)
        buf = b""
        while True:
            buf += s.recv(4096)
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                n = int(
                    next(
                        (
                            h.split(b":")[1]
                            for h in head.split(b"\r\n")
                            if h.lower().startswith(b"content-length")
                        ),
                        b"0",
                    )
                )
                if len(body) >= n:
                    return

    for _ in range(200):
        one()
    for _ in range(count):
        t = time.perf_counter_ns()
        one()
        samples.append((time.perf_counter_ns() - t) / 1000)
    s.close()
    samples.sort()
    return {
        "count": count,
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[int(len(samples) * 0.99)],
        "mean_us": statistics.fmean(samples),
    }


# -- setup ---------------------------------------------------------------------------------------


def manifests(path: Path) -> None:
    import yaml

    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "clusterIP": SERVICE_IP,
            "ports": [
                {"name": "iperf", "port": IPERF_PORT, "protocol": "TCP"},
                {"name": "http", "port": SVC_HTTP_PORT, "protocol": "TCP"},
            ],
        },
    }
    eps = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "bench-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "bench"},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "iperf", "port": IPERF_PORT, "protocol": "TCP"},
            {"name": "http", "port": HTTP_PORT, "protocol": "TCP"},
        ],
        "endpoints": [
            {"addresses": [SERVER_IP], "conditions": {"ready": True}, "nodeName": "node-a"}
        ],
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "bench.yaml").write_text(yaml.safe_dump_all([svc, eps]))


HTTP_BACKEND_CFG = """
global
    maxconn 9000
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout http-keep-alive 1h
frontend responder
    bind 0.0.0.0:{port}
    http-request return status 200 content-type text/plain string "ok"
"""

HAPROXY_CFG = """
global
    maxconn 6000
    nbthread 1
{tune}
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
{extra}
frontend iperf
    bind {node}:{iperf}
    default_backend iperf
backend iperf
    server s1 {server}:{iperf}
frontend http
    bind {node}:{svc_http}
    default_backend http
backend http
    server s1 {server}:{http}
"""


def wait_log(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while needle not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path.name}: no {needle!r}:\n{path.read_text()[-3000:]}")
        time.sleep(0.1)


def wait_port(host, ip: str, port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        with host.socket() as s:
            s.settimeout(1)
            if s.connect_ex((ip, port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"{log.name}: not listening on {ip}:{port}: {log.read_text()[-2000:]}"
            )
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Bench:
    def __init__(self, tb, duration: float, idle_conns: int, lat_count: int) -> None:
        from proxy.testbed import start_backend  # noqa: F401  (import check: testbed present)

        self.tb = tb
        self.duration = duration
        self.idle_conns = idle_conns
        self.lat_count = lat_count
        self.node = tb.add_node("node-a", underlay_ip=NODE_IP, pod_cidr="198.18.1.0/24")
        self.server = tb.add_pod(self.node, "server", SERVER_IP)
        self.client = tb.add_pod(self.node, "client", CLIENT_IP)
        self.work = Path(tb.workdir)
        self.mdir = self.work / "manifests"
        manifests(self.mdir)
        cfg = self.work / "responder.cfg"
        cfg.write_text(HTTP_BACKEND_CFG.format(port=HTTP_PORT))
        self.server.run(
            ["taskset", "-c", LOAD_CPU, "haproxy", "-f", str(cfg), "-db"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.server.run(
            ["taskset", "-c", LOAD_CPU, "iperf3", "-s", "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

    # Each yields (ip, iperf port, http port, pid of the proxy process or None).
    @contextlib.contextmanager
    def mode(self, name: str) -> Iterator[tuple[str, int, int, int | None]]:
        if name == "direct":
            yield SERVER_IP, IPERF_PORT, HTTP_PORT, None
        elif name.startswith("haproxy"):
            cfg = self.work / f"{name}.cfg"
            tuned = name == "haproxy-tuned"
            cfg.write_text(
                HAPROXY_CFG.format(
                    tune="    tune.bufsize 262144\n    tune.pipesize 1048576" if tuned else "",
                    extra="    option splice-auto" if tuned else "",
                    node=NODE_IP,
                    iperf=IPERF_PORT,
                    svc_http=SVC_HTTP_PORT,
                    server=SERVER_IP,
                    http=HTTP_PORT,
                )
            )
            log = self.work / f"{name}.log"
            with open(log, "wb") as out:
                p = self.node.run(
                    ["taskset", "-c", PROXY_CPU, "haproxy", "-f", str(cfg), "-db"],
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            wait_port(self.node, NODE_IP, SVC_HTTP_PORT, p, log)
            try:
                yield NODE_IP, IPERF_PORT, SVC_HTTP_PORT, p.pid
            finally:
                stop(p)
        else:
            proxy_mode = "iptables" if name == "iptables" else "userspace"
            engine = {"userspace-copy": "copy", "userspace-splice": "splice"}.get(name, "auto")
            log = self.work / f"daemon-{name}.log"
            args = [
                "--proxy-mode", proxy_mode, "--manifests", str(self.mdir),
                "--hostname-override", "node-a", "--cluster-cidr", "198.18.0.0/16",
                "--metrics-bind-address", "127.0.0.1:10249",
                "--healthz-bind-address", "127.0.0.1:10256",
            ]  # fmt: skip
            if name == "userspace-nodeaddr":
                args += ["--userspace-preserve-client-ip", "off"]
            with open(log, "wb") as out:
                p = self.node.run(
                    ["taskset", "-c", PROXY_CPU, sys.executable, "-c",
                     DAEMON_SHIM.format(engine=engine), *args],
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            try:
                wait_log(log, "synced 1 services", p)
                # iptables mode forwards in the kernel: no process memory per connection.
                yield SERVICE_IP, IPERF_PORT, SVC_HTTP_PORT, p.pid if name != "iptables" else None
            finally:
                stop(p)
                self.node.exec([sys.executable, "-m", "proxy", "--cleanup"], timeout=60)

    # -- measurements ------------------------------------------------------------------------

    def iperf(self, ip: str, port: int, streams: int) -> float | None:
        """Gbit/s received by the server."""
        argv = ["taskset", "-c", LOAD_CPU, "iperf3", "-c", ip, "-p", str(port), "-J",
                "-t", str(self.duration), "-P", str(streams)]  # fmt: skip
        for attempt in range(3):
            out = self.client.exec(argv, timeout=self.duration + 30, check=False)
            doc = json.loads(out.stdout or "{}")
            if "sum_received" in doc.get("end", {}):
                return doc["end"]["sum_received"]["bits_per_second"] / 1e9
            print(f"iperf3 to {ip}:{port} -P {streams} failed: {doc.get('error')}", flush=True)
            time.sleep(1 + attempt)
        return None

    def loadgen(self, *args: str) -> dict:
        argv = ["taskset", "-c", LOAD_CPU, sys.executable, str(Path(__file__).resolve()),
                "--loadgen", *args]  # fmt: skip
        out = self.client.exec(argv, timeout=self.duration + 60)
        return json.loads(out.stdout)

    def idle_memory(self, ip: str, port: int, pid: int | None) -> float | None:
        """Bytes of proxy RSS per idle proxied connection."""
        if pid is None:
            return None
        socks = []
        before = rss(pid)
        try:
            for _ in range(self.idle_conns):
                s = self.client.socket()
                s.settimeout(10)
                s.connect((ip, port))
                socks.append(s)
            time.sleep(1.5)  # let the proxy accept and connect every one of them
            after = rss(pid)
        finally:
            for s in socks:
                s.close()
        time.sleep(0.5)
        return (after - before) / self.idle_conns

    def run_mode(self, name: str) -> dict:
        with self.mode(name) as (ip, iperf_port, http_port, pid):
            # Warm up (first connections pay for lazy setup).
            self.loadgen("cps", ip, str(http_port), "0.5", "8")
            r: dict = {}
            for streams in (1, 32):
                c0 = cpu_seconds(pid)
                gbps = self.iperf(ip, iperf_port, streams)
                r[f"throughput_{streams}_gbps"] = gbps
                if pid is not None and gbps:
                    gb = gbps / 8 * self.duration
                    r[f"cpu_ms_per_gb_{streams}"] = (cpu_seconds(pid) - c0) * 1e3 / gb
            c0 = cpu_seconds(pid)
            cps = self.loadgen("cps", ip, str(http_port), str(self.duration), "64")
            r["conn_per_s"] = cps["per_second"]
            r["conn_errors"] = cps["errors"]
            if pid is not None and cps["conns"]:
                r["cpu_us_per_conn"] = (cpu_seconds(pid) - c0) * 1e6 / cps["conns"]
            lat = self.loadgen("lat", ip, str(http_port), str(self.lat_count))
            r["latency_p50_us"] = lat["p50_us"]
            r["latency_p99_us"] = lat["p99_us"]
            r["idle_bytes_per_conn"] = self.idle_memory(ip, http_port, pid)
            return r


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


FIGURES = (
    ("throughput_1_gbps", "1 stream (Gbit/s)"),
    ("throughput_32_gbps", "32 streams (Gbit/s)"),
    ("conn_per_s", "new connections/s"),
    ("latency_p50_us", "p50 latency (µs)"),
    ("latency_p99_us", "p99 latency (µs)"),
    ("idle_bytes_per_conn", "RSS per idle conn (bytes)"),
    ("cpu_ms_per_gb_1", "proxy CPU ms per GB, 1 stream"),
    ("cpu_ms_per_gb_32", "proxy CPU ms per GB, 32 streams"),
    ("cpu_us_per_conn", "proxy CPU µs per connection"),
)
LOWER_IS_BETTER = ("latency", "idle", "cpu")
HAPROXIES = ("haproxy", "haproxy-tuned")


def median_results(rounds: list[dict]) -> dict:
    out: dict = {}
    for mode in rounds[0]:
        out[mode] = {}
        for key in rounds[0][mode]:
            vals = [r[mode][key] for r in rounds if r[mode].get(key) is not None]
            out[mode][key] = statistics.median(vals) if vals else None
    return out


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    fig, axes = plt.subplots(3, 3, figsize=(16, 12))
    colors = {
        "direct": "#999999",
        "iptables": "#4c72b0",
        "haproxy": "#dd8452",
        "haproxy-tuned": "#c44e52",
        "userspace": "#55a868",
        "userspace-splice": "#2e7d32",
        "userspace-copy": "#8172b3",
        "userspace-nodeaddr": "#937860",
    }
    for ax, (key, label) in zip(axes.flat, FIGURES, strict=True):
        vals = [results[m].get(key) for m in modes]
        xs = [m for m, v in zip(modes, vals, strict=True) if v is not None]
        ys = [v for v in vals if v is not None]
        bars = ax.bar(xs, ys, color=[colors.get(m, "#333") for m in xs])
        better = "lower" if key.startswith(LOWER_IS_BETTER) else "higher"
        ax.set_title(f"{label} ({better} is better)", fontsize=10)
        ax.tick_params(axis="x", rotation=30)
        for b, v in zip(bars, ys, strict=True):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ratios(results: dict) -> dict:
    """Each userspace variant / the better of the two HAProxy runs, per figure."""
    out = {}
    best_h = {}
    for key, _ in FIGURES:
        hs = [results[m].get(key) for m in HAPROXIES if m in results]
        hs = [v for v in hs if v]
        if hs:
            best_h[key] = min(hs) if key.startswith(LOWER_IS_BETTER) else max(hs)
    for mode in ("userspace", "userspace-splice", "userspace-copy"):
        if mode not in results or not best_h:
            continue
        r = results[mode]
        out[mode] = {
            f"{key}_vs_best_haproxy": (r[key] / best_h[key])
            if r.get(key) and best_h.get(key)
            else None
            for key, _ in FIGURES
        }
    return out


def targets(rounds: list[dict]) -> dict:
    """The issue's targets: userspace / the better HAProxy run, within each round (the
    machine is shared, so only same-round ratios are comparable); median over rounds."""

    def ratio(rnd: dict, key: str) -> float | None:
        u = rnd.get("userspace", {}).get(key)
        hs = [rnd[m][key] for m in HAPROXIES if m in rnd and rnd[m].get(key)]
        return u / max(hs) if u and hs else None

    def med(key: str) -> float | None:
        vals = [v for v in (ratio(r, key) for r in rounds) if v is not None]
        return statistics.median(vals) if vals else None

    t1, t32, conn = med("throughput_1_gbps"), med("throughput_32_gbps"), med("conn_per_s")
    bulk = min(t1, t32) if t1 is not None and t32 is not None else None
    mems = [r["userspace"].get("idle_bytes_per_conn") for r in rounds if "userspace" in r]
    mem = statistics.median([m for m in mems if m is not None]) if any(mems) else None
    return {
        "bulk_throughput_vs_haproxy": {
            "value": bulk,
            "single_stream": t1,
            "streams_32": t32,
            "target": ">= 0.8",
            "met": bulk is not None and bulk >= 0.8,
        },
        "connection_rate_vs_haproxy": {
            "value": conn,
            "target": ">= 0.5",
            "met": conn is not None and conn >= 0.5,
        },
        "bytes_per_idle_connection": {
            "value": mem,
            "target": "<= 20480",
            "met": mem is not None and mem <= 20480,
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--idle-conns", type=int, default=4000)
    ap.add_argument("--latency-count", type=int, default=20000)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--loadgen", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.loadgen:
        kind, *rest = a.loadgen
        if kind == "cps":
            res = loadgen_cps(rest[0], int(rest[1]), float(rest[2]), int(rest[3]))
        else:
            res = loadgen_latency(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(res))
        return 0

    from proxy.testbed import Testbed

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    rounds: list[dict] = []
    started = time.time()
    with Testbed() as tb:
        bench = Bench(tb, a.duration, a.idle_conns, a.latency_count)
        for i in range(a.rounds):
            rnd = {}
            for mode in modes:
                rnd[mode] = bench.run_mode(mode)
                print(f"round {i + 1} {mode}: {json.dumps(rnd[mode])}", flush=True)
            rounds.append(rnd)
    results = median_results(rounds)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": " ".join(["python", "bench/dataplane_bench.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "haproxy": subprocess.run(
                ["haproxy", "-v"], capture_output=True, text=True
            ).stdout.split("\n")[0],
            "pinning": f"proxy on CPU {PROXY_CPU}; client, server, iperf3 on CPU {LOAD_CPU}",
        },
        "settings": {
            "duration_s": a.duration,
            "rounds": a.rounds,
            "idle_conns": a.idle_conns,
            "latency_count": a.latency_count,
            "cps_inflight": 64,
        },
        "median": results,
        "userspace_vs_best_haproxy": ratios(results),
        "targets": targets(rounds),
        "rounds": rounds,
    }
    (out / "dataplane.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(
        results,
        out / "dataplane.png",
        f"data planes on one virtual node ({os.cpu_count()} CPUs; median of {a.rounds} rounds)",
    )
    print(json.dumps({"median": results, "targets": doc["targets"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
