"""Testbed: virtual nodes, Calico-style pods and outside hosts in network namespaces.

Layout (every box is a namespace named "<prefix>-<name>"):

    pod ns: eth0 ip/32 ──veth── caliXXXX (proxy_arp) in node ns ── eth0 underlay_ip/24
                                                                      │ veth
    outside ns: eth0 ip/24 ──veth──────────────────── br0 in "<prefix>-net" (hidden)

Nodes route each other's pod CIDRs via their underlay IPs. No namespace has a default
route out of the machine, and nothing is created in the host namespace: every veth is
created inside a testbed namespace with its peer placed directly in another one.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import cleanup, netns
from .hosts import Host, Node

log = logging.getLogger("proxy.testbed")

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_PREFIX_RE = re.compile(r"kpt[a-z0-9-]*")

POD_GATEWAY = "169.254.1.1"
POD_GATEWAY6 = "fe80::1"


# Service ranges of the testbed (benchmarking ranges, as DESIGN.md asks).
SERVICE_CIDR = "198.19.0.0/16"
SERVICE_CIDR_V6 = "fd00:19::/108"


class Testbed:
    """Namespaces for one test; all of them (and tracked processes) go on close()."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        prefix: str | None = None,
        *,
        underlay: str = "198.18.200.0/24",
        underlay6: str = "fd00:200::/64",
        workdir: str | Path | None = None,
    ):
        if os.geteuid() != 0:
            raise PermissionError("the testbed needs root (it creates network namespaces)")
        random_prefix = prefix is None
        if prefix is None:
            prefix = f"kpt{secrets.token_hex(3)}"
        if not _PREFIX_RE.fullmatch(prefix) or len(prefix) > 40:
            raise ValueError(f"testbed prefix {prefix!r} must match kpt[a-z0-9-]* (≤40 chars)")
        self.prefix = prefix
        self.underlay = ipaddress.ip_network(underlay)
        self.underlay6 = ipaddress.ip_network(underlay6)
        self.nodes: dict[str, Node] = {}
        self.hosts: dict[str, Host] = {}  # every host including nodes, by name
        self._namespaces: list[str] = []  # creation order; removed in reverse
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.RLock()
        self._closed = False
        self._closing = False
        self._owner_pid = os.getpid()
        self._ports = 0
        self._claimed = False
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{prefix}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.net_ns = f"{prefix}-net"
        _register(self)
        try:
            while not cleanup.claim(self.prefix):
                if not random_prefix:
                    raise RuntimeError(f"testbed prefix {prefix!r} is in use by a running process")
                self.prefix = f"kpt{secrets.token_hex(3)}"  # a rare clash with a live run
                self.net_ns = f"{self.prefix}-net"
            self._claimed = True
            # A dead run's leftovers with this prefix (not those of a longer live prefix).
            mine = [n for n in netns.list_names() if n.startswith(self.prefix + "-")]
            if stale := [n for n in mine if cleanup.owner_prefix(n) == self.prefix]:
                log.warning("testbed: removing leftovers of a dead %s run: %s", self.prefix, stale)
                for n in stale:
                    cleanup.remove_namespace(n)
            self._add_ns(self.net_ns)
            netns.ip_batch(
                self.net_ns,
                [
                    "link set lo up",
                    "link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
                    "link set br0 up",
                ],
            )
            log.info("testbed %s: underlay bridge in netns %s", self.prefix, self.net_ns)
        except BaseException:
            self.close()
            raise

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Testbed {self.prefix} nodes={list(self.nodes)} hosts={len(self.hosts)}>"

    # -- building -----------------------------------------------------------------------------

    def ns_name(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _check_name(self, name: str) -> None:
        if not _NAME_RE.fullmatch(name) or name == "net":
            raise ValueError(f"host name {name!r}: use [a-z0-9-], not 'net'")
        if name in self.hosts:
            raise ValueError(f"host name {name!r} is already used in this testbed")
        if self._closed:
            raise RuntimeError("testbed is closed")

    def _add_ns(self, ns: str) -> None:
        with self._lock:
            self._namespaces.append(ns)  # recorded first: a failed add is still cleaned up
        netns.add(ns)

    def _underlay_addr(self, ip: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
        addr = ipaddress.ip_address(ip)
        if addr not in net or addr in (net.network_address, net.broadcast_address):
            raise ValueError(f"underlay address {ip} is not a host address of {net}")
        return f"{addr}/{net.prefixlen}"

    def _attach_underlay(self, host: Host, ip: str, ipv6: str | None) -> None:
        """eth0 in HOST, its peer enslaved to br0 in the hidden underlay namespace."""
        self._ports += 1
        port = f"u{self._ports}-{host.name}"[:15]
        cmds = [
            f"link add eth0 type veth peer name {port} netns {self.net_ns}",
            "link set lo up",
            f"address add {self._underlay_addr(ip, self.underlay)} dev eth0",
        ]
        if ipv6:
            cmds.append(f"address add {self._underlay_addr(ipv6, self.underlay6)} dev eth0 nodad")
        cmds.append("link set eth0 up")
        netns.ip_batch(host.ns, cmds)
        netns.ip_batch(self.net_ns, [f"link set {port} master br0", f"link set {port} up"])

    def add_node(
        self,
        name: str,
        *,
        underlay_ip: str,
        pod_cidr: str,
        underlay_ipv6: str | None = None,
        pod_cidr_v6: str | None = None,
    ) -> Node:
        """A node namespace on the underlay, routing to every other node's pod CIDR(s)."""
        self._check_name(name)
        cidr = str(ipaddress.ip_network(pod_cidr))
        cidr6 = str(ipaddress.ip_network(pod_cidr_v6)) if pod_cidr_v6 else None
        ns = self.ns_name(name)
        node = Node(self, name, ns, underlay_ip, cidr, ipv6=underlay_ipv6, pod_cidr_v6=cidr6)
        self._add_ns(node.ns)
        self.hosts[name] = node
        netns.sysctl(
            node.ns,
            {
                "net.ipv4.ip_forward": 1,
                "net.ipv6.conf.all.forwarding": 1,
                "net.ipv4.conf.all.rp_filter": 2,
                "net.ipv4.conf.default.rp_filter": 2,
                "net.ipv6.conf.all.accept_dad": 0,
                "net.ipv6.conf.default.accept_dad": 0,
            },
        )
        self._attach_underlay(node, underlay_ip, underlay_ipv6)
        # Proxy ARP answers only for targets routed out of another interface; with no
        # default route (Calico relies on it), give the gateway address such a route.
        netns.ip(node.ns, "route", "add", f"{POD_GATEWAY}/32", "dev", "eth0", "scope", "link")
        # A real node routes Service IPs somewhere (its default route), so traffic that is
        # not DNATed reaches the FORWARD/OUTPUT hooks (e.g. REJECT for a Service without
        # endpoints) instead of failing at routing. Here: onto the underlay, which leads
        # nowhere outside the testbed.
        netns.ip(node.ns, "route", "add", SERVICE_CIDR, "dev", "eth0", "scope", "link")
        if underlay_ipv6:
            netns.ip(node.ns, "-6", "route", "add", SERVICE_CIDR_V6, "dev", "eth0")
        for other in self.nodes.values():
            node.route(other.pod_cidr, via=other.ip)
            other.route(node.pod_cidr, via=node.ip)
            if cidr6 and other.pod_cidr_v6 and node.ipv6 and other.ipv6:
                node.route(other.pod_cidr_v6, via=other.ipv6)
                other.route(cidr6, via=node.ipv6)
        self.nodes[name] = node
        log.info("testbed: node %s netns %s ip %s pods %s", name, node.ns, underlay_ip, cidr)
        return node

    def add_pod(self, node: Node, name: str, ip: str, *, ipv6: str | None = None) -> Host:
        """A Calico-style pod: eth0 ip/32, default via 169.254.1.1 (v6: fe80::1) onlink."""
        self._check_name(name)
        if ipaddress.ip_address(ip) not in ipaddress.ip_network(node.pod_cidr):
            raise ValueError(f"pod {name}: {ip} is outside node {node.name}'s {node.pod_cidr}")
        if (
            ipv6
            and node.pod_cidr_v6
            and ipaddress.ip_address(ipv6) not in ipaddress.ip_network(node.pod_cidr_v6)
        ):
            raise ValueError(f"pod {name}: {ipv6} is outside {node.name}'s {node.pod_cidr_v6}")
        pod = Host(self, name, self.ns_name(name), ip, ipv6)
        pod.node = node
        self._add_ns(pod.ns)
        self.hosts[name] = pod
        # Calico's naming: "cali" + 11 hex chars of a hash of the workload.
        veth = "cali" + hashlib.sha1(pod.ns.encode()).hexdigest()[:11]
        if ipv6:
            netns.sysctl(
                pod.ns,
                {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0},
            )
        pod_cmds = [
            f"link add eth0 type veth peer name {veth} netns {node.ns}",
            "link set lo up",
            f"address add {ip}/32 dev eth0",
            "link set eth0 up",
            f"route add {POD_GATEWAY} dev eth0 scope link",
            f"route add default via {POD_GATEWAY} dev eth0 onlink",
        ]
        if ipv6:
            pod_cmds += [
                f"address add {ipv6}/128 dev eth0 nodad",
                f"route add ::/0 via {POD_GATEWAY6} dev eth0",
            ]
        netns.ip_batch(pod.ns, pod_cmds)
        # proxy_delay 0: otherwise proxy ARP answers are randomly delayed by up to 0.8 s.
        netns.sysctl(
            node.ns,
            {f"net.ipv4.conf.{veth}.proxy_arp": 1, f"net.ipv4.neigh.{veth}.proxy_delay": 0},
        )
        node_cmds = [f"link set {veth} up", f"route add {ip}/32 dev {veth} scope link"]
        if ipv6:
            node_cmds += [
                f"address add {POD_GATEWAY6}/64 dev {veth} nodad",
                f"route add {ipv6}/128 dev {veth}",
            ]
        netns.ip_batch(node.ns, node_cmds)
        node.pods.append(pod)
        log.info(
            "testbed: pod %s netns %s ip %s on node %s (%s)", name, pod.ns, ip, node.name, veth
        )
        return pod

    def add_external(self, name: str, ip: str, *, ipv6: str | None = None) -> Host:
        """An outside host on the underlay, no routes beyond it until host.route()."""
        self._check_name(name)
        host = Host(self, name, self.ns_name(name), ip, ipv6)
        self._add_ns(host.ns)
        self.hosts[name] = host
        if ipv6:
            netns.sysctl(
                host.ns,
                {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0},
            )
        self._attach_underlay(host, ip, ipv6)
        log.info("testbed: outside host %s netns %s ip %s", name, host.ns, ip)
        return host

    def namespaces(self) -> list[str]:
        """Namespaces this testbed made that still exist."""
        return [n for n in self._namespaces if netns.exists(n)]

    # -- processes and teardown ----------------------------------------------------------

    def _track(self, p: subprocess.Popen) -> None:
        with self._lock:
            self._procs = [q for q in self._procs if q.poll() is None]
            self._procs.append(p)

    def _stop_procs(self) -> None:
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            _signal_started(p, signal.SIGTERM)
        for p in live:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                _signal_started(p, signal.SIGKILL)
                try:
                    p.wait(3)
                except subprocess.TimeoutExpired:
                    log.error("testbed: pid %d survived SIGKILL", p.pid)
        for p in self._procs:
            for f in (p.stdout, p.stderr, p.stdin):
                if f:
                    f.close()
        self._procs.clear()

    def close(self) -> None:
        """Kill tracked processes, close sockets, delete every namespace. Idempotent.

        ^C, SIGTERM and SIGHUP arriving meanwhile are held until it is done; if close is
        still interrupted, it is not marked done, so the atexit hook tries again.
        """
        if self._owner_pid != os.getpid():
            return  # a forked child must not tear down its parent's testbed
        with self._lock, _signals_deferred():
            if self._closed or self._closing:
                return
            self._closing = True
            try:
                self._stop_procs()
                for h in self.hosts.values():
                    h._close_sockets()
                for ns in reversed(self._namespaces):
                    cleanup.remove_namespace(ns)
                left = self.namespaces()
                if left:
                    log.error("testbed %s: namespaces not removed: %s", self.prefix, left)
                else:
                    log.info(
                        "testbed %s: removed %d namespaces", self.prefix, len(self._namespaces)
                    )
                self._closed = True
            finally:
                self._closing = False
            if self._claimed:
                cleanup.release(self.prefix)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            _unregister(self)


def _signal_started(p: subprocess.Popen, sig: int) -> None:
    """Signal a process we started; its whole session too when it leads its own."""
    try:
        if os.getpgid(p.pid) == p.pid:
            os.killpg(p.pid, sig)
        else:
            os.kill(p.pid, sig)
    except ProcessLookupError:
        pass


# -- closing on every exit path ---------------------------------------------------------------

_live: list[Testbed] = []
_live_lock = threading.Lock()
_atexit_installed = False
_prev_handlers: dict[int, Any] = {}
_HANDLED = (signal.SIGTERM, signal.SIGHUP)
_DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _register(tb: Testbed) -> None:
    global _atexit_installed
    with _live_lock:
        _live.append(tb)
        if not _atexit_installed:
            _atexit_installed = True
            atexit.register(close_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    for sig in _HANDLED:
        prev = signal.getsignal(sig)
        if prev is _on_signal or prev is signal.SIG_IGN:
            continue
        _prev_handlers[sig] = prev
        signal.signal(sig, _on_signal)


def _unregister(tb: Testbed) -> None:
    with _live_lock:
        if tb in _live:
            _live.remove(tb)


def close_all() -> None:
    """Close every testbed of this process (atexit and signal handlers call this)."""
    with _live_lock:
        tbs = list(reversed(_live))
    for tb in tbs:
        try:
            tb.close()
        except Exception:
            log.exception("testbed %s: close failed", tb.prefix)


def _on_signal(signum: int, frame: Any) -> None:
    close_all()
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold ^C/SIGTERM/SIGHUP (main thread only) and re-deliver them afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {}
    for sig in _DEFERRED:
        saved[sig] = signal.getsignal(sig)
        if saved[sig] is not signal.SIG_IGN and saved[sig] is not None:
            signal.signal(sig, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)
