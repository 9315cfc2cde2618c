"""Cluster DNS: this daemon's server next to C servers holding the same records.

    client pod 198.18.1.10 ── node 198.18.200.1: `python -m proxy --proxy-mode=none` :53
      (dnsperf, CPU 1)                            dnsmasq, same records as a hosts file :5301
                                                  NSD, same records as zone files       :5300
                                                  (servers pinned to CPU 0)
                              upstream 198.18.200.53: stub DNS server (proxy.dns.stub)

Query sets (each against every server, rounds alternating):
  A        the Services' A records: what pods ask for (the targets are on this set)
  mixed    A (80 %), AAAA/NODATA (10 %) and SRV (10 %); dnsmasq keeps SRV records
           (`srv-host`) in a list it scans on every query, so it is slow here
  search   what an ndots:5 pod sends before the real name (NXDOMAIN answers)
Per set and server: the maximum rate (dnsperf, median of the rounds), then latency
percentiles with every server at half of *this product's* maximum rate (dnsperf -Q),
so the C servers' tails at the same load show how much of a tail is the machine's.
"""

from __future__ import annotations

import ipaddress
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from proxy.testbed import Host, Node, Testbed

from .core import Run, SuiteResult, Target, alternate
from .machine import ensure_tools

NODE_IP = "198.18.200.1"
CLIENT_IP = "198.18.1.10"
UPSTREAM_IP = "198.18.200.53"
SERVER_CPU, CLIENT_CPU = "0", "1"
ZONE = "cluster.local"
NAMESPACES = 10
PRODUCT, REFERENCE = "kube-proxy-py", "dnsmasq"
PERCENTILES = (50, 90, 99, 99.9)


@dataclass(frozen=True)
class DnsContender:
    name: str
    port: int
    tools: tuple[str, ...]


CONTENDERS = (
    DnsContender(PRODUCT, 53, ()),
    DnsContender(REFERENCE, 5301, ("dnsmasq",)),
    DnsContender("NSD", 5300, ("nsd",)),
)


# -- records -----------------------------------------------------------------------------------


def service_names(n: int) -> list[tuple[str, str, str]]:
    """(name, namespace, ClusterIP) for n Services in 198.19.0.0/16."""
    base = int(ipaddress.ip_address("198.19.0.10"))
    return [
        (f"svc-{i}", f"ns-{i % NAMESPACES}", str(ipaddress.ip_address(base + i))) for i in range(n)
    ]


def manifests(services: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]},
        }
        for name, ns, ip in services
    ]


def nsd_conf(d: Path, services: list[tuple[str, str, str]], port: int) -> Path:
    soa = "@ 5 IN SOA ns.dns.{z}. hostmaster.{z}. 1 7200 1800 86400 5\n@ 5 IN NS ns.dns.{z}.\n"
    lines = [soa.format(z=ZONE), f"ns.dns 5 IN A {NODE_IP}\n"]
    for name, ns, ip in services:
        lines.append(f"{name}.{ns}.svc 5 IN A {ip}\n")
        lines.append(f"_http._tcp.{name}.{ns}.svc 5 IN SRV 0 100 80 {name}.{ns}.svc.{ZONE}.\n")
    zones = {ZONE: "".join(lines), "example.com": soa.format(z="example.com")}
    text = f"""server:
  ip-address: {NODE_IP}@{port}
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "{d}"
  database: ""
  pidfile: "{d}/nsd.pid"
  xfrdfile: "{d}/xfrd.state"
  zonelistfile: "{d}/zone.list"
  logfile: "{d}/nsd.log"
  verbosity: 0
  rrl-ratelimit: 0
remote-control:
  control-enable: no
"""
    for z, body in zones.items():
        p = d / f"{z}.zone"
        p.write_text(f"$ORIGIN {z}.\n$TTL 5\n{body}")
        text += f"zone:\n  name: {z}\n  zonefile: {p}\n"
    conf = d / "nsd.conf"
    conf.write_text(text)
    return conf


