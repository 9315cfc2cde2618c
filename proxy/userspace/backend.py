"""What all listeners of one Target share: balancer, counters, live connections."""

from __future__ import annotations

import ipaddress
from typing import Any

from proxy.userspace.balancer import Balancer
from proxy.userspace.listeners import Target
from proxy.userspace.metrics import Stats


class Backend:
    __slots__ = ("balancer", "conns", "label", "ranges", "stats", "target", "udp")

    def __init__(self, target: Target, balancer: Balancer, stats: Stats) -> None:
        self.target = target
        self.label = target.label
        self.balancer = balancer
        self.stats = stats
        self.conns: set[Any] = set()  # TcpConn
        self.udp: set[Any] = set()  # UdpListener (their sessions follow endpoint changes)
        self.ranges = tuple(ipaddress.ip_network(r, strict=False) for r in target.source_ranges)

    def allows(self, client_ip: str) -> bool:
        """loadBalancerSourceRanges: may this client use this (LoadBalancer IP) listener?"""
        if not self.ranges:
            return True
        ip = ipaddress.ip_address(client_ip)
        return any(ip in net for net in self.ranges)

    def __repr__(self) -> str:
        return f"<Backend {self.label}/{self.target.protocol} eps={len(self.balancer.endpoints)}>"
