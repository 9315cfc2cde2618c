"""The rendered rules are accepted by the real kernel (iptables-restore in a throwaway netns).

One ruleset with every feature the renderer has, restored with `--noflush` as the applier
does, the built-in jumps added with `iptables -I`, then a partial render restored on top;
`iptables-save` must then show exactly the chains and rule counts the renderer reports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import MappingProxyType

import pytest

from proxy.iptables.render import BASE_JUMPS, RenderConfig, RenderResult, render, saved_chains
from proxy.model import Endpoint, Model, PortSpec, Service, ServiceEndpoints, make_model
from proxy.testbed import netns as tb_netns

pytestmark = pytest.mark.kernel

NODE = "node-a"
CIDRS = ("198.18.0.0/16", "fd00:18::/64")
PREFIX = f"kprt{os.getpid() % 100000}-"

# (iptables, iptables-restore, iptables-save) per family; legacy as well when installed.
BACKENDS = [("", "iptables", "ip6tables")]
if shutil.which("iptables-legacy-restore") and shutil.which("ip6tables-legacy-restore"):
    BACKENDS.append(("legacy", "iptables-legacy", "ip6tables-legacy"))


@contextmanager
def netns() -> Iterator[str]:
    name = PREFIX + uuid.uuid4().hex[:8]
    tb_netns.add(name)
    try:
        yield name
    finally:
        tb_netns.delete(name)


def run(ns: str, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True
    )


def ep(ip: str, port: int = 8080, node: str = NODE, ready: bool = True, **kw) -> Endpoint:
    return Endpoint(
        ip, port, ready, kw.get("serving", ready), kw.get("terminating", False), node_name=node
    )


def everything() -> tuple[dict, dict]:
    """Services covering every rule the renderer writes, dual-stack where it matters."""
    http = PortSpec("http", "TCP", 80)
    svcs = [
        Service("ns1", "cip", cluster_ips=("198.19.0.10", "fd00:19::10"), ports=(http,)),
        Service(
            "ns1",
            "np",
            type="NodePort",
            cluster_ips=("198.19.0.11", "fd00:19::11"),
            ports=(PortSpec("http", "TCP", 80, 30080),),
            external_ips=("198.19.100.1", "fd00:19::100"),
        ),
        Service(
            "ns1",
            "lb",
            type="LoadBalancer",
            cluster_ips=("198.19.0.12", "fd00:19::12"),
            ports=(PortSpec("http", "TCP", 80, 30081),),
            load_balancer_ips=("198.19.200.1", "fd00:19::200"),
            load_balancer_source_ranges=("203.0.113.0/25", "2001:db8::/48"),
            session_affinity_timeout=10800,
        ),
        Service(
            "ns1",
            "local",
            type="LoadBalancer",
            cluster_ips=("198.19.0.13", "fd00:19::13"),
            ports=(PortSpec("http", "TCP", 80, 30082),),
            load_balancer_ips=("198.19.200.2", "fd00:19::201"),
            external_traffic_local=True,
            health_check_node_port=32000,
        ),
        Service(
            "ns1",
            "remote-only",
            type="NodePort",
            cluster_ips=("198.19.0.14",),
            ports=(PortSpec("http", "TCP", 80, 30083),),
            external_traffic_local=True,
        ),
        Service(
            "ns1", "itp", cluster_ips=("198.19.0.15",), ports=(http,), internal_traffic_local=True
        ),
        Service(
            "ns1",
            "itp-none",
            cluster_ips=("198.19.0.16",),
            ports=(http,),
            internal_traffic_local=True,
        ),
        Service(
            "ns1",
            "dead",
            type="LoadBalancer",
            cluster_ips=("198.19.0.17", "fd00:19::17"),
            ports=(PortSpec("http", "TCP", 80, 30084),),
            external_ips=("198.19.100.2",),
            load_balancer_ips=("198.19.200.3",),
        ),
        Service("ns1", "term", cluster_ips=("198.19.0.18",), ports=(http,)),
        Service(
            "kube-system",
            "dns",
            cluster_ips=("198.19.0.53", "fd00:19::53"),
            ports=(PortSpec("dns", "UDP", 53), PortSpec("dns-tcp", "TCP", 53)),
        ),
        Service("ns1", "sctp", cluster_ips=("198.19.0.19",), ports=(PortSpec("", "SCTP", 9999),)),
    ]
    two = (ep("198.18.1.10"), ep("198.18.2.10", node="node-b"), ep("fd00:18::10"))
    eps = {
        "cip": {("http", "TCP"): two},
        "np": {("http", "TCP"): two},
        "lb": {("http", "TCP"): (*two, ep("fd00:18::11", node="node-b"))},
        "local": {("http", "TCP"): two},
        "remote-only": {("http", "TCP"): (ep("198.18.2.14", node="node-b"),)},
        "itp": {("http", "TCP"): two},
        "itp-none": {("http", "TCP"): (ep("198.18.2.16", node="node-b"),)},
        "dead": {("http", "TCP"): (ep("198.18.1.17", ready=False),)},
        "term": {
            ("http", "TCP"): (ep("198.18.1.18", ready=False, serving=True, terminating=True),)
        },
        "dns": {
            ("dns", "UDP"): (ep("198.18.1.53", 53), ep("fd00:18::53", 53)),
            ("dns-tcp", "TCP"): (ep("198.18.1.53", 53), ep("fd00:18::53", 53)),
        },
        "sctp": {("", "SCTP"): (ep("198.18.1.19", 9999),)},
    }
    services = {s.key: s for s in svcs}
    endpoints = {s.key: ServiceEndpoints((), MappingProxyType(eps[s.name])) for s in svcs}
    return services, endpoints


def restore(ns: str, binary: str, res: RenderResult) -> None:
    p = run(ns, [f"{binary}-restore", "--noflush", "-w"], res.text)
    assert p.returncode == 0, f"{binary}-restore failed: {p.stderr}\n{res.text}"


def check_kernel(ns: str, binary: str, res: RenderResult) -> None:
    p = run(ns, [f"{binary}-save"])
    assert p.returncode == 0, p.stderr
    saved = saved_chains(p.stdout)
    kube = {(t, c) for t, c in saved if c.startswith("KUBE-")}
    assert kube == set(res.state.chains)
    counts = {"filter": 0, "nat": 0}
    table = ""
    for line in p.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A KUBE-"):
            counts[table] += 1
    assert counts == dict(res.rules)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0] or "default")
@pytest.mark.parametrize("family", [4, 6])
def test_kernel_accepts_full_then_partial(backend: tuple[str, str, str], family: int) -> None:
    binary = backend[1] if family == 4 else backend[2]
    cfg = RenderConfig(
        family=family,
        node_name=NODE,
        cluster_cidrs=CIDRS,
        node_ip="203.0.113.5" if family == 4 else "2001:db8::5",
    )
    services, endpoints = everything()
    model: Model = make_model(services, endpoints)
    with netns() as ns:
        full = render(model, cfg)
        restore(ns, binary, full)
        for table, builtin, _, args in BASE_JUMPS:
            p = run(ns, [binary, "-w", "-t", table, "-I", builtin, *args])
            assert p.returncode == 0, f"{builtin} jump: {p.stderr}"
            assert run(ns, [binary, "-w", "-t", table, "-C", builtin, *args]).returncode == 0
        check_kernel(ns, binary, full)
        nat = {c for t, c in full.state.chains if t == "nat"}
        assert {c[:9] for c in nat} >= {"KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-SVL-"}
        assert any(c.startswith("KUBE-FW-") for c in nat)

        # Partial sync: one Service loses an endpoint, one is deleted, one is new.
        cip, gone = ("ns1", "cip"), ("ns1", "np")
        endpoints[cip] = ServiceEndpoints(
            (), MappingProxyType({("http", "TCP"): (ep("198.18.1.10"), ep("fd00:18::10"))})
        )
        del services[gone]
        new = Service(
            "ns2",
            "new",
            cluster_ips=("198.19.0.20", "fd00:19::20"),
            ports=(PortSpec("http", "TCP", 80),),
        )
        services[new.key] = new
        endpoints[new.key] = ServiceEndpoints(
            (), MappingProxyType({("http", "TCP"): (ep("198.18.1.20"), ep("fd00:18::20"))})
        )
        changed = frozenset({cip, gone, new.key})
        partial = render(make_model(services, endpoints), cfg, changed=changed, previous=full.state)
        assert not partial.full and "-X KUBE-" in partial.text
        restore(ns, binary, partial)
        check_kernel(ns, binary, partial)
        assert not (set(full.state.service_chains[gone]) & partial.state.chains)

        # And a full render on top leaves exactly the same kernel state.
        again = render(make_model(services, endpoints), cfg, previous=partial.state)
        restore(ns, binary, again)
        check_kernel(ns, binary, again)
