"""Model → nftables transaction (`nft -f` input) for the tables `ip kube-proxy` / `ip6 kube-proxy`.

Pure: no kernel, no subprocess, no clock. One call renders one IP family.

The shape is chosen for transaction cost (see README.md beside this file for the
measurements): the kernel's cost is in chains and sets created per transaction, not in
elements, so Services are **elements of a few named maps**, not chains:

- `service-ips` (address . protocol . port → verdict) sends a packet to a *picker chain*
  `pick-N` shared by every Service port with N usable endpoints; `pick-N` does
  `dnat to <daddr . proto . dport . numgen random mod N> map @service-endpoints`, and
  `service-endpoints` holds (frontend . slot i) → i-th endpoint. `numgen random mod N`
  is exact up to the kernel's 32-bit scaling (every slot gets ⌊2³²/N⌋ or ⌈2³²/N⌉ of the
  random values: within 2⁻³² of 1/N).
- NodePorts the same with (protocol . nodePort) keys (`service-nodeports`,
  `nodeport-endpoints`, `pick-nodeport-N`); Local policies use `*-local-*` twins.
- Policy (masquerading, externalTrafficPolicy Local) is one lookup in `ip-policies` /
  `nodeport-policies` that jumps to a fixed chain before the dispatch.
- No endpoints: `no-endpoint-services` / `no-endpoint-nodeports` (reject or drop), source
  ranges: `firewall-ips` + `firewall-allow` (interval set), hairpin: `hairpin-endpoints`
  (this node's endpoints only: a pod's traffic to its own Service is DNATed on its node).
- Only sessionAffinity ClientIP Services get chains and sets of their own (kube-proxy's
  `service-*`, `endpoint-*` chains and `affinity-*` sets): a client's endpoint must be
  remembered per endpoint, with a timeout.

A Service change is then a handful of `delete element` / `add element` commands; a full
sync recreates the table in one transaction. Picker chains are declared by full syncs only
(1..16 endpoints, or up to the power of two above the largest count): nft 1.0.6 cannot add
a rule naming the endpoint maps to an existing table, so a partial sync needing a picker
that is not there is rendered full. `RenderState` holds every element this
proxy put into the kernel (exactly), so a partial transaction never deletes what is not
there nor adds what is.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

from proxy.model import Endpoint, Model, PortSpec, Service, ServiceKey, ip_family
from proxy.selection import categorize

TABLE = "kube-proxy"

# -- maps and sets (index → name); element keys are "a . b . c" strings -------------------
SERVICE_IPS = 0
SERVICE_NODEPORTS = 1
IP_POLICIES = 2
NODEPORT_POLICIES = 3
EXTERNAL_FALLBACK = 4
NODEPORT_FALLBACK = 5
SERVICE_ENDPOINTS = 6
SERVICE_LOCAL_ENDPOINTS = 7
NODEPORT_ENDPOINTS = 8
NODEPORT_LOCAL_ENDPOINTS = 9
NO_ENDPOINT_SERVICES = 10
NO_ENDPOINT_NODEPORTS = 11
FIREWALL_IPS = 12
FIREWALL_ALLOW = 13
HAIRPIN = 14
NODEPORT_IPS = 15

MAP_NAMES = (
    "service-ips",
    "service-nodeports",
    "ip-policies",
    "nodeport-policies",
    "external-fallback",
    "nodeport-fallback",
    "service-endpoints",
    "service-local-endpoints",
    "nodeport-endpoints",
    "nodeport-local-endpoints",
    "no-endpoint-services",
    "no-endpoint-nodeports",
    "firewall-ips",
    "firewall-allow",
    "hairpin-endpoints",
    "nodeport-ips",
)
SETS = frozenset((FIREWALL_IPS, FIREWALL_ALLOW, HAIRPIN, NODEPORT_IPS))  # no values

# Fixed chains the policy maps jump to.
MARK_MASQ = "mark-for-masquerade"
MASQ_OFF_CLUSTER = "cluster-ip-masquerade"
EXTERNAL_MASQ = "external-masquerade"
EXTERNAL_LOCAL = "external-local"
NODEPORT_MASQ = "nodeport-masquerade"
NODEPORT_LOCAL = "nodeport-local"
REJECT_CHAIN = "reject-chain"
FW_CHECK = "firewall-check"

# Picker chains: prefix → the endpoint map they read and whether the key is a NodePort.
PICKERS = {
    "pick-": (SERVICE_ENDPOINTS, False),
    "pick-local-": (SERVICE_LOCAL_ENDPOINTS, False),
    "pick-nodeport-": (NODEPORT_ENDPOINTS, True),
    "pick-nodeport-local-": (NODEPORT_LOCAL_ENDPOINTS, True),
}


@dataclass(frozen=True, slots=True)
class _Entry:
    """The maps and chains through which external traffic reaches a Service: by its
    external/LB IPs or by its NodePort (the same shape, kube-proxy's twin maps)."""

    policies: int
    local_chain: str
    masq_chain: str
    fallback: int
    targets: int
    endpoints: int
    local_endpoints: int
    no_endpoints: int
    picker: str  # the picker chains' kind prefix


_BY_IP = _Entry(
    IP_POLICIES, EXTERNAL_LOCAL, EXTERNAL_MASQ, EXTERNAL_FALLBACK, SERVICE_IPS,
    SERVICE_ENDPOINTS, SERVICE_LOCAL_ENDPOINTS, NO_ENDPOINT_SERVICES, "",
)  # fmt: skip
_BY_NODEPORT = _Entry(
    NODEPORT_POLICIES, NODEPORT_LOCAL, NODEPORT_MASQ, NODEPORT_FALLBACK, SERVICE_NODEPORTS,
    NODEPORT_ENDPOINTS, NODEPORT_LOCAL_ENDPOINTS, NO_ENDPOINT_NODEPORTS, "nodeport-",
)  # fmt: skip


@dataclass(frozen=True)
class NftConfig:
    family: int  # 4 or 6
    node_name: str
    cluster_cidrs: tuple[str, ...] = ()  # only this family's first one is used
    masquerade_all: bool = False
    masquerade_mark: str = "0x4000"
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs; none of this family: all local
    local_ips: tuple[str, ...] = ()  # node's IPs, for --nodeport-addresses
    node_ip: str = ""  # LB source ranges containing it also admit the LB IP as source
    conntrack_tcp_be_liberal: bool = False  # then no INVALID drop in forward
    node_zone: str = ""  # this node's zone (its Node's label), for topology hints

    @property
    def ipx(self) -> str:
        return "ip6" if self.family == 6 else "ip"

    @property
    def addr_type(self) -> str:
        return "ipv6_addr" if self.family == 6 else "ipv4_addr"

    @property
    def cidr(self) -> str:
        return next((c for c in self.cluster_cidrs if ip_family(c) == self.family), "")

    def nodeport_ips(self) -> tuple[str, ...] | None:
        """The addresses accepting NodePorts, or None for every local one."""
        nets = [
            ipaddress.ip_network(c, strict=False)
            for c in self.nodeport_addresses
            if ip_family(c) == self.family
        ]
        if not nets or any(n.prefixlen == 0 for n in nets):
            return None
        out = []
        ips = {ipaddress.ip_address(i) for i in self.local_ips if ip_family(i) == self.family}
        for ip in sorted(ips):
            if not ip.is_loopback and any(ip in n for n in nets):
                out.append(str(ip))
        return tuple(out)

    def chain_inputs(self) -> tuple:
        """What the fixed chains depend on: a change makes the next render full."""
        return (
            self.family,
            self.node_name,
            self.cidr,
            self.masquerade_all,
            self.masquerade_mark,
            self.nodeport_ips() is None,
            self.node_ip,
            self.conntrack_tcp_be_liberal,
            self.node_zone,  # which endpoints every Service uses
        )


# -- names --------------------------------------------------------------------------------


@lru_cache(maxsize=1 << 14)
def _hashed(name: str) -> str:
    """kube-proxy's hashAndTruncate: 8 base32 characters of sha256, then the name."""
    h = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8]
    out = f"{h}-{name}"
    return out if len(out) <= 240 else out[:237] + "..."