def dnsmasq_conf(d: Path, services: list[tuple[str, str, str]], port: int) -> Path:
    hosts = d / "dnsmasq.hosts"
    hosts.write_text("".join(f"{ip} {name}.{ns}.svc.{ZONE}\n" for name, ns, ip in services))
    lines = [
        "no-resolv",
        "no-hosts",
        f"addn-hosts={hosts}",
        f"port={port}",
        f"listen-address={NODE_IP}",
        "bind-interfaces",
        "local-ttl=5",
        "cache-size=10000",
        f"local=/{ZONE}/",
        "local=/example.com/",
        "user=root",
        "pid-file=",
    ]
    lines += [
        f"srv-host=_http._tcp.{n}.{ns}.svc.{ZONE},{n}.{ns}.svc.{ZONE},80,0,100"
        for n, ns, _ in services
    ]
    conf = d / "dnsmasq.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def query_sets(services: list[tuple[str, str, str]], d: Path) -> dict[str, Path]:
    rnd = random.Random(1)
    sets: dict[str, list[str]] = {"A": [], "mixed": [], "search": []}
    for name, ns, _ in services:
        fq = f"{name}.{ns}.svc.{ZONE}"
        sets["A"].append(f"{fq} A")
        sets["mixed"] += [f"{fq} A"] * 8 + [f"{fq} AAAA", f"_http._tcp.{fq} SRV"]
        sets["search"] += [
            f"{fq}.{ns}.svc.{ZONE} A",
            f"{fq}.svc.{ZONE} A",
            f"www.site-{name}.com.{ns}.svc.{ZONE} A",
            f"{fq}.example.com A",
        ]
    out = {}
    for key, lines in sets.items():
        rnd.shuffle(lines)
        p = d / f"queries-{key}.txt"
        p.write_text("\n".join(lines) + "\n")
        out[key] = p
    return out


# -- dnsperf -----------------------------------------------------------------------------------

LATENCY = re.compile(r"^> \S+ \S+ \S+ ([\d.]+)$", re.M)


def dnsperf(
    client: Host,
    port: int,
    qfile: Path,
    seconds: float,
    rate: int | None = None,
    log: Path | None = None,
) -> dict[str, Any]:
    """One dnsperf run; with `log`, every response's latency is read (percentiles)."""
    argv = [
        "taskset",
        "-c",
        CLIENT_CPU,
        "dnsperf",
        "-s",
        NODE_IP,
        "-p",
        str(port),
        "-d",
        str(qfile),
        "-l",
        str(seconds),
        "-c",
        "4",
        "-q",
        "500",
        "-t",
        "2",
    ]
    if rate:
        argv += ["-Q", str(rate)]
    if log is not None:
        argv.append("-v")
        with open(log, "w") as f:
            p = subprocess.run(
                ["ip", "netns", "exec", client.ns, *argv],
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=seconds + 60,
                check=False,
            )
        text = log.read_text(errors="replace")
        log.unlink()  # large; the figures are kept
    else:
        cp = client.exec(argv, timeout=seconds + 60, check=False)
        text, p = cp.stdout + cp.stderr, cp
    m = re.search(r"Queries per second:\s+([\d.]+)", text)
    if not m:
        raise RuntimeError(f"dnsperf failed ({p.returncode}): {text[-1000:]}")
    out: dict[str, Any] = {"qps": float(m.group(1))}
    lost = re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", text)
    out["lost_pct"] = float(lost.group(1)) if lost else None
    if log is not None:
        lat = sorted(float(x) * 1e3 for x in LATENCY.findall(text))
        if lat:
            out["percentiles_ms"] = {
                str(q): lat[min(len(lat) - 1, int(len(lat) * q / 100))] for q in PERCENTILES
            }
    return out


