"""Cluster DNS end to end: the real daemon in a node namespace, `dig` and the system
resolver in a pod namespace, a stub upstream DNS server on an outside host.

One testbed for the module:

    client pod 198.18.1.10 ── node-a 198.18.200.1 (daemon: --dns-bind-address :53)
                                   │ underlay
                              upstream 198.18.200.53 (python -m proxy.dns.stub, :53)

The node's resolv.conf (/etc/netns/<node>/resolv.conf, bind-mounted by `ip netns exec`)
names the stub as nameserver and `example.com` as search domain, so the daemon's
default upstream and search-suffix handling come from it as in a real node.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from proxy.testbed import Host, Node, ProxyProcess, Testbed

pytestmark = pytest.mark.kernel

NODE_IP = "198.18.200.1"
UPSTREAM_IP = "198.18.200.53"
Z = "cluster.local"


def svc(name: str, ip: str | None, ports: list[dict] | None = None, **spec) -> dict:
    s: dict = {"ports": ports if ports is not None else [{"name": "http", "port": 80}], **spec}
    if ip is not None:
        s["clusterIP"] = ip
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": s,
    }


def eps(
    svc_name: str,
    addrs: list[tuple[str, bool, str]],
    *,
    ports: list[dict] | None = None,
    name: str | None = None,
    family: str = "IPv4",
) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{svc_name}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": svc_name},
        },
        "addressType": family,
        "ports": ports
        if ports is not None
        else [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": ready}, **({"hostname": h} if h else {})}
            for ip, ready, h in addrs
        ],
    }


def objects(web_ip: str = "198.19.0.10", db_extra: bool = False) -> list[dict]:
    db = [("198.18.1.21", True, "db-0"), ("198.18.1.22", True, ""), ("198.18.1.23", False, "db-2")]
    if db_extra:
        db.append(("198.18.1.24", True, "db-3"))
    return [
        svc("web", web_ip),
        svc("dual", None, clusterIPs=["198.19.0.20", "fd00:19::20"]),
        svc("db", "None", ports=[{"name": "pg", "port": 5432}]),
        svc("many", "None"),
        svc("ext", None, type="ExternalName", externalName="www.example.org"),
        eps("db", db, ports=[{"name": "pg", "port": 15432, "protocol": "TCP"}]),
        eps("many", [(f"198.18.2.{i}", True, "") for i in range(1, 101)]),
    ]


def write_manifests(path: Path, objs: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(objs))
    tmp.replace(path)  # atomic: the reader never sees half a file


@dataclass
class Site:
    tb: Testbed
    node: Node
    client: Host
    upstream: Host
    stub: subprocess.Popen
    stub_log: Path
    proxy: ProxyProcess
    manifests: Path
    netns_dirs: list[Path]

    def stub_queries(self) -> list[str]:
        return re.findall(r"^query (\S+)", self.stub_log.read_text(), re.M)


def _netns_etc(ns: str, resolv: str) -> Path:
    d = Path("/etc/netns") / ns
    d.mkdir(parents=True, exist_ok=True)
    (d / "resolv.conf").write_text(resolv)
    return d


def _start_stub(upstream: Host, log: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 - kept open for the child's lifetime
    p = upstream.python(
        ["-m", "proxy.dns.stub", "--listen", f"{UPSTREAM_IP}:53"],
        background=True,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 15
    while "listening" not in log.read_text():
        assert p.poll() is None, f"stub upstream exited: {log.read_text()}"
        assert time.monotonic() < deadline, "stub upstream did not start"
        time.sleep(0.05)
    return p


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("dns-e2e")
    dirs: list[Path] = []
    with Testbed(workdir=work) as tb:
        try:
            node = tb.add_node("node-a", underlay_ip=NODE_IP, pod_cidr="198.18.1.0/24")
            client = tb.add_pod(node, "client", "198.18.1.10")
            upstream = tb.add_external("upstream", UPSTREAM_IP)
            dirs.append(_netns_etc(node.ns, f"nameserver {UPSTREAM_IP}\nsearch example.com\n"))
            dirs.append(
                _netns_etc(
                    client.ns,
                    f"nameserver {NODE_IP}\nsearch default.svc.{Z} svc.{Z} {Z} example.com\n"
                    "options ndots:5 timeout:2 attempts:1\n",
                )
            )
            stub_log = work / "stub.log"
            stub = _start_stub(upstream, stub_log)
            manifests = work / "manifests.yaml"
            write_manifests(manifests, objects())
            px = node.start_proxy(
                [
                    "--proxy-mode=none",
                    "--manifests", str(manifests),
                    "--dns-bind-address", f"{NODE_IP}:53",
                    "--hostname-override", "node-a",
                    "--healthz-bind-address", "",
                    "--metrics-bind-address", "127.0.0.1:10249",
                ]
            )  # fmt: skip
            px.wait_ready()
            yield Site(tb, node, client, upstream, stub, stub_log, px, manifests, dirs)
        finally:
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)


# -- dig --------------------------------------------------------------------------------------


@dataclass
class Dig:
    status: str
    flags: set[str]
    answer: list[list[str]]  # [name, ttl, class, type, rdata...]
    authority: list[list[str]]
    additional: list[list[str]]
    raw: str

    def rdata(self, rtype: str | None = None) -> list[str]:
        return sorted(" ".join(r[4:]) for r in self.answer if rtype is None or r[3] == rtype)


def dig(host: Host, *args: str, server: str = NODE_IP) -> Dig:
    p = host.exec(["dig", f"@{server}", "+time=2", "+tries=1", *args], check=False)
    out = p.stdout
    m = re.search(r"status: (\w+)", out)
    assert m, f"dig {' '.join(args)} got no reply:\n{out}\n{p.stderr}"
    fm = re.search(r";; flags: ([^;]*);", out)
    sections: dict[str, list[list[str]]] = {"ANSWER": [], "AUTHORITY": [], "ADDITIONAL": []}
    current = None
    for line in out.splitlines():
        h = re.match(r";; (ANSWER|AUTHORITY|ADDITIONAL) SECTION:", line)
        if h:
            current = h.group(1)
        elif not line.strip() or line.startswith(";"):
            if not line.strip():
                current = None
        elif current:
            sections[current].append(line.split())
    return Dig(
        m.group(1),
        set(fm.group(1).split()) if fm else set(),
        sections["ANSWER"],
        sections["AUTHORITY"],
        sections["ADDITIONAL"],
        out,
    )


# -- records ----------------------------------------------------------------------------------


def test_a_aaaa_and_case_insensitive(site: Site) -> None:
    d = dig(site.client, f"web.default.svc.{Z}", "A")
    assert d.status == "NOERROR" and d.rdata("A") == ["198.19.0.10"] and "aa" in d.flags
    assert d.answer[0][1] == "5"  # --dns-ttl default
    assert dig(site.client, f"WeB.DEFAULT.svc.{Z}", "A").rdata("A") == ["198.19.0.10"]
    assert dig(site.client, f"dual.default.svc.{Z}", "AAAA").rdata("AAAA") == ["fd00:19::20"]
    nodata = dig(site.client, f"web.default.svc.{Z}", "AAAA")
    assert nodata.status == "NOERROR" and not nodata.answer
    assert [r[3] for r in nodata.authority] == ["SOA"]


def test_headless_srv_and_hostname_records(site: Site) -> None:
    assert dig(site.client, f"db.default.svc.{Z}").rdata("A") == ["198.18.1.21", "198.18.1.22"]
    srv = dig(site.client, f"_pg._tcp.db.default.svc.{Z}", "SRV")
    assert srv.rdata("SRV") == [
        f"0 100 15432 198-18-1-22.db.default.svc.{Z}.",
        f"0 100 15432 db-0.db.default.svc.{Z}.",
    ]
    assert sorted(r[4] for r in srv.additional if r[3] == "A") == ["198.18.1.21", "198.18.1.22"]
    assert dig(site.client, f"db-0.db.default.svc.{Z}").rdata("A") == ["198.18.1.21"]
    assert dig(site.client, f"db-2.db.default.svc.{Z}").status == "NXDOMAIN"  # not ready
    cip = dig(site.client, f"_http._tcp.web.default.svc.{Z}", "SRV")
    assert cip.rdata("SRV") == [f"0 100 80 web.default.svc.{Z}."]


def test_ptr_records(site: Site) -> None:
    assert dig(site.client, "-x", "198.19.0.10").rdata("PTR") == [f"web.default.svc.{Z}."]
    assert dig(site.client, "-x", "fd00:19::20").rdata("PTR") == [f"dual.default.svc.{Z}."]
    assert dig(site.client, "-x", "198.18.1.21").rdata("PTR") == [f"db-0.db.default.svc.{Z}."]


def test_external_name_cname_chased_through_the_upstream(site: Site) -> None:
    d = dig(site.client, f"ext.default.svc.{Z}", "A")
    assert d.rdata("CNAME") == ["www.example.org."] and d.rdata("A") == ["192.0.2.1"]


def test_dns_version_negative_answers_and_any(site: Site) -> None:
    assert dig(site.client, f"dns-version.{Z}", "TXT").rdata("TXT") == ['"1.1.0"']
    nx = dig(site.client, f"nope.default.svc.{Z}")
    assert nx.status == "NXDOMAIN" and [r[3] for r in nx.authority] == ["SOA"]
    any_ = dig(site.client, f"web.default.svc.{Z}", "ANY")
    assert [r[3] for r in any_.answer] == ["HINFO"]


# -- transport --------------------------------------------------------------------------------


def test_tcp_and_truncation(site: Site) -> None:
    name = f"many.default.svc.{Z}"  # 100 A records, ~1.6 kB
    assert len(dig(site.client, "+tcp", name).rdata("A")) == 100
    for size in ("512", "1232", "4096"):
        tc = dig(site.client, "+notcp", "+ignore", f"+bufsize={size}", name)
        assert "tc" in tc.flags and not tc.answer, size
    noedns = dig(site.client, "+notcp", "+ignore", "+noedns", name)
    assert "tc" in noedns.flags
    assert len(dig(site.client, name).rdata("A")) == 100  # dig retries over TCP itself
    small = dig(site.client, "+notcp", "+ignore", "+bufsize=512", f"db.default.svc.{Z}")
    assert "tc" not in small.flags and len(small.answer) == 2


def test_pipelined_queries_on_one_tcp_connection(site: Site) -> None:
    names = [f"web.default.svc.{Z}", "www.example.org", f"nope.default.svc.{Z}"]
    code = f"""
