"""Localhost NodePorts for data planes whose kernel NAT cannot serve loopback.

kube-proxy answers NodePorts on 127.0.0.1 in its iptables mode only: DNAT of a packet to
127.0.0.0/8 works only with `route_localnet`, which has no IPv6 counterpart, so `::1`
never works, and its nftables mode serves no loopback NodePort at all. This serves them
with the userspace engine instead, TCP and UDP: a listener on each loopback address and
NodePort, forwarding to the endpoints the shared selection picks (Cluster policy, as
kube-proxy treats traffic from the node itself).

A data plane asks `loopback_addresses(cfg, families, nat=...)` which addresses it must
serve this way (none when `--iptables-localhost-nodeports=false` or when
`--nodeport-addresses` leaves loopback out), then owns a `LocalhostNodePorts` and calls
its start / sync / hand_over / drain / predecessor_gone / stop from its own (the
listeners take part in seamless restarts like the userspace mode's). Nothing in the
kernel is changed: the addresses exist on `lo`, and the data plane's rules must not DNAT
them (kube-proxy's never do for `::1`; the iptables mode's `127.0.0.0/8` is NAT-served
and not passed here).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from proxy.config import Config
from proxy.endpoints.store import Snapshot
from proxy.userspace.dataplane import UserspaceDataPlane

LOOPBACK = {4: "127.0.0.1", 6: "::1"}


def loopback_addresses(
    cfg: Config, families: Iterable[int], *, nat: Iterable[int] = ()
) -> tuple[str, ...]:
    """Loopback addresses whose NodePorts the userspace engine must serve: one per
    family in `families` that kernel NAT does not serve (`nat`), when the flag is on and
    --nodeport-addresses covers that family's loopback (no CIDR of the family covers
    every address; `primary` never covers loopback)."""
    if not cfg.localhost_nodeports or cfg.nodeport_primary:
        return ()
    out = []
    for fam in sorted(set(families) - set(nat)):
        ip = ipaddress.ip_address(LOOPBACK[fam])
        nets = [ipaddress.ip_network(c) for c in cfg.nodeport_addresses if (":" in c) == (fam == 6)]
        if not nets or any(n.prefixlen == 0 or ip in n for n in nets):
            out.append(LOOPBACK[fam])
    return tuple(out)


class LocalhostNodePorts:
    """The userspace engine serving NodePorts on given loopback addresses only."""

    def __init__(self, cfg: Config, addresses: tuple[str, ...]) -> None:
        self.addresses = addresses
        self._plane = UserspaceDataPlane(cfg, loopback_nodeports=addresses)

    async def start(self) -> None:
        await self._plane.start()

    async def sync(self, snap: Snapshot, full: bool) -> None:
        """Follow the model; listener problems are logged, never raised (as userspace)."""
        await self._plane.sync(snap, full)

    async def hand_over(self) -> None:
        """A successor takes the listeners over (SO_REUSEPORT, see DataPlane.hand_over)."""
        await self._plane.hand_over()

    async def drain(self, timeout: float) -> None:
        await self._plane.drain(timeout)

    def predecessor_gone(self) -> None:
        self._plane.predecessor_gone()

    async def stop(self) -> None:
        await self._plane.stop()

    @property
    def listening(self) -> tuple[tuple[str, int, str], ...]:
        """(ip, port, protocol) of every open listener (for tests and logs)."""
        return tuple(sorted(self._plane.listeners))


class LoopbackLifecycle:
    """The seamless-restart and stop hooks of a kernel data plane: its rules serve the
    traffic and stay in place, so only its localhost NodePorts' listeners (`loopback`,
    when it serves any) have sockets and connections to hand over, drain and stop."""

    loopback: LocalhostNodePorts | None = None

    async def hand_over(self) -> None:
        if self.loopback is not None:
            await self.loopback.hand_over()

    async def drain(self, timeout: float) -> None:
        if self.loopback is not None:
            await self.loopback.drain(timeout)

    def predecessor_gone(self) -> None:
        if self.loopback is not None:
            self.loopback.predecessor_gone()

    async def stop(self) -> None:
        """Leave every rule in place (like kube-proxy) so traffic keeps flowing."""
        if self.loopback is not None:
            await self.loopback.stop()
