"""Which endpoints get a Service port's traffic on this node: kube-proxy's
CategorizeEndpoints (pkg/proxy/topology.go), once, for every data plane.

Pure. Three rules, applied in this order:

- **Traffic policy.** A Local policy (internalTrafficPolicy for ClusterIP traffic,
  externalTrafficPolicy for NodePort/externalIP/LB traffic) uses only endpoints on this
  node; Cluster uses endpoints anywhere.
- **Topology** (Cluster policy only). The EndpointSlice controller writes hints for
  Services with `trafficDistribution: PreferSameZone` (or its old spelling `PreferClose`),
  `PreferSameNode`, or the `service.kubernetes.io/topology-mode: Auto` annotation (older:
  `topology-aware-hints`). Like kube-proxy 1.33+, the proxy follows the hints themselves:
  when every ready endpoint has a node hint and one is hinted for this node, only those
  get traffic (PreferSameNode); else when every ready endpoint has a zone hint and one is
  hinted for this node's zone, only those (PreferSameZone); else all. So hints that are
  missing (an endpoint without one), inconsistent (none for this node or zone) or about a
  zone this node is not in fall back to the next rule, never to an empty set.
- **Terminating fallback** (KEP-1669). Ready endpoints are used; when none is ready
  (anywhere for Cluster, on this node for Local), endpoints that are serving and
  terminating are used instead, ignoring topology, so a rolling update does not
  black-hole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.model import Endpoint, PortSpec, Service

PREFER_SAME_ZONE = "PreferSameZone"
PREFER_SAME_NODE = "PreferSameNode"


def topology_mode(endpoints: Sequence[Endpoint], node_name: str, zone: str) -> str:
    """kube-proxy's topologyModeFromHints: "PreferSameNode", "PreferSameZone" or ""."""
    has_ready = False
    all_node_hints = all_zone_hints = True
    for_node = for_zone = False
    for e in endpoints:
        if not e.ready:
            continue
        has_ready = True
        if not e.node_hints:
            all_node_hints = False
        elif node_name in e.node_hints:
            for_node = True
        if not e.zone_hints:
            all_zone_hints = False
        elif zone in e.zone_hints:
            for_zone = True
    if not has_ready:
        return ""
    if all_node_hints and for_node:
        return PREFER_SAME_NODE
    if all_zone_hints and for_zone:
        return PREFER_SAME_ZONE
    return ""


def _available(e: Endpoint, mode: str, node_name: str, zone: str) -> bool:
    if mode == PREFER_SAME_NODE:
        return node_name in e.node_hints
    if mode == PREFER_SAME_ZONE:
        return zone in e.zone_hints
    return True


def usable_endpoints(
    endpoints: Sequence[Endpoint],
    node_name: str,
    *,
    local_only: bool,
    zone: str = "",
) -> tuple[Endpoint, ...]:
    """The endpoints one traffic policy sends to (order kept).

    `local_only` (a Local policy): ready endpoints on this node, else serving and
    terminating ones on this node. Otherwise (Cluster): ready endpoints the topology hints
    allow for this node and zone, else serving and terminating ones anywhere.
    `svc` is not consulted (the hints carry the Service's choice); it names the call.
    """
    if local_only:
        local = [e for e in endpoints if e.node_name == node_name]
        ready = tuple(e for e in local if e.ready)
        return ready or tuple(e for e in local if e.serving and e.terminating)
    mode = topology_mode(endpoints, node_name, zone)
    if mode:
        ready = tuple(e for e in endpoints if e.ready and _available(e, mode, node_name, zone))
    else:
        ready = tuple(e for e in endpoints if e.ready)
    return ready or tuple(e for e in endpoints if e.serving and e.terminating)


def externally_accessible(svc: Service, port: PortSpec) -> bool:
    """kube-proxy's ExternallyAccessible: a NodePort, an externalIP or a LB IP."""
    return bool(port.node_port or svc.external_ips or svc.load_balancer_ips)


@dataclass(frozen=True, slots=True)
class Categorized:
    """kube-proxy's CategorizeEndpoints result for one Service port.

    `cluster` / `local` are None when the port never uses that policy; `reachable` is
    every endpoint this node may send to (their union); `has_any` is whether the Service
    has a usable endpoint anywhere (true even when `reachable` is empty)."""

    cluster: tuple[Endpoint, ...] | None
    local: tuple[Endpoint, ...] | None
    reachable: tuple[Endpoint, ...]
    has_any: bool


def categorize(
    endpoints: Sequence[Endpoint],
    node_name: str,
    zone: str,
    *,
    uses_cluster: bool,
    uses_local: bool,
) -> Categorized:
    """CategorizeEndpoints, given which policies the port uses (see `policies`)."""
    if not endpoints:
        return Categorized(
            () if uses_cluster else None, () if uses_local else None, (), has_any=False
        )
    cluster: tuple[Endpoint, ...] | None = None
    local: tuple[Endpoint, ...] | None = None
    if uses_cluster:
        cluster = usable_endpoints(endpoints, node_name, local_only=False, zone=zone)
    if not uses_local:
        assert cluster is not None
        return Categorized(cluster, None, cluster, has_any=bool(cluster))
    has_any = any(e.ready or (e.serving and e.terminating) for e in endpoints)
    local = usable_endpoints(endpoints, node_name, local_only=True)
    if cluster is None:
        return Categorized(None, local, local, has_any)
    # Local endpoints are ready ones (then in `cluster` unless topology left them out) or
    # the terminating fallback (then not in it): merge, keeping `cluster`'s order.
    seen = {(e.ip, e.port) for e in cluster}
    extra = tuple(e for e in local if (e.ip, e.port) not in seen)
    return Categorized(cluster, local, cluster + extra if extra else cluster, has_any)


def policies(svc: Service, port: PortSpec) -> tuple[bool, bool]:
    """(uses Cluster endpoints, uses Local endpoints): kube-proxy's UsesClusterEndpoints /
    UsesLocalEndpoints. Even an externalTrafficPolicy: Local port needs Cluster endpoints
    for traffic from pods and the node itself (the short circuit of external IPs)."""
    external = externally_accessible(svc, port)
    uses_cluster = not svc.internal_traffic_local or external
    uses_local = svc.internal_traffic_local or (svc.external_traffic_local and external)
    return uses_cluster, uses_local
