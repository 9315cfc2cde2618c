"""iptables and nftables modes end to end, on one virtual node: real daemon, real rules,
real traffic.

One testbed for the module (node-a with pods web-1..3 running http/8080 and udp/7007
backends, a client pod, an outside host on the underlay); every test starts its own
daemon on a manifests directory written before it starts, and the node is cleaned with
`python -m proxy --cleanup` after each test, so tests do not see each other's rules.
Tests marked `both_modes` run once per kernel data plane (`mode`); the virtual node is
shared by both. Services live in 198.19.10.0/24 here.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.testbed import (
    Host,
    Node,
    ProxyProcess,
    Testbed,
    client_request,
    http_request,
    start_backend,
)

from .iptables_helpers import (
    MODES,
    ManifestDir,
    UdpFlow,
    assert_fair,
    cleanup_node,
    endpoint_slice,
    failed_syncs,
    kube_lines,
    metric,
    nft_tables,
    node_addresses,
    port,
    programmed,
    proxy_args,
    refused,
    service,
    spread,
    stop_checked,
    until_synced,
    wait_http,
)

pytestmark = pytest.mark.kernel

SERVICE_CIDR = "198.19.0.0/16"
SECOND_NODE_IP = "198.18.200.11"  # a second underlay address of node-a (--nodeport-addresses)


@dataclass
class Site:
    tb: Testbed
    node: Node
    webs: list[Host]
    client: Host
    outside: Host

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.webs]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with Testbed(workdir=tmp_path_factory.mktemp("iptables-mode")) as tb:
        node = tb.add_node("node-a", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
        node.exec(["ip", "address", "add", f"{SECOND_NODE_IP}/24", "dev", "eth0"])
        webs = [tb.add_pod(node, f"web-{i}", f"198.18.1.1{i}") for i in (1, 2, 3)]
        client = tb.add_pod(node, "client", "198.18.1.100")
        outside = tb.add_external("outside", "198.18.200.100")
        # Like a real node's default route: Service IPs that no rule catches leave towards
        # a router (the outside host, which does not forward: a black hole). Without any
        # route the node would answer "network unreachable" before the filter table's
        # REJECT rules could run.
        node.route(SERVICE_CIDR, via=outside.ip)
        for w in webs:
            start_backend(w, 8080, proto="http")
            start_backend(w, 7007, proto="udp")
        yield Site(tb, node, webs, client, outside)


StartProxy = Callable[..., ProxyProcess]

both_modes = pytest.mark.parametrize("mode", MODES, indirect=True)


@pytest.fixture
def mode(request: pytest.FixtureRequest) -> str:
    """The data plane a test's daemons run (iptables unless the test is `both_modes`)."""
    return getattr(request, "param", "iptables")


@pytest.fixture
def manifests(tmp_path: Path) -> ManifestDir:
    return ManifestDir(tmp_path / "manifests")


@pytest.fixture
def start_proxy(
    site: Site, manifests: ManifestDir, tmp_path: Path, mode: str
) -> Iterator[StartProxy]:
    """start_proxy(*extra_flags, as_mode=None) → a ready daemon on `manifests` (in the
    test's `mode` unless `as_mode` says otherwise), logging to the test's tmp_path;
    stopped, checked and the node cleaned up afterwards."""
    started: list[ProxyProcess] = []

    def start(*extra: str, as_mode: str | None = None) -> ProxyProcess:
        args = proxy_args(site.node, mode=as_mode or mode, manifests=manifests, extra=extra)
        p = site.node.start_proxy(args, log=tmp_path / f"proxy-{len(started) + 1}.log")
        started.append(p)
        p.wait_ready()
        return p

    yield start
    problems = [msg for p in started if (msg := stop_checked(p))]
    problems += [msg for p in started if mode == "nftables" and (msg := failed_syncs(p))]
    cleanup_node(site.node)
    if problems:
        pytest.fail("\n".join(problems))


