"""The Kubernetes source against the test API server: informer semantics, recovery, errors."""

from __future__ import annotations

import functools
import itertools
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from proxy.config import Config, UsageError
from proxy.endpoints.kube import NOT_IN_POD, Backoff, KubeSource
from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Store
from proxy.model import Model
from proxy.testbed import apiserver
from proxy.testbed.apiserver import ApiServer, write_kubeconfig

PROXY_NAME = "service.kubernetes.io/service-proxy-name"


def svc(name: str, ip: str, ns: str = "default", labels: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }


def eps(name: str, service: str, ips: list[str], ns: str = "default") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
    }


def restarts(resource: str, reason: str) -> float:
    v = REGISTRY.get_sample_value(
        "kubeproxy_py_watch_restarts_total", {"resource": resource, "reason": reason}
    )
    return v or 0.0


def skipped(kind: str) -> float:
    return REGISTRY.get_sample_value("kubeproxy_py_skipped_objects_total", {"kind": kind}) or 0.0


wait_for = functools.partial(apiserver.wait_for, timeout=20.0, interval=0.02)


def model(store: Store) -> Model:
    return store.snapshot().model


def cluster_ip(store: Store, name: str, ns: str = "default") -> str | None:
    s = model(store).services.get((ns, name))
    return s.cluster_ips[0] if s and s.cluster_ips else None


def endpoint_ips(store: Store, name: str, ns: str = "default") -> list[str]:
    return [a.ip for a in model(store).endpoints_of((ns, name)).addresses]


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.api = ApiServer().start()
        self.kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", self.api.url)
        self.store = Store()
        self.sources: list[KubeSource] = []

    def source(self, **kw: Any) -> KubeSource:
        kw.setdefault("backoff_initial", 0.02)
        kw.setdefault("backoff_cap", 0.2)
        cfg = Config(
            kubeconfig=str(kw.pop("kubeconfig", self.kubeconfig)), master=kw.pop("master", "")
        )
        src = KubeSource(cfg, self.store, **kw)
        self.sources.append(src)
        return src

    def synced(self, **kw: Any) -> KubeSource:
        src = self.source(**kw)
        src.start()
        assert src.wait_synced(20)
        return src

    def close(self) -> None:
        for s in self.sources:
            s.stop()
        self.api.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


# -- the happy path ----------------------------------------------------------------------


def test_initial_list_populates_the_store(env: Env) -> None:
    env.api.create(svc("web", "198.19.0.10"))
    env.api.create(svc("db", "198.19.0.11", ns="data"))
    env.api.create(eps("web-1", "web", ["198.18.0.1", "198.18.0.2"]))
    src = env.source()
    assert not env.store.has_synced
    src.start()
    assert src.wait_synced(20)
    assert env.store.has_synced and src.has_synced
    assert cluster_ip(env.store, "web") == "198.19.0.10"
    assert cluster_ip(env.store, "db", "data") == "198.19.0.11"
    assert endpoint_ips(env.store, "web") == ["198.18.0.1", "198.18.0.2"]
    assert env.api.list_count("services") == 1 and env.api.list_count("endpointslices") == 1
    assert src.resource_version(SERVICE) == str(env.api.resource_version)


def test_adds_updates_and_deletes_propagate(env: Env) -> None:
    env.api.create(svc("web", "198.19.0.10"))
    env.synced()
    env.api.create(svc("api", "198.19.0.12"))
    env.api.create(eps("api-1", "api", ["198.18.0.5"]))
    wait_for(lambda: endpoint_ips(env.store, "api") == ["198.18.0.5"], "api endpoints")
    env.api.update(svc("web", "198.19.0.20"))
    env.api.update(eps("api-1", "api", ["198.18.0.5", "198.18.0.6"]))
    wait_for(lambda: cluster_ip(env.store, "web") == "198.19.0.20", "web updated")
    wait_for(lambda: len(endpoint_ips(env.store, "api")) == 2, "api endpoints updated")
    env.api.delete("EndpointSlice", "default", "api-1")
    env.api.delete("Service", "default", "web")
    wait_for(lambda: ("default", "web") not in model(env.store).services, "web deleted")
    wait_for(lambda: endpoint_ips(env.store, "api") == [], "api endpoints deleted")
    assert env.api.list_count("services") == 1 and env.api.list_count("endpointslices") == 1
    assert env.api.watch_count("services") == 1  # one stream carried everything


