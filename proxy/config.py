"""Command line and configuration file → Config, from one table.

Flag names and meanings follow kube-proxy so a kube-proxy DaemonSet's arguments work
unchanged where they apply. Precedence: defaults < --config file < flags given.
`SETTINGS` is the one place that lists each setting: its Config field, its flag, its
path in the file (a KubeProxyConfiguration, kubeproxy.config.k8s.io/v1alpha1, or this
proxy's own KubeProxyPyConfiguration document in the same file) and its type. The file
loader is proxy/configfile.py. Every user error raises `UsageError` with a one-line
message that says what to do.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MODES = ("iptables", "nftables", "userspace", "none")


class UsageError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


class PrivilegeError(UsageError):
    """Missing root/CAP_NET_ADMIN: unlike a missing binary, never "nothing to do"."""


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """Go-style duration ("30s", "1m30s", "500ms") or plain seconds → seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip()
    try:
        return float(s)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise UsageError(f"{what}: {text!r} is not a duration (examples: 30s, 1m, 500ms)")
    return total


def parse_hostport(text: str, what: str, *, allow_empty: bool = False) -> tuple[str, int] | None:
    """ "H:P", "[v6]:P" or ":P" → (host, port); empty → None when allowed."""
    s = text.strip()
    if not s:
        if allow_empty:
            return None
        raise UsageError(f"{what}: empty address; give HOST:PORT, e.g. 0.0.0.0:10256")
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:]*):(\d+)", s)
    if not m:
        raise UsageError(f"{what}: {text!r} is not HOST:PORT (e.g. 127.0.0.1:10249)")
    host = m.group(1) or m.group(3) or "0.0.0.0"
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise UsageError(f"{what}: port {port} out of range 0-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{what}: {host!r} is not an IP address") from None
    return host, port


def parse_cidrs(text: str | list[str], what: str) -> tuple[str, ...]:
    items = text if isinstance(text, list) else [t for t in str(text).split(",")]
    out = []
    for t in items:
        t = str(t).strip()
        if not t:
            continue
        try:
            out.append(str(ipaddress.ip_network(t, strict=False)))
        except ValueError:
            raise UsageError(f"{what}: {t!r} is not a CIDR (e.g. 10.244.0.0/16)") from None
    return tuple(out)


def parse_upstreams(text: str | list[str], what: str) -> tuple[str, ...]:
    """Resolvers "IP", "IP:PORT" or "[v6]:PORT" (port 53 when left out) → "H:P" strings."""
    items = text if isinstance(text, list) else str(text).split(",")
    ups = []
    for u in items:
        u = str(u).strip()
        if not u:
            continue
        if not u.startswith("[") and u.count(":") != 1:  # bare IPv4 or IPv6: port 53
            u = f"[{u}]:53" if ":" in u else f"{u}:53"
        hp = parse_hostport(u, what)
        assert hp is not None
        ups.append(f"{hp[0]}:{hp[1]}" if ":" not in hp[0] else f"[{hp[0]}]:{hp[1]}")
    return tuple(ups)