def web_service(name: str, ip: str, *, node_port: int = 0, **spec) -> dict:
    svc_type = {"type": "NodePort"} if node_port else {}
    return service(name, ip, [port(80, 8080, node_port=node_port)], **svc_type, **spec)


# -- 1. ClusterIP ---------------------------------------------------------------------------


@both_modes
def test_cluster_ip_spreads_over_three_endpoints(site, manifests, start_proxy):
    manifests.write(
        "web",
        web_service("web", "198.19.10.1"),
        endpoint_slice("web", site.webs, port=8080),
    )
    start_proxy()
    counts = spread(site.client, "198.19.10.1", 80, 90)
    assert_fair(counts, site.names)
    # The node itself (host-network clients, kubelet) goes through nat OUTPUT.
    assert set(spread(site.node, "198.19.10.1", 80, 30)) == set(site.names)


# -- 2. NodePort ----------------------------------------------------------------------------


@both_modes
def test_nodeport_from_outside_host(site, manifests, start_proxy):
    manifests.write(
        "np",
        web_service("np", "198.19.10.2", node_port=30080),
        endpoint_slice("np", site.webs, port=8080),
    )
    start_proxy()
    counts = spread(site.outside, site.node.ip, 30080, 45)
    assert set(counts) == set(site.names), counts
    # Without --nodeport-addresses every local address accepts NodePorts.
    assert client_request(site.outside, SECOND_NODE_IP, 30080, "http") in site.names


@both_modes
def test_nodeport_addresses_restricts_accepting_address(site, manifests, start_proxy):
    manifests.write(
        "np",
        web_service("np", "198.19.10.2", node_port=30080),
        endpoint_slice("np", site.webs, port=8080),
        service(
            "lb",
            "198.19.10.6",
            [port(80, 8080, node_port=30081)],
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            healthCheckNodePort=30082,
        ),
        endpoint_slice("lb", site.webs, port=8080),
    )
    start_proxy("--nodeport-addresses", f"{site.node.ip}/32")
    for p in (30080, 30081):
        assert client_request(site.outside, site.node.ip, p, "http") in site.names
        err = refused(site.outside, SECOND_NODE_IP, p)
        assert isinstance(err, ConnectionRefusedError), (
            f"NodePort {p} on {SECOND_NODE_IP} (outside --nodeport-addresses) should not be "
            f"forwarded (nothing listens there: refused), got {err!r}"
        )
    assert client_request(site.client, "198.19.10.2", 80, "http") in site.names
    # The health check nodePort listens on the --nodeport-addresses only, too.
    status, body = wait_http(site.outside, site.node.ip, 30082)
    assert status == 200 and json.loads(body)["localEndpoints"] == 3, body
    err = refused(site.outside, SECOND_NODE_IP, 30082, "http")
    assert isinstance(err, ConnectionRefusedError), (
        f"health check nodePort on {SECOND_NODE_IP}, outside --nodeport-addresses, should be "
        f"closed (refused), got {err or 'an answer'!r}"
    )


# -- 3. endpoint and Service changes ------------------------------------------------------


