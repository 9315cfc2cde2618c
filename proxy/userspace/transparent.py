"""Endpoints see the client's address (node mode): IP_TRANSPARENT and policy routing.

A proxy normally connects to the endpoint from the node's own address, so access logs,
rate limits and NetworkPolicies at the endpoint see the node. Here the socket towards
the endpoint is made with IP_TRANSPARENT and bound to the client's address and port, so
the endpoint sees the client. Its replies are addressed to the client, not to the node:
they must be handed to our socket instead of being forwarded to the client. On the node:

    iptables -t mangle -A PREROUTING -j KUBE-USERSPACE-TRANSPARENT
    -A KUBE-USERSPACE-TRANSPARENT -m addrtype ! --dst-type LOCAL \\
        -m socket --transparent -j MARK --set-xmark 0x2000/0x2000
    ip rule add fwmark 0x2000/0x2000 lookup 107 priority 107
    ip route add local 0.0.0.0/0 dev lo table 107           (and the same for IPv6)

A reply that belongs to one of our transparent sockets is marked and routed to the local
host, where the socket gets it (the TPROXY recipe; `addrtype` first keeps the socket
lookup off traffic to the node itself). Mark bit 13 is free of kube-proxy's (14, 15),
Calico's (0xffff0000) and Cilium's (0x0f00) marks.

Where the reply would not come back through this node, the client's address cannot be
kept and the node's is used, which is what kube-proxy's masquerading decides too
(`SourcePolicy.preserve`, pure): hairpin (a pod reaching itself through its Service: the
Pod would drop a packet from its own address), clients on the node itself, external
traffic (NodePort, LoadBalancer, externalIPs) to an endpoint on another node, and
ClusterIP traffic from outside --cluster-cidr to one. --masquerade-all keeps the node's
address always. --cleanup removes the chain, the rule and the route.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Any

from proxy.model import Endpoint

log = logging.getLogger("proxy.userspace.transparent")

CHAIN = "KUBE-USERSPACE-TRANSPARENT"
MARK = 0x2000
TABLE = 107
PRIORITY = 107
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
JUMP = ("PREROUTING", "-j", CHAIN)


def _first_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[0] if lines else "failed"


class SourcePolicy:
    """Whether a connection to an endpoint may carry the client's address (pure)."""

    __slots__ = ("_in_cluster", "cluster_nets", "hostname", "local_ips", "masquerade_all")

    def __init__(
        self,
        hostname: str,
        cluster_cidrs: Iterable[str] = (),
        *,
        masquerade_all: bool = False,
        local_ips: Iterable[str] = (),
    ) -> None:
        self.hostname = hostname
        self.cluster_nets = tuple(ipaddress.ip_network(c, strict=False) for c in cluster_cidrs)
        self.masquerade_all = masquerade_all
        self.local_ips = frozenset(local_ips)
        self._in_cluster: dict[str, bool] = {}  # per client address: parsing costs

    def preserve(self, client_ip: str, ep: Endpoint, external: bool) -> bool:
        if self.masquerade_all or client_ip == ep.ip or client_ip in self.local_ips:
            return False  # hairpin: the Pod drops packets from its own address
        if client_ip.startswith("127.") or client_ip == "::1":
            return False
        if ep.node_name and ep.node_name == self.hostname:
            return True  # the endpoint's replies go through this node: its default route
        if external:
            return False  # another node's endpoint would answer the client directly
        return not self.cluster_nets or self._cluster(client_ip)

    def _cluster(self, ip: str) -> bool:
        hit = self._in_cluster.get(ip)
        if hit is None:
            if len(self._in_cluster) > 65536:
                self._in_cluster.clear()
            addr = ipaddress.ip_address(ip)
            hit = self._in_cluster[ip] = any(addr in n for n in self.cluster_nets)
        return hit


def transparent_socket(family: int, kind: int, client: tuple[str, int]) -> _socket.socket:
    """A non-blocking socket bound to the client's address (its port when free). The C
    socket type, as the TCP engine's others: socket.socket's Python __init__ and close
    cost as much as the bind at high connection rates."""
    s = _socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        try:
            s.bind(client)
        except OSError:
            s.bind((client[0], 0))  # its port is taken here: any port of its address
    except BaseException:
        s.close()
        raise
    return s


