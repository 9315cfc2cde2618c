"""Which sockets the userspace proxy listens on: a pure function of the model, a pure
diff against what is open, and the one I/O step that opens a listening socket.

A listener is (ip, port, protocol). Each one forwards to a `Target`: one Service port
seen from one traffic scope (ClusterIP traffic obeys internalTrafficPolicy; NodePort,
externalIP and LoadBalancer traffic obey externalTrafficPolicy) and one address family.
All listeners of one Target share a balancer (so affinity and health are shared).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.handover import reuseport, steer_to_oldest
from proxy.model import Service, ServiceKey, ip_family

ListenerKey = tuple[str, int, str]  # (ip, port, protocol)
SUPPORTED = ("TCP", "UDP")


@dataclass(frozen=True, slots=True)
class Target:
    service: ServiceKey
    port_name: str
    protocol: str
    external: bool  # reached as NodePort/externalIP/LB: externalTrafficPolicy applies
    family: int  # endpoints of this IP family only (4/6); 0: any (laptop mode)
    # loadBalancerSourceRanges, on LoadBalancer ingress IP listeners only
    source_ranges: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """kube-proxy's ServicePortName string: ns/name or ns/name:port."""
        ns, name = self.service
        return f"{ns}/{name}:{self.port_name}" if self.port_name else f"{ns}/{name}"


def fmt_key(key: ListenerKey) -> str:
    ip, port, proto = key
    return f"[{ip}]:{port}/{proto}" if ":" in ip else f"{ip}:{port}/{proto}"


def proxied(svc: Service) -> bool:
    """Services this data plane serves (others: DNS only, or another proxy's)."""
    return (
        svc.type != "ExternalName"
        and not svc.headless
        and not svc.proxy_name
        and bool(svc.cluster_ips or svc.external_ips or svc.load_balancer_ips)
    )


def service_listeners(
    svc: Service, node_ips: tuple[str, ...], *, any_family: bool = False
) -> tuple[dict[ListenerKey, Target], tuple[str, ...]]:
    """The listeners one Service wants, and problems to log (pure)."""
    out: dict[ListenerKey, Target] = {}
    problems: list[str] = []
    if not proxied(svc):
        return out, ()
    node_port_type = svc.type in ("NodePort", "LoadBalancer")
    families = {ip_family(ip) for ip in svc.cluster_ips} or {4, 6}
    for p in svc.ports:
        if p.protocol not in SUPPORTED:
            problems.append(f"port {p.port}/{p.protocol}: not supported in userspace mode")
            continue

        def want(ip: str, port: int, external: bool, ranges: tuple = (), p=p) -> None:
            fam = 0 if any_family else ip_family(ip)
            t = Target(svc.key, p.name, p.protocol, external, fam, ranges)
            out.setdefault((ip, port, p.protocol), t)

        for ip in svc.cluster_ips:
            want(ip, p.port, False)
        for ip in svc.external_ips:
            want(ip, p.port, True)
        for ip in svc.load_balancer_ips:
            want(ip, p.port, True, svc.load_balancer_source_ranges)
        if node_port_type and p.node_port:
            for ip in node_ips:
                # A single-stack Service has no endpoints of the other family to offer.
                if any_family or ip_family(ip) in families:
                    want(ip, p.node_port, True)
    return out, tuple(problems)


@dataclass(slots=True)
class Plan:
    """The whole desired listener set, computed incrementally: per-Service results are
    memoized on the (immutable, shared between snapshots) Service record."""

    node_ips: tuple[str, ...] = ()
    any_family: bool = False
    _memo: dict[ServiceKey, tuple[Service, dict[ListenerKey, Target], tuple[str, ...]]] = field(
        default_factory=dict
    )

    def desired(
        self, services: Mapping[ServiceKey, Service], node_ips: tuple[str, ...]
    ) -> tuple[dict[ListenerKey, Target], list[tuple[ServiceKey, str]]]:
        """All listeners (first Service by key wins a conflict) and problems per Service."""
        if node_ips != self.node_ips:
            self.node_ips = node_ips
            self._memo.clear()
        memo = self._memo
        for key in [k for k in memo if k not in services]:
            del memo[key]
        out: dict[ListenerKey, Target] = {}
        problems: list[tuple[ServiceKey, str]] = []
        for key in sorted(services):
            svc = services[key]
            hit = memo.get(key)
            if hit is None or hit[0] is not svc:
                lst, probs = service_listeners(svc, node_ips, any_family=self.any_family)
                hit = memo[key] = (svc, lst, probs)
            problems.extend((key, p) for p in hit[2])
            for lk, t in hit[1].items():
                owner = out.get(lk)
                if owner is None:
                    out[lk] = t
                elif owner.service != key:
                    problems.append(
                        (key, f"{fmt_key(lk)} is already served for {'/'.join(owner.service)}")
                    )
        return out, problems


@dataclass(frozen=True, slots=True)
class Diff:
    add: dict[ListenerKey, Target]
    remove: tuple[ListenerKey, ...]
    retarget: dict[ListenerKey, Target]

    def __bool__(self) -> bool:
        return bool(self.add or self.remove or self.retarget)


def diff_listeners(
    current: Mapping[ListenerKey, Target], desired: Mapping[ListenerKey, Target]
) -> Diff:
    """What to open, close, and point elsewhere to go from `current` to `desired` (pure).
    A listener whose key stays but whose Target changed is kept open and retargeted."""
    add = {k: t for k, t in desired.items() if k not in current}
    remove = tuple(k for k in current if k not in desired)
    retarget = {k: t for k, t in desired.items() if k in current and current[k] != t}
    return Diff(add, remove, retarget)


# -- I/O -------------------------------------------------------------------------------------

_REASONS = {
    errno.EADDRINUSE: "port already in use",
    errno.EADDRNOTAVAIL: "address is not local",
    errno.EACCES: "permission denied (ports below the unprivileged start need root)",
}


def listen_error(e: OSError) -> str:
    return _REASONS.get(e.errno or 0, e.strerror or str(e))


def open_listener(
    key: ListenerKey, *, freebind: bool = False, backlog: int = 4096
) -> socket.socket:
    """A non-blocking socket bound (and for TCP, listening) on `key`; raises OSError."""
    ip, port, proto = key
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    typ = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
    sock = socket.socket(fam, typ | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if proto == "TCP":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reuseport(sock)  # shared with a successor on upgrades (proxy/handover.py)
        if fam == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if freebind:
            sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: address is a local route
        sock.bind((ip, port))
        if proto == "TCP":
            sock.listen(backlog)
        steer_to_oldest(sock)
    except BaseException:
        sock.close()
        raise
    return sock