@both_modes
def test_endpoint_add_remove_and_service_delete(site, manifests, start_proxy):
    web1, web2, web3 = site.webs
    svc = web_service("churn", "198.19.10.3")
    manifests.write("churn-svc", svc)
    manifests.write("churn-eps", endpoint_slice("churn", [web1, web2], port=8080))
    proxy = start_proxy()
    assert set(spread(site.client, "198.19.10.3", 80, 40)) == {"web-1", "web-2"}

    def answered_by(want: set[str], n: int = 40) -> Callable[[], None]:
        def check() -> None:
            got = spread(site.client, "198.19.10.3", 80, n)
            assert set(got) == want, f"answered by {dict(got)}, want exactly {sorted(want)}"

        return check

    manifests.write("churn-eps", endpoint_slice("churn", [web1, web2, web3], port=8080))
    until_synced(proxy, answered_by({"web-1", "web-2", "web-3"}, 60), what="endpoint added")

    manifests.write("churn-eps", endpoint_slice("churn", [web2, web3], port=8080))
    until_synced(proxy, answered_by({"web-2", "web-3"}), what="endpoint removed")

    # Down to none (its chains go, REJECT comes) and back again, in partial syncs.
    manifests.write("churn-eps", endpoint_slice("churn", [], port=8080))

    def rejected() -> None:
        err = refused(site.client, "198.19.10.3", 80, "http")
        assert isinstance(err, ConnectionRefusedError), f"no endpoints left, got {err!r}"

    until_synced(proxy, rejected, what="last endpoint removed")
    manifests.write("churn-eps", endpoint_slice("churn", [web1], port=8080))
    until_synced(proxy, answered_by({"web-1"}, 10), what="endpoint back")

    manifests.remove("churn-svc")  # the slice stays behind, as after a kubectl delete svc

    def gone() -> None:
        err = refused(site.client, "198.19.10.3", 80, "http", timeout=1)
        assert isinstance(err, OSError), f"deleted Service's ClusterIP still answers ({err!r})"

    until_synced(proxy, gone, what="Service deleted")
    assert proxy.alive()


# -- 4. no endpoints: REJECT -----------------------------------------------------------------


@both_modes
def test_service_without_endpoints_refuses_at_once(site, manifests, start_proxy):
    manifests.write(
        "empty",
        service(
            "empty",
            "198.19.10.4",
            [
                port(80, 8080, name="http", node_port=30084),
                port(53, 7007, name="dns", protocol="UDP"),
            ],
            type="NodePort",
        ),
    )
    start_proxy()
    for who, ip, p, proto in (
        (site.client, "198.19.10.4", 80, "tcp"),
        (site.client, "198.19.10.4", 53, "udp"),
        (site.outside, site.node.ip, 30084, "tcp"),
    ):
        err = refused(who, ip, p, proto)
        assert isinstance(err, ConnectionRefusedError), (
            f"{proto} {ip}:{p} from {who.name}: want an immediate refusal (REJECT), got {err!r}"
        )


# -- 5. session affinity ----------------------------------------------------------------


@both_modes
def test_session_affinity_client_ip_sticks(site, manifests, start_proxy):
    manifests.write(
        "sticky",
        web_service(
            "sticky",
            "198.19.10.5",
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
        ),
        endpoint_slice("sticky", site.webs, port=8080),
    )
    start_proxy()
    counts = spread(site.client, "198.19.10.5", 80, 30)
    assert len(counts) == 1, f"one client should stick to one backend, got {dict(counts)}"
    assert set(counts) <= set(site.names)


# -- 7. UDP and conntrack ---------------------------------------------------------------


@both_modes
def test_udp_flow_moves_after_its_endpoint_is_removed(site, manifests, start_proxy):
    manifests.write("echo-svc", service("echo", "198.19.10.7", [port(53, 7007, protocol="UDP")]))
    manifests.write("echo-eps", endpoint_slice("echo", site.webs[:2], port=7007, protocol="UDP"))
    proxy = start_proxy()
    flow = UdpFlow(site.client, "198.19.10.7", 53, src_port=40007)
    try:
        first = flow.ask()
        assert first in ("web-1", "web-2")
        # One 5-tuple, one conntrack entry: it keeps reaching the same endpoint.
        assert {flow.ask() for _ in range(5)} == {first}
        rest = [w for w in site.webs[:2] if w.name != first]
        # The old endpoint keeps running: only a conntrack flush can move the flow.
        manifests.write("echo-eps", endpoint_slice("echo", rest, port=7007, protocol="UDP"))

        def moved() -> str:
            got = flow.ask()
            assert got == rest[0].name, f"same 5-tuple still answered by {got}"
            return got

        until_synced(proxy, moved, what="UDP flow moved off the removed endpoint")
        assert {flow.ask() for _ in range(3)} == {rest[0].name}
    finally:
        flow.close()


# -- restart ---------------------------------------------------------------------------


