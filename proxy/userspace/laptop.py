"""Laptop mode: Services served on loopback addresses, no root, no address changes.

Every Service with a ClusterIP gets its own address in 127.0.0.0/8 (Linux routes the
whole /8 to `lo`, so any of them can be bound without adding it anywhere). The address
is a hash of namespace/name, so it is the same on every run and every laptop:

    127.X.Y.Z  with X in 1..254, Y in 0..255, Z in 1..254 (from sha256("ns/name"))

127.0.x.x is left alone (127.0.0.1, Debian's 127.0.1.1), and so are .0 and .255 host
parts. With 16.5 million addresses two Services collide with probability ~n²/33M (≈3%
at 1,000 Services); a collision is resolved by `laptop_addresses`: the Service whose
key sorts first keeps its address, the other takes the next hash (`ns/name#1`, …).

Ports below the unprivileged port start (1024 unless sysctl
net.ipv4.ip_unprivileged_port_start says otherwise, or the process has
CAP_NET_BIND_SERVICE) cannot be bound without root, so they are served at
`port + offset` (default 10000: 80 → 10080, 443 → 10443, 53 → 10053). The rewritten model
given to DNS carries the served ports too, so SRV answers are right.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType

from proxy.model import Model, Service, ServiceKey

DEFAULT_PORT_OFFSET = 10000
LAPTOP_NODE_IP = "127.0.0.1"  # NodePorts are served here on a laptop
_CAP_NET_BIND_SERVICE = 10


def _address_from(text: str) -> str:
    h = hashlib.sha256(text.encode()).digest()
    return f"127.{1 + h[0] % 254}.{h[1]}.{1 + h[2] % 254}"


def laptop_address(svc: Service) -> str:
    """The loopback address a Service is served on (first choice; pure)."""
    return _address_from(f"{svc.namespace}/{svc.name}")


def serves_on_laptop(svc: Service) -> bool:
    """Services that get a loopback address: those with a ClusterIP that we proxy."""
    return bool(svc.cluster_ips) and not svc.headless and not svc.proxy_name


def laptop_addresses(services: Mapping[ServiceKey, Service]) -> dict[ServiceKey, str]:
    """Collision-free Service → loopback address for a whole model (deterministic)."""
    wanted = {k: laptop_address(s) for k, s in services.items() if serves_on_laptop(s)}
    counts = Counter(wanted.values())
    out: dict[ServiceKey, str] = {k: a for k, a in wanted.items() if counts[a] == 1}
    used = set(out.values())
    for key in sorted(k for k, a in wanted.items() if counts[a] > 1):
        addr, attempt = wanted[key], 0
        while addr in used:
            attempt += 1
            addr = _address_from(f"{key[0]}/{key[1]}#{attempt}")
        used.add(addr)
        out[key] = addr
    return out


def unprivileged_port_start() -> int:
    """Lowest port this process may bind: 0 with root or CAP_NET_BIND_SERVICE."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return 0
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    if int(line.split()[1], 16) >> _CAP_NET_BIND_SERVICE & 1:
                        return 0
                    break
    except OSError:
        pass
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1024


def served_port(port: int, port_start: int, offset: int = DEFAULT_PORT_OFFSET) -> int:
    """The port actually listened on for a Service port (pure)."""
    if port < port_start and port + offset <= 65535:
        return port + offset
    return port


class LaptopRewriter:
    """`rewrite(model)`: the model as served on this laptop, memoized per Service record
    so a sync of 1k unchanged Services costs a few dict lookups."""

    def __init__(self, port_start: int | None = None, offset: int = DEFAULT_PORT_OFFSET):
        self.port_start = unprivileged_port_start() if port_start is None else port_start
        self.offset = offset
        self._memo: dict[ServiceKey, tuple[Service, str, Service]] = {}
        self._last: tuple[Model, Model] | None = None  # DNS and the data plane share a model

    def rewrite_service(self, svc: Service, addr: str) -> Service:
        hit = self._memo.get(svc.key)
        if hit is not None and hit[0] is svc and hit[1] == addr:
            return hit[2]
        ports = tuple(
            dataclasses.replace(
                p,
                port=served_port(p.port, self.port_start, self.offset),
                node_port=served_port(p.node_port, self.port_start, self.offset)
                if p.node_port
                else 0,
            )
            for p in svc.ports
        )
        new = dataclasses.replace(
            svc,
            cluster_ips=(addr,),
            ports=ports,
            external_ips=(),  # a laptop cannot own them
            load_balancer_ips=(),
            # Local policies mean "this node's endpoints"; a laptop is not a node.
            external_traffic_local=False,
            internal_traffic_local=False,
        )
        self._memo[svc.key] = (svc, addr, new)
        return new

    def rewrite(self, model: Model) -> Model:
        if self._last is not None and self._last[0] is model:
            return self._last[1]
        addrs = laptop_addresses(model.services)
        services: dict[ServiceKey, Service] = {}
        for key, svc in model.services.items():
            addr = addrs.get(key)
            services[key] = svc if addr is None else self.rewrite_service(svc, addr)
        for key in [k for k in self._memo if k not in model.services]:
            del self._memo[key]
        out = dataclasses.replace(model, services=MappingProxyType(services))
        self._last = (model, out)
        return out


_default_rewriter: LaptopRewriter | None = None


def rewrite_model_for_laptop(model: Model) -> Model:
    """The model whose cluster_ips (and ports) are the loopback addresses actually
    served in laptop mode; the daemon gives it to DNS. ExternalName and headless
    Services are unchanged; external/LB IPs are dropped (not served on a laptop)."""
    global _default_rewriter
    if _default_rewriter is None:
        _default_rewriter = LaptopRewriter()
    return _default_rewriter.rewrite(model)