def test_services_of_another_proxy_are_kept_and_marked(env: Env) -> None:
    env.api.create(svc("theirs", "198.19.0.30", labels={PROXY_NAME: "other-proxy"}))
    env.synced()
    s = model(env.store).services[("default", "theirs")]
    assert s.proxy_name == "other-proxy"


def test_optional_label_selector_is_applied_by_the_server(env: Env) -> None:
    env.api.create(svc("mine", "198.19.0.31"))
    env.api.create(svc("theirs", "198.19.0.30", labels={PROXY_NAME: "other-proxy"}))
    env.synced(label_selectors={SERVICE: f"!{PROXY_NAME}"})
    assert set(model(env.store).services) == {("default", "mine")}
    env.api.update(svc("mine", "198.19.0.31", labels={PROXY_NAME: "x"}))  # leaves the selection
    wait_for(lambda: not model(env.store).services, "relabelled Service gone")


# -- recovery ----------------------------------------------------------------------------


def test_dropped_watch_resumes_from_last_version_without_relist_or_loss(env: Env) -> None:
    env.api.create(svc("a", "198.19.0.1"))
    env.api.create(svc("b", "198.19.0.2"))
    env.api.create(eps("a-1", "a", ["198.18.0.1"]))
    src = env.synced()
    wait_for(lambda: env.api.open_watches() == 2, "both watches open")
    closed = restarts("services", "closed")
    env.api.stall_watches(60)  # these changes are not delivered before the drop
    env.api.update(svc("a", "198.19.0.100"))
    env.api.delete("Service", "default", "b")
    env.api.create(svc("c", "198.19.0.3"))
    env.api.update(eps("a-1", "a", ["198.18.0.1", "198.18.0.9"]))
    assert env.api.drop_watches() == 2
    env.api.release_watches()
    wait_for(lambda: cluster_ip(env.store, "c") == "198.19.0.3", "c added")
    m = model(env.store)
    assert m.services[("default", "a")].cluster_ips == ("198.19.0.100",)
    assert ("default", "b") not in m.services
    wait_for(lambda: endpoint_ips(env.store, "a") == ["198.18.0.1", "198.18.0.9"], "a endpoints")
    assert env.api.list_count("services") == 1 and env.api.list_count("endpointslices") == 1
    assert env.api.watch_count("services") >= 2
    assert restarts("services", "closed") > closed
    assert src.resource_version(ENDPOINT_SLICE) == str(env.api.resource_version)


def test_watch_timeout_resumes_without_relist(env: Env) -> None:
    env.synced(watch_timeout=(1, 1))
    wait_for(lambda: env.api.watch_count("services") >= 3, "the watch to be renewed twice")
    env.api.create(svc("late", "198.19.0.7"))
    wait_for(lambda: cluster_ip(env.store, "late") == "198.19.0.7", "late added")
    assert env.api.list_count("services") == 1


def test_expired_version_relists_and_drops_what_vanished(env: Env) -> None:
    env.api.create(svc("gone", "198.19.0.1"))
    env.api.create(svc("stays", "198.19.0.2"))
    env.api.create(eps("gone-1", "gone", ["198.18.0.1"]))
    env.synced()
    wait_for(lambda: env.api.open_watches() == 2, "both watches open")
    expired = restarts("services", "expired")
    env.api.stall_watches(60)
    env.api.delete("Service", "default", "gone")
    env.api.delete("EndpointSlice", "default", "gone-1")
    env.api.create(svc("new", "198.19.0.3"))
    env.api.create(eps("new-1", "new", ["198.18.0.3"]))
    env.api.compact(keep_last=0)  # the outage outlived the history: resuming must 410
    env.api.drop_watches()
    env.api.release_watches()
    wait_for(lambda: env.api.list_count("services") == 2, "a relist of Services")
    wait_for(lambda: endpoint_ips(env.store, "new") == ["198.18.0.3"], "new endpoints")
    m = model(env.store)
    assert set(m.services) == {("default", "stays"), ("default", "new")}
    assert m.endpoints_of(("default", "gone")).addresses == ()
    assert env.api.list_count("endpointslices") == 2
    assert restarts("services", "expired") > expired
    # And after the relist it watches again: a later change still arrives.
    env.api.update(svc("stays", "198.19.0.22"))
    wait_for(lambda: cluster_ip(env.store, "stays") == "198.19.0.22", "stays updated")
    assert env.api.list_count("services") == 2