@both_modes
def test_restart_reconciles_what_changed_while_down(site, manifests, start_proxy, mode):
    web1, web2, web3 = site.webs
    manifests.write(
        "keep",
        web_service("keep", "198.19.10.30"),
        endpoint_slice("keep", [web1], port=8080),
        service("keep-udp", "198.19.10.32", [port(53, 7007, protocol="UDP")]),
        endpoint_slice("keep-udp", [web1], port=7007, protocol="UDP"),
    )
    manifests.write(
        "drop",
        web_service("drop", "198.19.10.31", node_port=30131),
        endpoint_slice("drop", [web2], port=8080),
    )
    first = start_proxy()
    assert client_request(site.client, "198.19.10.31", 80, "http") == "web-2"
    flow = UdpFlow(site.client, "198.19.10.32", 53, src_port=40032)
    try:
        assert flow.ask() == "web-1"
        assert first.stop() == 0
        # While no daemon runs: a Service goes away, endpoints move.
        manifests.remove("drop")
        manifests.write(
            "keep",
            web_service("keep", "198.19.10.30"),
            endpoint_slice("keep", [web3], port=8080),
            service("keep-udp", "198.19.10.32", [port(53, 7007, protocol="UDP")]),
            endpoint_slice("keep-udp", [web2], port=7007, protocol="UDP"),
        )
        assert flow.ask() == "web-1", "rules and flows must outlive the daemon"
        second = start_proxy()
        assert set(spread(site.client, "198.19.10.30", 80, 10)) == {"web-3"}
        err = refused(site.client, "198.19.10.31", 80, "http", timeout=1)
        assert isinstance(err, OSError), f"Service removed while down still answers ({err!r})"
        err = refused(site.outside, site.node.ip, 30131, "http")
        assert isinstance(err, ConnectionRefusedError), f"its NodePort still forwards ({err!r})"
        left = [ln for ln in programmed(site.node, mode).splitlines() if "198.19.10.31" in ln]
        assert not left, "rules of the removed Service survived the restart:\n" + "\n".join(left)

        # The first sync after a restart has no previous state: it must still move the
        # UDP flow off the endpoint it no longer has (conntrack reconciliation).
        def moved() -> None:
            got = flow.ask()
            assert got == "web-2", f"UDP 5-tuple still answered by {got} after the restart"

        until_synced(second, moved, what="UDP flow reconciled after a restart")
    finally:
        flow.close()


# -- 9. bad objects -------------------------------------------------------------------


def test_bad_objects_are_skipped_and_the_rest_works(site, manifests, start_proxy):
    manifests.write(
        "bad",
        service("bad-ip", "198.19.10.999", [port(80, 8080)]),
        service("bad-port", "198.19.10.91", [port(70000, 8080)]),
        service("bad-proto", "198.19.10.92", [port(80, 8080, protocol="HTTP")]),
        endpoint_slice("ghost", site.webs, port=8080, name="ghost-x7k2p"),
        web_service("x" * 64, "198.19.10.93"),
    )
    manifests.write(
        "good",
        web_service("good", "198.19.10.9"),
        endpoint_slice("good", site.webs, port=8080),
    )
    proxy = start_proxy()
    assert set(spread(site.client, "198.19.10.9", 80, 30)) <= set(site.names)
    assert proxy.alive()
    status, _ = proxy.healthz()
    assert status == 200

    logs = proxy.logs().splitlines()
    reasons = {
        "default/bad-ip": "not an IP address",
        "default/bad-port": "out of range",
        "default/bad-proto": "unknown protocol",
        "default/ghost-x7k2p": "unknown",
        f"default/{'x' * 64}": "invalid Service name",
    }
    for ref, reason in reasons.items():
        lines = [ln for ln in logs if ref in ln]
        assert len(lines) == 1, f"want one log line naming {ref}, got {lines}"
        assert reason in lines[0], f"log line for {ref} does not say why ({reason!r}): {lines[0]}"
    text = proxy.metrics()
    assert metric(text, "kubeproxy_py_skipped_objects_total") == len(reasons), [
        ln for ln in text.splitlines() if "skipped" in ln
    ]