def service_chain_base(svc: Service, port: PortSpec) -> str:
    return _hashed(f"{svc.namespace}/{svc.name}/{port.protocol.lower()}/{port.name}")


def endpoint_chain_base(svc: Service, port: PortSpec, ep: Endpoint) -> str:
    ip = ep.ip.replace(":", ".")
    proto = port.protocol.lower()
    return _hashed(f"{svc.namespace}/{svc.name}/{proto}/{port.name}__{ip}/{ep.port}")


# -- per-Service contributions ------------------------------------------------------------

Element = tuple[int, str, str]  # (map index, key, value: "" for sets)


class _Eps:
    """A frontend's endpoint elements, kept as the endpoints themselves: element i is
    (frontend . i) → endpoint i. Their text is made only when written (as strings they
    were half of the state's memory: 20 MiB at 10k Services x 10 endpoints)."""

    __slots__ = ("eps", "key", "m")

    def __init__(self, m: int, key: str, eps: tuple[Endpoint, ...]) -> None:
        self.m, self.key, self.eps = m, key, eps

    def __len__(self) -> int:
        return len(self.eps)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Eps) and (self.m, self.key, self.eps) == (
            other.m,
            other.key,
            other.eps,
        )

    __hash__ = None  # type: ignore[assignment]

    def elements(self) -> Iterator[Element]:
        m, key = self.m, self.key
        for i, e in enumerate(self.eps):
            yield (m, f"{key} . {i}", f"{e.ip} . {e.port}")


Item = Element | _Eps


def _expand(items: Iterable[Item]) -> Iterator[Element]:
    for it in items:
        if isinstance(it, _Eps):
            yield from it.elements()
        else:
            yield it


@dataclass(frozen=True, slots=True)
class _Contrib:
    """What one Service puts into the kernel: elements of the shared maps, the picker
    chains they jump to, and (affinity only) chains and sets of its own."""

    svc: Service
    eps: object
    # Elements by frontend ("ip <addr . proto . port>" or "np <proto . port>"): the unit
    # of ownership when two Services claim one frontend (bad input; the least
    # namespace/name wins, as a full render's first one would).
    groups: Mapping[str, tuple[Item, ...]]
    hairpin: frozenset[str]  # endpoint IPs (hairpin-endpoints, refcounted)
    pickers: frozenset[str]
    chains: Mapping[str, tuple[str, ...]]  # own chains: name → rules
    sets: Mapping[str, str]  # own sets: name → declaration body
    endpoints: int  # endpoint elements (metrics)
    # Ports with endpoints but none here for a Local policy (internal, external):
    # kube-proxy's sync_proxy_rules_no_local_endpoints_total (see no_local_endpoints).
    no_local: tuple[int, int] = (0, 0)


def no_local_endpoints(state: RenderState) -> tuple[int, int]:
    """(internal, external) Service ports with a Local policy and no endpoint on this
    node although they have endpoints, over everything the state holds."""
    internal = external = 0
    for c in state.contribs.values():
        internal += c.no_local[0]
        external += c.no_local[1]
    return internal, external