def mangle_rules() -> str:
    """iptables-restore input for our chain (pure)."""
    return (
        "*mangle\n"
        f":{CHAIN} - [0:0]\n"
        f"-F {CHAIN}\n"
        f"-A {CHAIN} -m addrtype ! --dst-type LOCAL -m socket --transparent "
        f'-m comment --comment "kube-proxy-py userspace: replies to client-addressed '
        f'connections" -j MARK --set-xmark {MARK:#x}/{MARK:#x}\n'
        "COMMIT\n"
    )


class TransparentRouting:
    """Sets up (and removes) the mark rule, the ip rule and the local route."""

    def __init__(self, backends: Iterable[Any]) -> None:
        self.backends = list(backends)  # proxy.iptables.backend.Backend, one per family

    async def setup(self) -> str:
        """Returns "" when the client's address can be kept, else why not (undone)."""
        from proxy.iptables.backend import run

        families = tuple(be.family for be in self.backends)
        for family in families:
            fam = socket.AF_INET6 if family == 6 else socket.AF_INET
            probe = ("::1" if family == 6 else "127.0.0.1", 0)
            try:
                transparent_socket(fam, socket.SOCK_STREAM, probe).close()
            except OSError as e:
                return f"IP_TRANSPARENT refused ({e.strerror or e})"
        for be in self.backends:
            try:
                res = await run([be.restore, "--noflush"], stdin=mangle_rules(), timeout=30)
            except (OSError, RuntimeError) as e:  # it exited before reading its input
                await self.cleanup()
                return f"{be}: the mangle rule cannot be added ({e})"
            if res.rc != 0:
                await self.cleanup()
                return f"{be}: the mangle rule cannot be added ({_first_line(res.err)})"
            chk = await run([be.iptables, "-w", "-t", "mangle", "-C", *JUMP], timeout=30)
            if chk.rc != 0:
                ins = await run([be.iptables, "-w", "-t", "mangle", "-I", *JUMP], timeout=30)
                if ins.rc != 0:
                    await self.cleanup()
                    return f"{be}: cannot jump to {CHAIN} ({_first_line(ins.err)})"
        try:
            await asyncio.to_thread(_routing, True, families)
        except Exception as e:
            await self.cleanup()
            return f"policy routing cannot be set up ({e})"
        return ""

    async def cleanup(self) -> int:
        """Remove everything `setup` may have made; returns how many things were removed."""
        from proxy.iptables.backend import run

        removed = 0
        for be in self.backends:
            delete = [be.iptables, "-w", "-t", "mangle", "-D", *JUMP]
            while (await run(delete, timeout=30)).rc == 0:
                removed += 1
            for op in ("-F", "-X"):
                res = await run([be.iptables, "-w", "-t", "mangle", op, CHAIN], timeout=30)
                removed += res.rc == 0 and op == "-X"
        with contextlib.suppress(Exception):
            removed += await asyncio.to_thread(_routing, False, (4, 6))
        return removed


def _routing(add: bool, families: tuple[int, ...]) -> int:
    """Add (or remove) the fwmark rule and the local default route, per family."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    done = 0
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family in families:
            fam = socket.AF_INET6 if family == 6 else socket.AF_INET
            dst = "::/0" if family == 6 else "0.0.0.0/0"
            rule = {"family": fam, "fwmark": MARK, "fwmask": MARK, "table": TABLE,
                    "priority": PRIORITY}  # fmt: skip
            route = {
                "family": fam,
                "dst": dst,
                "type": "local",
                "oif": lo,
                "table": TABLE,
                "scope": 254,
            }  # fmt: skip  (host scope, as `ip route add local` sets)
            if add:
                try:
                    ipr.rule("add", **rule)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:  # there already: a restart, or a handover
                        raise
                ipr.route("replace", **route)
                done += 2
            else:
                for kind, spec in (("rule", rule), ("route", route)):
                    try:
                        getattr(ipr, kind)("del", **spec)
                        done += 1
                    except Exception:
                        pass
    return done