# -- 10. --cleanup ------------------------------------------------------------------------


@both_modes
def test_cleanup_leaves_nothing(site, manifests, start_proxy, mode):
    manifests.write(
        "mix",
        web_service("np", "198.19.10.20", node_port=30100),
        endpoint_slice("np", site.webs, port=8080),
        web_service(
            "sticky",
            "198.19.10.21",
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
        ),
        endpoint_slice("sticky", site.webs, port=8080),
        service(
            "lb",
            "198.19.10.22",
            [port(80, 8080, node_port=30101)],
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            healthCheckNodePort=30102,
        ),
        endpoint_slice("lb", site.webs[:1], port=8080),
        service("udp", "198.19.10.23", [port(53, 7007, protocol="UDP")]),
        endpoint_slice("udp", site.webs, port=7007, protocol="UDP"),
        web_service("none", ["198.19.10.24", "fd00:19::10:24"]),
    )
    proxy = start_proxy()
    assert client_request(site.client, "198.19.10.20", 80, "http") in site.names
    for fam in (4, 6):
        if mode == "nftables":
            table = f"table {'ip6' if fam == 6 else 'ip'} kube-proxy"
            assert table in nft_tables(site.node), f"no {table} while the daemon runs"
        else:
            assert any(ln.startswith(":KUBE-SERVICES") for ln in kube_lines(site.node, fam)), (
                f"IPv{fam}: no KUBE-SERVICES chain while the daemon runs"
            )
    assert proxy.stop() == 0
    # Rules outlive the daemon (like kube-proxy): traffic still flows until --cleanup.
    assert client_request(site.client, "198.19.10.20", 80, "http") in site.names

    for attempt in ("first", "second"):
        p = site.node.exec([sys.executable, "-m", "proxy", "--cleanup"], check=False, timeout=60)
        assert p.returncode == 0, f"{attempt} --cleanup exited {p.returncode}: {p.stderr}"
        for save in (
            "iptables-save",
            "ip6tables-save",
            "iptables-legacy-save",
            "ip6tables-legacy-save",
        ):
            left = kube_lines(site.node, save=save)
            assert not left, f"after the {attempt} --cleanup, {save} still shows:\n" + "\n".join(
                left
            )
        left = [t for t in nft_tables(site.node) if t.endswith(" kube-proxy")]
        assert not left, f"after the {attempt} --cleanup, nft still lists {left}"
    err = refused(site.client, "198.19.10.20", 80, "http", timeout=1)
    assert isinstance(err, OSError), f"ClusterIP still answers after --cleanup ({err!r})"


# -- 12. health and metrics -----------------------------------------------------------