_EMPTY: Mapping = MappingProxyType({})


def _ep_str(e: Endpoint) -> str:
    return f"[{e.ip}]:{e.port}" if ":" in e.ip else f"{e.ip}:{e.port}"


def _collapse(cidrs: Iterable[str]) -> list[str]:
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    return [str(n) for n in ipaddress.collapse_addresses(nets)]  # type: ignore[arg-type]


class _Planner:
    def __init__(self, cfg: NftConfig) -> None:
        self.cfg = cfg
        self.fam = cfg.family
        self.node = cfg.node_name
        self.masq_policy = cfg.masquerade_all or bool(cfg.cidr)
        node_ip = ipaddress.ip_address(cfg.node_ip) if cfg.node_ip else None
        self.node_ip = node_ip if node_ip is not None and node_ip.version == cfg.family else None

    def plan(self, svc: Service, svc_eps) -> _Contrib | None:
        if svc.proxy_name or svc.headless or svc.type == "ExternalName":
            return None
        fam = self.fam
        cip = next((ip for ip in svc.cluster_ips if ip_family(ip) == fam), None)
        if cip is None:
            return None
        ext_ips = [ip for ip in svc.external_ips if ip_family(ip) == fam]
        lb_ips = [ip for ip in svc.load_balancer_ips if ip_family(ip) == fam]
        ranges = [c for c in svc.load_balancer_source_ranges if ip_family(c) == fam]
        if any(c.endswith("/0") for c in ranges):
            ranges = []
        out: dict[str, list[Item]] = {}
        hairpin: set[str] = set()
        pickers: set[str] = set()
        chains: dict[str, tuple[str, ...]] = {}
        sets: dict[str, str] = {}
        n_eps = 0
        no_local = [0, 0]
        for port in svc.ports:
            raw = svc_eps.ports.get((port.name, port.protocol), ()) if svc_eps else ()
            items = sorted(
                ((_ep_str(e), e) for e in raw if (":" in e.ip) == (fam == 6)), key=_first
            )
            n_eps += self._port(
                svc, port, cip, ext_ips, lb_ips, ranges, items, out, pickers, chains, sets,
                no_local,
            )  # fmt: skip
            # Hairpin (a pod reaching itself through the Service) is DNATed on the pod's
            # own node, so only this node's endpoints (or those of unknown node) need it.
            node = self.node
            hairpin.update(e.ip for _, e in items if e.node_name in (node, ""))
        return _Contrib(
            svc,
            svc_eps,
            MappingProxyType({g: tuple(els) for g, els in out.items()}),
            frozenset(hairpin),
            frozenset(pickers),
            MappingProxyType(chains) if chains else _EMPTY,
            MappingProxyType(sets) if sets else _EMPTY,
            n_eps,
            (no_local[0], no_local[1]),
        )

    def _port(
        self, svc, port, cip, ext_ips, lb_ips, ranges, items, out, pickers, chains, sets, no_local
    ):
        proto = port.protocol.lower()
        pp = f"{proto} . {port.port}"
        externally = bool(port.node_port or lb_ips or ext_ips)
        etp_local = svc.external_traffic_local
        itp_local = svc.internal_traffic_local
        uses_cluster = not itp_local or externally
        uses_local = itp_local or (etp_local and externally)
        eps = [e for _, e in items]
        # kube-proxy's CategorizeEndpoints (policies, topology hints, terminating fallback)
        cat = categorize(
            eps, self.node, self.cfg.node_zone, uses_cluster=uses_cluster, uses_local=uses_local
        )
        has_endpoints = cat.has_any
        cluster = list(cat.cluster or ())
        local = list(cat.local or ())
        internal = local if itp_local else cluster
        has_internal = has_endpoints and (not itp_local or bool(local))
        has_external = has_endpoints and (not etp_local or bool(local))
        if has_endpoints and not has_internal:
            no_local[0] += 1
        if has_endpoints and etp_local and externally and not has_external:
            no_local[1] += 1
        uses_ext = has_endpoints and externally
        uses_fw = has_endpoints and bool(lb_ips) and bool(ranges)
        refuse = f"goto {REJECT_CHAIN}" if not has_endpoints else "drop"
        affinity = svc.session_affinity_timeout
        n_eps = 0

        def chooser(kind: str, eps_: list[Endpoint]) -> str:
            """The verdict sending a packet to one of `eps_` (kind: a picker prefix)."""
            if affinity:
                return f"goto {self._affinity(svc, port, kind, eps_, chains, sets)}"
            name = f"pick-{kind}{len(eps_)}"
            pickers.add(name)
            return f"goto {name}"

        before = set(out)  # a frontend repeated by a later port (bad input) is skipped

        def group(name: str) -> list[Item]:
            return [] if name in before else out.setdefault(name, [])

        def endpoints(els: list[Item], map_idx: int, key: str, eps_: list[Endpoint]) -> None:
            nonlocal n_eps
            if affinity:
                return  # the affinity chains DNAT themselves
            n_eps += len(eps_)
            if eps_:
                els.append(_Eps(map_idx, key, tuple(eps_)))

        def external(els: list[Item], key: str, by: _Entry) -> None:
            """External traffic by `by` (IPs or NodePort): policy, then endpoints."""
            if uses_ext:
                p = by.picker
                if etp_local:
                    els.append((by.policies, key, f"jump {by.local_chain}"))
                    els.append((by.fallback, key, chooser(p, cluster)))
                    endpoints(els, by.endpoints, key, cluster)
                    if local:
                        els.append((by.targets, key, chooser(p + "local-", local)))
                        endpoints(els, by.local_endpoints, key, local)
                else:
                    els.append((by.policies, key, f"jump {by.masq_chain}"))
                    els.append((by.targets, key, chooser(p, cluster)))
                    endpoints(els, by.endpoints, key, cluster)
            if not has_external:
                els.append((by.no_endpoints, key, refuse))

        # ClusterIP
        key = f"{cip} . {pp}"
        els = group("ip " + key)
        if has_internal:
            if self.masq_policy:
                els.append((IP_POLICIES, key, f"jump {MASQ_OFF_CLUSTER}"))
            kind = "local-" if itp_local else ""
            els.append((SERVICE_IPS, key, chooser(kind, internal)))
            endpoints(
                els, SERVICE_LOCAL_ENDPOINTS if itp_local else SERVICE_ENDPOINTS, key, internal
            )
        else:
            els.append((NO_ENDPOINT_SERVICES, key, refuse))

        # external IPs and load-balancer IPs
        allowed: list[str] = []
        if uses_fw:
            allowed = list(ranges)
            if self.node_ip is not None and any(
                self.node_ip in ipaddress.ip_network(c) for c in ranges
            ):
                allowed += lb_ips  # a local VIP loops back with itself as the source
            allowed = _collapse(allowed)
        for ip in dict.fromkeys((*ext_ips, *lb_ips)):
            key = f"{ip} . {pp}"
            els = group("ip " + key)
            external(els, key, _BY_IP)
            if allowed and ip in lb_ips:
                els.append((FIREWALL_IPS, key, ""))
                els.extend((FIREWALL_ALLOW, f"{key} . {c}", "") for c in allowed)

        # NodePort (not subject to source ranges, as upstream)
        if port.node_port:
            key = f"{proto} . {port.node_port}"
            els = group("np " + key)
            external(els, key, _BY_NODEPORT)
        return n_eps

    def _affinity(self, svc, port, kind, eps_, chains, sets) -> str:
        """kube-proxy's affinity shape: a Service chain checks each endpoint's affinity
        set, else picks at random; each endpoint chain records the client and DNATs."""
        kind = "local-" if kind.endswith("local-") else ""
        base = service_chain_base(svc, port)
        name = f"{'local' if kind else 'service'}-{base}"
        if name in chains:
            return name
        ipx = self.cfg.ipx
        timeout = svc.session_affinity_timeout
        rules: list[str] = []
        eps_chains = []
        for e in eps_:
            eb = endpoint_chain_base(svc, port, e)
            ep_chain, aff = f"endpoint-{eb}", f"affinity-{eb}"
            sets[aff] = f"type {self.cfg.addr_type}; flags dynamic,timeout; timeout {timeout}s;"
            rules.append(f"{ipx} saddr @{aff} goto {ep_chain}")
            chains[ep_chain] = (
                f"update @{aff} {{ {ipx} saddr }}",
                f"meta l4proto {port.protocol.lower()} dnat to {_hostport(e)}",
            )
            eps_chains.append(ep_chain)
        vm = ", ".join(f"{i} : goto {c}" for i, c in enumerate(eps_chains))
        rules.append(f"numgen random mod {len(eps_chains)} vmap {{ {vm} }}")
        chains[name] = tuple(rules)
        return name