@dataclass
class Config:
    kubeconfig: str = ""
    master: str = ""
    manifests: str = ""
    proxy_mode: str = "iptables"
    hostname: str = field(default_factory=lambda: socket.gethostname().lower())
    bind_address: str = "0.0.0.0"  # kube-proxy's bindAddress: an IPv6 one means IPv6 too
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs; empty: all local addresses
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    healthz_bind: tuple[str, int] | None = ("0.0.0.0", 10256)
    metrics_bind: tuple[str, int] | None = ("127.0.0.1", 10249)
    cleanup: bool = False
    dns_bind: tuple[str, int] | None = None
    cluster_domain: str = "cluster.local"
    dns_upstream: tuple[str, ...] = ()  # empty: from /etc/resolv.conf
    dns_ttl: int = 5
    # own the DNS address on the node (+ NOTRACK rules in iptables mode): proxy/dns/nodelocal.py
    dns_node_local: bool = False
    # SIGTERM: stop accepting, let proxied connections finish for up to this long
    shutdown_grace_period: float = 25.0
    udp_idle_timeout: float = 250.0  # userspace: UDP session idle expiry (s)
    log_level: str = "info"
    # iptables backend: "auto" picks the one the node already uses (as kube-proxy does).
    iptables_backend: str = "auto"
    ipv6: str = "auto"  # "auto": program IPv6 when ip6tables works; "on"/"off"
    # userspace mode (proxy/userspace; see proxy/userspace/README.md)
    userspace_laptop: str = "auto"  # "auto": laptop mode when not root; "on"/"off"
    userspace_port_offset: int = 10000  # laptop: ports below the unprivileged start + this
    userspace_engine: str = "auto"  # TCP: auto (copy, splice once bulk) | splice | copy
    userspace_tcp_idle_timeout: float = 86400.0  # close TCP connections idle this long; 0: never
    userspace_udp_max_sessions: int = 4096  # per UDP listener; least recently active evicted
    userspace_address_mode: str = "auto"  # auto (interface, else routes) | interface | local-route
    # userspace: reach endpoints directly, through the API server's pods/portforward, or
    # probe which works (auto)
    userspace_endpoint_access: str = "auto"
    # NodePorts also answer on 127.0.0.1 (kube-proxy's --iptables-localhost-nodeports)
    localhost_nodeports: bool = True
    # kube-proxy's conntrack settings (KubeProxyConntrackConfiguration); 0 leaves the
    # kernel's value alone, as kube-proxy does
    conntrack_max_per_core: int = 32768
    conntrack_min: int = 131072
    conntrack_tcp_timeout_established: float = 86400.0
    conntrack_tcp_timeout_close_wait: float = 3600.0
    conntrack_tcp_be_liberal: bool = False
    conntrack_udp_timeout: float = 0.0
    conntrack_udp_timeout_stream: float = 0.0
    init_only: bool = False  # privileged node set-up (sysctls, conntrack), then exit

    @property
    def masquerade_mark(self) -> str:
        return f"{1 << self.masquerade_bit:#x}"


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    """How one type of setting is read from a flag (text) and from the file (YAML value)."""

    name: str  # for type errors: "a duration string such as 30s"
    yaml_types: tuple[type, ...]  # what the file may hold (bool is never an int here)
    convert: Callable[[Any, str], Any]  # (flag text or file value, what) → Config value
    choices: tuple[str, ...] | None = None
    boolean: bool = False

    def from_flag(self, text: Any, what: str) -> Any:
        return self.convert(text, what)

    def from_file(self, value: Any, what: str) -> Any:
        ok = isinstance(value, self.yaml_types) and not (
            isinstance(value, bool) and bool not in self.yaml_types
        )
        if not ok:
            got = type(value).__name__ if value is not None else "null"
            raise UsageError(f"{what}: expected {self.name}, got {got} {value!r}")
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"{what}: {value!r} is not one of {', '.join(self.choices)}")
        return self.convert(value, what)


def _str(v: Any, what: str) -> str:
    return str(v).strip()


def _bool(v: Any, what: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "t", "true"):
        return True
    if s in ("0", "f", "false"):
        return False
    raise UsageError(f"{what}: {v!r} is not a boolean (true or false)")