@pytest.mark.parametrize("bookmarks", [True, False])
def test_bookmarks_advance_the_version_so_resume_does_not_expire(env: Env, bookmarks: bool) -> None:
    env.api.create(svc("a", "198.19.0.1"))
    src = env.synced()
    wait_for(lambda: env.api.open_watches() == 2, "both watches open")
    for i in range(5):  # churn in EndpointSlices only: the Service watch sees none of it
        env.api.create(eps(f"a-{i}", "a", [f"198.18.0.{i + 1}"]))
    wait_for(lambda: len(endpoint_ips(env.store, "a")) == 5, "slices seen")
    assert int(src.resource_version(SERVICE)) < env.api.resource_version
    if bookmarks:
        env.api.send_bookmarks()
        wait_for(
            lambda: src.resource_version(SERVICE) == str(env.api.resource_version),
            "the bookmark to move the Service watch's version",
        )
    env.api.compact(keep_last=0)
    env.api.drop_watches()
    env.api.create(svc("b", "198.19.0.2"))
    wait_for(lambda: cluster_ip(env.store, "b") == "198.19.0.2", "b added")
    assert env.api.list_count("endpointslices") == 1
    # Without the bookmark, the Service watch resumes from a compacted version: relist.
    assert env.api.list_count("services") == (1 if bookmarks else 2)


def test_backs_off_while_the_server_is_down_then_recovers(env: Env, tmp_path: Path) -> None:
    down = socket.socket()  # bound, not listening: connections are refused
    down.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{down.getsockname()[1]}"
    kc = write_kubeconfig(tmp_path / "down-kubeconfig", url)
    errors = restarts("services", "error")
    src = env.source(kubeconfig=kc)
    src.start()
    wait_for(lambda: restarts("services", "error") >= errors + 3, "three failed attempts")
    assert not src.has_synced and not env.store.has_synced
    api = ApiServer()
    api.create(svc("web", "198.19.0.10"))
    api.start(sock=down)
    try:
        assert src.wait_synced(20)
        assert cluster_ip(env.store, "web") == "198.19.0.10"
        # A restart of the API server later (same port, same state): resume, no relist.
        host, port = api.address
        api.stop()
        api.create(svc("during", "198.19.0.11"))
        api.start(host=host, port=port)
        wait_for(lambda: cluster_ip(env.store, "during") == "198.19.0.11", "change made while down")
        assert api.list_count("services") == 1
    finally:
        src.stop()
        api.stop()


def test_bad_objects_are_skipped_and_the_watch_goes_on(env: Env) -> None:
    env.api.create(svc("bad-in-list", "not-an-ip"))
    env.api.create(svc("good", "198.19.0.1"))
    env.synced()
    assert set(model(env.store).services) == {("default", "good")}
    wait_for(lambda: env.api.open_watches("services") == 1, "the Service watch")
    before = skipped("Service")
    undecodable = skipped("ServiceEvent")
    env.api.create(svc("bad", "198.19.0.999"))
    env.api.create({"kind": "Service", "metadata": {"name": "no-spec"}})
    assert env.api.inject_event("services", b"this is not json") == 1
    assert env.api.inject_event("services", b'{"type":"ADDED","object":"a string"}') == 1
    env.api.create(svc("after", "198.19.0.2"))
    wait_for(lambda: cluster_ip(env.store, "after") == "198.19.0.2", "the good one after")
    assert set(model(env.store).services) == {("default", "good"), ("default", "after")}
    assert skipped("Service") >= before + 2
    assert skipped("ServiceEvent") == undecodable + 2
    assert env.api.watch_count("services") == 1  # the same stream carried on