def _hostport(e: Endpoint) -> str:
    return f"[{e.ip}]:{e.port}" if ":" in e.ip else f"{e.ip}:{e.port}"


def _first(t):
    return t[0]


# -- the fixed part of the table ----------------------------------------------------------


def _map_decl(cfg: NftConfig, idx: int) -> str:
    a = cfg.addr_type
    ipx = cfg.ipx
    frontend = f"{a} . inet_proto . inet_service"
    nodeport = "inet_proto . inet_service"
    # nft 1.0.6 cannot read this typeof back from the kernel ("conflicting protocols: ip
    # vs. th"), so a rule naming these maps can only be added in the transaction that
    # creates them: picker chains are declared in full syncs only (see PICKER_SPAN).
    # ("tcp dport" would read back, but makes nft add a `meta l4proto tcp` dependency.)
    ep_value = f"{ipx} daddr . th dport"
    decl = {
        SERVICE_IPS: f"type {frontend} : verdict",
        SERVICE_NODEPORTS: f"type {nodeport} : verdict",
        IP_POLICIES: f"type {frontend} : verdict",
        NODEPORT_POLICIES: f"type {nodeport} : verdict",
        EXTERNAL_FALLBACK: f"type {frontend} : verdict",
        NODEPORT_FALLBACK: f"type {nodeport} : verdict",
        SERVICE_ENDPOINTS: f"typeof {ipx} daddr . meta l4proto . th dport . numgen random mod 1"
        f" : {ep_value}",
        SERVICE_LOCAL_ENDPOINTS: f"typeof {ipx} daddr . meta l4proto . th dport . numgen "
        f"random mod 1 : {ep_value}",
        NODEPORT_ENDPOINTS: f"typeof meta l4proto . th dport . numgen random mod 1 : {ep_value}",
        NODEPORT_LOCAL_ENDPOINTS: f"typeof meta l4proto . th dport . numgen random mod 1"
        f" : {ep_value}",
        NO_ENDPOINT_SERVICES: f"type {frontend} : verdict",
        NO_ENDPOINT_NODEPORTS: f"type {nodeport} : verdict",
        FIREWALL_IPS: f"type {frontend}",
        FIREWALL_ALLOW: f"type {frontend} . {a}; flags interval",
        HAIRPIN: f"type {a} . {a}",
        NODEPORT_IPS: f"type {a}",
    }[idx]
    kind = "set" if idx in SETS else "map"
    return f"{kind} {MAP_NAMES[idx]} {{ {decl}; }}"