def _int(v: Any, what: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise UsageError(f"{what}: {v!r} is not a whole number") from None


def _choice(*choices: str) -> Kind:
    return Kind(f"one of {', '.join(choices)}", (str,), _str, choices)


STR = Kind("a string", (str,), _str)
HOSTNAME = Kind("a string", (str,), lambda v, w: str(v).strip().lower())
BOOL = Kind("true or false", (bool,), _bool, boolean=True)
INT = Kind("a whole number", (int,), _int)
DURATION = Kind('a duration string such as "30s"', (str,), lambda v, w: parse_duration(v, w))
HOSTPORT = Kind(
    'an address such as "0.0.0.0:10256"',
    (str,),
    lambda v, w: parse_hostport(str(v), w, allow_empty=True),
)
CIDRS = Kind('CIDRs such as "10.244.0.0/16"', (str, list), lambda v, w: parse_cidrs(v, w))
UPSTREAMS = Kind("a list of resolver addresses", (str, list), lambda v, w: parse_upstreams(v, w))


def _ip(v: Any, what: str) -> str:
    try:
        return str(ipaddress.ip_address(str(v).strip()))
    except ValueError:
        raise UsageError(f"{what}: {v!r} is not an IP address") from None


IP = Kind("an IP address", (str,), _ip)


def _verbosity(v: Any, what: str) -> str:
    return "debug" if _int(v, what) >= 4 else "info"


VERBOSITY = Kind("a whole number", (int,), _verbosity)

KUBE = "KubeProxyConfiguration"  # kubeproxy.config.k8s.io/v1alpha1
OWN = "KubeProxyPyConfiguration"  # this proxy's settings (OWN_API_VERSION), same file
OWN_API_VERSION = "config.kube-proxy-py.io/v1alpha1"


@dataclass(frozen=True, slots=True)
class Setting:
    field: str  # Config attribute
    kind: Kind
    flag: str | None = None  # command-line flag
    path: str | None = None  # dotted path in the KubeProxyConfiguration document
    own: str | None = None  # dotted path in the KubeProxyPyConfiguration document
    help: str = ""
    # kube-proxy's defaulting: "" / 0s / 0 in its file mean "use the default" (kubeadm
    # writes every field that way). Pointer fields (null = default) set this False.
    zero_is_default: bool = True
    nft_path: str | None = None  # the nftables.* twin, used in nftables mode


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("kubeconfig", STR, "--kubeconfig", "clientConnection.kubeconfig",
      help="kubeconfig file of the API server to watch (default: in-cluster)"),
    S("master", STR, "--master", help="API server URL (overrides the kubeconfig's server)"),
    S("manifests", STR, "--manifests", own="manifests",
      help="YAML file or directory of Services/EndpointSlices instead of an API"),
    S("proxy_mode", _choice(*MODES), "--proxy-mode", "mode",
      help="iptables (default), nftables, userspace or none"),
    S("hostname", HOSTNAME, "--hostname-override", "hostnameOverride",
      help="this node's name (default: the hostname)"),
    S("bind_address", IP, "--bind-address", "bindAddress",
      help="the node's IP (as kube-proxy: an IPv6 address turns IPv6 rules on)"),
    S("cluster_cidrs", CIDRS, "--cluster-cidr", "clusterCIDR",
      help="pod CIDR(s), comma separated; others are masqueraded"),
    S("masquerade_all", BOOL, "--masquerade-all", "iptables.masqueradeAll",
      help="SNAT all Service traffic", nft_path="nftables.masqueradeAll"),
    S("masquerade_bit", INT, "--iptables-masquerade-bit", "iptables.masqueradeBit",
      help="fwmark bit for masquerading (0-31; 14)", zero_is_default=False,
      nft_path="nftables.masqueradeBit"),
    S("nodeport_addresses", CIDRS, "--nodeport-addresses", "nodePortAddresses",
      help="CIDRs of node addresses that accept NodePorts"),
    S("sync_period", DURATION, "--iptables-sync-period", "iptables.syncPeriod",
      help="resync period (default 30s; full syncs hourly)", nft_path="nftables.syncPeriod"),
    S("min_sync_period", DURATION, "--iptables-min-sync-period", "iptables.minSyncPeriod",
      help="minimum time between syncs (default 1s)", nft_path="nftables.minSyncPeriod"),
    S("healthz_bind", HOSTPORT, "--healthz-bind-address", "healthzBindAddress",
      help="HOST:PORT for /healthz and /livez ('' disables)"),
    S("metrics_bind", HOSTPORT, "--metrics-bind-address", "metricsBindAddress",
      help="HOST:PORT for /metrics ('' disables)"),
    S("cleanup", BOOL, "--cleanup", help="remove what this proxy made, exit"),
    S("localhost_nodeports", BOOL, "--iptables-localhost-nodeports",
      "iptables.localhostNodePorts", help="NodePorts also answer on 127.0.0.1 (default true)",
      zero_is_default=False),
    S("conntrack_max_per_core", INT, "--conntrack-max-per-core", "conntrack.maxPerCore",
      help="conntrack entries per CPU (32768; 0: leave)", zero_is_default=False),
    S("conntrack_min", INT, "--conntrack-min", "conntrack.min",
      help="minimum conntrack table size (131072)", zero_is_default=False),
    S("conntrack_tcp_timeout_established", DURATION, "--conntrack-tcp-timeout-established",
      "conntrack.tcpEstablishedTimeout", help="idle timeout of TCP flows (24h; 0: leave)",
      zero_is_default=False),
    S("conntrack_tcp_timeout_close_wait", DURATION, "--conntrack-tcp-timeout-close-wait",
      "conntrack.tcpCloseWaitTimeout", help="CLOSE_WAIT timeout (1h; 0: leave)",
      zero_is_default=False),
    S("conntrack_tcp_be_liberal", BOOL, "--conntrack-tcp-be-liberal", "conntrack.tcpBeLiberal",
      help="liberal TCP conntrack; INVALID packets are then not dropped (default false)"),
    S("conntrack_udp_timeout", DURATION, "--conntrack-udp-timeout", "conntrack.udpTimeout",
      help="idle timeout of UDP flows (0: leave the kernel's)"),
    S("conntrack_udp_timeout_stream", DURATION, "--conntrack-udp-timeout-stream",
      "conntrack.udpStreamTimeout", help="timeout of UDP streams (0: leave the kernel's)"),
    S("init_only", BOOL, "--init-only",
      help="do the privileged node set-up (sysctls, conntrack) and exit"),
    S("log_level", VERBOSITY, "--v", "logging.verbosity",
      help="log verbosity (0-4, as klog; 4 and up: debug)"),
    S("log_level", _choice("debug", "info", "warning", "error"), "--log-level", own="logLevel",
      help="log level (overrides --v)"),
    # -- this proxy's own settings (KubeProxyPyConfiguration) --
    S("dns_bind", HOSTPORT, "--dns-bind-address", own="dns.bindAddress",
      help="HOST:PORT to serve cluster DNS on (default: off)"),
    S("cluster_domain", STR, "--cluster-domain", own="dns.clusterDomain",
      help="DNS zone (default cluster.local)"),
    S("dns_upstream", UPSTREAMS, "--dns-upstream", own="dns.upstreams",
      help="resolvers for other names, comma separated (default resolv.conf)"),
    S("dns_ttl", INT, "--dns-ttl", own="dns.ttl", help="TTL of cluster answers in seconds (5)"),
    S("dns_node_local", BOOL, "--dns-node-local", own="dns.nodeLocal",
      help="own the DNS address on the node, like NodeLocal DNSCache (+ NOTRACK rules)"),
    S("shutdown_grace_period", DURATION, "--shutdown-grace-period",
      own="shutdownGracePeriod",
      help="on SIGTERM, let proxied connections finish for up to this long (default 25s)"),
    S("udp_idle_timeout", DURATION, "--udp-timeout", own="userspace.udpIdleTimeout",
      help="userspace mode: idle timeout of a UDP session (default 250s)"),
    S("userspace_laptop", _choice("auto", "on", "off"), "--userspace-laptop",
      own="userspace.laptop", help="userspace: serve Services on loopback addresses (auto: "
      "when not root)"),
    S("userspace_port_offset", INT, "--userspace-port-offset", own="userspace.portOffset",
      help="userspace laptop mode: ports below 1024 are served at port+N (default 10000)"),
    S("userspace_engine", _choice("auto", "splice", "copy"), "--userspace-engine",
      own="userspace.engine",
      help="userspace TCP forwarding: copy, splice, or auto (splice once a stream is bulk)"),
    S("userspace_tcp_idle_timeout", DURATION, "--userspace-tcp-idle-timeout",
      own="userspace.tcpIdleTimeout",
      help="userspace: close TCP connections idle this long (default 24h; 0: never)"),
    S("userspace_udp_max_sessions", INT, "--userspace-udp-max-sessions",
      own="userspace.udpMaxSessions",
      help="userspace: UDP sessions per listener, least recently active evicted (4096)"),
    S("userspace_address_mode", _choice("auto", "interface", "local-route"),
      "--userspace-address-mode", own="userspace.addressMode",
      help="userspace: own Service IPs on an interface or as local routes (auto)"),
    S("userspace_endpoint_access", _choice("auto", "direct", "port-forward"),
      "--userspace-endpoint-access", own="userspace.endpointAccess",
      help="userspace: endpoints directly, through the API server's port-forward, or auto"),
    S("iptables_backend", _choice("auto", "legacy", "nft"), "--iptables-backend",
      own="iptables.backend", help="default: what the node uses"),
    S("ipv6", _choice("auto", "on", "off"), "--ipv6", own="ipv6",
      help="program IPv6 rules (default auto)"),
)  # fmt: skip
del S