def test_healthz_and_metrics(site, manifests, start_proxy):
    manifests.write("m-svc", web_service("m", "198.19.10.12"))
    manifests.write(
        "m-eps", endpoint_slice("m", site.webs[:2], port=8080, trigger_time=time.time() - 1)
    )
    proxy = start_proxy()
    status, body = proxy.healthz()
    assert status == 200, body
    doc = json.loads(body)
    assert {"lastUpdated", "currentTime"} <= set(doc), doc
    assert proxy.healthz("/livez")[0] == 200

    text = proxy.metrics()
    assert metric(text, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1
    assert metric(text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0
    nat_rules = metric(text, "kubeproxy_sync_proxy_rules_iptables_total", table="nat")
    assert nat_rules > 0, [ln for ln in text.splitlines() if "iptables_total" in ln]
    npl = "kubeproxy_network_programming_duration_seconds_count"
    before = metric(text, npl)
    # As kube-proxy: a trigger time from before the daemon started measures nothing of it.
    assert before == 0, "a last-change-trigger-time older than the daemon was observed"

    # An endpoint change made now is observed. The annotation has whole seconds, and one
    # stamped in the second the daemon started reads as older than it (kube-proxy ignores
    # those too): wait for the clock to enter the next second first.
    started = time.time()  # the daemon's store started before this
    while time.time() < math.floor(started) + 1:
        time.sleep(0.01)
    manifests.write("m-eps", endpoint_slice("m", site.webs, port=8080, trigger_time=time.time()))

    def observed() -> None:
        assert metric(proxy.metrics(), npl) > before, "no new network-programming sample"
        assert "web-3" in spread(site.client, "198.19.10.12", 80, 45)

    until_synced(proxy, observed, what="programming latency of an endpoint change")
    # After that partial sync the rule gauge still matches what the kernel holds.
    owned = sum(
        sum(1 for ln in kube_lines(site.node, fam) if ln.startswith("-A KUBE-")) for fam in (4, 6)
    )
    text = proxy.metrics()
    nat_rules = metric(text, "kubeproxy_sync_proxy_rules_iptables_total", table="nat")
    filter_rules = metric(text, "kubeproxy_sync_proxy_rules_iptables_total", table="filter")
    assert nat_rules + filter_rules == owned, (nat_rules, filter_rules, owned)


# -- 14. masquerading -------------------------------------------------------------------


@both_modes
def test_nodeport_is_masqueraded_pod_traffic_keeps_its_source(site, manifests, start_proxy):
    manifests.write(
        "who",
        web_service("who", "198.19.10.14", node_port=30094),
        endpoint_slice("who", site.webs, port=8080),
    )
    start_proxy()
    own = node_addresses(site.node)
    for _ in range(6):  # several backends: every path is masqueraded
        src = client_request(site.outside, site.node.ip, 30094, "http", path="/client")
        assert src in own, f"NodePort traffic reached the backend from {src}, not the node {own}"
    for _ in range(6):
        src = client_request(site.client, "198.19.10.14", 80, "http", path="/client")
        assert src == site.client.ip, f"pod → ClusterIP traffic was rewritten to {src}"
    # Hairpin: a backend reaching itself through its Service must be masqueraded, or its
    # reply would go straight back to itself and never be un-DNATed.
    web1 = site.webs[0]
    hairpins = 0
    for _ in range(45):
        status, headers, body = http_request(web1, "198.19.10.14", 80, "/client")
        assert status == 200, body
        src = body.strip()
        if headers["x-backend"] == web1.name:
            hairpins += 1
            assert src in own, f"hairpin traffic reached {web1.name} from {src}, not the node"
        else:
            assert src == web1.ip, f"{web1.name} → ClusterIP traffic was rewritten to {src}"
    assert hairpins, f"{web1.name} never reached itself through the Service in 45 requests"


# -- switching modes -----------------------------------------------------------------------


def test_switching_modes_takes_over_the_node(site, manifests, start_proxy):
    """iptables → nftables → iptables on a live node: each mode's first sync removes the
    other's rules, and the Service answers throughout (ClusterIP and NodePort)."""
    manifests.write(
        "sw",
        web_service("sw", "198.19.10.40", node_port=30140),
        endpoint_slice("sw", site.webs, port=8080),
    )
    first = start_proxy()
    assert client_request(site.client, "198.19.10.40", 80, "http") in site.names
    assert first.stop() == 0

    second = start_proxy(as_mode="nftables")
    left = programmed(site.node, "iptables")
    assert not left, f"iptables-mode rules survived the nftables mode's first sync:\n{left}"
    assert set(spread(site.client, "198.19.10.40", 80, 30)) == set(site.names)
    assert client_request(site.outside, site.node.ip, 30140, "http") in site.names
    text = second.metrics()
    assert metric(text, "kubeproxy_py_nftables_elements", ip_family="4") > 0
    assert metric(text, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1
    assert "kubeproxy_sync_proxy_rules_nftables_sync_failures_total 0.0" in text
    assert second.stop() == 0

    start_proxy()  # back to iptables
    left_tables = [t for t in nft_tables(site.node) if t.endswith(" kube-proxy")]
    assert not left_tables, f"nftables-mode tables survived the iptables mode's sync: {left_tables}"
    assert set(spread(site.client, "198.19.10.40", 80, 30)) == set(site.names)