PICKER_SPAN = 16  # pickers declared per kind: 1..max(16, the largest count, to a power of 2)


def declared_pickers(in_use: Iterable[str]) -> list[str]:
    """The picker chains a full render declares, given the ones in use: every kind for
    every N up to a power of two at or above the largest N in use (16 at least), so a
    partial sync rarely meets an endpoint count without its chain (then it renders full)."""
    top = max([PICKER_SPAN, *(int(p.rsplit("-", 1)[1]) for p in in_use)])
    span = 1 << (top - 1).bit_length()
    return [f"{prefix}{n}" for prefix in PICKERS for n in range(1, span + 1)]


def picker_rules(cfg: NftConfig, name: str) -> tuple[str, ...]:
    """The one rule of a picker chain `pick-[nodeport-][local-]N`."""
    prefix, n = name.rsplit("-", 1)
    map_idx, nodeport = PICKERS[prefix + "-"]
    ipx = cfg.ipx
    key = "meta l4proto . th dport" if nodeport else f"{ipx} daddr . meta l4proto . th dport"
    return (f"dnat {ipx} to {key} . numgen random mod {n} map @{MAP_NAMES[map_idx]}",)


def is_picker(name: str) -> bool:
    prefix, _, n = name.rpartition("-")
    return n.isdigit() and prefix + "-" in PICKERS


@lru_cache(maxsize=8)
def _fixed(cfg: NftConfig) -> tuple[list[str], dict[str, tuple[str, ...]], dict[str, str]]:
    """(base chain declarations, regular fixed chains → rules, base chain → rules)."""
    ipx = cfg.ipx
    mark = cfg.masquerade_mark
    cidr = cfg.cidr
    nodeport_ips = cfg.nodeport_ips()
    if nodeport_ips is None:
        loop = "::1" if cfg.family == 6 else "127.0.0.0/8"
        np_dest = f"fib daddr type local {ipx} daddr != {loop}"
    else:
        np_dest = f"{ipx} daddr @nodeport-ips"
    frontend = f"{ipx} daddr . meta l4proto . th dport"
    nodeport = "meta l4proto . th dport"
    chains: dict[str, tuple[str, ...]] = {
        MARK_MASQ: (f"meta mark set meta mark or {mark}",),
        "masquerading": (
            f"ct status dnat {ipx} saddr . {ipx} daddr @hairpin-endpoints jump {MARK_MASQ}",
            f"meta mark and {mark} == 0 return",
            f"meta mark set meta mark xor {mark}",
            "masquerade fully-random",
        ),
        "services": (
            f"{frontend} vmap @ip-policies",
            f"{frontend} vmap @service-ips",
            f"{np_dest} {nodeport} vmap @nodeport-policies",
            f"{np_dest} {nodeport} vmap @service-nodeports",
        ),
        MASQ_OFF_CLUSTER: (
            (f"jump {MARK_MASQ}",)
            if cfg.masquerade_all
            else ((f"{ipx} saddr != {cidr} jump {MARK_MASQ}",) if cidr else ())
        ),
        EXTERNAL_MASQ: (f"jump {MARK_MASQ}",),
        NODEPORT_MASQ: (f"jump {MARK_MASQ}",),
        # externalTrafficPolicy Local: pods and the node itself use the Cluster policy
        # (as if hairpinning through an outside load balancer), the node masqueraded.
        EXTERNAL_LOCAL: (
            *((f"{ipx} saddr {cidr} {frontend} vmap @external-fallback",) if cidr else ()),
            f"fib saddr type local jump {MARK_MASQ}",
            f"fib saddr type local {frontend} vmap @external-fallback",
        ),
        NODEPORT_LOCAL: (
            *((f"{ipx} saddr {cidr} {nodeport} vmap @nodeport-fallback",) if cidr else ()),
            f"fib saddr type local jump {MARK_MASQ}",
            f"fib saddr type local {nodeport} vmap @nodeport-fallback",
        ),
        REJECT_CHAIN: ("reject",),
        "endpoints-check": (
            f"{frontend} vmap @no-endpoint-services",
            f"{np_dest} {nodeport} vmap @no-endpoint-nodeports",
        ),
        # loadBalancerSourceRanges: checked before DNAT, on the LB IP.
        "firewall-check": (
            f"{frontend} @firewall-ips {frontend} . {ipx} saddr != @firewall-allow drop",
        ),
    }
    forward = ["ct state new jump endpoints-check"]
    if not cfg.conntrack_tcp_be_liberal:
        # INVALID packets would otherwise reach pods un-NATed and get RST (k/k#74839).
        forward.insert(0, "ct state invalid drop")
    base = {
        # name: (type, hook, priority, rules)
        "filter-prerouting": ("filter", "prerouting", "-110", (f"ct state new jump {FW_CHECK}",)),
        "filter-input": ("filter", "input", "-110", ("ct state new jump endpoints-check",)),
        "filter-forward": ("filter", "forward", "-110", tuple(forward)),
        "filter-output": ("filter", "output", "-110", ("ct state new jump firewall-check",)),
        # After nat-output: node-originated traffic that was DNATed is not checked.
        "filter-output-post-dnat": (
            "filter",
            "output",
            "-90",
            ("ct state new jump endpoints-check",),
        ),
        "nat-prerouting": ("nat", "prerouting", "-100", ("jump services",)),
        "nat-output": ("nat", "output", "-100", ("jump services",)),
        "nat-postrouting": ("nat", "postrouting", "100", ("jump masquerading",)),
    }
    decls = []
    base_rules = {}
    for name, (typ, hook, prio, rules) in base.items():
        decls.append(f"chain {name} {{\n\t\ttype {typ} hook {hook} priority {prio}; policy accept;")
        base_rules[name] = rules
    return decls, chains, base_rules  # type: ignore[return-value]