def _wait_answers(node: Node, port: int, name: str, proc: subprocess.Popen, who: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        p = node.exec(
            ["dig", f"@{NODE_IP}", "-p", port, "+time=1", "+tries=1", "+short", name], check=False
        )
        if p.stdout.strip():
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{who} does not answer {name} on port {port}")
        time.sleep(0.1)


def _start(c: DnsContender, node: Node, work: Path, services: list, mf: Path) -> subprocess.Popen:
    pin = ["taskset", "-c", SERVER_CPU]
    log = open(work / f"{c.name}.log", "ab")  # noqa: SIM115 (the child keeps it)
    if c.name == PRODUCT:
        argv = [
            sys.executable,
            "-m",
            "proxy",
            "--proxy-mode=none",
            "--manifests",
            mf,
            "--dns-bind-address",
            f"{NODE_IP}:{c.port}",
            "--dns-upstream",
            UPSTREAM_IP,
            "--hostname-override",
            "node",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ]
    elif c.name == "NSD":
        argv = ["nsd", "-d", "-c", nsd_conf(work, services, c.port)]
    else:
        argv = ["dnsmasq", "-k", f"--conf-file={dnsmasq_conf(work, services, c.port)}"]
    return node.run([*pin, *argv], stdout=log, stderr=subprocess.STDOUT)


def run(ctx: Run) -> SuiteResult:
    o = ctx.options
    rounds = o.rounds or (1 if ctx.quick else 3)
    duration = o.duration
    sets = o.dns_sets or (["A"] if ctx.quick else ["A", "mixed", "search"])
    n = o.dns_names
    res = SuiteResult(
        settings={
            "names": n,
            "rounds": rounds,
            "duration_s": duration,
            "sets": sets,
            "pinning": f"servers on CPU {SERVER_CPU}, dnsperf on CPU {CLIENT_CPU}",
        }
    )
    base = ensure_tools(["dnsperf", "dig", "taskset"], ctx.install)
    if base:
        res.missing["all"] = "; ".join(base.values())
        return res
    cs = []
    for c in CONTENDERS:
        why = ensure_tools(list(c.tools), ctx.install)
        if why:
            res.missing[c.name] = "; ".join(why.values())
        else:
            cs.append(c)
    services = service_names(n)
    step = ctx.task("dns", total=len(sets) * rounds * len(cs) * 2)
    pct: dict[str, dict[str, dict[str, float]]] = {}
    with Testbed(workdir=ctx.out / "work" / "dns") as tb:
        work = Path(tb.workdir)
        node = tb.add_node("node", underlay_ip=NODE_IP, pod_cidr="198.18.1.0/24")
        client = tb.add_pod(node, "client", CLIENT_IP)
        upstream = tb.add_external("upstream", UPSTREAM_IP)
        upstream.python(
            ["-m", "proxy.dns.stub", "--listen", f"{UPSTREAM_IP}:53", "--ttl", "3600", "--quiet"],
            background=True,
            stdout=subprocess.DEVNULL,
        )
        mf = work / "services.yaml"
        mf.write_text(yaml.safe_dump_all(manifests(services)))
        last = f"{services[-1][0]}.{services[-1][1]}.svc.{ZONE}"
        for c in cs:
            p = _start(c, node, work, services, mf)
            _wait_answers(node, c.port, last, p, c.name)
        qsets = query_sets(services, work)
        for q in qsets.values():  # warm-up: one pass of every name through every server
            for c in cs:
                client.exec(
                    ["dnsperf", "-s", NODE_IP, "-p", c.port, "-d", q, "-n", "1", "-q", "50"],
                    timeout=120,
                    check=False,
                )
        names = [c.name for c in cs]
        port = {c.name: c.port for c in cs}
        for s in sets:
            qfile = qsets[s]
            fmax = res.figure(
                f"maximum rate, {s} queries",
                unit="q/s",
                product=PRODUCT,
                reference=REFERENCE,
                target=Target(">=", 1.0) if s == "A" else None,
            )
            for r, who in alternate(names, rounds):
                step(f"dns: {s} queries, {who} at full speed, round {r + 1}")
                fmax.add(who, dnsperf(client, port[who], qfile, duration)["qps"])
                step.done()
            half = int((fmax.value(PRODUCT) or 1000) / 2)
            f50 = res.figure(
                f"p50 at half {PRODUCT}'s maximum, {s} queries",
                unit="ms",
                product=PRODUCT,
                reference=REFERENCE,
                better="lower",
            )
            f99 = res.figure(
                f"p99 at half {PRODUCT}'s maximum, {s} queries",
                unit="ms",
                product=PRODUCT,
                reference=REFERENCE,
                better="lower",
                target=Target("<=", 2.0) if s == "A" else None,
            )
            runs: dict[str, list[dict[str, float]]] = {w: [] for w in names}
            for r, who in alternate(names, rounds):
                step(f"dns: {s} queries, {who} at {half} q/s, round {r + 1}")
                x = dnsperf(client, port[who], qfile, duration, rate=half, log=work / "v.log")
                pc = x.get("percentiles_ms", {})
                runs[who].append(pc)
                f50.add(who, pc.get("50"))
                f99.add(who, pc.get("99"))
                step.done()
            pct[s] = {
                w: {q: statistics.median(p[q] for p in ps if q in p) for q in ps[0]}
                for w, ps in runs.items()
                if ps and ps[0]
            }
            res.extra.setdefault("half_rate_qps", {})[s] = half
    res.extra["percentiles_ms"] = pct
    return res
