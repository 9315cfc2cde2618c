"""Data plane: every way a client pod can reach a Service's endpoint, on one virtual node.

The server pod runs iperf3 (5201) and an HTTP responder (HAProxy's `http-request return`,
a fast C backend, on 8081); the client pod reaches them through each contender in turn:

  direct          client → pod IP: no proxy at all (the ceiling)
  iptables mode   the daemon, kernel DNAT to the pod
  userspace mode  the daemon's asyncio proxy
  HAProxy         HAProxy in TCP mode (nbthread 1): the reference userspace proxy
  (nftables mode  when the daemon has it)

Per contender and round: throughput with 1…N iperf3 streams, new connections per second
(wrk, one request per connection, 64 in flight), p50/p99 of a small request on a kept
connection, and for proxy processes their RSS per idle connection and CPU per connection.
The proxy process is pinned to CPU 1, everything else to CPU 0 (on two cores the two
userspace proxies get exactly one core each). Contenders alternate each round.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from proxy.testbed import Testbed

from .cli import DATA_FIGURES
from .core import Run, SuiteResult, Target, alternate
from .loadgen import parse_wrk, wrk_argv
from .machine import cpu_seconds, ensure_tools, rss_kib

SERVICE_IP = "198.19.0.10"
NODE_IP = "198.18.200.1"
SERVER_IP = "198.18.1.10"
CLIENT_IP = "198.18.1.100"
IPERF_PORT = 5201
HTTP_PORT = 8081  # on the server pod
SVC_HTTP_PORT = 80  # on the Service and the proxies
PROXY_CPU, LOAD_CPU = "1", "0"
CPS_INFLIGHT = 64
PRODUCT, REFERENCE = "userspace mode", "HAProxy"
BASELINE = f"{PRODUCT} @baseline"
FIGURES = DATA_FIGURES  # --figures: what measure() can be limited to


@dataclass(frozen=True)
class Endpoint:
    """Where the client sends traffic, and the proxy process (None: the kernel)."""

    ip: str
    iperf_port: int
    http_port: int
    pid: int | None


@dataclass(frozen=True)
class DataContender:
    name: str
    tools: tuple[str, ...]
    serve: Callable[[Bench], contextlib.AbstractContextManager[Endpoint]]


def contenders(baseline: Path | None = None, modes: list[str] | None = None) -> list[DataContender]:
    """`baseline`: a checkout whose userspace mode runs too (a before/after contender);
    `modes`: only these of the daemon's modes."""
    from proxy.config import MODES

    out = [
        DataContender("direct", (), lambda b: b.direct()),
        DataContender("iptables mode", ("iptables",), lambda b: b.daemon("iptables")),
        DataContender(PRODUCT, (), lambda b: b.daemon("userspace")),
        DataContender(REFERENCE, ("haproxy",), lambda b: b.haproxy()),
    ]
    if "nftables" in MODES:
        out.insert(2, DataContender("nftables mode", ("nft",), lambda b: b.daemon("nftables")))
    if modes is not None:  # --modes: only these daemon modes (the references always run)
        out = [c for c in out if not c.name.endswith(" mode") or c.name[: -len(" mode")] in modes]
    if baseline is not None:
        base = str(baseline.resolve())
        old = DataContender(BASELINE, (), lambda b: b.daemon("userspace", pythonpath=base))
        out.insert(out.index(next(c for c in out if c.name == PRODUCT)) + 1, old)
    return out