# -- state and results --------------------------------------------------------------------


@dataclass(frozen=True)
class RenderState:
    """What the kernel holds after a render was applied (opaque to callers)."""

    config: NftConfig | None = None
    contribs: Mapping[ServiceKey, _Contrib] = field(default_factory=lambda: _EMPTY)
    owners: Mapping[str, ServiceKey] = field(default_factory=lambda: _EMPTY)  # frontend →
    shadows: Mapping[str, frozenset[ServiceKey]] = field(default_factory=lambda: _EMPTY)
    hairpin: Mapping[str, int] = field(default_factory=lambda: _EMPTY)  # ip → Services
    nodeport_ips: tuple[str, ...] = ()
    pickers: frozenset[str] = frozenset()  # picker chains declared (see declared_pickers)
    chains: frozenset[str] = frozenset()  # per-Service chains in the kernel
    sets: frozenset[str] = frozenset()  # per-Service sets in the kernel
    elements: int = 0


@dataclass(frozen=True)
class RenderResult:
    text: str  # `nft -f` input: one transaction ("" when nothing changed)
    state: RenderState
    full: bool
    elements: int  # elements in the kernel after this transaction
    elements_written: int  # element adds and deletes in `text`
    chains: int  # chains in the table after this transaction


def render(
    model: Model,
    cfg: NftConfig,
    *,
    changed: frozenset[ServiceKey] | None = None,
    previous: RenderState | None = None,
) -> RenderResult:
    """Render one family. Full (the table recreated in one transaction) when `changed` or
    `previous` is None or the config changed the fixed chains; otherwise partial: element
    deletes and adds for the Services in `changed` (and any whose records differ from what
    `previous` holds), plus the affinity chains and sets that appear or go away. A partial
    that would need a picker chain the last full render did not declare is rendered full."""
    gc_was = gc.isenabled()
    gc.disable()  # many small objects, no cycles: the cyclic GC only costs time here
    try:
        return _render(model, cfg, changed, previous)
    finally:
        if gc_was:
            gc.enable()


def _same(c: _Contrib, svc: Service, eps: object) -> bool:
    return (c.svc is svc or c.svc == svc) and (c.eps is eps or c.eps == eps)


def _render(model, cfg, changed, previous) -> RenderResult:
    full = (
        changed is None
        or previous is None
        or previous.config is None
        or previous.config.chain_inputs() != cfg.chain_inputs()
    )
    planner = _Planner(cfg)
    if full:
        return _render_full(model, cfg, planner, previous)
    old = previous.contribs.copy()  # plain dicts: lookups on mappingproxy are slower
    services = model.services.copy()
    endpoints = model.endpoints.copy()
    # Which Services to look at: the changed ones, plus any whose records differ.
    touched: dict[ServiceKey, _Contrib | None] = {}
    for key in changed:
        svc = services.get(key)
        touched[key] = planner.plan(svc, endpoints.get(key)) if svc is not None else None
    for key in old.keys() - services.keys():
        touched.setdefault(key, None)
    for key, svc in services.items():
        if key in touched:
            continue
        c = old.get(key)
        eps = endpoints.get(key)
        if c is None or not _same(c, svc, eps):
            touched[key] = planner.plan(svc, eps)
    declared = previous.pickers
    if any(c is not None and not c.pickers <= declared for c in touched.values()):
        return _render_full(model, cfg, planner, previous)
    return _render_partial(cfg, previous, touched)


def _element_text(m: int, k: str, v: str) -> str:
    return f"{k} : {v}" if v else k


def _render_full(model, cfg, planner, previous) -> RenderResult:
    stream = FullStream(model, cfg, planner=planner, previous=previous)
    text = "".join(stream)
    return stream.result(text)


def _picker_bound(model: Model) -> list[str]:
    """Picker names covering every endpoint count the model can use: a port's usable
    endpoints are some of its raw ones, so the largest raw count bounds them all. (The
    table's head, with the pickers, is written before any Service is planned.)"""
    top = 0
    for eps in model.endpoints.values():
        for v in eps.ports.values():
            if len(v) > top:
                top = len(v)
    return [f"pick-{top}"] if top else []


