"""API objects (raw JSON/YAML dicts, camelCase as on the wire) → model records.

Pure and defensive: any field may be missing or of the wrong type. A problem that makes
the whole object unusable raises `BadObject`; a problem with one part (a port, an
endpoint) drops that part and is reported in the returned `problems` list, so the rest
of the object is still programmed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from proxy.model import (
    PROTOCOLS,
    SERVICE_TYPES,
    Endpoint,
    EndpointAddress,
    NodeInfo,
    PortKey,
    PortSpec,
    Service,
    ServiceEndpoints,
    ServiceKey,
    ip_family,
    ip_sort_key,
    normalize_ip_sloppy,
)

PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"

# RFC 1123 label / DNS-1035 label: what Kubernetes allows for names and namespaces.
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# DNS-1123 subdomain: what Pod names may be.
_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class BadObject(ValueError):
    """The object cannot be programmed at all; the message says why."""


def object_ref(obj: Any) -> str:
    """namespace/name of a raw object, for log lines, even when the object is malformed."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return "<no metadata>"
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _meta(obj: Any) -> tuple[str, str, dict, dict]:
    if not isinstance(obj, dict):
        raise BadObject("not an object")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise BadObject("no metadata")
    ns, name = meta.get("namespace") or "default", meta.get("name")
    if not isinstance(name, str) or not isinstance(ns, str):
        raise BadObject("metadata.name/namespace missing")
    if len(ns) > 63 or not _NAME_RE.match(ns):
        raise BadObject(f"invalid namespace {ns[:80]!r}")
    ns = sys.intern(ns)  # a few namespaces over every record: one copy each
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if not isinstance(labels, dict):
        labels = {}
    if not isinstance(annotations, dict):
        annotations = {}
    return ns, name, labels, annotations


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


def _ip(v: Any, what: str, warnings: list[str]) -> str:
    """An IP in canonical form; leading zeros are read as decimal, with a warning."""
    if not isinstance(v, str):
        raise ValueError(f"{what} is not a string")
    try:
        ip, sloppy = normalize_ip_sloppy(v)
    except ValueError:
        raise ValueError(f"{what} {v[:60]!r} is not an IP address") from None
    if sloppy:
        warnings.append(
            f"{what} {v.strip()!r} has leading zeros; read as decimal {ip}, as kube-proxy does"
        )
    return ip


def _cidr(v: Any, what: str, warnings: list[str]) -> str:
    """A CIDR in canonical form (host bits cleared), leading zeros read as decimal."""
    text = str(v).strip()
    addr, slash, bits = text.partition("/")
    try:
        addr = _ip(addr, what, warnings)
        return str(ipaddress.ip_network(f"{addr}{slash}{bits}", strict=False))
    except ValueError:
        raise ValueError(f"{what} {text[:60]!r} is not a CIDR") from None


def _port_number(v: Any, what: str, *, allow_zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what} {v!r} is not an integer")
    if not (0 if allow_zero else 1) <= v <= 65535:
        raise ValueError(f"{what} {v} out of range")
    return v


def _protocol(v: Any) -> str:
    p = "TCP" if v is None else v
    for known in PROTOCOLS:  # the constant, not the decoded copy (one per record)
        if p == known:
            return known
    raise ValueError(f"unknown protocol {str(p)[:20]!r}")


@dataclass(frozen=True, slots=True)
class ParsedService:
    service: Service
    problems: tuple[str, ...] = ()  # parts skipped
    warnings: tuple[str, ...] = ()  # programmed, but worth a log line (e.g. leading zeros)


