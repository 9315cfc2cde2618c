"""The node's privileged set-up, as kube-proxy does it before its proxier starts:
conntrack sysctls (KubeProxyConntrackConfiguration) and, for localhost NodePorts in the
iptables mode, `route_localnet`.

`plan()` is pure: the settings and what the kernel holds now → the writes needed, each
with whether it may fail. `apply()` does them. Like kube-proxy, a value already right is
not written again, so a container that lost the privilege after `--init-only` did the
work starts cleanly (see `run_init_only`).

Everything here is per network namespace except two things: `nf_conntrack_max`, which
the kernel makes read-only outside the host's namespace, and the conntrack `hashsize`,
a module parameter of the whole host. Those are best effort: a node namespace (a pod
without hostNetwork, this project's virtual nodes) gets one log line saying the host's
value applies, and `hashsize` is only ever written from the host's network namespace.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import Config, UsageError

log = logging.getLogger("proxy.node")

NETFILTER = "/proc/sys/net/netfilter/"
CONNTRACK_MAX = NETFILTER + "nf_conntrack_max"
HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"
ROUTE_LOCALNET = "/proc/sys/net/ipv4/conf/all/route_localnet"


@dataclass(frozen=True, slots=True)
class Write:
    path: str
    value: int
    # Best effort: the kernel may refuse it here (read-only in a node namespace).
    optional: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def conntrack_max(max_per_core: int, minimum: int, ncpu: int) -> int:
    """kube-proxy's getConntrackMax: per-core times CPUs, at least `minimum` (no upper
    cap); 0 (leave the kernel's value) when max-per-core is 0."""
    if max_per_core <= 0:
        return 0
    return max(max_per_core * ncpu, minimum)


def localhost_nodeports_by_nat(cfg: Config) -> bool:
    """Whether the iptables mode serves NodePorts on 127.0.0.1 by kernel NAT, which needs
    route_localnet: the flag, and --nodeport-addresses covering IPv4 loopback (all
    addresses do; `primary` does not)."""
    if cfg.proxy_mode != "iptables" or not cfg.localhost_nodeports or cfg.nodeport_primary:
        return False
    import ipaddress

    nets = [ipaddress.ip_network(c) for c in cfg.nodeport_addresses if ":" not in c]
    loopback = ipaddress.ip_address("127.0.0.1")
    return not nets or any(n.prefixlen == 0 or loopback in n for n in nets)


def plan(
    cfg: Config, ncpu: int, current: Callable[[str], int | None], *, host_netns: bool
) -> tuple[list[Write], list[str]]:
    """The writes `cfg` needs given what the kernel holds (`current(path)`, None when it
    cannot be read), and notes to log about what is left alone. Pure."""
    writes: list[Write] = []
    notes: list[str] = []

    def want(path: str, value: int, *, optional: bool = False) -> None:
        if current(path) != value:
            writes.append(Write(path, value, optional))

    limit = conntrack_max(cfg.conntrack_max_per_core, cfg.conntrack_min, ncpu)
    if limit > 0:
        # Written whenever it differs, lowered too, as kube-proxy's SetMax does.
        if current(CONNTRACK_MAX) != limit:
            writes.append(Write(CONNTRACK_MAX, limit, optional=True))
        hashsize = current(HASHSIZE)
        if hashsize is not None and hashsize < limit // 4:
            if host_netns:
                writes.append(Write(HASHSIZE, limit // 4, optional=True))
            else:
                notes.append(
                    f"conntrack hashsize {hashsize} is below {limit // 4} (nf_conntrack_max "
                    f"{limit} / 4) but is a host-wide setting: not changed from a node "
                    "network namespace"
                )
    for seconds, name in (
        (cfg.conntrack_tcp_timeout_established, "nf_conntrack_tcp_timeout_established"),
        (cfg.conntrack_tcp_timeout_close_wait, "nf_conntrack_tcp_timeout_close_wait"),
        (cfg.conntrack_udp_timeout, "nf_conntrack_udp_timeout"),
        (cfg.conntrack_udp_timeout_stream, "nf_conntrack_udp_timeout_stream"),
    ):
        if seconds > 0:  # 0 leaves the kernel's value, as kube-proxy
            want(NETFILTER + name, int(seconds))
    if cfg.conntrack_tcp_be_liberal:  # false never writes 0: someone else may want it
        want(NETFILTER + "nf_conntrack_tcp_be_liberal", 1)
    return writes, notes


def localnet_plan(cfg: Config, current: Callable[[str], int | None]) -> list[Write]:
    """route_localnet=1, which NAT of NodePorts on 127.0.0.0/8 needs (the iptables mode
    sets it as it starts, as kube-proxy's proxier does; --init-only sets it too)."""
    if localhost_nodeports_by_nat(cfg) and current(ROUTE_LOCALNET) != 1:
        return [Write(ROUTE_LOCALNET, 1)]
    return []


def read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def in_host_netns() -> bool:
    """True in the host's network namespace (the one PID 1 is in); False when it is
    another one or cannot be told (then host-wide settings are left alone)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def ncpu() -> int:
    """CPUs of the node (conntrack's table is node-wide, as kube-proxy's cpuset.NumCPU)."""
    try:
        with open("/sys/devices/system/cpu/online", encoding="ascii") as f:
            n = 0
            for part in f.read().strip().split(","):
                lo, _, hi = part.partition("-")
                n += int(hi or lo) - int(lo) + 1
            if n > 0:
                return n
    except (OSError, ValueError):
        pass
    return os.cpu_count() or 1


def apply(writes: list[Write]) -> None:
    """Do the writes; a required one that fails raises UsageError saying what to do."""
    for w in writes:
        try:
            with open(w.path, "w", encoding="ascii") as f:
                f.write(f"{w.value}\n")
            log.info("set %s to %d", w.name, w.value)
        except OSError as e:
            why = e.strerror or str(e)
            if w.optional:
                log.warning(
                    "cannot set %s to %d here (%s): the host's value (%s) applies; set it "
                    "on the host to change it",
                    w.name,
                    w.value,
                    why,
                    read_int(w.path),
                )
                continue
            raise UsageError(
                f"cannot set {w.path} to {w.value} ({why}): run with write access to "
                "/proc/sys (root, privileged), or run `kube-proxy-py --init-only` in a "
                "privileged init container first"
            ) from None


def sets_up_node(cfg: Config) -> bool:
    """Whether this run owns the node's conntrack settings: the modes that proxy on a node
    (the userspace mode too, unless it is on a laptop); not --proxy-mode=none."""
    if cfg.proxy_mode in ("iptables", "nftables"):
        return True
    if cfg.proxy_mode != "userspace" or cfg.userspace_laptop == "on":
        return False
    return cfg.userspace_laptop == "off" or os.geteuid() == 0


def setup_conntrack(cfg: Config) -> None:
    """kube-proxy's conntrack set-up (see the module docstring); raises UsageError."""
    writes, notes = plan(cfg, ncpu(), read_int, host_netns=in_host_netns())
    for n in notes:
        log.info("%s", n)
    apply(writes)


def setup_route_localnet(cfg: Config) -> None:
    """route_localnet for localhost NodePorts by NAT (kube-proxy logs why, and how to
    turn it off); raises UsageError."""
    writes = localnet_plan(cfg, read_int)
    if writes:
        log.info(
            "setting route_localnet=1 for NodePorts on localhost; to change this, disable "
            "--iptables-localhost-nodeports or leave loopback out of --nodeport-addresses"
        )
    apply(writes)


def init_only(cfg: Config) -> int:
    """--init-only: the privileged set-up a long-running container without write access
    to /proc/sys relies on, then exit 0 (kube-proxy's init-only)."""
    if sets_up_node(cfg):
        setup_conntrack(cfg)
    setup_route_localnet(cfg)
    log.info("node set up (--init-only): conntrack settings and route_localnet applied")
    return 0