class FullStream:
    """A full render, produced piece by piece: iterating yields nft input in parts of at
    most PART_ELEMENTS elements, each a sequence of whole commands (a transaction may end
    after any part), the first part the table itself. Services are planned as the parts
    are produced, so a consumer applying parts while later ones are planned overlaps the
    render with nft, and no whole transaction text is ever held. `result()` after the
    iteration: the state and counts."""

    def __init__(
        self,
        model: Model,
        cfg: NftConfig,
        *,
        planner: _Planner | None = None,
        previous: RenderState | None = None,
        part_elements: int = 0,
    ) -> None:
        self.part_elements = part_elements or PART_ELEMENTS
        self.model = model
        self.cfg = cfg
        self.planner = planner or _Planner(cfg)
        self.previous = previous
        self._state: RenderState | None = None
        self._chains = 0
        self.elements = 0

    def __iter__(self) -> Iterator[str]:
        gc_was = gc.isenabled()
        gc.disable()  # many small objects, no cycles: the cyclic GC only costs time here
        try:
            yield from self._parts()
        finally:
            if gc_was:
                gc.enable()

    def _parts(self) -> Iterator[str]:
        cfg, previous, planner = self.cfg, self.previous, self.planner
        old = previous.contribs if previous is not None and previous.config == cfg else _EMPTY
        services = self.model.services
        endpoints = self.model.endpoints
        fam = cfg.ipx
        t = f"{fam} {TABLE}"
        np_ips = cfg.nodeport_ips()
        decls, fixed_chains, base_rules = _fixed(cfg)
        pickers = declared_pickers(_picker_bound(self.model))
        declared = frozenset(pickers)
        lines = [
            f"add table {t}",
            f"delete table {t}",  # with the line above: recreate, atomically
            f"table {t} {{",
            '\tcomment "rules for kube-proxy-py"',
        ]
        for idx in range(len(MAP_NAMES)):
            if idx == NODEPORT_IPS and np_ips is None:
                continue
            lines.append("\t" + _map_decl(cfg, idx))
        all_chains = dict(fixed_chains)
        for p in pickers:
            all_chains[p] = picker_rules(cfg, p)
        for name, rules in all_chains.items():
            lines.append(f"\tchain {name} {{")
            lines.extend(f"\t\t{r}" for r in rules)
            lines.append("\t}")
        for decl, rules in zip(decls, base_rules.values(), strict=True):
            lines.append(f"\t{decl}")
            lines.extend(f"\t\t{r}" for r in rules)
            lines.append("\t}")
        lines.append("}")
        lines.append("")
        yield "\n".join(lines)

        contribs: dict[ServiceKey, _Contrib] = {}
        owners: dict[str, ServiceKey] = {}
        shadows: dict[str, set[ServiceKey]] = {}
        hairpin: dict[str, int] = {}
        chains: dict[str, tuple[str, ...]] = {}
        sets: dict[str, str] = {}
        per_map: list[list[str]] = [[] for _ in MAP_NAMES]  # element text
        own: list[str] = []  # affinity sets and chains, before the elements naming them
        pending = 0
        n_elements = 0
        for key in sorted(services):  # sorted: the first claimant owns a frontend
            svc = services[key]
            eps = endpoints.get(key)
            c = old.get(key)
            if c is None or not _same(c, svc, eps):
                c = planner.plan(svc, eps)
            if c is None:
                continue
            if not c.pickers <= declared:  # cannot happen: the bound covers every count
                raise AssertionError(f"picker outside the declared bound: {c.pickers}")
            contribs[key] = c
            for g, els in c.groups.items():
                if g in owners:
                    shadows.setdefault(g, set()).add(key)
                    continue
                owners[g] = key
                for el in els:
                    if isinstance(el, _Eps):
                        k = el.key
                        per_map[el.m] += [
                            f"{k} . {i} : {e.ip} . {e.port}" for i, e in enumerate(el.eps)
                        ]
                        pending += len(el.eps)
                    else:
                        per_map[el[0]].append(f"{el[1]} : {el[2]}" if el[2] else el[1])
                        pending += 1
            for ip in c.hairpin:
                hairpin[ip] = hairpin.get(ip, 0) + 1
            if c.chains:
                for name, body in c.sets.items():
                    if name not in sets:
                        own.append(f"add set {t} {name} {{ {body} }}")
                sets.update(c.sets)
                fresh = [n for n in c.chains if n not in chains]
                own.extend(f"add chain {t} {n}" for n in fresh)
                for n in fresh:
                    own.extend(f"add rule {t} {n} {r}" for r in c.chains[n])
                chains.update(c.chains)
            if pending >= self.part_elements:
                n_elements += pending
                yield _elements_part(t, own, per_map)
                pending = 0
        per_map[HAIRPIN] = [f"{ip} . {ip}" for ip in hairpin]
        per_map[NODEPORT_IPS] = list(np_ips or ())
        n_elements += pending + len(per_map[HAIRPIN]) + len(per_map[NODEPORT_IPS])
        if own or any(per_map):
            yield _elements_part(t, own, per_map)
        self.elements = n_elements
        self._chains = len(all_chains) + len(base_rules) + len(chains)
        self._state = RenderState(
            config=cfg,
            contribs=MappingProxyType(contribs),
            owners=MappingProxyType(owners),
            shadows=MappingProxyType({g: frozenset(v) for g, v in shadows.items()}),
            hairpin=MappingProxyType(hairpin),
            nodeport_ips=np_ips or (),
            pickers=declared,
            chains=frozenset(chains),
            sets=frozenset(sets),
            elements=n_elements,
        )

    def result(self, text: str = "") -> RenderResult:
        """The state once every part was produced (`text`: what the caller joined, if)."""
        if self._state is None:
            raise RuntimeError("FullStream.result() before the stream was consumed")
        return RenderResult(
            text=text,
            state=self._state,
            full=True,
            elements=self.elements,
            elements_written=self.elements,
            chains=self._chains,
        )


PART_ELEMENTS = 4000  # elements per part of a full stream (about 160 KB of text)


def _elements_part(t: str, own: list[str], per_map: list[list[str]]) -> str:
    """`own` declarations, then `add element` commands for `per_map`; empties both."""
    lines = own[:]
    own.clear()
    for m, els in enumerate(per_map):
        if els:
            head = f"add element {t} {MAP_NAMES[m]}"
            for i in range(0, len(els), _CHUNK):
                lines.append(f"{head} {{ {', '.join(els[i : i + _CHUNK])} }}")
            els.clear()
    lines.append("")
    return "\n".join(lines)


_CHUNK = 2000  # elements per `add element` command


def _chunked(lines: list[str], head: str, els: list[str]) -> None:
    for i in range(0, len(els), _CHUNK):
        lines.append(f"{head} {{ {', '.join(els[i : i + _CHUNK])} }}")