def parse_service(obj: Any) -> ParsedService:
    """A Service object → Service record (raises BadObject when unusable)."""
    ns, name, labels, _ = _meta(obj)
    if len(name) > 63 or not _NAME_RE.match(name):
        raise BadObject(f"invalid Service name {name[:80]!r}")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise BadObject("no spec")
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    problems: list[str] = []
    warnings: list[str] = []

    svc_type = spec.get("type") or "ClusterIP"
    if svc_type not in SERVICE_TYPES:
        raise BadObject(f"unknown Service type {str(svc_type)[:30]!r}")

    external_name = ""
    if svc_type == "ExternalName":
        external_name = spec.get("externalName")
        if not isinstance(external_name, str) or not external_name:
            raise BadObject("ExternalName Service without spec.externalName")
        external_name = external_name.rstrip(".").lower()

    # clusterIPs (dual stack) supersedes clusterIP; "None" means headless.
    raw_ips = _list(spec.get("clusterIPs")) or (
        [spec["clusterIP"]] if isinstance(spec.get("clusterIP"), str) else []
    )
    headless = any(ip == "None" for ip in raw_ips)
    cluster_ips: list[str] = []
    if svc_type != "ExternalName" and not headless:
        for raw in raw_ips:
            if raw == "":
                continue
            try:
                cluster_ips.append(_ip(raw, "clusterIP", warnings))
            except ValueError as e:
                raise BadObject(str(e)) from None
        if len({ip_family(i) for i in cluster_ips}) != len(cluster_ips):
            raise BadObject("clusterIPs has two addresses of one family")

    ports: list[PortSpec] = []
    seen: set[tuple[int, str]] = set()
    seen_names: set[str] = set()
    for i, p in enumerate(_list(spec.get("ports"))):
        try:
            if not isinstance(p, dict):
                raise ValueError("not an object")
            pname = p.get("name") or ""
            if not isinstance(pname, str) or (pname and not _NAME_RE.match(pname)):
                raise ValueError(f"invalid port name {str(pname)[:40]!r}")
            proto = _protocol(p.get("protocol"))
            port = _port_number(p.get("port"), "port")
            node_port = _port_number(p.get("nodePort", 0) or 0, "nodePort", allow_zero=True)
            target = p.get("targetPort", port)
            if not isinstance(target, int | str) or isinstance(target, bool):
                target = port
            if (port, proto) in seen:
                raise ValueError(f"duplicate port {port}/{proto}")
            if pname in seen_names:
                raise ValueError(f"duplicate port name {pname!r}")
            seen.add((port, proto))
            seen_names.add(pname)
            ports.append(PortSpec(sys.intern(pname), proto, port, node_port, target))
        except ValueError as e:
            problems.append(f"spec.ports[{i}] skipped: {e}")

    def ip_list(values: Any, what: str) -> tuple[str, ...]:
        out: list[str] = []
        for v in _list(values):
            try:
                out.append(_ip(v, what, warnings))
            except ValueError as e:
                problems.append(f"{e}, skipped")
        return tuple(dict.fromkeys(out))

    external_ips = ip_list(spec.get("externalIPs"), "externalIP")
    lb_ips: tuple[str, ...] = ()
    if svc_type == "LoadBalancer":
        lb = status.get("loadBalancer") if isinstance(status.get("loadBalancer"), dict) else {}
        # An ingress with ipMode Proxy is a load balancer that proxies to the nodes: its IP
        # is not short-circuited on the node (kube-proxy drops it from the Service), so
        # traffic to it from the node and pods goes out to the load balancer.
        ingress = [
            i.get("ip")
            for i in _list(lb.get("ingress"))
            if isinstance(i, dict) and i.get("ip") and i.get("ipMode") != "Proxy"
        ]
        lb_ips = ip_list(ingress, "loadBalancer ingress IP")
    ranges: list[str] = []
    for r in _list(spec.get("loadBalancerSourceRanges")):
        try:
            ranges.append(_cidr(r, "loadBalancerSourceRange", warnings))
        except ValueError as e:
            problems.append(f"{e}, skipped")

    affinity_timeout = 0
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = spec.get("sessionAffinityConfig")
        timeout = 10800
        if isinstance(cfg, dict) and isinstance(cfg.get("clientIP"), dict):
            t = cfg["clientIP"].get("timeoutSeconds", 10800)
            if isinstance(t, int) and not isinstance(t, bool) and 0 < t <= 86400:
                timeout = t
            else:
                problems.append(f"sessionAffinity timeoutSeconds {t!r} invalid, using 10800")
        affinity_timeout = timeout

    hc_port = 0
    etp_local = spec.get("externalTrafficPolicy") == "Local" and svc_type in (
        "NodePort",
        "LoadBalancer",
    )
    if etp_local and svc_type == "LoadBalancer":
        try:
            hc_port = _port_number(
                spec.get("healthCheckNodePort", 0) or 0, "healthCheckNodePort", allow_zero=True
            )
        except ValueError as e:
            problems.append(str(e))

    svc = Service(
        namespace=ns,
        name=name,
        type=svc_type,
        cluster_ips=tuple(cluster_ips),
        headless=headless,
        ports=tuple(ports),
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        load_balancer_source_ranges=tuple(ranges),
        session_affinity_timeout=affinity_timeout,
        external_traffic_local=etp_local,
        internal_traffic_local=spec.get("internalTrafficPolicy") == "Local",
        health_check_node_port=hc_port,
        external_name=external_name,
        publish_not_ready_addresses=bool(spec.get("publishNotReadyAddresses")),
        proxy_name=str(labels.get(PROXY_NAME_LABEL) or ""),
    )
    return ParsedService(svc, tuple(problems), tuple(warnings))