def test_error_event_backs_off_and_resumes_without_relist(env: Env) -> None:
    env.synced()
    wait_for(lambda: env.api.open_watches("services") == 1, "the Service watch")
    errors = restarts("services", "error")
    line = b'{"type":"ERROR","object":{"kind":"Status","code":500,"message":"etcd hiccup"}}'
    assert env.api.inject_event("services", line) == 1
    wait_for(lambda: restarts("services", "error") > errors, "the error to be counted")
    env.api.create(svc("next", "198.19.0.5"))
    wait_for(lambda: cluster_ip(env.store, "next") == "198.19.0.5", "next added")
    assert env.api.list_count("services") == 1


def test_stop_ends_the_threads_and_the_watches(env: Env) -> None:
    src = env.synced()
    wait_for(lambda: env.api.open_watches() == 2, "both watches open")
    threads = [i.thread for i in src._informers.values()]
    src.stop()
    assert not any(t.is_alive() for t in threads)
    wait_for(lambda: env.api.open_watches() == 0, "the server to see the watches go")


def test_master_overrides_the_kubeconfig_server(env: Env, tmp_path: Path) -> None:
    env.api.create(svc("web", "198.19.0.10"))
    dead = write_kubeconfig(tmp_path / "dead", "http://127.0.0.1:9")
    src = env.synced(kubeconfig=dead, master=env.api.url)
    assert src.host == env.api.url
    assert cluster_ip(env.store, "web") == "198.19.0.10"


def test_master_alone_needs_no_kubeconfig(env: Env) -> None:
    env.api.create(svc("web", "198.19.0.10"))
    env.synced(kubeconfig="", master=env.api.url)
    assert cluster_ip(env.store, "web") == "198.19.0.10"


async def _await_synced(src: KubeSource) -> bool:
    return await src.synced()


def test_synced_can_be_awaited_from_the_event_loop(env: Env) -> None:
    import asyncio

    env.api.create(svc("web", "198.19.0.10"))
    src = env.source()
    src.start()
    assert asyncio.run(_await_synced(src))


# -- configuration errors ------------------------------------------------------------------


def one_line_error(cfg: Config) -> str:
    with pytest.raises(UsageError) as e:
        KubeSource.check_config(cfg)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_kubeconfig_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    msg = one_line_error(Config(kubeconfig=str(path)))
    assert msg == f"--kubeconfig: cannot read {path}: No such file or directory"


def test_unreadable_kubeconfig_is_one_line(tmp_path: Path) -> None:
    msg = one_line_error(Config(kubeconfig=str(tmp_path)))  # a directory
    assert msg.startswith(f"--kubeconfig: cannot read {tmp_path}: ")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("clusters: [", "is not valid YAML"),
        ("just a string\n", "is not a kubeconfig"),
        ("", "is not a kubeconfig"),
        ("apiVersion: v1\nclusters: [{name: c, cluster: {server: 'http://x'}}]\n", "context"),
        (
            "apiVersion: v1\nclusters: [{name: c, cluster: {server: 'http://x'}}]\n"
            "contexts: [{name: x, context: {cluster: c}}]\ncurrent-context: y\n",
            "y",
        ),
    ],
)
def test_bad_kubeconfig_content_is_one_line(tmp_path: Path, content: str, says: str) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(content)
    msg = one_line_error(Config(kubeconfig=str(path)))
    assert msg.startswith(f"--kubeconfig: {path}") and says in msg


def test_not_in_a_pod_without_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert one_line_error(Config()) == NOT_IN_POD


def test_bad_master_url_is_one_line() -> None:
    assert one_line_error(Config(master="10.0.0.1:6443")).startswith("--master: ")


def test_source_constructor_and_check_raise_the_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        KubeSource(Config(kubeconfig=str(tmp_path / "nope")), Store())
    kc = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9")
    src = KubeSource(Config(kubeconfig=str(kc)), Store())
    src.check()  # as the daemon calls it before start()
    kc.unlink()
    with pytest.raises(UsageError):
        src.check()


# -- backoff -------------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    b = Backoff(0.5, 30.0)
    delays = [b.next() for _ in range(12)]
    assert 0.5 <= delays[0] <= 0.6
    assert 1.0 <= delays[1] <= 1.2
    assert all(d <= 30.0 for d in delays)
    assert delays[-1] == 30.0
    assert all(later >= earlier * 0.8 for earlier, later in itertools.pairwise(delays))
    b.reset()
    assert b.next() <= 0.6


