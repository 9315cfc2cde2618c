"""iptables and nftables modes end to end on a two-node, dual-stack virtual cluster.

node-a (pods a-web, client) and node-b (pods b-web, b-client) each run the daemon on one
shared manifests directory, written before they start (the cases here are static, so one
pair of daemons per mode serves the module; the virtual cluster is built once for both
modes). Services live in 198.19.20.0/24 and fd00:19::20:0/112 here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from proxy.testbed import (
    Cluster,
    Host,
    ProxyProcess,
    Testbed,
    client_request,
    start_backend,
)
from proxy.testbed import cluster as tb_cluster

from .iptables_helpers import (
    MODES,
    ManifestDir,
    cleanup_node,
    endpoint_slice,
    failed_syncs,
    port,
    proxy_args,
    refused,
    service,
    spread,
    stop_checked,
    wait_http,
)

pytestmark = pytest.mark.kernel

CLUSTER_CIDRS = "198.18.0.0/16,fd00:18::/64"
SERVICE_CIDRS = ("198.19.0.0/16", "fd00:19::/108")

REMOTE_IP = "198.19.20.11"  # endpoints on node-b only
LOCAL_LB_IP = "198.19.20.12"  # LoadBalancer, externalTrafficPolicy: Local, endpoint on b
LB_NODE_PORT, LB_HEALTH_PORT = 30090, 30091
ITP_IP = "198.19.20.13"  # internalTrafficPolicy: Local, endpoints on both nodes
DUAL_IPS = ("198.19.20.14", "fd00:19::20:14")  # dual-stack ClusterIP, both nodes


@dataclass
class Site:
    c: Cluster
    b_client: Host
    proxies: dict[str, ProxyProcess]


def _manifests(c: Cluster) -> list[dict]:
    a_web, b_web = c.web_a, c.web_b
    web = [port(80, 8080)]
    return [
        service("remote", REMOTE_IP, web),
        endpoint_slice("remote", [b_web], port=8080),
        service(
            "local-lb",
            LOCAL_LB_IP,
            [port(80, 8080, node_port=LB_NODE_PORT)],
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            healthCheckNodePort=LB_HEALTH_PORT,
        ),
        endpoint_slice("local-lb", [b_web], port=8080),
        service("itp", ITP_IP, web, internalTrafficPolicy="Local"),
        endpoint_slice("itp", [a_web, b_web], port=8080),
        service("dual", list(DUAL_IPS), web),
        endpoint_slice("dual", [a_web, b_web], port=8080),
        endpoint_slice("dual", [a_web, b_web], port=8080, ipv6=True),
    ]


@dataclass
class Bed:
    c: Cluster
    b_client: Host
    manifests: ManifestDir


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """The virtual cluster with its backends, shared by both modes."""
    work = tmp_path_factory.mktemp("iptables-cluster")
    with Testbed(workdir=work) as tb:
        c = tb_cluster.two_node_cluster(tb, dual_stack=True)
        b_client = tb.add_pod(c.b, "b-client", "198.18.2.100", ipv6="fd00:18::2:100")
        for node in c.nodes:  # unmatched Service IPs go to a black hole, as on a real node
            node.route(SERVICE_CIDRS[0], via=c.outside.ip)
            node.route(SERVICE_CIDRS[1], via=c.outside.ipv6)
        for web in c.webs:
            start_backend(web, 8080, proto="http")
        manifests = ManifestDir(work / "manifests")
        manifests.write("cluster", *_manifests(c))
        yield Bed(c, b_client, manifests)


@pytest.fixture(scope="module", params=MODES)
def site(bed: Bed, request: pytest.FixtureRequest) -> Iterator[Site]:
    """One daemon per node in one mode; the nodes are cleaned before the next mode."""
    c = bed.c
    proxies: dict[str, ProxyProcess] = {}
    try:
        for node in c.nodes:
            args = proxy_args(
                node, mode=request.param, manifests=bed.manifests, cluster_cidr=CLUSTER_CIDRS
            )
            proxies[node.name] = node.start_proxy(args)
        for p in proxies.values():
            p.wait_ready()
        yield Site(c, bed.b_client, proxies)
    finally:
        problems = [msg for p in proxies.values() if (msg := stop_checked(p))]
        if request.param == "nftables":
            problems += [msg for p in proxies.values() if (msg := failed_syncs(p))]
        for node in c.nodes:
            cleanup_node(node)
    if problems:
        pytest.fail("\n".join(problems))


# -- 11. cross-node ------------------------------------------------------------------------


def test_cross_node_service(site):
    """A client pod on node-a reaches a Service whose only endpoint is on node-b."""
    counts = spread(site.c.client, REMOTE_IP, 80, 10)
    assert set(counts) == {"b-web"}, counts
    # Pod → ClusterIP keeps the pod's address across nodes (no masquerade inside the CIDR).
    src = client_request(site.c.client, REMOTE_IP, 80, "http", path="/client")
    assert src == site.c.client.ip
    # ...and node-b's own daemon serves it to its local client too.
    assert client_request(site.b_client, REMOTE_IP, 80, "http") == "b-web"


# -- 6. traffic policies ---------------------------------------------------------------


def test_external_traffic_policy_local(site):
    c = site.c
    # node-a has no local endpoint: its NodePort must not forward to node-b.
    err = refused(c.outside, c.a.ip, LB_NODE_PORT, "http", timeout=1.5)
    assert isinstance(err, OSError), (
        f"NodePort on node-a (no local endpoint, externalTrafficPolicy Local) answered: {err!r}"
    )
    # node-b has one: it serves, and the client's address survives (no masquerade).
    assert client_request(c.outside, c.b.ip, LB_NODE_PORT, "http") == "b-web"
    src = client_request(c.outside, c.b.ip, LB_NODE_PORT, "http", path="/client")
    assert src == c.outside.ip, f"Local policy NodePort traffic arrived from {src}"
    # The health check nodePort tells a load balancer which node to use.
    status, body = wait_http(c.outside, c.a.ip, LB_HEALTH_PORT)
    doc = json.loads(body)
    assert status == 503 and doc["localEndpoints"] == 0, (status, doc)
    status, body = wait_http(c.outside, c.b.ip, LB_HEALTH_PORT)
    doc = json.loads(body)
    assert status == 200 and doc["localEndpoints"] == 1, (status, doc)
    assert doc["service"] == {"namespace": "default", "name": "local-lb"}, doc
    # Inside the cluster the ClusterIP is not restricted by the external policy.
    assert client_request(c.client, LOCAL_LB_IP, 80, "http") == "b-web"


def test_internal_traffic_policy_local(site):
    c = site.c
    assert set(spread(c.client, ITP_IP, 80, 20)) == {"a-web"}
    assert set(spread(site.b_client, ITP_IP, 80, 20)) == {"b-web"}


# -- 13. IPv6 ------------------------------------------------------------------------------


def test_dual_stack_cluster_ip_answers_on_ipv6(site):
    c = site.c
    v4, v6 = DUAL_IPS
    counts6 = spread(c.client, v6, 80, 30)
    assert set(counts6) == {"a-web", "b-web"}, f"IPv6 ClusterIP answered by {dict(counts6)}"
    assert set(spread(c.client, v4, 80, 30)) == {"a-web", "b-web"}
    src = client_request(c.client, v6, 80, "http", path="/client")
    assert src == c.client.ipv6, f"pod → IPv6 ClusterIP arrived from {src}"
