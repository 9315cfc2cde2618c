"""Model → `iptables-restore --noflush` input, the way kube-proxy's iptables proxier writes it.

Pure: no kernel, no subprocess, no clock. One call renders one IP family (the caller runs
it once for IPv4 and once for IPv6 and feeds the texts to iptables-restore and
ip6tables-restore). The rules, comments and chain names follow upstream
pkg/proxy/iptables/proxier.go (syncProxyRules / writeServiceToEndpointRules); only the
order of lines in the file differs: rules are grouped per chain and Services are visited
in (namespace, name) order, so consecutive renders diff cleanly. Rule order *within*
a chain, which is all the kernel sees, is upstream's.

Partial renders mirror kube-proxy's MinimizeIPTablesRestore: the top-level chains are
rewritten every time, per-Service chains only for Services in `changed` (plus any whose
records or chain set differ from what `previous` recorded, so a wrong `changed` cannot
leave a jump to a missing chain or stale endpoints).

Speed: each Service's share of the text (a `ServiceFragment`) is kept in the RenderState and
reused by the next render while the Service and its endpoints are the same records, so
renders after the first cost little more than joining strings.
"""

from __future__ import annotations

import gc
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from itertools import repeat
from operator import itemgetter
from types import MappingProxyType
from typing import Any, overload

from proxy.iptables.names import (
    endpoint_chain,
    external_chain,
    firewall_chain,
    is_service_chain,
    local_chain,
    service_chain,
)
from proxy.model import (
    Endpoint,
    Model,
    PortSpec,
    Service,
    ServiceEndpoints,
    ServiceKey,
    ip_family,
)
from proxy.selection import categorize

FILTER = "filter"
NAT = "nat"

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
# kubelet's chain; kube-proxy rewrites its one rule when localhost NodePorts are on,
# but never owns or deletes it.
KUBELET_FIREWALL = "KUBE-FIREWALL"

# Top-level chains, in the order kube-proxy declares them.
FILTER_CHAINS = (
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
)
NAT_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
TOP_CHAINS = frozenset((FILTER, c) for c in FILTER_CHAINS) | frozenset((NAT, c) for c in NAT_CHAINS)

_NEW = ("-m", "conntrack", "--ctstate", "NEW")
ChainNames = tuple[tuple[str, str], ...]
"""(table, chain) of one Service's own chains, in the order its plan makes them: a tuple,
not a set (10k Services: ~5 MB less in the state), so compared as made."""
_NONE: ChainNames = ()


def _jump(
    table: str, builtin: str, chain: str, comment: str, extra: tuple[str, ...] = ()
) -> tuple[str, str, str, tuple[str, ...]]:
    return (table, builtin, chain, (*extra, "-m", "comment", "--comment", comment, "-j", chain))


