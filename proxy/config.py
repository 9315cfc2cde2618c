"""Command line and KubeProxyConfiguration → Config.

Flag names and meanings follow kube-proxy so a kube-proxy DaemonSet's arguments work
unchanged where they apply. Precedence: defaults < --config file < flags given.
Every user error raises `UsageError` with a one-line message that says what to do.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

MODES = ("iptables", "userspace", "none")


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


@dataclass
class Config:
    kubeconfig: str = ""
    master: str = ""
    manifests: str = ""
    proxy_mode: str = "iptables"
    hostname: str = field(default_factory=lambda: socket.gethostname().lower())
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


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the whole usage block)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_bool_flag(text: str) -> bool:
    """Go-style boolean flag values (`--flag`, `--flag=false`), as kube-proxy accepts."""
    v = text.strip().lower()
    if v in ("1", "t", "true"):
        return True
    if v in ("0", "f", "false"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true or false)")


def _build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="kube-proxy-py",
        description="Kubernetes Service data plane (iptables/userspace) with node-local DNS.",
    )
    a = p.add_argument
    a("--kubeconfig", help="kubeconfig file of the API server to watch (default: in-cluster)")
    a("--master", help="API server URL (overrides the kubeconfig's server)")
    a("--manifests", help="YAML file or directory of Services/EndpointSlices instead of an API")
    a("--proxy-mode", choices=MODES, help="iptables (default), userspace or none")
    a("--hostname-override", help="this node's name (default: the hostname)")
    a("--cluster-cidr", help="pod CIDR(s), comma separated; others are masqueraded")
    a("--masquerade-all", action="store_true", default=None, help="SNAT all Service traffic")
    a("--iptables-masquerade-bit", type=int, help="fwmark bit for masquerading (0-31; 14)")
    a("--nodeport-addresses", help="CIDRs of node addresses that accept NodePorts")
    a("--iptables-sync-period", help="resync period (default 30s; full syncs hourly)")
    a("--iptables-min-sync-period", help="minimum time between syncs (default 1s)")
    a("--healthz-bind-address", help="HOST:PORT for /healthz and /livez ('' disables)")
    a("--metrics-bind-address", help="HOST:PORT for /metrics ('' disables)")
    a("--config", help="KubeProxyConfiguration YAML; flags given override it")
    a("--cleanup", action="store_true", default=None, help="remove what this proxy made, exit")
    a("--dns-bind-address", help="HOST:PORT to serve cluster DNS on (default: off)")
    a("--cluster-domain", help="DNS zone (default cluster.local)")
    a("--dns-upstream", help="resolvers for other names, comma separated (default resolv.conf)")
    a("--dns-ttl", type=int, help="TTL of cluster answers in seconds (default 5)")
    a("--udp-timeout", help="userspace mode: idle timeout of a UDP session (default 250s)")
    a(
        "--userspace-laptop",
        choices=("auto", "on", "off"),
        help="userspace: serve Services on loopback addresses (auto: when not root)",
    )
    a(
        "--userspace-port-offset",
        type=int,
        help="userspace laptop mode: ports below 1024 are served at port+N (default 10000)",
    )
    a(
        "--userspace-engine",
        choices=("auto", "splice", "copy"),
        help="userspace TCP forwarding: copy, splice, or auto (splice once a stream is bulk)",
    )
    a(
        "--userspace-tcp-idle-timeout",
        help="userspace: close TCP connections idle this long (default 24h; 0: never)",
    )
    a(
        "--userspace-udp-max-sessions",
        type=int,
        help="userspace: UDP sessions per listener, least recently active evicted (4096)",
    )
    a(
        "--userspace-address-mode",
        choices=("auto", "interface", "local-route"),
        help="userspace: own Service IPs on an interface or as local routes (auto)",
    )
    a(
        "--userspace-endpoint-access",
        choices=("auto", "direct", "port-forward"),
        help="userspace: endpoints directly, through the API server's port-forward, or auto",
    )
    a(
        "--iptables-localhost-nodeports",
        nargs="?",
        const="true",
        type=_parse_bool_flag,
        help="NodePorts also answer on 127.0.0.1 (default true)",
    )
    a("--conntrack-max-per-core", type=int, help="conntrack entries per CPU (32768; 0: leave)")
    a("--conntrack-min", type=int, help="minimum conntrack table size (131072)")
    a("--conntrack-tcp-timeout-established", help="idle timeout of TCP flows (24h; 0: leave)")
    a("--conntrack-tcp-timeout-close-wait", help="CLOSE_WAIT timeout (1h; 0: leave)")
    a(
        "--conntrack-tcp-be-liberal",
        nargs="?",
        const="true",
        type=_parse_bool_flag,
        help="liberal TCP conntrack; INVALID packets are then not dropped (default false)",
    )
    a("--conntrack-udp-timeout", help="idle timeout of UDP flows (0: leave the kernel's)")
    a("--conntrack-udp-timeout-stream", help="timeout of UDP streams (0: leave the kernel's)")
    a(
        "--init-only",
        action="store_true",
        default=None,
        help="do the privileged node set-up (sysctls, conntrack) and exit",
    )
    a("--iptables-backend", choices=("auto", "legacy", "nft"), help="default: what the node uses")
    a("--ipv6", choices=("auto", "on", "off"), help="program IPv6 rules (default auto)")
    a("--v", "-v", dest="verbosity", type=int, help="log verbosity (0-4, as klog; 2=info)")
    a("--log-level", choices=("debug", "info", "warning", "error"))
    return p


def _from_kube_proxy_configuration(path: str) -> dict[str, Any]:
    """The subset of KubeProxyConfiguration that applies here → Config field values."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"--config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "KubeProxyConfiguration":
        raise UsageError(f"--config: {path} is not a KubeProxyConfiguration")
    out: dict[str, Any] = {}
    conn = doc.get("clientConnection") or {}
    ipt = doc.get("iptables") or {}
    if conn.get("kubeconfig"):
        out["kubeconfig"] = str(conn["kubeconfig"])
    if doc.get("mode"):
        mode = str(doc["mode"])
        if mode not in MODES:
            raise UsageError(f"--config: mode {mode!r} is not supported; use one of {MODES}")
        out["proxy_mode"] = mode
    if doc.get("hostnameOverride"):
        out["hostname"] = str(doc["hostnameOverride"]).lower()
    if doc.get("clusterCIDR"):
        out["cluster_cidrs"] = parse_cidrs(str(doc["clusterCIDR"]), "clusterCIDR")
    if "masqueradeAll" in ipt:
        out["masquerade_all"] = bool(ipt["masqueradeAll"])
    if ipt.get("masqueradeBit") is not None:
        out["masquerade_bit"] = int(ipt["masqueradeBit"])
    if ipt.get("syncPeriod"):
        out["sync_period"] = parse_duration(ipt["syncPeriod"], "iptables.syncPeriod")
    if ipt.get("minSyncPeriod") is not None:
        out["min_sync_period"] = parse_duration(ipt["minSyncPeriod"], "iptables.minSyncPeriod")
    if doc.get("nodePortAddresses"):
        out["nodeport_addresses"] = parse_cidrs(list(doc["nodePortAddresses"]), "nodePortAddresses")
    if "healthzBindAddress" in doc:
        out["healthz_bind"] = parse_hostport(
            str(doc["healthzBindAddress"] or ""), "healthzBindAddress", allow_empty=True
        )
    if "metricsBindAddress" in doc:
        out["metrics_bind"] = parse_hostport(
            str(doc["metricsBindAddress"] or ""), "metricsBindAddress", allow_empty=True
        )
    return out