HTTP_RESPONDER_CFG = """
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
    maxconn 9000
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
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


def manifests(path: Path) -> None:
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


def _wait(pred: Callable[[], bool], proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while not pred():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what}:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Bench:
    """One node with a server pod and a client pod; each contender serves in turn."""

    def __init__(self, tb: Testbed, o: Any) -> None:
        self.tb = tb
        self.o = o
        self.iperf_seconds = max(1, round(o.duration))  # iperf3 takes whole seconds (0: forever)
        self.node = tb.add_node("node-a", underlay_ip=NODE_IP, pod_cidr="198.18.1.0/24")
        self.server = tb.add_pod(self.node, "server", SERVER_IP)
        self.client = tb.add_pod(self.node, "client", CLIENT_IP)
        self.work = Path(tb.workdir)
        self.mdir = self.work / "manifests"
        manifests(self.mdir)
        cfg = self.work / "responder.cfg"
        cfg.write_text(HTTP_RESPONDER_CFG.format(port=HTTP_PORT))
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.server.run(["taskset", "-c", LOAD_CPU, "haproxy", "-f", cfg, "-db"], **quiet)
        self.server.run(["taskset", "-c", LOAD_CPU, "iperf3", "-s", "-p", IPERF_PORT], **quiet)
        for port in (HTTP_PORT, IPERF_PORT):
            self._wait_port(SERVER_IP, port)

    def _wait_port(self, ip: str, port: int, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + 30
        while True:
            with self.client.socket() as s:
                s.settimeout(1)
                if s.connect_ex((ip, port)) == 0:
                    return
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {ip}:{port}")
            time.sleep(0.05)

    # -- contenders ------------------------------------------------------------------------

    @contextlib.contextmanager
    def direct(self) -> Iterator[Endpoint]:
        yield Endpoint(SERVER_IP, IPERF_PORT, HTTP_PORT, None)

    @contextlib.contextmanager
    def haproxy(self) -> Iterator[Endpoint]:
        cfg = self.work / "haproxy.cfg"
        cfg.write_text(
            HAPROXY_CFG.format(
                node=NODE_IP,
                iperf=IPERF_PORT,
                svc_http=SVC_HTTP_PORT,
                server=SERVER_IP,
                http=HTTP_PORT,
            )
        )
        log = self.work / "haproxy.log"
        with open(log, "wb") as out:
            p = self.node.run(
                ["taskset", "-c", PROXY_CPU, "haproxy", "-f", cfg, "-db"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_port(NODE_IP, SVC_HTTP_PORT, p)
            yield Endpoint(NODE_IP, IPERF_PORT, SVC_HTTP_PORT, p.pid)
        finally:
            _stop(p)

    @contextlib.contextmanager
    def daemon(self, mode: str, *extra: str, pythonpath: str | None = None) -> Iterator[Endpoint]:
        """`pythonpath`: run the daemon of that checkout instead (--baseline)."""
        stem = "-".join([mode, *extra, *(["baseline"] if pythonpath else [])]).replace("--", "")
        log = self.work / f"daemon-{stem}.log"
        # PYTHONSAFEPATH: `-m proxy` must not find this checkout in the cwd first
        env = {"PYTHONPATH": pythonpath, "PYTHONSAFEPATH": "1"} if pythonpath else None
        args = [
            *extra,
            "--proxy-mode",
            mode,
            "--manifests",
            self.mdir,
            "--hostname-override",
            "node-a",
            "--cluster-cidr",
            "198.18.0.0/16",
            "--metrics-bind-address",
            "",
            "--healthz-bind-address",
            "",
        ]
        with open(log, "wb") as out:
            p = self.node.run(
                ["taskset", "-c", PROXY_CPU, sys.executable, "-m", "proxy", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            _wait(
                lambda: "synced 1 services" in log.read_text(errors="replace"),
                p,
                f"{mode} mode did not sync",
                log,
            )
            self._wait_port(SERVICE_IP, SVC_HTTP_PORT, p)
            # The kernel modes forward in the kernel: no process cost per connection.
            yield Endpoint(
                SERVICE_IP, IPERF_PORT, SVC_HTTP_PORT, p.pid if mode == "userspace" else None
            )
        finally:
            _stop(p)
            self.node.exec([sys.executable, "-m", "proxy", "--cleanup"], timeout=60, check=False)

    # -- measurements ----------------------------------------------------------------------

    def iperf(self, ep: Endpoint, streams: int) -> float | None:
        """Gbit/s received by the server."""
        d = self.iperf_seconds
        argv = [
            "taskset",
            "-c",
            LOAD_CPU,
            "iperf3",
            "-c",
            ep.ip,
            "-p",
            ep.iperf_port,
            "-J",
            "-t",
            d,
            "-P",
            streams,
        ]
        for attempt in range(3):
            out = self.client.exec(argv, timeout=d + 30, check=False)
            doc = json.loads(out.stdout or "{}")
            if "sum_received" in doc.get("end", {}):
                return doc["end"]["sum_received"]["bits_per_second"] / 1e9
            time.sleep(0.5 + attempt)
        return None

    def loadgen(self, *args: Any) -> dict[str, Any]:
        argv = [
            "taskset",
            "-c",
            LOAD_CPU,
            sys.executable,
            "-m",
            "kube_proxy_py_bench.loadgen",
            *args,
        ]
        out = self.client.exec(argv, timeout=self.o.duration + 120)
        return json.loads(out.stdout)

    def wrk(self, ep: Endpoint, seconds: float) -> dict[str, Any]:
        """New connections per second by wrk, a new connection per request. Python's own
        client (`loadgen cps`) was the bottleneck: on an EPYC machine direct, HAProxy and
        the userspace mode came within 10 % of one another (9.8k–10.8k/s), direct, with
        no proxy at all, the slowest; with wrk HAProxy went 14 % faster."""
        argv = ["taskset", "-c", LOAD_CPU, *wrk_argv(ep.ip, ep.http_port, seconds, CPS_INFLIGHT)]
        out = self.client.exec(argv, timeout=seconds + 60)
        return parse_wrk(out.stdout)

    def idle_kib(self, ep: Endpoint, count: int) -> float | None:
        """KiB of proxy RSS per idle proxied connection."""
        if ep.pid is None:
            return None
        socks = []
        before = rss_kib(ep.pid) or 0
        try:
            for _ in range(count):
                s = self.client.socket()
                s.settimeout(10)
                s.connect((ep.ip, ep.http_port))
                socks.append(s)
            time.sleep(1.0)  # let the proxy accept and connect every one of them
            after = rss_kib(ep.pid) or 0
        finally:
            for s in socks:
                s.close()
        return (after - before) / count

    def measure(
        self, ep: Endpoint, streams: list[int], idle: int, lat: int, which: list[str]
    ) -> dict[str, Any]:
        d = self.o.duration
        self.loadgen("cps", ep.ip, ep.http_port, 0.3, 8)  # warm-up: lazy set-up paid here
        r: dict[str, Any] = {}
        for n in streams if "throughput" in which else []:
            c0 = cpu_seconds(ep.pid) if ep.pid else 0.0
            gbps = self.iperf(ep, n)
            r[f"gbps_{n}"] = gbps
            if ep.pid and gbps:
                gb = gbps / 8 * self.iperf_seconds
                r[f"cpu_ms_per_gb_{n}"] = (cpu_seconds(ep.pid) - c0) * 1e3 / gb
        if "cps" in which:
            c0 = cpu_seconds(ep.pid) if ep.pid else 0.0
            c = self.wrk(ep, d)
            r["cps"] = c["per_second"]
            if ep.pid and c["conns"]:
                r["cpu_us_per_conn"] = (cpu_seconds(ep.pid) - c0) * 1e6 / c["conns"]
        if "latency" in which:
            la = self.loadgen("lat", ep.ip, ep.http_port, lat)
            r["p50_us"], r["p99_us"] = la["p50_us"], la["p99_us"]
        if "idle" in which:
            r["idle_kib"] = self.idle_kib(ep, idle)
        return r


def run(ctx: Run) -> SuiteResult:
    o = ctx.options
    rounds = o.rounds or (1 if ctx.quick else 3)
    streams = o.streams or ([1, 32] if ctx.quick else [1, 8, 32])
    idle = 500 if ctx.quick else 4000
    lat = 2000 if ctx.quick else 20000
    which = o.figures or list(FIGURES)
    res = SuiteResult(
        settings={
            "rounds": rounds,
            "streams": streams,
            "duration_s": o.duration,
            "idle_connections": idle,
            "latency_requests": lat,
            "cps_inflight": CPS_INFLIGHT,
            "measured": which,
            "pinning": f"proxy on CPU {PROXY_CPU}, load on CPU {LOAD_CPU}",
        }
    )
    base = ensure_tools(["iperf3", "haproxy", "taskset", "wrk"], ctx.install)
    if base:  # the server pod needs iperf3 and HAProxy (its HTTP responder), the client wrk
        res.missing["all"] = "; ".join(base.values())
        return res
    cs = []
    for c in contenders(o.baseline, o.modes):
        why = ensure_tools(list(c.tools), ctx.install)
        if why:
            res.missing[c.name] = "; ".join(why.values())
        else:
            cs.append(c)

    def fig(name: str, unit: str, better: str = "higher", target: Target | None = None) -> Any:
        return res.figure(
            name, unit=unit, product=PRODUCT, reference=REFERENCE, better=better, target=target
        )

    figs: dict[str, Any] = {}
    for n in streams:
        t = Target(">=", 1.0) if n in (1, 32) else None
        figs[f"gbps_{n}"] = fig(f"throughput, {n} stream{'s' * (n > 1)}", "Gbit/s", target=t)
    figs["cps"] = fig("new connections/s", "conn/s", target=Target(">=", 0.75))
    figs["p50_us"] = fig("small request on a kept connection, p50", "µs", "lower")
    figs["p99_us"] = fig("small request on a kept connection, p99", "µs", "lower")
    figs["idle_kib"] = fig("RSS per idle connection", "KiB", "lower", Target("<=", 20, of="value"))
    figs["cpu_us_per_conn"] = fig("proxy CPU per connection", "µs", "lower")
    figs[f"cpu_ms_per_gb_{streams[-1]}"] = fig(
        f"proxy CPU per GB, {streams[-1]} streams", "ms", "lower"
    )

    step = ctx.task("data plane", total=rounds * len(cs))
    with Testbed(workdir=ctx.out / "work" / "data-plane") as tb:
        bench = Bench(tb, o)
        by_name = {c.name: c for c in cs}
        for r, name in alternate([c.name for c in cs], rounds):
            step(f"data plane: {name}, round {r + 1}")
            try:
                with by_name[name].serve(bench) as ep:
                    m = bench.measure(ep, streams, idle, lat, which)
            except Exception as e:  # one contender failing must not lose the others
                res.missing.setdefault(name, f"failed: {e}".splitlines()[0][:300])
                m = {}
            for key, f in figs.items():
                f.add(name, m.get(key))
            step.done()
    res.extra["throughput_vs_streams"] = {
        c.name: {n: figs[f"gbps_{n}"].value(c.name) for n in streams} for c in cs
    }
    return res
