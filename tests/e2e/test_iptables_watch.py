"""iptables and nftables modes fed by an API server: watch recovery proven with traffic.

The test API server (proxy/testbed/apiserver.py) runs in this process but listens inside the
node's namespace (a socket made there with `node.socket()`), so the daemon reaches it at
127.0.0.1 through a kubeconfig. Per mode, one server and one daemon serve the module (the
virtual node is shared); each test uses its own Services (198.19.30.0/24).
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from proxy.testbed import Host, Node, ProxyProcess, Testbed, client_request, start_backend
from proxy.testbed.apiserver import ApiServer, wait_for

from .iptables_helpers import (
    MODES,
    cleanup_node,
    endpoint_slice,
    failed_syncs,
    metric,
    port,
    proxy_args,
    refused,
    service,
    spread,
    stop_checked,
    until_synced,
)

pytestmark = pytest.mark.kernel

KINDS = ("services", "endpointslices")


@dataclass
class Site:
    tb: Testbed
    node: Node
    webs: list[Host]
    client: Host
    api: ApiServer
    proxy: ProxyProcess

    def web(self, name: str) -> Host:
        return next(w for w in self.webs if w.name == name)


def web_service(name: str, ip: str) -> dict:
    return service(name, ip, [port(80, 8080)])


@dataclass
class Bed:
    tb: Testbed
    node: Node
    webs: list[Host]
    client: Host


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """The virtual node and its pods, shared by both modes."""
    work = tmp_path_factory.mktemp("iptables-watch")
    with Testbed(workdir=work) as tb:
        node = tb.add_node("node-a", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
        webs = [tb.add_pod(node, f"web-{i}", f"198.18.1.1{i}") for i in (1, 2, 3)]
        client = tb.add_pod(node, "client", "198.18.1.100")
        # No route for Service IPs: one without rules fails at once (network unreachable),
        # so checks made before a sync fail fast instead of timing out.
        for w in webs:
            start_backend(w, 8080, proto="http")
        yield Bed(tb, node, webs, client)


@pytest.fixture(scope="module", params=MODES)
def site(bed: Bed, request: pytest.FixtureRequest) -> Iterator[Site]:
    """A fresh API server and one daemon in one mode."""
    node, webs = bed.node, bed.webs
    api = ApiServer()
    # The initial list already holds a Service: the first sync must program it.
    api.apply(web_service("alpha", "198.19.30.1"))
    api.apply(endpoint_slice("alpha", webs[:2], port=8080))
    sock = node.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    api.start(sock=sock)
    proxy = None
    try:
        kubeconfig = api.kubeconfig(bed.tb.workdir / f"kubeconfig-{request.param}")
        # 100ms: bursts of watch events coalesce into one sync (the bounded-frequency path).
        args = proxy_args(node, mode=request.param, kubeconfig=kubeconfig, min_sync="100ms")
        proxy = node.start_proxy(args)
        proxy.wait_ready()
        yield Site(bed.tb, node, webs, bed.client, api, proxy)
    finally:
        problem = stop_checked(proxy) if proxy is not None else None
        if problem is None and proxy is not None and request.param == "nftables":
            problem = failed_syncs(proxy)
        api.stop()
        cleanup_node(node)
    if problem:
        pytest.fail(problem)


def counts(api: ApiServer) -> tuple[dict[str, int], dict[str, int]]:
    return (
        {k: api.list_count(k) for k in KINDS},
        {k: api.watch_count(k) for k in KINDS},
    )


# Wait for an API-server-side condition (requests the daemon makes).
wait_until = functools.partial(wait_for, timeout=15.0, interval=0.05)


def test_initial_list_is_programmed(site):
    assert set(spread(site.client, "198.19.30.1", 80, 30)) == {"web-1", "web-2"}


def test_dropped_watch_resumes_without_relist(site):
    api, proxy = site.api, site.proxy
    api.apply(web_service("beta", "198.19.30.2"))
    api.apply(endpoint_slice("beta", site.webs[:1], port=8080))
    until_synced(proxy, lambda: client_request(site.client, "198.19.30.2", 80, "http"))
    lists, watches = counts(api)

    assert api.drop_watches() == 2, "the daemon should hold one watch per resource"
    # Changed right after the drop: the resumed watch must replay it from its RV.
    api.apply(endpoint_slice("beta", [site.web("web-3")], port=8080))

    def moved() -> None:
        got = spread(site.client, "198.19.30.2", 80, 10)
        assert set(got) == {"web-3"}, f"answered by {dict(got)}"

    until_synced(proxy, moved, what="endpoint change after a dropped watch")
    wait_until(
        lambda: all(api.watch_count(k) > watches[k] for k in KINDS) and api.open_watches() == 2,
        "both watches to be re-established",
    )
    assert counts(api)[0] == lists, "a dropped watch must resume, not relist"
    text = proxy.metrics()
    closed = metric(text, "kubeproxy_py_watch_restarts_total", reason="closed")
    assert closed >= 2, [ln for ln in text.splitlines() if "watch_restarts" in ln]


def test_expired_watch_relists_and_reconciles(site):
    api, proxy = site.api, site.proxy
    api.apply(web_service("gamma", "198.19.30.3"))
    api.apply(endpoint_slice("gamma", site.webs, port=8080))
    until_synced(proxy, lambda: client_request(site.client, "198.19.30.3", 80, "http"))
    lists, _ = counts(api)

    # While the watches hear nothing: delete one Service, add another, change endpoints,
    # then forget the history and break the streams → resuming gets 410 → relist.
    api.stall_watches(3600)
    try:
        api.delete("EndpointSlice", "default", "gamma-v4")
        api.delete("Service", "default", "gamma")
        api.apply(web_service("delta", "198.19.30.4"))
        api.apply(endpoint_slice("delta", [site.web("web-2")], port=8080))
        api.apply(endpoint_slice("alpha", [site.web("web-3")], port=8080))
        api.compact(0)
        assert api.drop_watches() == 2
        wait_until(
            lambda: all(api.list_count(k) > lists[k] for k in KINDS),
            "the daemon to relist after 410 Gone",
        )
    finally:
        api.release_watches()

    def reconciled() -> None:
        assert client_request(site.client, "198.19.30.4", 80, "http") == "web-2"
        assert set(spread(site.client, "198.19.30.1", 80, 10)) == {"web-3"}
        err = refused(site.client, "198.19.30.3", 80, "http", timeout=1)
        assert isinstance(err, OSError), f"deleted Service still answers ({err!r})"

    until_synced(proxy, reconciled, what="state after the relist")
    text = proxy.metrics()
    expired = metric(text, "kubeproxy_py_watch_restarts_total", reason="expired")
    assert expired >= 2, [ln for ln in text.splitlines() if "watch_restarts" in ln]
    assert "relisting" in proxy.logs()