BASE_JUMPS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    # kube-proxy's iptablesJumpChains, in its order; it ensures each with `-C`/`-I`
    # (prepend), so the last one listed for a built-in chain ends up first in it.
    _jump(
        FILTER,
        "INPUT",
        KUBE_EXTERNAL_SERVICES,
        "kubernetes externally-visible service portals",
        _NEW,
    ),
    _jump(
        FILTER,
        "FORWARD",
        KUBE_EXTERNAL_SERVICES,
        "kubernetes externally-visible service portals",
        _NEW,
    ),
    _jump(FILTER, "INPUT", KUBE_NODEPORTS, "kubernetes health check service ports"),
    _jump(FILTER, "FORWARD", KUBE_SERVICES, "kubernetes service portals", _NEW),
    _jump(FILTER, "OUTPUT", KUBE_SERVICES, "kubernetes service portals", _NEW),
    _jump(FILTER, "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    _jump(FILTER, "INPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    _jump(FILTER, "OUTPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    _jump(FILTER, "FORWARD", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    _jump(NAT, "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    _jump(NAT, "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    _jump(NAT, "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
)

# kubelet's jumps to its KUBE-FIREWALL (kube-proxy's iptablesKubeletJumpChains): ensured
# on full syncs, never removed, so the "block incoming localnet connections" rule is live
# even on nodes whose kubelet does not write it.
KUBELET_JUMPS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (FILTER, "INPUT", KUBELET_FIREWALL, ()),
    (FILTER, "OUTPUT", KUBELET_FIREWALL, ()),
)

# nfacct counters kube-proxy's rules count packets in (kube-proxy's metrics package names).
CT_STATE_INVALID_COUNTER = "ct_state_invalid_dropped_pkts"
LOCALHOST_NODEPORTS_COUNTER = "localhost_nps_accepted_pkts"
NFACCT_COUNTERS = (CT_STATE_INVALID_COUNTER, LOCALHOST_NODEPORTS_COUNTER)

# Above about this many nat rules the render state keeps no chain text (memory over speed).
TEXT_CACHE_MAX_RULES = 100_000


@dataclass(frozen=True)
class RenderConfig:
    family: int  # 4 or 6
    node_name: str
    cluster_cidrs: tuple[str, ...]  # only this family's first one is used (kube-proxy's detector)
    masquerade_all: bool = False
    masquerade_mark: str = "0x4000"
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs; none of this family = all local addresses
    local_ips: tuple[str, ...] = ()  # node's own IPs, for nodeport_addresses matching
    # -- additions (all optional) --
    # The node's primary IP of this family: LB source ranges containing it also admit
    # traffic whose source is the LB IP (upstream's allowFromNode). "" = never.
    node_ip: str = ""
    random_fully: bool = True  # MASQUERADE --random-fully (iptables >= 1.6.2)
    # --iptables-localhost-nodeports: IPv4 NodePorts on 127.0.0.0/8. Needs the applier to
    # set net.ipv4.conf.all.route_localnet=1; then kubelet's KUBE-FIREWALL rule is written.
    localhost_nodeports: bool = False
    # net.netfilter.nf_conntrack_tcp_be_liberal=1 on the node: no INVALID drop rule.
    conntrack_tcp_be_liberal: bool = False
    # Above this many endpoints, per-endpoint comments are dropped (kube-proxy's
    # largeClusterEndpointsThreshold).
    large_cluster_threshold: int = 1000
    # This node's zone (its Node's topology.kubernetes.io/zone), for topology hints.
    node_zone: str = ""
    # nfacct counters that exist on the node (NFACCT_COUNTERS); rules count into those only
    # (`-m nfacct` with a missing counter would fail the whole restore).
    nfacct_counters: frozenset[str] = frozenset()


def _empty_map() -> Mapping[ServiceKey, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class RenderState:
    """What the previous render left in the kernel (opaque to callers)."""

    # (table, chain) this proxy owns. Never changed once made (a set, not a frozenset copy
    # of one: at 10k Services each is a 4 MB table).
    chains: AbstractSet[tuple[str, str]] = frozenset()
    service_chains: Mapping[ServiceKey, ChainNames] = field(default_factory=_empty_map)
    # -- additions --
    service_rules: Mapping[ServiceKey, int] = field(default_factory=_empty_map)  # nat rules
    config: RenderConfig | None = None  # None: unknown, so the next render is full
    # Per-Service rendered text, reused while a Service's records are unchanged.
    fragments: Mapping[ServiceKey, ServiceFragment] = field(
        default_factory=_empty_map, repr=False, compare=False
    )


@dataclass(frozen=True)
class RenderResult:
    text: str
    state: RenderState
    rules: Mapping[str, int]  # table → rules owned after this sync
    rules_written: Mapping[str, int]  # table → rules written in `text`
    full: bool = True  # whether this was a full render
    # Restores to run, in order, before `text` (see `chunk_chains`): each holds the whole
    # chain set of some Services, leaf chains first, so every one is consistent alone.
    pre: Sequence[str] = ()
    # Service ports with endpoints but none on this node for a Local policy, (internal,
    # external): kube-proxy's sync_proxy_rules_no_local_endpoints_total.
    no_local_endpoints: tuple[int, int] = (0, 0)


# -- helpers ----------------------------------------------------------------------------

_PROBS: list[str] = ["<bad value>"]


def probability(n: int) -> str:
    """kube-proxy's computeProbability: %0.10f of 1/n, cached as upstream does."""
    while len(_PROBS) <= n:
        _PROBS.append(f"{1.0 / len(_PROBS):.10f}")
    return _PROBS[n]


def _cluster_cidr(cfg: RenderConfig) -> str:
    """This family's cluster CIDR (kube-proxy's detector uses the first), "" if none."""
    return next((c for c in cfg.cluster_cidrs if ip_family(c) == cfg.family), "")


def _nodeport_nets(cfg: RenderConfig) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [
        ipaddress.ip_network(c, strict=False)
        for c in cfg.nodeport_addresses
        if ip_family(c) == cfg.family
    ]


def localhost_nodeports(cfg: RenderConfig) -> bool:
    """NodePorts on 127.0.0.0/8 by kernel NAT: the flag, IPv4, and --nodeport-addresses
    including loopback (kube-proxy's ContainsIPv4Loopback; all addresses do)."""
    if not cfg.localhost_nodeports or cfg.family != 4:
        return False
    nets = _nodeport_nets(cfg)
    loopback = ipaddress.ip_address("127.0.0.1")
    return not nets or any(n.prefixlen == 0 or loopback in n for n in nets)


def _nodeport_destinations(cfg: RenderConfig) -> tuple[list[str], bool]:
    """(matches for the KUBE-SERVICES → KUBE-NODEPORTS rules, localhost NodePorts on)."""
    v6 = cfg.family == 6
    nets = _nodeport_nets(cfg)
    match_all = not nets or any(n.prefixlen == 0 for n in nets)
    localhost = localhost_nodeports(cfg)
    if match_all:
        dest = "-m addrtype --dst-type LOCAL"
        if v6:
            dest += " ! -d ::1/128"
        elif not localhost:
            dest += " ! -d 127.0.0.0/8"
        return [dest], localhost
    ips = {ipaddress.ip_address(ip) for ip in cfg.local_ips if ip_family(ip) == cfg.family}
    out = []
    for ip in sorted(ips):
        if not any(ip in n for n in nets):
            continue
        if ip.is_loopback and (v6 or not localhost):
            continue  # kube-proxy logs and skips these
        out.append(f"-d {ip}")
    return out, localhost


_first = itemgetter(0)


@dataclass(slots=True)
class TopLevelRules:
    """The rules one Service adds to the top-level chains, per table and chain (kube-proxy
    writes them straight into its filterRules/natRules buffers)."""

    filter_services: list[str] = field(default_factory=list)  # KUBE-SERVICES (filter)
    filter_external_services: list[str] = field(default_factory=list)  # KUBE-EXTERNAL-SERVICES
    filter_nodeports: list[str] = field(default_factory=list)  # KUBE-NODEPORTS (filter)
    filter_firewall: list[str] = field(default_factory=list)  # KUBE-PROXY-FIREWALL
    nat_services: list[str] = field(default_factory=list)  # KUBE-SERVICES (nat)
    nat_nodeports: list[str] = field(default_factory=list)  # KUBE-NODEPORTS (nat)

    def freeze(self) -> TopRules:
        """The six lists as tuples, in field order (empty ones are the shared `()`): what
        a ServiceFragment keeps (10k Services: ~3 MB less than six lists each)."""
        return (
            tuple(self.filter_services),
            tuple(self.filter_external_services),
            tuple(self.filter_nodeports),
            tuple(self.filter_firewall),
            tuple(self.nat_services),
            tuple(self.nat_nodeports),
        )

    def extend(self, other: TopRules) -> None:
        fs, fe, fn, ff, ns, nn = other
        self.filter_services += fs
        self.filter_external_services += fe
        self.filter_nodeports += fn
        self.filter_firewall += ff
        self.nat_services += ns
        self.nat_nodeports += nn


TopRules = tuple[tuple[str, ...], ...]
"""A frozen TopLevelRules (`TopLevelRules.freeze`)."""
_NO_TOP: TopRules = ((),) * 6


@dataclass(slots=True)
class EndpointInfo:
    """kube-proxy's endpointInfo: one endpoint of a Service port and its KUBE-SEP chain."""

    endpoint: str  # BaseEndpointInfo.String(): "ip:port" / "[ip]:port", orders and names
    ip: str
    chain_name: str


@dataclass(slots=True)
class ServicePortInfo:
    """One Service port, planned: kube-proxy's servicePortInfo plus the per-port locals
    of syncProxyRules (CategorizeEndpoints' results, which chains are used)."""

    name_string: str  # ServicePortName.String(): ns/name or ns/name:port
    protocol_match: str  # "-m tcp -p tcp"
    cluster_ip: str
    port: int
    load_balancer_ips: list[str]
    load_balancer_source_ranges: list[str]
    sticky_max_age_seconds: int  # 0: no session affinity
    external_policy_local: bool
    cluster_policy_chain_name: str  # KUBE-SVC-…
    local_policy_chain_name: str  # KUBE-SVL-…
    external_chain_name: str  # KUBE-EXT-…
    firewall_chain_name: str  # KUBE-FW-…
    internal_policy_chain: str  # the policy chain internal traffic goes to
    cluster_endpoints: list[EndpointInfo]
    local_endpoints: list[EndpointInfo]
    all_locally_reachable_endpoints: list[EndpointInfo]
    has_internal_endpoints: bool
    has_external_endpoints: bool
    uses_external_traffic_chain: bool
    uses_fw_chain: bool


@dataclass(slots=True)
class ServiceFragment:
    """One Service's share of a render; reusable while `svc` and `eps` are unchanged.

    Its chains are kept as two text blocks (declarations, rules) rather than lists of
    lines: a fraction of the memory, and the final join has fewer pieces.
    """

    svc: Service
    eps: ServiceEndpoints | None
    ports: list[ServicePortInfo] | None = field(default_factory=list)  # None once written
    top: TopRules = _NO_TOP  # its rules in the top-level chains (TopLevelRules.freeze)
    names: ChainNames = _NONE  # (table, chain) of its own chains
    n_endpoints: int = 0
    # Ports with endpoints but none here for a Local policy: [internal, external]
    no_local: list[int] = field(default_factory=lambda: [0, 0])
    comments: bool | None = None  # which flavour decl/rules were written in
    decl: str = ""  # "\n"-joined chain declarations
    rules: str = ""  # "\n"-joined rules
    n_rules: int = 0

    def copy(self) -> ServiceFragment:
        return replace(self)


class _Renderer:
    """Per-render constants and the two halves of the work: plan (top-level rules and
    chain names) and write (the per-Service chains)."""

    def __init__(self, cfg: RenderConfig) -> None:
        self.cfg = cfg
        self.v6 = cfg.family == 6
        self.cidr = _cluster_cidr(cfg)
        self.node = cfg.node_name
        self.zone = cfg.node_zone
        # NodePort traffic to 127.0.0.0/8 counted apart (kube-proxy's localhost nfacct rule)
        self.count_localhost = (
            localhost_nodeports(cfg) and LOCALHOST_NODEPORTS_COUNTER in cfg.nfacct_counters
        )
        node_ip = ipaddress.ip_address(cfg.node_ip) if cfg.node_ip else None
        self.node_ip = node_ip if node_ip is not None and node_ip.version == cfg.family else None

    # -- planning -------------------------------------------------------------------------

    def plan(self, svc: Service, svc_eps: ServiceEndpoints | None) -> ServiceFragment | None:
        """The Service's top-level rules and chain names (None: not proxied here)."""
        if svc.proxy_name or svc.headless or svc.type == "ExternalName":
            return None
        v6 = self.v6
        fam = self.cfg.family
        cip = next((ip for ip in svc.cluster_ips if ip_family(ip) == fam), None)
        if cip is None:
            return None  # kube-proxy's change tracker drops it for this family
        f = ServiceFragment(svc, svc_eps)
        ext_ips = [ip for ip in svc.external_ips if ip_family(ip) == fam]
        lb_ips = [ip for ip in svc.load_balancer_ips if ip_family(ip) == fam]
        ranges = [c for c in svc.load_balancer_source_ranges if ip_family(c) == fam]
        if any(c.endswith("/0") for c in ranges):
            ranges = []  # a zero CIDR allows everything, like no ranges at all
        ports: Sequence[PortSpec] = svc.ports
        if len(ports) > 1:
            ports = sorted(ports, key=lambda p: (p.port, p.protocol))
        names: list[str] = []
        planned: list[ServicePortInfo] = []
        top = TopLevelRules()
        for port in ports:
            raw = svc_eps.ports.get((port.name, port.protocol), ()) if svc_eps else ()
            if raw:
                if v6:
                    items = [(f"[{e.ip}]:{e.port}", e) for e in raw if ":" in e.ip]
                else:
                    items = [(f"{e.ip}:{e.port}", e) for e in raw if ":" not in e.ip]
                f.n_endpoints += len(items)
                if len(items) > 1:
                    items.sort(key=_first)  # kube-proxy orders endpoints by that string
            else:
                items = []
            planned.append(
                self._plan_port(svc, port, cip, ext_ips, lb_ips, ranges, items, f, top, names)
            )
        f.ports = planned
        f.top = top.freeze()
        f.names = tuple(zip(repeat(NAT), names))
        return f

    def _plan_port(
        self,
        svc: Service,
        port: PortSpec,
        cip: str,
        ext_ips: list[str],
        lb_ips: list[str],
        ranges: list[str],
        items: list[tuple[str, Endpoint]],
        f: ServiceFragment,
        top: TopLevelRules,
        names: list[str],
    ) -> ServicePortInfo:
        spn = svc.port_name_string(port)
        proto = port.protocol.lower()
        mpp = f"-m {proto} -p {proto}"
        svc_chain = service_chain(spn, proto)
        svl = local_chain(spn, proto)
        ext = external_chain(spn, proto)
        fw = firewall_chain(spn, proto)

        externally = bool(port.node_port or lb_ips or ext_ips)
        etp_local = svc.external_traffic_local
        itp_local = svc.internal_traffic_local
        uses_cluster = not itp_local or externally
        uses_local = itp_local or (etp_local and externally)

        # CategorizeEndpoints: traffic policies, topology hints, terminating fallback.
        cluster: list[EndpointInfo] = []
        local: list[EndpointInfo] = []
        reach: list[EndpointInfo] = []
        has_endpoints = False
        if items:
            eps = tuple(e for _, e in items)
            cat = categorize(
                eps, self.node, self.zone, uses_cluster=uses_cluster, uses_local=uses_local
            )
            has_endpoints = cat.has_any
            by_id = {id(e): s for s, e in items}

            def infos(sel: tuple[Endpoint, ...]) -> list[EndpointInfo]:
                if len(sel) == len(items):  # all of them (the common case), same order
                    return [EndpointInfo(s, e.ip, endpoint_chain(spn, proto, s)) for s, e in items]
                return [
                    EndpointInfo(by_id[id(e)], e.ip, endpoint_chain(spn, proto, by_id[id(e)]))
                    for e in sel
                ]

            cluster = infos(cat.cluster) if cat.cluster else []
            local = infos(cat.local) if cat.local else []
            if cat.reachable is cat.cluster:
                reach = cluster
            elif cat.reachable is cat.local:
                reach = local
            else:
                reach = infos(cat.reachable)

        has_internal = has_endpoints and (not itp_local or bool(local))
        has_external = has_endpoints and (not etp_local or bool(local))
        uses_ext = has_endpoints and externally
        uses_fw = has_endpoints and bool(lb_ips) and bool(ranges)
        p = ServicePortInfo(
            name_string=spn,
            protocol_match=mpp,
            cluster_ip=cip,
            port=port.port,
            load_balancer_ips=lb_ips,
            load_balancer_source_ranges=ranges,
            sticky_max_age_seconds=svc.session_affinity_timeout,
            external_policy_local=etp_local,
            cluster_policy_chain_name=svc_chain,
            local_policy_chain_name=svl,
            external_chain_name=ext,
            firewall_chain_name=fw,
            internal_policy_chain=svl if itp_local else svc_chain,
            cluster_endpoints=cluster,
            local_endpoints=local,
            all_locally_reachable_endpoints=reach,
            has_internal_endpoints=has_internal,
            has_external_endpoints=has_external,
            uses_external_traffic_chain=uses_ext,
            uses_fw_chain=uses_fw,
        )
        lb_chain = fw if uses_fw else ext
        if has_endpoints and not has_internal:
            f.no_local[0] += 1
        if has_endpoints and etp_local and externally and not has_external:
            f.no_local[1] += 1

        # ---- top-level rules ----
        dport = f"--dport {port.port}"
        if not has_endpoints:
            target = "REJECT"
            comment = f'"{spn} has no endpoints"'
        else:
            target = "DROP"
            comment = f'"{spn} has no local endpoints"'

        if has_internal:
            top.nat_services.append(
                f'-A KUBE-SERVICES -m comment --comment "{spn} cluster IP" {mpp} -d {cip} '
                f"{dport} -j {p.internal_policy_chain}"
            )
        else:
            top.filter_services.append(
                f"-A KUBE-SERVICES -m comment --comment {comment} {mpp} -d {cip} {dport} "
                f"-j {target}"
            )
        # External and load-balancer IPs without a (local) endpoint are rejected or dropped.
        no_ext = f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {comment} {mpp} -d"
        for ip in ext_ips:
            if has_endpoints:
                top.nat_services.append(
                    f'-A KUBE-SERVICES -m comment --comment "{spn} external IP" {mpp} -d {ip} '
                    f"{dport} -j {ext}"
                )
            if not has_external:
                top.filter_external_services.append(f"{no_ext} {ip} {dport} -j {target}")
        for ip in lb_ips:
            if has_endpoints:
                top.nat_services.append(
                    f'-A KUBE-SERVICES -m comment --comment "{spn} loadbalancer IP" {mpp} '
                    f"-d {ip} {dport} -j {lb_chain}"
                )
            if uses_fw:
                top.filter_firewall.append(
                    f'-A KUBE-PROXY-FIREWALL -m comment --comment "{spn} traffic not accepted '
                    f'by {fw}" {mpp} -d {ip} {dport} -j DROP'
                )
            if not has_external:
                top.filter_external_services.append(f"{no_ext} {ip} {dport} -j {target}")
        if port.node_port:
            # NodePorts are not subject to loadBalancerSourceRanges (as upstream).
            if has_endpoints and self.count_localhost:
                top.nat_nodeports.append(
                    f"-A KUBE-NODEPORTS -m comment --comment {spn} {mpp} -d 127.0.0.0/8 "
                    f"--dport {port.node_port} -m nfacct --nfacct-name "
                    f"{LOCALHOST_NODEPORTS_COUNTER} -j {ext}"
                )
            if has_endpoints:
                top.nat_nodeports.append(
                    f"-A KUBE-NODEPORTS -m comment --comment {spn} {mpp} "
                    f"--dport {port.node_port} -j {ext}"
                )
            if not has_external:
                top.filter_external_services.append(
                    f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {comment} "
                    f"-m addrtype --dst-type LOCAL {mpp} --dport {port.node_port} -j {target}"
                )
        if svc.health_check_node_port:
            top.filter_nodeports.append(
                f'-A KUBE-NODEPORTS -m comment --comment "{spn} health check node port" '
                f"-m tcp -p tcp --dport {svc.health_check_node_port} -j ACCEPT"
            )

        # ---- the per-Service chains, in the order write() declares them ----
        if uses_ext:
            names.append(ext)
        if uses_fw:
            names.append(fw)
        if cluster:
            names.append(svc_chain)
        if local:
            names.append(svl)
        names.extend([e.chain_name for e in reach])
        return p

    def count(self, f: ServiceFragment) -> int:
        """The rules write() makes for `f`'s chains (either comment flavour), from its plan
        alone; tests check it against what write() makes."""
        if not f.names or not f.ports:
            return 0
        n = 0
        masq_any = self.cfg.masquerade_all or bool(self.cidr)
        for p in f.ports:
            if p.uses_external_traffic_chain:
                n += (3 if self.cidr else 2) if p.external_policy_local else 1
                n += p.has_external_endpoints
            if p.uses_fw_chain:
                ranges = p.load_balancer_source_ranges
                n += len(ranges) + 1
                node_ip = self.node_ip
                if node_ip is not None and any(node_ip in ipaddress.ip_network(c) for c in ranges):
                    n += len(p.load_balancer_ips)
            per = 2 if p.sticky_max_age_seconds else 1
            masq = p.has_internal_endpoints and masq_any
            if p.cluster_endpoints:
                n += per * len(p.cluster_endpoints)
                n += masq and p.internal_policy_chain == p.cluster_policy_chain_name
            if p.local_endpoints:
                n += per * len(p.local_endpoints)
                n += masq and p.internal_policy_chain == p.local_policy_chain_name
            n += 2 * len(p.all_locally_reachable_endpoints)
        return n

    # -- writing --------------------------------------------------------------------------

    def write(self, f: ServiceFragment, comments: bool) -> ServiceFragment:
        """`f` with its chain declarations and rules written (a copy if `f` already holds
        them in the other comment flavour, so earlier states stay intact)."""
        if f.comments == comments:
            return f
        if f.comments is not None:
            f = f.copy()
        ports = f.ports
        if ports is None:  # written before in the other flavour: plan again (same result)
            again = self.plan(f.svc, f.eps)
            ports = again.ports if again is not None else None
        decl: list[str] = []
        rules: list[str] = []
        if f.names and ports:
            for p in ports:
                self._write_port(p, decl, rules, comments)
        f.decl, f.rules, f.n_rules = "\n".join(decl), "\n".join(rules), len(rules)
        f.comments = comments
        f.ports = None  # the plan is bulky and rarely needed again
        return f

    def _write_port(
        self, p: ServicePortInfo, decl: list[str], out: list[str], comments: bool
    ) -> None:
        spn = p.name_string
        mpp = p.protocol_match
        svc_chain, svl = p.cluster_policy_chain_name, p.local_policy_chain_name
        ext, fw = p.external_chain_name, p.firewall_chain_name
        if p.uses_external_traffic_chain:
            decl.append(f":{ext} - [0:0]")
        if p.uses_fw_chain:
            decl.append(f":{fw} - [0:0]")
        if p.cluster_endpoints:
            decl.append(f":{svc_chain} - [0:0]")
        if p.local_endpoints:
            decl.append(f":{svl} - [0:0]")
        decl.extend([f":{e.chain_name} - [0:0]" for e in p.all_locally_reachable_endpoints])

        internal_masq = ""
        internal = p.internal_policy_chain
        if p.has_internal_endpoints:
            base = (
                f'-m comment --comment "{spn} cluster IP" {mpp} -d {p.cluster_ip} --dport {p.port}'
            )
            if self.cfg.masquerade_all:
                internal_masq = f"-A {internal} {base} -j KUBE-MARK-MASQ"
            elif self.cidr:
                # Off-cluster sources are masqueraded so replies come back through us.
                internal_masq = f"-A {internal} {base} ! -s {self.cidr} -j KUBE-MARK-MASQ"

        if p.uses_external_traffic_chain:
            if not p.external_policy_local:
                out.append(
                    f'-A {ext} -m comment --comment "masquerade traffic for {spn} external '
                    f'destinations" -j KUBE-MARK-MASQ'
                )
            else:
                # Pods and the node itself reach external IPs through the Cluster policy,
                # as if they hairpinned through an outside load balancer.
                if self.cidr:
                    out.append(
                        f'-A {ext} -m comment --comment "pod traffic for {spn} external '
                        f'destinations" -s {self.cidr} -j {svc_chain}'
                    )
                out.append(
                    f'-A {ext} -m comment --comment "masquerade LOCAL traffic for {spn} '
                    f'external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ'
                )
                out.append(
                    f'-A {ext} -m comment --comment "route LOCAL traffic for {spn} external '
                    f'destinations" -m addrtype --src-type LOCAL -j {svc_chain}'
                )
            if p.has_external_endpoints:
                out.append(f"-A {ext} -j {svl if p.external_policy_local else svc_chain}")

        if p.uses_fw_chain:
            head = f'-A {fw} -m comment --comment "{spn} loadbalancer IP"'
            node_ip = self.node_ip
            allow_from_node = False
            for cidr in p.load_balancer_source_ranges:
                out.append(f"{head} -s {cidr} -j {ext}")
                if node_ip is not None and node_ip in ipaddress.ip_network(cidr):
                    allow_from_node = True
            if allow_from_node:
                # A VIP that is local to the node loops back with itself as the source.
                out.extend([f"{head} -s {ip} -j {ext}" for ip in p.load_balancer_ips])
            # Whatever falls through is not DNATed and meets KUBE-PROXY-FIREWALL's DROP.
            out.append(
                f'-A {fw} -m comment --comment "other traffic to {spn} will be dropped by '
                f'KUBE-PROXY-FIREWALL"'
            )

        if p.cluster_endpoints:
            if internal_masq and internal == svc_chain:
                out.append(internal_masq)
            _dispatch(out, p, svc_chain, p.cluster_endpoints, comments)
        if p.local_endpoints:
            if internal_masq and internal == svl:
                out.append(internal_masq)
            _dispatch(out, p, svl, p.local_endpoints, comments)

        # Endpoint chains: masquerade hairpin traffic (a pod reaching itself), then DNAT.
        sc = f" -m comment --comment {spn}" if comments else ""
        if p.sticky_max_age_seconds:
            for e in p.all_locally_reachable_endpoints:
                sep = e.chain_name
                out.append(f"-A {sep}{sc} -s {e.ip} -j KUBE-MARK-MASQ")
                out.append(
                    f"-A {sep}{sc} -m recent --name {sep} --set {mpp} -j DNAT "
                    f"--to-destination {e.endpoint}"
                )
        else:
            for e in p.all_locally_reachable_endpoints:
                sep = e.chain_name
                out.append(f"-A {sep}{sc} -s {e.ip} -j KUBE-MARK-MASQ")
                out.append(f"-A {sep}{sc} {mpp} -j DNAT --to-destination {e.endpoint}")


def _dispatch(
    out: list[str], p: ServicePortInfo, chain: str, eps: list[EndpointInfo], comments: bool
) -> None:
    """writeServiceToEndpointRules: affinity matches first, then the i-th of n endpoints
    taken with probability 1/(n-i), the last one unconditionally."""
    spn = p.name_string
    if p.sticky_max_age_seconds:
        t = p.sticky_max_age_seconds
        for e in eps:
            c = f' -m comment --comment "{spn} -> {e.endpoint}"' if comments else ""
            out.append(
                f"-A {chain}{c} -m recent --name {e.chain_name} --rcheck --seconds {t} --reap "
                f"-j {e.chain_name}"
            )
    n = len(eps)
    probability(n)  # fills the cache up to n
    probs = _PROBS
    last = n - 1
    if comments:
        for i, e in enumerate(eps):
            if i < last:
                out.append(
                    f'-A {chain} -m comment --comment "{spn} -> {e.endpoint}" -m statistic '
                    f"--mode random --probability {probs[n - i]} -j {e.chain_name}"
                )
            else:
                out.append(
                    f'-A {chain} -m comment --comment "{spn} -> {e.endpoint}" -j {e.chain_name}'
                )
    else:
        for i, e in enumerate(eps):
            if i < last:
                out.append(
                    f"-A {chain} -m statistic --mode random --probability {probs[n - i]} "
                    f"-j {e.chain_name}"
                )
            else:
                out.append(f"-A {chain} -j {e.chain_name}")


# -- render -----------------------------------------------------------------------------


def _chain_inputs(cfg: RenderConfig) -> tuple[object, ...]:
    """The config that per-Service chains depend on. Other settings (marks, NodePort
    addresses, local IPs, …) only touch top-level chains, which every render rewrites."""
    return (
        cfg.family,
        cfg.node_name,
        cfg.node_zone,
        _cluster_cidr(cfg),
        cfg.masquerade_all,
        cfg.node_ip,
        # the per-Service localhost NodePort rules (planned with the Service)
        localhost_nodeports(cfg) and LOCALHOST_NODEPORTS_COUNTER in cfg.nfacct_counters,
    )


def _same(f: ServiceFragment, svc: Service, eps: ServiceEndpoints | None) -> bool:
    return (f.svc is svc or f.svc == svc) and (f.eps is eps or f.eps == eps)


def render(
    model: Model,
    cfg: RenderConfig,
    *,
    changed: frozenset[ServiceKey] | None = None,
    previous: RenderState | None = None,
    chunk_chains: int = 0,
) -> RenderResult:
    """Render one IP family's ruleset; see the module docstring for full vs partial.

    `chunk_chains` > 0 splits a large write into several restores of about that many
    chains each (`RenderResult.pre`), whole Services at a time, with the top-level chains
    and stale-chain deletions in the final `text`. iptables-nft-restore --noflush is
    quadratic in the chains of one transaction (32k chains: 20 s in one restore, 1.3 s
    in chunks of 4k; the data plane's NFT_CHUNK_CHAINS says which size it uses and why),
    so the nft backend uses it; legacy rewrites the whole table per restore and must not.
    """
    # The render allocates ~10 objects per rule and frees none of them in cycles; left on,
    # the cyclic GC rescans the (large) live heap over and over and doubles the run time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _render(model, cfg, changed, previous, chunk_chains)
    finally:
        if gc_was_enabled:
            gc.enable()


def _render(
    model: Model,
    cfg: RenderConfig,
    changed: frozenset[ServiceKey] | None,
    previous: RenderState | None,
    chunk_chains: int = 0,
) -> RenderResult:
    reuse = (
        previous is not None
        and previous.config is not None
        and _chain_inputs(previous.config) == _chain_inputs(cfg)
    )
    full = changed is None or not reuse
    changed = changed or frozenset()
    old: Mapping[ServiceKey, ServiceFragment] = {}
    if reuse and previous is not None:
        old = previous.fragments
    prev_names = previous.service_chains if previous is not None else {}
    r = _Renderer(cfg)
    services = model.services
    endpoints = model.endpoints
    # Large rulesets: the state keeps each Service's plan outcome (names, top-level rules,
    # counts) but neither its per-endpoint plan nor its chain text; they are made again
    # when needed (a later full render: ~0.7 s at 320k rules, small beside
    # iptables-restore). Decided up front (every endpoint is at least three nat rules), so
    # that at 10k Services neither every plan nor every Service's text is alive at once.
    lean = 3 * sum(len(e) for se in endpoints.values() for e in se.ports.values()) > (
        TEXT_CACHE_MAX_RULES
    )

    # Pass 1: plan every Service (or reuse its fragment); top-level rules are collected.
    top = TopLevelRules()
    frags: list[tuple[ServiceKey, ServiceFragment, bool]] = []
    total_endpoints = 0
    no_local_int = no_local_ext = 0
    for key in sorted(services):
        svc = services[key]
        eps = endpoints.get(key)
        f = old.get(key)
        fresh = f is None or not _same(f, svc, eps) or key in changed
        if f is None or fresh:
            f = r.plan(svc, eps)
            if f is None:
                continue
            if lean:  # its rules are counted now and written when their chunk is
                f.n_rules = r.count(f)
                f.ports = None
        elif f.svc is not svc or f.eps is not eps:  # equal records: adopt the new ones
            f = f.copy()
            f.svc, f.eps = svc, eps
        total_endpoints += f.n_endpoints
        no_local_int += f.no_local[0]
        no_local_ext += f.no_local[1]
        top.extend(f.top)
        frags.append((key, f, fresh))

    # Pass 2: write per-Service chains where needed. (Fragments from `previous` hold their
    # lines unless the state was lean: they were written when they were made.)
    comments = total_endpoints <= cfg.large_cluster_threshold
    skipped = n_written = 0
    new_frags: dict[ServiceKey, ServiceFragment] = {}
    todo: list[tuple[ServiceKey, ServiceFragment]] = []
    for key, f, fresh in frags:
        if not full and not fresh and prev_names.get(key, _NONE) == f.names:
            new_frags[key] = f  # unchanged and already in the kernel
            skipped += f.n_rules
            continue
        todo.append((key, f))
    del frags
    touched = [key for key, _ in todo]
    # Whole Services per chunk (a Service's chains are replaced atomically); the final
    # text keeps the top level, the remainder and the stale-chain deletions.
    chunking = (
        chunk_chains > 0
        and sum(1 for _, f in todo if f.names) > 1
        and sum(len(f.names) for _, f in todo) > chunk_chains
    )
    # Service chains jump to KUBE-MARK-MASQ, which may not exist yet on a first sync:
    # each chunk carries it whole (same content, replaced atomically).
    mark_masq = (
        f":{KUBE_MARK_MASQ} - [0:0]",
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {cfg.masquerade_mark}",
    )
    n_decl: list[str] = []
    n_rules: list[str] = []
    pre: Sequence[str] = ()
    if chunking and lean:
        # Chunks are written when they are restored, one at a time (`_Chunks`).
        groups: list[tuple[ServiceFragment, ...]] = []
        group: list[ServiceFragment] = []
        in_block = 0
        for key, f in todo:
            if f.comments is not None:  # text from a state that kept it
                f = _textless(f)
            new_frags[key] = f
            n_written += f.n_rules
            if f.names:
                group.append(f)
                in_block += len(f.names)
                if in_block >= chunk_chains:
                    groups.append(tuple(group))
                    group, in_block = [], 0
        for f in group:  # the remainder goes into the final text
            w = r.write(f.copy(), comments)
            n_decl.append(w.decl)
            if w.rules:
                n_rules.append(w.rules)
        pre = _Chunks(r, comments, mark_masq, groups)
    else:
        chunks: list[str] = []
        in_block = 0
        for key, f in todo:
            f = r.write(f, comments)
            n_written += f.n_rules
            decl, rules = f.decl, f.rules
            new_frags[key] = _textless(f) if lean and (decl or rules) else f
            if decl:
                n_decl.append(decl)
            if rules:
                n_rules.append(rules)
            if chunking and decl:
                in_block += len(f.names)
                if in_block >= chunk_chains:
                    chunks.append("\n".join(("*nat", *mark_masq, *n_decl, *n_rules, "COMMIT\n")))
                    n_decl, n_rules, in_block = [], [], 0
        pre = tuple(chunks)
    del todo

    service_chains = {k: f.names for k, f in new_frags.items() if f.names}
    if full:
        owned = set(TOP_CHAINS)
        for names in service_chains.values():
            owned.update(names)
        stale: Iterable[tuple[str, str]] = previous.chains - owned if previous else ()
    else:
        assert previous is not None
        removed: set[tuple[str, str]] = set()
        added: set[tuple[str, str]] = set()
        for k in touched:
            removed.update(prev_names.get(k, _NONE))
            added.update(new_frags[k].names)
        for k in prev_names:
            if k not in new_frags:  # Service gone (or no longer proxied)
                removed.update(prev_names[k])
        owned = set(previous.chains)  # one copy, changed in place
        owned -= removed
        owned |= added
        owned |= TOP_CHAINS
        stale = removed - owned
    stale_by_table: dict[str, list[str]] = {}
    for table, chain in sorted(stale):
        stale_by_table.setdefault(table, []).append(chain)

    text, written = _assemble(cfg, top, n_decl, n_rules, n_written, stale_by_table)
    if lean:  # fragments reused from a state that kept text
        for k, f in new_frags.items():
            if f.decl or f.rules:
                new_frags[k] = _textless(f)
    state = RenderState(
        chains=owned,
        service_chains=MappingProxyType(service_chains),
        service_rules=MappingProxyType({k: f.n_rules for k, f in new_frags.items() if f.names}),
        config=cfg,
        fragments=MappingProxyType(new_frags),
    )
    return RenderResult(
        text=text,
        state=state,
        rules=MappingProxyType({FILTER: written[FILTER], NAT: written[NAT] + skipped}),
        rules_written=MappingProxyType(written),
        full=full,
        pre=pre,
        no_local_endpoints=(no_local_int, no_local_ext),
    )


class _Chunks(Sequence[str]):
    """The restores of a large render's per-Service chains, each written when it is read
    (whole Services, leaf chains first; see `render`'s chunk_chains): at 10k Services all
    of them at once were a copy of the whole ruleset (~30 MB) and of every Service's plan,
    held through all the restores. Pure like the render: reading one twice gives the
    same text. Read them from a worker thread: each is tens of ms of CPU."""

    def __init__(
        self,
        r: _Renderer,
        comments: bool,
        head: tuple[str, ...],
        groups: Sequence[tuple[ServiceFragment, ...]],
    ) -> None:
        self._r, self._comments, self._head, self._groups = r, comments, head, groups

    def __len__(self) -> int:
        return len(self._groups)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...

    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        if isinstance(i, slice):
            return _Chunks(self._r, self._comments, self._head, self._groups[i])
        gc_was_enabled = gc.isenabled()
        gc.disable()  # as in render(): nothing cyclic is made, and the heap is large
        try:
            decl: list[str] = []
            rules: list[str] = []
            for f in self._groups[i]:
                w = self._r.write(f.copy(), self._comments)  # the state's own stays lean
                decl.append(w.decl)
                if w.rules:
                    rules.append(w.rules)
            return "\n".join(("*nat", *self._head, *decl, *rules, "COMMIT\n"))
        finally:
            if gc_was_enabled:
                gc.enable()

    def __repr__(self) -> str:
        return f"<{len(self._groups)} restores written when read>"


def _textless(f: ServiceFragment) -> ServiceFragment:
    """A copy of `f` without its chain text (and plan): written again when needed."""
    g = f.copy()
    g.decl = g.rules = ""
    g.comments = None
    g.ports = None
    return g


def _assemble(
    cfg: RenderConfig,
    top: TopLevelRules,
    n_decl: list[str],
    n_rules: list[str],
    n_rule_count: int,
    stale: dict[str, list[str]],
) -> tuple[str, dict[str, int]]:
    """The restore text: *filter then *nat; returns it and the rule count per table."""
    mark = cfg.masquerade_mark
    destinations, localhost = _nodeport_destinations(cfg)

    forward = []
    if not cfg.conntrack_tcp_be_liberal:
        # INVALID packets would otherwise reach pods un-NATed and get RST (k/k#74839),
        # counted for kubeproxy_iptables_ct_state_invalid_dropped_packets_total.
        count = ""
        if CT_STATE_INVALID_COUNTER in cfg.nfacct_counters:
            count = f" -m nfacct --nfacct-name {CT_STATE_INVALID_COUNTER}"
        forward.append(f"-A KUBE-FORWARD -m conntrack --ctstate INVALID{count} -j DROP")
    forward.append(
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {mark}/{mark} -j ACCEPT"
    )
    forward.append(
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
    f_decl = [f":{c} - [0:0]" for c in FILTER_CHAINS]
    filter_rules = [
        *top.filter_services,
        *top.filter_external_services,
        *forward,
        *top.filter_nodeports,
        *top.filter_firewall,
    ]
    if localhost:
        # route_localnet opens 127.0.0.0/8 to the network; kubelet's rule closes it again.
        f_decl.append(f":{KUBELET_FIREWALL} - [0:0]")
        filter_rules.append(
            f'-A {KUBELET_FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
            "-j DROP"
        )

    masq = '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
    masq += "-j MASQUERADE --random-fully" if cfg.random_fully else "-j MASQUERADE"
    nat_top = [
        f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN",
        # Clear the mark so a packet that re-traverses the stack is not masqueraded twice.
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}",
        masq,
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}",
    ]
    last = (
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must '
        'be the last rule in this chain"'
    )
    nodeport_jumps = [f"{last} {d} -j KUBE-NODEPORTS" for d in destinations]

    stale_filter = stale.get(FILTER, [])
    stale_nat = stale.get(NAT, [])
    lines = ["*filter", *f_decl]
    lines += [f":{c} - [0:0]" for c in stale_filter]  # flushes them before the -X below
    lines += filter_rules
    lines += [f"-X {c}" for c in stale_filter]
    lines += ["COMMIT", "*nat"]
    lines += [f":{c} - [0:0]" for c in NAT_CHAINS]
    lines += n_decl
    lines += [f":{c} - [0:0]" for c in stale_nat]
    lines += nat_top
    lines += top.nat_services
    lines += nodeport_jumps  # must stay the last rules of KUBE-SERVICES
    lines += top.nat_nodeports
    lines += n_rules
    lines += [f"-X {c}" for c in stale_nat]
    lines.append("COMMIT\n")
    nat_count = len(nat_top) + len(top.nat_services) + len(nodeport_jumps)
    nat_count += len(top.nat_nodeports) + n_rule_count
    return "\n".join(lines), {FILTER: len(filter_rules), NAT: nat_count}


# -- helpers for the applier ------------------------------------------------------------


def owned_chain(table: str, chain: str) -> bool:
    """True for a chain this proxy creates (top-level or per-Service)."""
    return (table, chain) in TOP_CHAINS or (table == NAT and is_service_chain(chain))


def saved_chains(save_output: str) -> set[tuple[str, str]]:
    """(table, chain) of every chain declared in `iptables-save` output."""
    out: set[tuple[str, str]] = set()
    table = ""
    for line in save_output.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and table:
            out.add((table, line[1:].split(" ", 1)[0]))
    return out


def state_from_chains(chains: Iterable[tuple[str, str]]) -> RenderState:
    """A `previous` for the first full render after start-up: the chains found in the
    kernel (e.g. via `saved_chains`) that this proxy owns, so that leftovers of an earlier
    run (or of kube-proxy) are deleted. Its config is unknown, so the render is full."""
    return RenderState(chains=frozenset(c for c in chains if owned_chain(*c)))