# kube-proxy fields that do not apply to this proxy: read without a warning, ignored.
# A section listed here is opaque (its keys are not checked).
KUBE_IGNORED = (
    "clientConnection.acceptContentTypes",
    "clientConnection.burst",
    "clientConnection.contentType",
    "clientConnection.qps",
    "bindAddressHardFail",  # bind failures are always fatal here
    "configSyncPeriod",
    "detectLocal",
    "detectLocalMode",
    "enableProfiling",
    "featureGates",
    "ipvs",
    "logging",  # logging.verbosity is read (SETTINGS)
    "nftables",  # nftables.* is read in nftables mode (Setting.nft_path)
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "udpIdleTimeout",
    "winkernel",
    "windowsRunAsService",
)


# -- flags ------------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the whole usage block)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="kube-proxy-py",
        description="Kubernetes Service data plane (iptables/nftables/userspace), node-local DNS.",
    )
    p.add_argument("--config", help="a KubeProxyConfiguration file; flags given override it")
    for s in SETTINGS:
        if s.flag is None:
            continue
        names = [s.flag, "-v"] if s.flag == "--v" else [s.flag]
        dest = f"{s.field}{s.flag}"  # two flags may set one field (--v, --log-level)
        kw: dict[str, Any] = {"dest": dest, "help": s.help, "default": None}
        if s.kind.boolean:  # Go-style: --flag, --flag=true, --flag=false
            kw.update(nargs="?", const=True, metavar="BOOL")
        elif s.kind.choices is not None:
            kw["choices"] = s.kind.choices
        else:
            kw["metavar"] = s.flag.lstrip("-").split("-")[-1].upper()
        p.add_argument(*names, **kw)
    return p


