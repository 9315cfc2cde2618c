"""Endpoint selection (proxy/selection.py): kube-proxy's TestCategorizeEndpoints, case for
case, plus the PreferSameNode cases of kube-proxy 1.33+ (topologyModeFromHints).

kube-proxy's older table also varied the Service's `topology-aware-hints` annotation and a
feature gate. Since 1.33 kube-proxy decides from the hints alone (the annotation and
`trafficDistribution` are the EndpointSlice controller's input: it writes hints only for
Services that ask), so those rows become "hints present → followed" here, and the
`Service` is not an input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from proxy.model import Endpoint, PortSpec, Service
from proxy.selection import (
    PREFER_SAME_NODE,
    PREFER_SAME_ZONE,
    categorize,
    policies,
    topology_mode,
    usable_endpoints,
)

NODE = "node-1"


def ep(
    ip: str,
    *,
    zones: tuple[str, ...] = (),
    nodes: tuple[str, ...] = (),
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    local: bool = False,
) -> Endpoint:
    return Endpoint(
        ip,
        80,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=terminating,
        node_name=NODE if local else "node-9",
        zone_hints=tuple(sorted(zones)),
        node_hints=tuple(sorted(nodes)),
    )


@dataclass
class Case:
    name: str
    endpoints: list[Endpoint]
    zone: str = "zone-a"
    itp_local: bool = False
    etp_local: bool = False
    node_port: int = 0
    # None: the port never uses that policy; a set: the endpoints it uses (by last octet)
    cluster: set[int] | None = field(default_factory=set)
    local: set[int] | None = None
    all: set[int] | None = None  # default: cluster or local, whichever is set
    only_remote: bool = False  # has_any although nothing is reachable from this node


def A(n: int) -> str:
    return f"198.18.2.{n}"


Z4 = [
    ep(A(3), zones=("zone-a",)),
    ep(A(4), zones=("zone-b",)),
    ep(A(5), zones=("zone-c",)),
    ep(A(6), zones=("zone-a",)),
]

CASES = [
    # -- kube-proxy's table (zone hints) --
    Case("hints followed (whatever the annotation says)", Z4, cluster={3, 6}),
    Case(
        "externalTrafficPolicy: Local, topology ignored for Local endpoints",
        [
            ep(A(3), zones=("zone-a",), local=True),
            ep(A(4), zones=("zone-b",), local=True),
            ep(A(5), zones=("zone-c",)),
            ep(A(6), zones=("zone-a",)),
        ],
        etp_local=True,
        node_port=8080,
        cluster={3, 6},
        local={3, 4},
        all={3, 4, 6},
    ),
    Case(
        "internalTrafficPolicy: Local, topology ignored for Local endpoints",
        [
            ep(A(3), zones=("zone-a",), local=True),
            ep(A(4), zones=("zone-b",), local=True),
            ep(A(5), zones=("zone-c",)),
            ep(A(6), zones=("zone-a",)),
        ],
        itp_local=True,
        node_port=8080,
        cluster={3, 6},
        local={3, 4},
        all={3, 4, 6},
    ),
    Case("empty node labels", [ep(A(3), zones=("zone-a",))], zone="", cluster={3}),
    Case("node in different zone, no endpoint filtering", Z4[:1], zone="zone-b", cluster={3}),
    Case("normal endpoint filtering", Z4, cluster={3, 6}),
    Case(
        "unready endpoint",
        [*Z4[:3], ep(A(6), zones=("zone-a",), ready=False)],
        cluster={3},
    ),
    Case(
        "only unready endpoints in same zone (should not filter)",
        [
            ep(A(3), zones=("zone-a",), ready=False),
            *Z4[1:3],
            ep(A(6), zones=("zone-a",), ready=False),
        ],
        cluster={4, 5},
    ),
    Case(
        "missing hints, no filtering applied",
        [Z4[0], Z4[1], ep(A(5)), Z4[3]],
        cluster={3, 4, 5, 6},
    ),
    Case(
        "multiple hints per endpoint, filtering includes any endpoint with zone included",
        [
            ep(A(3), zones=("zone-a", "zone-b", "zone-c")),
            ep(A(4), zones=("zone-b", "zone-c")),
            ep(A(5), zones=("zone-b", "zone-d")),
            ep(A(6), zones=("zone-c",)),
        ],
        zone="zone-c",
        cluster={3, 4, 6},
    ),
    Case(
        "conflicting topology and localness require merging allEndpoints",
        [
            ep(A(0), zones=("zone-a",), local=True),
            ep(A(1), zones=("zone-b",), local=True),
            ep(A(2), zones=("zone-a",)),
            ep(A(3), zones=("zone-b",)),
        ],
        etp_local=True,
        node_port=8080,
        cluster={0, 2},
        local={0, 1},
        all={0, 1, 2},
    ),
    Case(
        "internalTrafficPolicy: Local, with empty endpoints",
        [],
        itp_local=True,
        cluster=None,
        local=set(),
    ),
    Case(
        "internalTrafficPolicy: Local, but all endpoints are remote",
        [ep(A(0)), ep(A(1))],
        itp_local=True,
        cluster=None,
        local=set(),
        only_remote=True,
    ),
    Case(
        "internalTrafficPolicy: Local, all endpoints are local",
        [ep(A(0), local=True), ep(A(1), local=True)],
        itp_local=True,
        cluster=None,
        local={0, 1},
    ),
    Case(
        "internalTrafficPolicy: Local, some endpoints are local",
        [ep(A(0), local=True), ep(A(1))],
        itp_local=True,
        cluster=None,
        local={0},
    ),
    Case(
        "Cluster traffic policy, endpoints not Ready",
        [ep(A(0), ready=False), ep(A(1), ready=False)],
        cluster=set(),
    ),
    Case(
        "Cluster traffic policy, some endpoints are Ready",
        [ep(A(0), ready=False), ep(A(1))],
        cluster={1},
    ),
    Case(
        "Cluster traffic policy, all endpoints are terminating",
        [
            ep(A(0), ready=False, serving=True, terminating=True, local=True),
            ep(A(1), ready=False, serving=True, terminating=True),
        ],
        cluster={0, 1},
    ),
    Case(
        "iTP: Local, eTP: Cluster, some endpoints local",
        [ep(A(0), local=True), ep(A(1))],
        itp_local=True,
        node_port=8080,
        cluster={0, 1},
        local={0},
        all={0, 1},
    ),
    Case(
        "iTP: Cluster, eTP: Local, some endpoints local",
        [ep(A(0), local=True), ep(A(1))],
        etp_local=True,
        node_port=8080,
        cluster={0, 1},
        local={0},
        all={0, 1},
    ),
    Case(
        "iTP: Local, eTP: Local, some endpoints local",
        [ep(A(0), local=True), ep(A(1))],
        itp_local=True,
        etp_local=True,
        node_port=8080,
        cluster={0, 1},
        local={0},
        all={0, 1},
    ),
    Case(
        "iTP: Local, eTP: Local, all endpoints remote",
        [ep(A(0)), ep(A(1))],
        itp_local=True,
        etp_local=True,
        node_port=8080,
        cluster={0, 1},
        local=set(),
        all={0, 1},
    ),
    Case(
        "iTP: Local, eTP: Local, all endpoints remote and terminating",
        [
            ep(A(0), ready=False, serving=True, terminating=True),
            ep(A(1), ready=False, serving=True, terminating=True),
        ],
        itp_local=True,
        etp_local=True,
        node_port=8080,
        cluster={0, 1},
        local=set(),
        all={0, 1},
        only_remote=True,
    ),
    Case(
        "iTP: Cluster, eTP: Local, with terminating endpoints",
        [
            ep(A(0)),
            ep(A(1), ready=False, serving=False, local=True),
            ep(A(2), ready=False, serving=True, terminating=True, local=True),
            ep(A(3), ready=False, serving=True, terminating=True),
        ],
        etp_local=True,
        node_port=8080,
        cluster={0},
        local={2},
        all={0, 2},
    ),
    Case(
        "externalTrafficPolicy ignored if not externally accessible",
        [ep(A(0)), ep(A(1), local=True)],
        etp_local=True,
        cluster={0, 1},
        all={0, 1},
    ),
    Case(
        "no cluster endpoints for iTP:Local internal-only service",
        [ep(A(0)), ep(A(1), local=True)],
        itp_local=True,
        cluster=None,
        local={1},
    ),
    # -- PreferSameNode (node hints, then zone hints, then all) --
    Case(
        "node hints: only the endpoints hinted for this node",
        [
            ep(A(1), zones=("zone-a",), nodes=(NODE,), local=True),
            ep(A(2), zones=("zone-a",), nodes=("node-2",)),
            ep(A(3), zones=("zone-b",), nodes=("node-3",)),
        ],
        cluster={1},
    ),
    Case(
        "node hints for other nodes only: fall back to the zone",
        [
            ep(A(1), zones=("zone-a",), nodes=("node-4",)),
            ep(A(2), zones=("zone-a",), nodes=("node-2",)),
            ep(A(3), zones=("zone-b",), nodes=("node-3",)),
        ],
        cluster={1, 2},
    ),
    Case(
        "a ready endpoint without a node hint: fall back to the zone",
        [
            ep(A(1), zones=("zone-a",), nodes=(NODE,), local=True),
            ep(A(2), zones=("zone-a",)),
            ep(A(3), zones=("zone-b",), nodes=("node-3",)),
        ],
        cluster={1, 2},
    ),
    Case(
        "node hints unusable and zone hints unusable: all",
        [
            ep(A(1), zones=("zone-b",), nodes=("node-4",)),
            ep(A(2), zones=("zone-b",), nodes=("node-2",)),
            ep(A(3), nodes=("node-3",)),
        ],
        cluster={1, 2, 3},
    ),
    Case(
        "the endpoint hinted for this node is not ready: fall back to the zone",
        [
            ep(A(1), zones=("zone-a",), nodes=(NODE,), ready=False, local=True),
            ep(A(2), zones=("zone-a",), nodes=("node-2",)),
            ep(A(3), zones=("zone-b",), nodes=("node-3",)),
        ],
        cluster={2},
    ),
    Case(
        "node hints without a zone label: node hints still apply",
        [
            ep(A(1), zones=("zone-a",), nodes=(NODE,), local=True),
            ep(A(2), zones=("zone-b",), nodes=("node-2",)),
        ],
        zone="",
        cluster={1},
    ),
    Case(
        "none ready: serving terminating endpoints anywhere, topology ignored",
        [
            ep(
                A(1),
                zones=("zone-a",),
                nodes=(NODE,),
                ready=False,
                serving=True,
                terminating=True,
                local=True,
            ),
            ep(
                A(2),
                zones=("zone-b",),
                nodes=("node-2",),
                ready=False,
                serving=True,
                terminating=True,
            ),
            ep(
                A(3),
                zones=("zone-b",),
                nodes=("node-3",),
                ready=False,
                serving=False,
                terminating=True,
            ),
        ],
        cluster={1, 2},
    ),
    Case(
        "PreferSameNode with externalTrafficPolicy: Local merges both",
        [
            ep(A(1), zones=("zone-a",), nodes=("node-2",)),
            ep(A(2), zones=("zone-a",), nodes=(NODE,), local=True),
            ep(A(3), zones=("zone-b",), nodes=("node-3",), local=True),
        ],
        etp_local=True,
        node_port=30080,
        cluster={2},
        local={2, 3},
        all={2, 3},
    ),
]


def _octets(eps: tuple[Endpoint, ...] | None) -> set[int] | None:
    return None if eps is None else {int(e.ip.rsplit(".", 1)[1]) for e in eps}


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_categorize_endpoints(c: Case) -> None:
    svc = Service(
        "ns",
        "svc",
        type="NodePort" if c.node_port else "ClusterIP",
        cluster_ips=("198.19.0.1",),
        ports=(PortSpec("p", "TCP", 80, c.node_port),),
        external_traffic_local=c.etp_local and bool(c.node_port),
        internal_traffic_local=c.itp_local,
    )
    uses_cluster, uses_local = policies(svc, svc.ports[0])
    got = categorize(
        tuple(c.endpoints), NODE, c.zone, uses_cluster=uses_cluster, uses_local=uses_local
    )
    assert _octets(got.cluster) == c.cluster
    assert _octets(got.local) == c.local
    want_all = c.all if c.all is not None else (c.cluster if c.local is None else c.local)
    assert _octets(got.reachable) == want_all
    assert got.has_any == (bool(want_all) or c.only_remote)
    assert len(got.reachable) == len({(e.ip, e.port) for e in got.reachable})  # no duplicates


def test_topology_mode_prefers_node_then_zone() -> None:
    both = [ep(A(1), zones=("zone-a",), nodes=(NODE,)), ep(A(2), zones=("zone-a",), nodes=("x",))]
    assert topology_mode(both, NODE, "zone-a") == PREFER_SAME_NODE
    assert topology_mode(both, "node-2", "zone-a") == PREFER_SAME_ZONE
    assert topology_mode(both, "node-2", "zone-z") == ""
    assert topology_mode([ep(A(1), ready=False, nodes=(NODE,))], NODE, "zone-a") == ""
    assert topology_mode([], NODE, "zone-a") == ""


def test_usable_endpoints_local_policy_ignores_hints() -> None:
    eps = (
        ep(A(1), zones=("zone-b",), local=True),
        ep(A(2), zones=("zone-a",)),
    )
    assert [e.ip for e in usable_endpoints(eps, NODE, local_only=True, zone="zone-a")] == [A(1)]
    assert [e.ip for e in usable_endpoints(eps, NODE, local_only=False, zone="zone-a")] == [A(2)]


def test_order_is_kept() -> None:
    eps = tuple(ep(A(n), zones=("zone-a",) if n % 2 else ("zone-b",)) for n in range(9, 0, -1))
    got = usable_endpoints(eps, NODE, local_only=False, zone="zone-a")
    assert [e.ip for e in got] == [A(n) for n in (9, 7, 5, 3, 1)]