import socket, struct
from dnslib import DNSRecord
s = socket.create_connection(("{NODE_IP}", 53), timeout=5)
qs = [DNSRecord.question(n) for n in {names!r}]
for i, q in enumerate(qs):
    q.header.id = 100 + i
s.sendall(b"".join(struct.pack("!H", len(p)) + p for p in (bytes(q.pack()) for q in qs)))
buf = b""
def take(n):
    global buf
    while len(buf) < n:
        chunk = s.recv(65536)
        assert chunk, "closed early"
        buf += chunk
    out, buf = buf[:n], buf[n:]
    return out
for _ in qs:
    r = DNSRecord.parse(take(struct.unpack("!H", take(2))[0]))
    print(r.header.id, r.header.rcode, len(r.rr))
"""
    out = site.client.python(code).stdout.split("\n")
    got = sorted(tuple(map(int, line.split())) for line in out if line.strip())
    assert got == [(100, 0, 1), (101, 0, 1), (102, 3, 0)]


HOARDER = """
import asyncio, sys
from dnslib import DNSRecord
SERVER = (sys.argv[1], 53)
q = DNSRecord.question("web.default.svc.cluster.local").pack()
QUERY = len(q).to_bytes(2, "big") + q

async def hold(src: str) -> None:
    # Keep one connection open from `src`, opening a new one whenever the server closes
    # it (a pause after each close keeps the churn to what a test box can take). A query
    # every 0.3 s keeps it from idling out at the server's busy idle timeout (0.5 s), so
    # the slots stay taken and only shedding can make room.
    while True:
        try:
            r, w = await asyncio.open_connection(*SERVER, local_addr=(src, 0))
        except OSError:
            await asyncio.sleep(0.5)
            continue
        try:
            while True:
                w.write(QUERY)
                await r.readexactly(int.from_bytes(await r.readexactly(2), "big"))
                await asyncio.sleep(0.3)
        except (OSError, asyncio.IncompleteReadError):
            pass
        w.close()
        await asyncio.sleep(0.5)

