"""A ready-made two-node cluster for e2e tests, benchmarks and the demo."""

from __future__ import annotations

from dataclasses import dataclass, field

from .hosts import Host, Node
from .testbed import Testbed


@dataclass
class Cluster:
    """Two nodes (a, b), pods on both, a client pod on a, and an outside host.

    Addresses (underlay 198.18.200.0/24, pods 198.18.{1,2}.0/24, v6 when dual_stack):
      node-a 198.18.200.1  pods: a-web 198.18.1.10, client 198.18.1.100
      node-b 198.18.200.2  pods: b-web 198.18.2.10
      outside 198.18.200.100 (no routes beyond the underlay)
    """

    tb: Testbed
    a: Node
    b: Node
    web_a: Host
    web_b: Host
    client: Host
    outside: Host
    extra: dict[str, Host] = field(default_factory=dict)

    @property
    def nodes(self) -> list[Node]:
        return [self.a, self.b]

    @property
    def webs(self) -> list[Host]:
        return [self.web_a, self.web_b]


def two_node_cluster(tb: Testbed, *, dual_stack: bool = False) -> Cluster:
    def v6(addr: str) -> str | None:
        return addr if dual_stack else None

    a = tb.add_node(
        "node-a",
        underlay_ip="198.18.200.1",
        pod_cidr="198.18.1.0/24",
        underlay_ipv6=v6("fd00:200::1"),
        pod_cidr_v6=v6("fd00:18::1:0/112"),
    )
    b = tb.add_node(
        "node-b",
        underlay_ip="198.18.200.2",
        pod_cidr="198.18.2.0/24",
        underlay_ipv6=v6("fd00:200::2"),
        pod_cidr_v6=v6("fd00:18::2:0/112"),
    )
    web_a = tb.add_pod(a, "a-web", "198.18.1.10", ipv6=v6("fd00:18::1:10"))
    client = tb.add_pod(a, "client", "198.18.1.100", ipv6=v6("fd00:18::1:100"))
    web_b = tb.add_pod(b, "b-web", "198.18.2.10", ipv6=v6("fd00:18::2:10"))
    outside = tb.add_external("outside", "198.18.200.100", ipv6=v6("fd00:200::100"))
    return Cluster(tb, a, b, web_a, web_b, client, outside)