def _render_partial(cfg, previous: RenderState, touched) -> RenderResult:
    fam = cfg.ipx
    t = f"{fam} {TABLE}"
    old_contribs = previous.contribs
    contribs = old_contribs.copy()
    owners = previous.owners.copy()
    shadows = previous.shadows.copy()
    hair_delta: dict[str, int] = {}
    groups: set[str] = set()
    old_chains: dict[str, tuple[str, ...]] = {}
    new_chains: dict[str, tuple[str, ...]] = {}
    old_sets: set[str] = set()
    new_sets: dict[str, str] = {}
    for key, c in touched.items():
        prev = contribs.pop(key, None)
        if prev is not None:
            groups.update(prev.groups)
            old_chains.update(prev.chains)
            old_sets.update(prev.sets)
            for ip in prev.hairpin:
                hair_delta[ip] = hair_delta.get(ip, 0) - 1
        if c is not None:
            contribs[key] = c
            groups.update(c.groups)
            new_chains.update(c.chains)
            new_sets.update(c.sets)
            for ip in c.hairpin:
                hair_delta[ip] = hair_delta.get(ip, 0) + 1

    # Per frontend: who owns it now, and which elements leave and enter the kernel.
    gone: dict[tuple[int, str], str] = {}
    came: dict[tuple[int, str], str] = {}
    for g in groups:
        was = owners.get(g)
        claim = set(shadows.get(g, ()))
        if was is not None:
            claim.add(was)
        claim = {k for k in claim if k not in touched}
        claim.update(k for k in touched if (c := contribs.get(k)) is not None and g in c.groups)
        now = min(claim) if claim else None
        if now is None:
            owners.pop(g, None)
        else:
            owners[g] = now
        rest = claim - {now} if now is not None else set()
        if rest:
            shadows[g] = frozenset(rest)
        else:
            shadows.pop(g, None)
        if was == now and now not in touched:
            continue
        if was is not None:
            for m, k, v in _expand(old_contribs[was].groups[g]):
                gone[(m, k)] = v
        if now is not None:
            for m, k, v in _expand(contribs[now].groups[g]):
                came[(m, k)] = v

    hairpin = previous.hairpin.copy() if hair_delta else previous.hairpin
    for ip, d in hair_delta.items():
        if not d:
            continue
        n = hairpin.get(ip, 0) + d  # type: ignore[union-attr]
        mk = (HAIRPIN, f"{ip} . {ip}")
        if n > 0:
            hairpin[ip] = n  # type: ignore[index]
            if n == d:
                came[mk] = ""
        else:
            del hairpin[ip]  # type: ignore[attr-defined]
            gone[mk] = ""
    np_ips = cfg.nodeport_ips() or ()
    for ip in set(previous.nodeport_ips) - set(np_ips):
        gone[(NODEPORT_IPS, ip)] = ""
    for ip in set(np_ips) - set(previous.nodeport_ips):
        came[(NODEPORT_IPS, ip)] = ""

    dels = {mk: v for mk, v in gone.items() if came.get(mk) != v}
    adds = {mk: v for mk, v in came.items() if gone.get(mk) != v}

    kernel_chains = set(previous.chains)
    kernel_sets = set(previous.sets)
    # Own chains/sets of touched Services: rewrite those still wanted, drop the others.
    wanted_chains = set(new_chains)
    wanted_sets = set(new_sets)
    if old_chains or old_sets:
        for c in contribs.values():
            if c.chains:
                wanted_chains.update(c.chains)
                wanted_sets.update(c.sets)
    stale_chains = sorted((set(old_chains) & kernel_chains) - wanted_chains)
    stale_sets = sorted((old_sets & kernel_sets) - wanted_sets)

    lines: list[str] = []
    for name in sorted(set(new_sets) - kernel_sets):
        lines.append(f"add set {t} {name} {{ {new_sets[name]} }}")
    # Own chains: declare all first (they jump to each other), then fill them.
    for name in new_chains:
        lines.append(f"add chain {t} {name}")
    for name, rules in new_chains.items():
        lines.append(f"flush chain {t} {name}")
        lines.extend(f"add rule {t} {name} {r}" for r in rules)
    for m in range(len(MAP_NAMES)):
        _chunked(lines, f"delete element {t} {MAP_NAMES[m]}", [k for (mm, k) in dels if mm == m])
    for m in range(len(MAP_NAMES)):
        els = [_element_text(mm, k, v) for (mm, k), v in adds.items() if mm == m]
        _chunked(lines, f"add element {t} {MAP_NAMES[m]}", els)
    for name in stale_chains:
        lines.append(f"flush chain {t} {name}")
    for name in stale_chains:
        lines.append(f"delete chain {t} {name}")
    for name in stale_sets:
        lines.append(f"delete set {t} {name}")

    chains_now = (kernel_chains - set(stale_chains)) | set(new_chains)
    sets_now = (kernel_sets - set(stale_sets)) | set(new_sets)
    n_elements = previous.elements + len(adds) - len(dels)
    state = RenderState(
        config=cfg,
        contribs=MappingProxyType(contribs),
        owners=MappingProxyType(owners),
        shadows=MappingProxyType(shadows),
        hairpin=MappingProxyType(hairpin) if hairpin is not previous.hairpin else hairpin,
        nodeport_ips=np_ips,
        pickers=previous.pickers,
        chains=frozenset(chains_now),
        sets=frozenset(sets_now),
        elements=n_elements,
    )
    _, fixed_chains, base_rules = _fixed(cfg)
    return RenderResult(
        text="\n".join(lines) + "\n" if lines else "",
        state=state,
        full=False,
        elements=n_elements,
        elements_written=len(dels) + len(adds),
        chains=len(fixed_chains) + len(base_rules) + len(previous.pickers) + len(chains_now),
    )