# A slice's endpoint is the same record as a merged address: merging then shares the
# objects instead of copying them (100k endpoints: ~12 MB less).
SliceEndpoint = EndpointAddress


@dataclass(frozen=True, slots=True)
class Slice:
    """One EndpointSlice, validated; merged per Service by `merge_slices`."""

    namespace: str
    name: str
    service: ServiceKey
    ports: tuple[tuple[str, str, int], ...]  # (name, protocol, port)
    endpoints: tuple[SliceEndpoint, ...]
    trigger_time: float  # epoch seconds, 0 when absent
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


# A handful of distinct hint sets repeated over every endpoint: one tuple each.
_HINTS: dict[tuple[str, ...], tuple[str, ...]] = {}


def _names(v: Any) -> tuple[str, ...]:
    """hints.forZones / forNodes ([{name: …}]) → sorted names, shared between endpoints."""
    names = sorted(
        {n["name"] for n in _list(v) if isinstance(n, dict) and isinstance(n.get("name"), str)}
    )
    if not names:
        return ()
    key = tuple(names)
    if len(_HINTS) > 4096:  # bounded: hint sets are few unless someone writes garbage
        _HINTS.clear()
    return _HINTS.setdefault(key, tuple(sys.intern(n) for n in key))


def _hints(v: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(zone hints, node hints) of an endpoint's `hints` (empty when absent or malformed)."""
    if not isinstance(v, dict):
        return (), ()
    return _names(v.get("forZones")), _names(v.get("forNodes"))


ZONE_LABEL = "topology.kubernetes.io/zone"


def parse_node(obj: Any) -> NodeInfo:
    """This node's Node object → NodeInfo: its zone label and its node IPs as kube-proxy
    picks them (GetNodeHostIPs: InternalIPs before ExternalIPs, the first of each family;
    addresses that are not IPs are left out)."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    zone = labels.get(ZONE_LABEL) if isinstance(labels, dict) else None
    status = obj.get("status") if isinstance(obj, dict) else None
    addrs = _list(status.get("addresses") if isinstance(status, dict) else None)
    by_family: dict[int, str] = {}
    for kind in ("InternalIP", "ExternalIP"):
        for a in addrs:
            if isinstance(a, dict) and a.get("type") == kind:
                with contextlib.suppress(ValueError):
                    ip, _ = normalize_ip_sloppy(str(a.get("address", "")))
                    by_family.setdefault(ip_family(ip), ip)
    first = next(iter(by_family.values()), None)
    ips = sorted(by_family.values(), key=lambda ip: ip != first)  # the first one leads
    return NodeInfo(zone=zone if isinstance(zone, str) else "", addresses=tuple(ips))


def _parse_time(v: Any) -> float:
    if not isinstance(v, str) or not v:
        return 0.0
    try:
        return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def parse_slice(obj: Any) -> Slice:
    """An EndpointSlice (discovery.k8s.io/v1) → Slice (raises BadObject when unusable)."""
    ns, name, labels, annotations = _meta(obj)
    svc_name = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(svc_name, str) or not svc_name:
        raise BadObject(f"no {SERVICE_NAME_LABEL} label")
    addr_type = obj.get("addressType", "IPv4")
    if addr_type not in ("IPv4", "IPv6"):  # FQDN slices are not proxied (as in kube-proxy)
        raise BadObject(f"addressType {str(addr_type)[:20]!r} is not proxied")
    want_version = 4 if addr_type == "IPv4" else 6
    problems: list[str] = []
    warnings: list[str] = []

    ports: list[tuple[str, str, int]] = []
    for i, p in enumerate(_list(obj.get("ports"))):
        try:
            if not isinstance(p, dict):
                raise ValueError("not an object")
            pname = p.get("name") or ""
            if not isinstance(pname, str):
                raise ValueError("port name is not a string")
            proto = _protocol(p.get("protocol"))
            ports.append((sys.intern(pname), proto, _port_number(p.get("port"), "port")))
        except ValueError as e:
            problems.append(f"ports[{i}] skipped: {e}")

    eps: list[SliceEndpoint] = []
    for i, ep in enumerate(_list(obj.get("endpoints"))):
        if not isinstance(ep, dict):
            problems.append(f"endpoints[{i}] skipped: not an object")
            continue
        addrs = _list(ep.get("addresses"))
        if not addrs:
            problems.append(f"endpoints[{i}] skipped: no addresses")
            continue
        try:
            # kube-proxy uses the first address only
            ip = _ip(addrs[0], f"endpoints[{i}] address", warnings)
        except ValueError as e:
            problems.append(f"endpoints[{i}] skipped: {e}")
            continue
        if ip_family(ip) != want_version:
            problems.append(f"endpoints[{i}] skipped: {ip} is not {addr_type}")
            continue
        cond = ep.get("conditions") if isinstance(ep.get("conditions"), dict) else {}
        # API semantics: nil ready means ready; nil serving means "same as ready".
        ready = cond.get("ready") is not False
        serving = cond.get("serving")
        serving = ready if serving is None else bool(serving)
        terminating = bool(cond.get("terminating"))
        hostname = ep.get("hostname") if isinstance(ep.get("hostname"), str) else ""
        node = ep.get("nodeName")
        zone = ep.get("zone")
        zone_hints, node_hints = _hints(ep.get("hints"))
        pod, why = _pod_ref(ep.get("targetRef"), ns)
        if why:
            problems.append(f"endpoints[{i}].targetRef ignored: {why}")
        eps.append(
            SliceEndpoint(
                ip=ip,
                ready=ready,
                serving=serving,
                terminating=terminating,
                # A few distinct values repeated 100k times: one copy each.
                node_name=sys.intern(node) if isinstance(node, str) else "",
                zone=sys.intern(zone) if isinstance(zone, str) else "",
                hostname=hostname.lower(),
                pod=pod,
                zone_hints=zone_hints,
                node_hints=node_hints,
            )
        )
    return Slice(
        namespace=ns,
        name=name,
        service=(ns, svc_name),
        ports=tuple(ports),
        endpoints=tuple(eps),
        trigger_time=_parse_time(annotations.get(TRIGGER_TIME_ANNOTATION)),
        problems=tuple(problems),
        warnings=tuple(warnings),
    )


def _pod_ref(ref: Any, slice_ns: str) -> tuple[str, str]:
    """targetRef → ("namespace/name" of a Pod, "") or ("", why it is unusable); no ref or
    a ref to another kind is ("", "")."""
    if not isinstance(ref, dict) or ref.get("kind", "Pod") != "Pod":
        return "", ""
    name, ns = ref.get("name"), ref.get("namespace") or slice_ns
    if not isinstance(name, str) or not isinstance(ns, str):
        return "", "name/namespace is not a string"
    if len(name) > 253 or not _SUBDOMAIN_RE.match(name) or not _NAME_RE.match(ns):
        return "", f"invalid Pod reference {ns[:63]!r}/{name[:80]!r}"
    return f"{ns}/{name}", ""


def _better(a: SliceEndpoint, b: SliceEndpoint) -> SliceEndpoint:
    """Of two copies of one endpoint (in two slices), keep the more useful one."""
    rank = lambda e: (e.ready, e.serving, not e.terminating)  # noqa: E731
    return b if rank(b) > rank(a) else a


def merge_slices(slices: list[Slice] | tuple[Slice, ...]) -> ServiceEndpoints:
    """All slices of one Service → ServiceEndpoints, de-duplicated (pure).

    Slices are visited in name order so the result does not depend on arrival order.
    """
    by_ip: dict[str, SliceEndpoint] = {}
    by_port: dict[PortKey, dict[tuple[str, int], SliceEndpoint]] = {}
    for s in sorted(slices, key=lambda s: s.name):
        for e in s.endpoints:
            by_ip[e.ip] = _better(by_ip[e.ip], e) if e.ip in by_ip else e
        for pname, proto, port in s.ports:
            bucket = by_port.setdefault((pname, proto), {})
            for e in s.endpoints:
                k = (e.ip, port)
                bucket[k] = _better(bucket[k], e) if k in bucket else e
    # Deterministic order (by address) so rules and answers do not churn on re-lists.
    addresses = tuple(sorted(by_ip.values(), key=lambda e: ip_sort_key(e.ip)))
    ports: dict[PortKey, tuple[Endpoint, ...]] = {}
    for pk, bucket in by_port.items():
        ports[pk] = tuple(
            Endpoint(
                ip,
                port,
                e.ready,
                e.serving,
                e.terminating,
                e.node_name,
                e.zone,
                e.pod,
                e.zone_hints,
                e.node_hints,
            )
            for (ip, port), e in sorted(
                bucket.items(), key=lambda kv: (ip_sort_key(kv[0][0]), kv[0][1])
            )
        )
    return ServiceEndpoints(addresses, MappingProxyType(ports))