def parse_args(argv: list[str] | None = None) -> Config:
    parser = _build_parser()
    ns = parser.parse_args(argv)  # on a bad flag argparse prints usage + one line, exits 2
    cfg = Config()
    if ns.config:
        for k, v in _from_kube_proxy_configuration(ns.config).items():
            setattr(cfg, k, v)
    if ns.kubeconfig is not None:
        cfg.kubeconfig = ns.kubeconfig
    if ns.master is not None:
        cfg.master = ns.master
    if ns.manifests is not None:
        cfg.manifests = ns.manifests
    if ns.proxy_mode is not None:
        cfg.proxy_mode = ns.proxy_mode
    if ns.hostname_override:
        cfg.hostname = ns.hostname_override.strip().lower()
    if ns.cluster_cidr is not None:
        cfg.cluster_cidrs = parse_cidrs(ns.cluster_cidr, "--cluster-cidr")
    if ns.masquerade_all is not None:
        cfg.masquerade_all = True
    if ns.iptables_masquerade_bit is not None:
        cfg.masquerade_bit = ns.iptables_masquerade_bit
    if ns.nodeport_addresses is not None:
        cfg.nodeport_addresses = parse_cidrs(ns.nodeport_addresses, "--nodeport-addresses")
    if ns.iptables_sync_period is not None:
        cfg.sync_period = parse_duration(ns.iptables_sync_period, "--iptables-sync-period")
    if ns.iptables_min_sync_period is not None:
        cfg.min_sync_period = parse_duration(
            ns.iptables_min_sync_period, "--iptables-min-sync-period"
        )
    if ns.healthz_bind_address is not None:
        cfg.healthz_bind = parse_hostport(
            ns.healthz_bind_address, "--healthz-bind-address", allow_empty=True
        )
    if ns.metrics_bind_address is not None:
        cfg.metrics_bind = parse_hostport(
            ns.metrics_bind_address, "--metrics-bind-address", allow_empty=True
        )
    if ns.cleanup:
        cfg.cleanup = True
    if ns.dns_bind_address is not None:
        cfg.dns_bind = parse_hostport(ns.dns_bind_address, "--dns-bind-address", allow_empty=True)
    if ns.cluster_domain is not None:
        cfg.cluster_domain = ns.cluster_domain.strip().strip(".").lower() or "cluster.local"
    if ns.dns_upstream is not None:
        ups = []
        for u in ns.dns_upstream.split(","):
            u = u.strip()
            if not u:
                continue
            if not u.startswith("[") and u.count(":") != 1:  # bare IPv4 or IPv6: port 53
                u = _default_dns_port(u)
            hp = parse_hostport(u, "--dns-upstream")
            assert hp is not None
            ups.append(f"{hp[0]}:{hp[1]}" if ":" not in hp[0] else f"[{hp[0]}]:{hp[1]}")
        cfg.dns_upstream = tuple(ups)
    if ns.dns_ttl is not None:
        if not 0 <= ns.dns_ttl <= 86400:
            raise UsageError("--dns-ttl: give seconds between 0 and 86400")
        cfg.dns_ttl = ns.dns_ttl
    if ns.udp_timeout is not None:
        cfg.udp_idle_timeout = parse_duration(ns.udp_timeout, "--udp-timeout")
    if ns.userspace_laptop is not None:
        cfg.userspace_laptop = ns.userspace_laptop
    if ns.userspace_port_offset is not None:
        if not 0 < ns.userspace_port_offset < 65535:
            raise UsageError("--userspace-port-offset: give a number between 1 and 65534")
        cfg.userspace_port_offset = ns.userspace_port_offset
    if ns.userspace_engine is not None:
        cfg.userspace_engine = ns.userspace_engine
    if ns.userspace_tcp_idle_timeout is not None:
        cfg.userspace_tcp_idle_timeout = parse_duration(
            ns.userspace_tcp_idle_timeout, "--userspace-tcp-idle-timeout"
        )
    if ns.userspace_udp_max_sessions is not None:
        if ns.userspace_udp_max_sessions < 1:
            raise UsageError("--userspace-udp-max-sessions: give a positive number")
        cfg.userspace_udp_max_sessions = ns.userspace_udp_max_sessions
    if ns.userspace_address_mode is not None:
        cfg.userspace_address_mode = ns.userspace_address_mode
    if ns.userspace_endpoint_access is not None:
        cfg.userspace_endpoint_access = ns.userspace_endpoint_access
    if ns.iptables_localhost_nodeports is not None:
        cfg.localhost_nodeports = ns.iptables_localhost_nodeports
    for name in ("conntrack_max_per_core", "conntrack_min"):
        value = getattr(ns, name)
        if value is not None:
            if value < 0:
                raise UsageError(f"--{name.replace('_', '-')}: must not be negative")
            setattr(cfg, name, value)
    for name in (
        "conntrack_tcp_timeout_established",
        "conntrack_tcp_timeout_close_wait",
        "conntrack_udp_timeout",
        "conntrack_udp_timeout_stream",
    ):
        value = getattr(ns, name)
        if value is not None:
            setattr(cfg, name, parse_duration(value, f"--{name.replace('_', '-')}"))
    if ns.conntrack_tcp_be_liberal is not None:
        cfg.conntrack_tcp_be_liberal = ns.conntrack_tcp_be_liberal
    if ns.init_only:
        cfg.init_only = True
    if ns.iptables_backend is not None:
        cfg.iptables_backend = ns.iptables_backend
    if ns.ipv6 is not None:
        cfg.ipv6 = ns.ipv6
    if ns.log_level:
        cfg.log_level = ns.log_level
    elif ns.verbosity is not None:
        cfg.log_level = "debug" if ns.verbosity >= 4 else "info"
    _validate(cfg)
    return cfg


def _default_dns_port(addr: str) -> str:
    return f"[{addr}]:53" if ":" in addr else f"{addr}:53"


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


def describe(cfg: Config) -> str:
    """One line with the effective settings, for the start-up log."""
    skip = {"kubeconfig", "master"}
    return " ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg) if f.name not in skip)