async def main() -> None:
    tasks = []
    for spec in sys.argv[2:]:
        src, n = spec.split("=")
        tasks += [asyncio.create_task(hold(src)) for _ in range(int(n))]
    print("holding", len(tasks), flush=True)
    await asyncio.gather(*tasks)

asyncio.run(main())
"""


def dns_metrics(site: Site) -> dict[str, float]:
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(kubeproxy_dns_\S+) (\S+)$", site.proxy.metrics(), re.M)
    }


def test_tcp_clients_are_served_while_another_pod_hoards_connections(site: Site) -> None:
    """Bug 8: idle TCP connections used to fill all 256 slots for 10 s and lock real
    clients out. A pod now wants 64 connections from its address and 16 from each of 16
    more, keeping each in use and reopening it as soon as it is closed: 32 of its own
    address's are refused (the per-client limit), the other 288 are more than the 256
    slots, so the server stays full and makes room by shedding. Queries from another pod
    are all answered meanwhile (with no shedding they would be refused)."""
    hoarder = site.tb.add_pod(site.node, "hoarder", "198.18.1.11")
    extra = [f"198.18.1.{i}" for i in range(200, 216)]
    dev = re.search(r"dev (\S+)", site.node.exec(["ip", "-o", "route", "get", hoarder.ip]).stdout)
    assert dev, "no route to the hoarder pod"
    for ip in extra:
        hoarder.exec(["ip", "address", "add", f"{ip}/32", "dev", "eth0"])
        site.node.exec(["ip", "route", "add", f"{ip}/32", "dev", dev.group(1)])
    specs = [f"{hoarder.ip}=64", *(f"{ip}=16" for ip in extra)]
    refused = 'kubeproxy_dns_dropped_total{reason="tcp_connection_limit"}'
    refused_before = dns_metrics(site).get(refused, 0)
    p = hoarder.python(["-c", HOARDER, NODE_IP, *specs], background=True, stdout=subprocess.PIPE)
    try:
        # Wait for the state the queries must get through: the server full and shedding
        # (not for the connection gauge: an instant's reading of it says nothing).
        limit = 'kubeproxy_dns_dropped_total{reason="tcp_client_limit"}'
        shed = 'kubeproxy_dns_dropped_total{reason="tcp_shed_idle"}'
        deadline = time.monotonic() + 120
        while (m := dns_metrics(site)).get(shed, 0) < 1 or m.get(limit, 0) < 1:
            assert p.poll() is None, "the hoarder exited"
            assert time.monotonic() < deadline, f"the server never filled up: {m}"
            time.sleep(0.2)
        for _ in range(20):
            d = dig(site.client, "+tcp", "+time=5", f"web.default.svc.{Z}")
            assert d.rdata("A") == ["198.19.0.10"], d.raw
        m = dns_metrics(site)
        assert m.get(refused, 0) == refused_before, m  # nothing was busy: none refused
        assert p.poll() is None, "the hoarder exited"
    finally:
        p.kill()
        p.wait(10)


def test_only_the_bind_address_answers(site: Site) -> None:
    p = site.node.exec(
        ["dig", "@127.0.0.1", "+time=1", "+tries=1", f"web.default.svc.{Z}"], check=False
    )
    assert "status:" not in p.stdout  # nothing listens on the node's loopback


# -- forwarding and search paths -------------------------------------------------------------


def test_forwarding_is_cached(site: Site) -> None:
    before = site.stub_queries().count("cached.example.org.")
    for _ in range(3):
        d = dig(site.client, "cached.example.org")
        assert d.rdata("A") == ["192.0.2.1"] and "aa" not in d.flags
    assert site.stub_queries().count("cached.example.org.") == before + 1


def getent4(host: Host, name: str) -> str:
    out = host.exec(["getent", "ahostsv4", name], check=False).stdout
    return out.split()[0] if out.strip() else ""


def test_system_resolver_with_search_path_and_ndots(site: Site) -> None:
    """getent/getaddrinfo inside the pod use /etc/netns/<pod>/resolv.conf (ndots:5)."""
    # IPv4 only: the stub upstream answers AAAA for every name, so an AAAA search would
    # (correctly) find web.example.com's after the cluster names' NODATA.
    assert getent4(site.client, "web") == "198.19.0.10"
    assert getent4(site.client, "web.default") == "198.19.0.10"
    code = (
        "import socket; "
        "print(sorted({a[4][0] for a in socket.getaddrinfo('db', 80, socket.AF_INET)}))"
    )
    assert site.client.python(code).stdout.strip() == "['198.18.1.21', '198.18.1.22']"
    # A fully qualified cluster name typed without the trailing dot has 4 dots < ndots:5,
    # so the resolver first tries it with every search suffix. The one ending in the host
    # domain (example.com) is answered NXDOMAIN here: the stub upstream answers *every*
    # name (like a wildcard), so had it been asked, the pod would get 192.0.2.1.
    fq = f"web.default.svc.{Z}"
    assert getent4(site.client, fq) == "198.19.0.10"
    assert f"{fq}.example.com." not in site.stub_queries()
    # External names still resolve, through the search list and then as written.
    assert getent4(site.client, "www.example.net") == "192.0.2.1"


def test_metrics_are_exported(site: Site) -> None:
    text = site.proxy.metrics()
    assert re.search(r'kubeproxy_dns_queries_total\{qtype="A",rcode="NOERROR"\} \d', text)
    assert "kubeproxy_dns_cache_hits_total" in text
    assert 'kubeproxy_dns_request_duration_seconds_bucket{le="0.00025",source="zone"}' in text


# -- changes (keep these last: they edit the manifests and stop the upstream) ---------------------


def test_answers_follow_manifest_edits(site: Site) -> None:
    """The Service and its slice may land in two syncs (the source publishes them one
    after the other): the answers are checked after each sync until both are in."""
    n = site.proxy.sync_count()
    write_manifests(site.manifests, objects(web_ip="198.19.0.11", db_extra=True))

    def followed() -> bool:
        return dig(site.client, f"web.default.svc.{Z}").rdata("A") == [
            "198.19.0.11"
        ] and "198.18.1.24" in dig(site.client, f"db.default.svc.{Z}").rdata("A")

    deadline = time.monotonic() + 60
    while True:
        n = site.proxy.wait_synced(after=n, timeout=max(1.0, deadline - time.monotonic()))
        if followed():
            break
        assert time.monotonic() < deadline, "the answers did not follow the edit"
    assert dig(site.client, f"db-3.db.default.svc.{Z}").rdata("A") == ["198.18.1.24"]
    assert dig(site.client, "-x", "198.19.0.11").rdata("PTR") == [f"web.default.svc.{Z}."]
    gone = dig(site.client, "-x", "198.19.0.10")  # not ours any more: asked upstream
    assert gone.status == "NOERROR" and not gone.answer


def test_upstream_down_gives_servfail(site: Site) -> None:
    site.stub.terminate()
    site.stub.wait(10)
    d = dig(site.client, "after-stop.example.org")
    assert d.status == "SERVFAIL"
    assert dig(site.client, f"web.default.svc.{Z}").status == "NOERROR"  # the zone still is
    assert dig(site.client, "cached.example.org").rdata("A") == ["192.0.2.1"]  # still cached


# -- every proxy mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_dns_in_every_proxy_mode(mode: str, tmp_path: Path) -> None:
    with Testbed(workdir=tmp_path) as tb:
        node = tb.add_node("node-a", underlay_ip=NODE_IP, pod_cidr="198.18.1.0/24")
        client = tb.add_pod(node, "client", "198.18.1.10")
        manifests = tmp_path / "m.yaml"
        write_manifests(manifests, objects())
        args = [
            f"--proxy-mode={mode}",
            "--manifests", str(manifests),
            "--dns-bind-address", f"{NODE_IP}:53",
            "--dns-upstream", "127.0.0.1:5399",  # closed port: ICMP says so at once
            "--hostname-override", "node-a",
            "--cluster-cidr", "198.18.0.0/16",
            "--healthz-bind-address", "",
            "--metrics-bind-address", "",
        ]  # fmt: skip
        px = node.start_proxy(args)
        try:
            px.wait_ready()
            assert dig(client, f"web.default.svc.{Z}").rdata("A") == ["198.19.0.10"]
            assert dig(client, "nowhere.example.org").status == "SERVFAIL"  # no upstream there
        finally:
            px.stop()
            node.exec([sys.executable, "-m", "proxy", "--cleanup"], check=False)
