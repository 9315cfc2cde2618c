"""Owning Service addresses on the node with netlink (pyroute2), in the current netns.

Every ClusterIP, externalIP and LoadBalancer ingress IP this proxy serves becomes a local
address so the kernel delivers its traffic to our listeners. Two ways, both traceable to
us so `--cleanup` removes exactly what we made and nothing else:

- interface: a proxy-owned link `kube-proxy-py0` holding /32 and /128 addresses (IPv6
  with IFA_F_NODAD so they are usable at once). A `dummy` link where the kernel has the
  module, else a bridge with no ports (which is always up and never forwards anything).
- local-route: `local IP dev lo table local proto 107` routes (the AnyIP trick); used
  when no interface can be made. IPv6 sockets then bind with IP_FREEBIND.

All methods are blocking netlink calls: the data plane runs them on one worker thread
(pyroute2's sync API cannot run on the daemon's uvloop thread).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
from collections.abc import Iterable

log = logging.getLogger("proxy.userspace.addresses")

IFNAME = "kube-proxy-py0"
ROUTE_PROTO = 107  # rtm_protocol marking our local routes (unassigned in rt_protos)
_LOCAL_TABLE = 255
_SCOPE_HOST = 254
_IFA_F_NODAD = 0x02
MODES = ("auto", "interface", "local-route")


class AddressError(Exception):
    """An address could not be added or removed; the message says why."""


def _prefixlen(ip: str) -> int:
    return 128 if ":" in ip else 32


def _family(ip: str) -> int:
    return 10 if ":" in ip else 2


def _netlink_reason(e: Exception) -> str:
    code = getattr(e, "code", None)
    if isinstance(code, int) and code:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    return str(e) or type(e).__name__


class AddressOwner:
    """Adds, removes and enumerates Service addresses; remembers what it added."""

    def __init__(self, mode: str = "auto", ifname: str = IFNAME) -> None:
        if mode not in MODES:
            raise ValueError(f"address mode {mode!r} not in {MODES}")
        self.mode = mode
        self.ifname = ifname  # node-local DNS owns its address on a link of its own
        self.kind = ""  # dummy | bridge | local-route, after start()
        self.owned: set[str] = set()
        self._ipr = None
        self._index = 0

    # -- lifecycle -------------------------------------------------------------------------

    def _iproute(self):
        if self._ipr is None:
            from pyroute2 import IPRoute

            # An explicit plain loop: pyroute2 would otherwise use the thread's default
            # policy, which may be uvloop's, and uvloop cannot open netlink sockets.
            self._ipr = IPRoute(use_event_loop=asyncio.SelectorEventLoop())
        return self._ipr

    def start(self) -> str:
        """Find or make where addresses live; adopt what a previous run left. Returns kind."""
        ipr = self._iproute()
        if self.mode in ("auto", "interface"):
            try:
                self._index = self._ensure_link(ipr)
            except Exception as e:
                if self.mode == "interface":
                    raise AddressError(f"cannot create {self.ifname}: {_netlink_reason(e)}") from e
                log.warning(
                    "cannot create %s (%s); owning Service addresses as local routes instead",
                    self.ifname,
                    _netlink_reason(e),
                )
        if not self._index:
            self.kind = "local-route"
        self.owned = set(self.current())
        log.info(
            "Service addresses on %s (%s); %d already there",
            self.ifname if self._index else "lo as local routes",
            self.kind,
            len(self.owned),
        )
        return self.kind

    def _ensure_link(self, ipr) -> int:
        found = ipr.link_lookup(ifname=self.ifname)
        if found:
            idx = found[0]
            link = ipr.get_links(idx)[0]
            info = link.get_attr("IFLA_LINKINFO")
            self.kind = (info.get_attr("IFLA_INFO_KIND") if info else "") or "unknown"
        else:
            from pyroute2.netlink.exceptions import NetlinkError

            try:
                ipr.link("add", ifname=self.ifname, kind="dummy")
                self.kind = "dummy"
            except NetlinkError as e:
                if e.code not in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL):
                    raise
                # No dummy module (like this kernel): a bridge without ports works the same.
                ipr.link("add", ifname=self.ifname, kind="bridge")
                self.kind = "bridge"
            idx = ipr.link_lookup(ifname=self.ifname)[0]
            log.info("created %s (%s) for Service addresses", self.ifname, self.kind)
        ipr.link("set", index=idx, state="up")
        return idx

    def current(self) -> list[str]:
        """Addresses we own now, according to the kernel."""
        ipr = self._iproute()
        if self._index:
            return [
                a.get_attr("IFA_ADDRESS")
                for a in ipr.get_addr(index=self._index)
                if a["prefixlen"] in (32, 128) and not _link_local(a.get_attr("IFA_ADDRESS"))
            ]
        return self._our_routes()

    def _our_routes(self) -> list[str]:
        ipr = self._iproute()
        out = []
        for fam in (2, 10):
            for r in ipr.get_routes(family=fam, table=_LOCAL_TABLE):
                if r["proto"] == ROUTE_PROTO and r["type"] == 2:
                    out.append(r.get_attr("RTA_DST"))
        return out

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    # -- addresses -------------------------------------------------------------------------

    def add(self, ip: str) -> None:
        """Make `ip` local. Raises AddressError with the kernel's reason."""
        from pyroute2.netlink.exceptions import NetlinkError

        ipr = self._iproute()
        try:
            if self._index:
                ipr.addr(
                    "add",
                    index=self._index,
                    address=ip,
                    prefixlen=_prefixlen(ip),
                    flags=_IFA_F_NODAD if ":" in ip else 0,
                )
            else:
                ipr.route("add", **self._route_spec(ip))
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise AddressError(_netlink_reason(e)) from e
        self.owned.add(ip)

    def remove(self, ip: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        ipr = self._iproute()
        try:
            if self._index:
                ipr.addr("del", index=self._index, address=ip, prefixlen=_prefixlen(ip))
            else:
                ipr.route("del", **self._route_spec(ip))
        except NetlinkError as e:
            if e.code not in (errno.EADDRNOTAVAIL, errno.ESRCH, errno.ENOENT):
                raise AddressError(_netlink_reason(e)) from e
        self.owned.discard(ip)

    def _route_spec(self, ip: str) -> dict:
        return {
            "dst": ip,
            "dst_len": _prefixlen(ip),
            "family": _family(ip),
            "type": "local",
            "table": _LOCAL_TABLE,
            "oif": 1,  # lo
            "proto": ROUTE_PROTO,
            "scope": _SCOPE_HOST,
        }

    def apply(self, add: Iterable[str], remove: Iterable[str]) -> dict[str, str]:
        """Add and remove in one trip to the worker thread; returns {ip: error}."""
        errors: dict[str, str] = {}
        for ip in remove:
            try:
                self.remove(ip)
            except AddressError as e:
                errors[ip] = str(e)
        for ip in add:
            try:
                self.add(ip)
            except AddressError as e:
                errors[ip] = str(e)
        return errors

    def survey(self) -> tuple[list[str], list[str]]:
        """(ours, the node's) from one address dump; with local routes, ours from routes.
        One dump because parsing is what costs (~0.1 ms per address with pyroute2)."""
        ours: list[str] = []
        node: list[str] = []
        for a in self._iproute().get_addr():
            ip = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if not ip or _link_local(ip):
                continue
            if self._index and a["index"] == self._index:
                if a["prefixlen"] in (32, 128):
                    ours.append(ip)
            else:
                node.append(ip)
        if not self._index:
            ours = self._our_routes()
        return ours, list(dict.fromkeys(node))

    # -- --cleanup ---------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Remove our interface and our local routes; returns what was released."""
        ipr = self._iproute()
        released: list[str] = []
        found = ipr.link_lookup(ifname=self.ifname)
        if found:
            self._index = found[0]
            released += self.current()
            ipr.link("del", index=found[0])
            self._index = 0
        for ip in self._our_routes():
            ipr.route("del", **self._route_spec(ip))
            released.append(ip)
        self.owned.clear()
        return released


def _link_local(ip: str | None) -> bool:
    return bool(ip) and ipaddress.ip_address(ip).is_link_local


def pick_node_addresses(addresses: Iterable[str], cidrs: Iterable[str]) -> tuple[str, ...]:
    """The node addresses NodePorts listen on: those inside `cidrs` (all when empty)."""
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    out = []
    for ip in addresses:
        a = ipaddress.ip_address(ip)
        if not nets or any(a.version == n.version and a in n for n in nets):
            out.append(ip)
    return tuple(sorted(set(out), key=lambda i: (":" in i, i)))