class SleepRecorder:
    """Stands in for the informers' backoff waits: records each delay per resource and
    returns at once, except that a thread with `hold_after` delays is held until released
    (the outage goes on, without real waiting)."""

    def __init__(self, hold_after: int) -> None:
        self.delays: dict[str, list[float]] = {}
        self.hold_after = hold_after
        self.held: set[str] = set()
        self.lock = threading.Lock()
        self.release = threading.Event()

    def __call__(self, delay: float) -> None:
        resource = threading.current_thread().name.removeprefix("kube-")
        with self.lock:
            mine = self.delays.setdefault(resource, [])
            mine.append(delay)
            hold = len(mine) == self.hold_after
            if hold:
                self.held.add(resource)
        if hold:
            self.release.wait(60)


def test_relist_after_an_outage_does_not_wait_out_the_connection_backoff(env: Env) -> None:
    """Bug 6: one backoff served connection errors and the relist after a 410, so after a
    long outage the relist waited the 30 s cap again. Reconnects stay jittered and capped;
    the relist, once the server answers, comes after the list's own short backoff."""
    env.api.create(svc("a", "198.19.0.1"))
    sleeps = SleepRecorder(hold_after=12)
    src = env.source(backoff_initial=0.5, backoff_cap=30.0, sleep=sleeps)
    src.start()
    assert src.wait_synced(20)
    wait_for(lambda: env.api.open_watches() == 2, "both watches open")
    host, port = env.api.address
    env.api.stop()  # the outage: connections refused from now on
    env.api.create(svc("during", "198.19.0.2"))  # changed meanwhile, history compacted
    env.api.compact(keep_last=0)
    wait_for(lambda: sleeps.held == {"services", "endpointslices"}, "both watches held")
    outage = sleeps.delays["services"]
    # Exponential, jittered by at most 20 %, capped at 30 s.
    assert outage[0] <= 0.6 and all(d <= 30.0 for d in outage), outage
    assert outage[-1] == 30.0 and outage[-5] >= 0.8 * 30.0, outage
    assert len({round(d, 6) for d in outage[:6]}) == 6, outage  # grows (and is jittered)
    env.api.start(host=host, port=port)
    sleeps.release.set()  # the next reconnect gets through: 410, relist
    wait_for(lambda: cluster_ip(env.store, "during") == "198.19.0.2", "the relist")
    for resource in ("services", "endpointslices"):
        wait_for(lambda r=resource: len(sleeps.delays[r]) > sleeps.hold_after, f"{resource} 410")
        relist_delay = sleeps.delays[resource][sleeps.hold_after]
        assert relist_delay <= 0.6, sleeps.delays[resource]
    assert env.api.list_count("services") == 2


# -- this node's own Node ------------------------------------------------------------------


def _node(name: str, zone: str, ip: str = "198.18.200.1") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


def test_this_nodes_node_object_is_watched_by_name(env: Env) -> None:
    """The Node watch (a field selector on the node's name): its zone and IPs reach the
    model (the other Node, listed first, is never sent), changes follow, and a deleted
    Node is forgotten."""
    from proxy.endpoints.kube import DEFAULT_KINDS, this_node

    env.store = Store()  # takes any Node: only the server's field selector filters here
    env.api.create(_node("node-b", "zone-b", "198.18.200.2"))  # listed first if sent
    env.api.create(_node("node-a", "zone-a"))
    env.synced(kinds=(*DEFAULT_KINDS, this_node("node-a")))
    snap = env.store.snapshot()
    assert snap.model.node.zone == "zone-a" and snap.node_changed
    assert snap.model.node.addresses == ("198.18.200.1",)
    env.api.update(_node("node-a", "zone-c"))
    wait_for(lambda: model(env.store).node.zone == "zone-c", "zone followed")
    env.api.update(_node("node-a", "zone-c", "198.18.200.9"))
    wait_for(lambda: model(env.store).node.addresses == ("198.18.200.9",), "IP followed")
    env.api.delete("Node", "", "node-a")
    wait_for(lambda: model(env.store).node.zone == "", "Node deleted")
    assert env.api.list_count("nodes") == 1
    assert env.store.snapshot().node_changed is False  # taken by the waits above
