"""The model: plain immutable records built from Service and EndpointSlice objects.

Every data plane (iptables, userspace, DNS) reads only these records, never API objects.
A `Model` is a snapshot: its mappings are never mutated after construction, and records
for Services that did not change are shared between consecutive snapshots, so a snapshot
of 10k Services costs a dict copy, not a rebuild.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

ServiceKey = tuple[str, str]
"""(namespace, name) of a Service."""

PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")


def ip_family(ip: str) -> int:
    """4 or 6 for an IP literal (already validated by the parser)."""
    return 6 if ":" in ip else 4


def normalize_ip(ip: str) -> str:
    """Canonical text form of an IP (raises ValueError when it is not one).

    inet_pton/inet_ntop are ~20x faster than ipaddress, which matters at 100k endpoints.
    """
    ip = ip.strip()
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        return socket.inet_ntop(fam, socket.inet_pton(fam, ip))
    except (OSError, ValueError):
        raise ValueError(f"{ip!r} is not an IP address") from None


def normalize_ip_sloppy(ip: str) -> tuple[str, bool]:
    """Like normalize_ip, but also accepts IPv4 octets with leading zeros ("10.0.0.010"),
    read as decimal like Go's ParseIPSloppy, which kube-proxy uses: old clusters still
    hold such addresses from before the API server refused them. Returns (canonical
    form, whether leading zeros were read)."""
    try:
        return normalize_ip(ip), False
    except ValueError:
        parts = ip.strip().split(".")
        if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts):
            raise
        octets = [int(p) for p in parts]
        if any(o > 255 for o in octets):
            raise
        return ".".join(map(str, octets)), True


def ip_sort_key(ip: str) -> bytes:
    """Orders IPv4 before IPv6, numerically within a family (ip must be canonical)."""
    if ":" in ip:
        return b"\x06" + socket.inet_pton(socket.AF_INET6, ip)
    return b"\x04" + socket.inet_pton(socket.AF_INET, ip)


@dataclass(frozen=True, slots=True)
class PortSpec:
    """One entry of a Service's spec.ports."""

    name: str  # "" when the Service has a single unnamed port
    protocol: str  # TCP | UDP | SCTP
    port: int
    node_port: int = 0  # 0: none allocated
    target_port: int | str = 0  # informational; endpoints carry the real port


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    type: str = "ClusterIP"  # one of SERVICE_TYPES
    cluster_ips: tuple[str, ...] = ()  # empty when headless or ExternalName
    headless: bool = False  # clusterIP: None
    ports: tuple[PortSpec, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip
    load_balancer_source_ranges: tuple[str, ...] = ()  # CIDRs, normalized
    session_affinity_timeout: int = 0  # seconds; 0 means sessionAffinity None
    external_traffic_local: bool = False  # externalTrafficPolicy: Local
    internal_traffic_local: bool = False  # internalTrafficPolicy: Local
    health_check_node_port: int = 0
    external_name: str = ""  # for type ExternalName
    publish_not_ready_addresses: bool = False
    # service.kubernetes.io/service-proxy-name: another proxy programs it; data planes skip
    # it, DNS still answers for it.
    proxy_name: str = ""

    @property
    def key(self) -> ServiceKey:
        return (self.namespace, self.name)

    def port_name_string(self, port: PortSpec) -> str:
        """kube-proxy's ServicePortName.String(): ns/name or ns/name:port."""
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{port.name}" if port.name else base


@dataclass(frozen=True, slots=True)
class EndpointAddress:
    """One backend (pod) of a Service, merged over all of its EndpointSlices."""

    ip: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    hostname: str = ""  # endpoints[].hostname, for DNS
    pod: str = ""  # endpoints[].targetRef "namespace/name" when it is a Pod (port-forward)
    # hints.forZones / hints.forNodes names (sorted, shared between equal endpoints)
    zone_hints: tuple[str, ...] = ()
    node_hints: tuple[str, ...] = ()

    @property
    def family(self) -> int:
        return ip_family(self.ip)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An address on one Service port: what traffic is actually sent to."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    pod: str = ""  # "namespace/name" of the Pod behind it (targetRef), for port-forward
    zone_hints: tuple[str, ...] = ()  # hints.forZones: the zones that should use it
    node_hints: tuple[str, ...] = ()  # hints.forNodes: the nodes that should use it

    @property
    def family(self) -> int:
        return ip_family(self.ip)

    def __str__(self) -> str:  # kube-proxy's endpoint string, used in chain hashes
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


PortKey = tuple[str, str]
"""(port name, protocol): how EndpointSlice ports are matched to Service ports."""


@dataclass(frozen=True, slots=True)
class ServiceEndpoints:
    """All endpoints of one Service, merged from its slices and de-duplicated."""

    addresses: tuple[EndpointAddress, ...] = ()
    ports: Mapping[PortKey, tuple[Endpoint, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def for_port(self, port: PortSpec) -> tuple[Endpoint, ...]:
        return self.ports.get((port.name, port.protocol), ())


EMPTY_ENDPOINTS = ServiceEndpoints()


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """This node as its own Node object describes it (all empty until it is known)."""

    zone: str = ""  # label topology.kubernetes.io/zone
    # Its node IPs, at most one per family, the primary first (kube-proxy's
    # GetNodeHostIPs over status.addresses): what `--nodeport-addresses primary` means.
    addresses: tuple[str, ...] = ()

    def ip(self, family: int) -> str:
        """The node IP of one family ("" when the Node has none)."""
        return next((ip for ip in self.addresses if ip_family(ip) == family), "")


UNKNOWN_NODE = NodeInfo()


@dataclass(frozen=True, slots=True)
class Model:
    """A consistent snapshot of every Service this node serves and its endpoints."""

    services: Mapping[ServiceKey, Service] = field(default_factory=lambda: MappingProxyType({}))
    endpoints: Mapping[ServiceKey, ServiceEndpoints] = field(
        default_factory=lambda: MappingProxyType({})
    )
    node: NodeInfo = UNKNOWN_NODE  # topology (zone) and `--nodeport-addresses primary`

    def endpoints_of(self, key: ServiceKey) -> ServiceEndpoints:
        return self.endpoints.get(key, EMPTY_ENDPOINTS)

    def endpoints_for(self, svc: Service, port: PortSpec) -> tuple[Endpoint, ...]:
        return self.endpoints.get(svc.key, EMPTY_ENDPOINTS).for_port(port)


def make_model(
    services: Mapping[ServiceKey, Service],
    endpoints: Mapping[ServiceKey, ServiceEndpoints],
    node: NodeInfo = UNKNOWN_NODE,
) -> Model:
    """Freeze two dicts into a Model (copies them; records are shared)."""
    return Model(MappingProxyType(dict(services)), MappingProxyType(dict(endpoints)), node)