def parse_args(argv: list[str] | None = None) -> Config:
    from proxy.configfile import load_file  # the file format lives there

    ns = vars(_build_parser().parse_args(argv))  # a bad flag: one line, exit 2
    given: dict[str, Any] = {}  # field → value, in table order (--log-level after --v)
    for s in SETTINGS:
        if s.flag is not None and (v := ns[f"{s.field}{s.flag}"]) is not None:
            given[s.field] = v if v is True else s.kind.from_flag(v, s.flag)
    cfg = Config()
    if ns["config"]:
        for name, value in load_file(ns["config"], mode=given.get("proxy_mode")).items():
            setattr(cfg, name, value)
    for name, value in given.items():
        setattr(cfg, name, value)
    _normalise(cfg)
    _validate(cfg)
    return cfg


def _normalise(cfg: Config) -> None:
    if not cfg.hostname:  # --hostname-override='' or hostnameOverride: "": the hostname
        cfg.hostname = socket.gethostname().lower()
    cfg.cluster_domain = cfg.cluster_domain.strip(".").lower() or "cluster.local"
    if cfg.ipv6 == "auto" and ipaddress.ip_address(cfg.bind_address).version == 6:
        cfg.ipv6 = "on"  # kube-proxy: an IPv6 bindAddress makes IPv6 the primary family


def _validate(cfg: Config) -> None:
    if not 0 <= cfg.masquerade_bit <= 31:
        raise UsageError("--iptables-masquerade-bit: must be between 0 and 31")
    if cfg.sync_period <= 0:
        raise UsageError("--iptables-sync-period: must be greater than 0")
    if cfg.min_sync_period < 0:
        raise UsageError("--iptables-min-sync-period: must not be negative")
    if cfg.min_sync_period > cfg.sync_period:
        raise UsageError("--iptables-min-sync-period must not exceed --iptables-sync-period")
    if cfg.manifests and (cfg.kubeconfig or cfg.master):
        raise UsageError("--manifests and --kubeconfig/--master are exclusive; pick one source")
    if cfg.manifests and not Path(cfg.manifests).exists():
        raise UsageError(f"--manifests: {cfg.manifests} does not exist")
    if not cfg.hostname or len(cfg.hostname) > 253:
        raise UsageError("--hostname-override: give this node's name")
    if cfg.dns_node_local and cfg.dns_bind is None:
        raise UsageError("--dns-node-local needs --dns-bind-address, e.g. 169.254.20.10:53")
    if not 0 <= cfg.dns_ttl <= 86400:
        raise UsageError("--dns-ttl: give seconds between 0 and 86400")
    if not 0 < cfg.userspace_port_offset < 65535:
        raise UsageError("--userspace-port-offset: give a number between 1 and 65534")
    if cfg.userspace_udp_max_sessions < 1:
        raise UsageError("--userspace-udp-max-sessions: give a positive number")
    for name in ("conntrack_max_per_core", "conntrack_min"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')}: must not be negative")


def describe(cfg: Config) -> str:
    """One line with the effective settings, for the start-up log."""
    skip = {"kubeconfig", "master"}
    return " ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg) if f.name not in skip)
