"""The test API server keeps real list/watch semantics (so informer tests mean something)."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.testbed.apiserver import (
    AdminClient,
    ApiServer,
    ApiServerClient,
    parse_selector,
    selector_matches,
    wait_for,
    write_kubeconfig,
)

ROOT = Path(__file__).resolve().parents[2]


def svc(name: str, ip: str, ns: str = "default", labels: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]},
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
        "ports": [{"port": 8080, "protocol": "TCP", "name": ""}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
    }


@pytest.fixture
def api() -> Iterator[ApiServer]:
    server = ApiServer().start()
    yield server
    server.stop()


def get(api: ApiServer, path: str) -> tuple[int, Any]:
    host, port = api.address
    c = http.client.HTTPConnection(host, port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


class Watch:
    """A raw watch stream read line by line (http.client undoes the chunking)."""

    def __init__(self, api: ApiServer, path: str) -> None:
        host, port = api.address
        self.conn = http.client.HTTPConnection(host, port, timeout=10)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200

    def next(self) -> dict:
        line = self.resp.readline()
        assert line, "stream ended"
        return json.loads(line)

    def take(self, n: int) -> list[dict]:
        return [self.next() for _ in range(n)]

    def rest(self) -> list[dict]:
        """Everything until the server ends the stream cleanly."""
        return [json.loads(line) for line in self.resp.read().splitlines() if line]

    def close(self) -> None:
        self.conn.close()


def summary(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"].get("name", "")) for e in events]


# -- list --------------------------------------------------------------------------------


def test_list_returns_items_and_the_global_resource_version(api: ApiServer) -> None:
    api.create(svc("a", "198.19.0.1"))
    api.create(svc("b", "198.19.0.2", ns="other"))
    api.create(eps("a-1", "a", ["198.18.0.1"]))
    code, body = get(api, "/api/v1/services")
    assert code == 200
    assert body["kind"] == "ServiceList"
    assert body["metadata"]["resourceVersion"] == str(api.resource_version)
    assert sorted(i["metadata"]["name"] for i in body["items"]) == ["a", "b"]
    for rv in ("0", ""):
        _, again = get(api, f"/api/v1/services?resourceVersion={rv}")
        assert len(again["items"]) == 2
    _, ns_only = get(api, "/api/v1/namespaces/other/services")
    assert [i["metadata"]["name"] for i in ns_only["items"]] == ["b"]
    _, slices = get(api, "/apis/discovery.k8s.io/v1/endpointslices")
    assert slices["kind"] == "EndpointSliceList" and len(slices["items"]) == 1
    assert api.list_count("services") == 4 and api.list_count("EndpointSlice") == 1


def test_writes_assign_increasing_versions_uids_and_timestamps(api: ApiServer) -> None:
    a = api.create(svc("a", "198.19.0.1"))
    b = api.create(svc("b", "198.19.0.2"))
    a2 = api.update(svc("a", "198.19.0.3"))
    assert int(a["metadata"]["resourceVersion"]) < int(b["metadata"]["resourceVersion"])
    assert int(b["metadata"]["resourceVersion"]) < int(a2["metadata"]["resourceVersion"])
    assert a2["metadata"]["uid"] == a["metadata"]["uid"] != b["metadata"]["uid"]
    assert a2["metadata"]["creationTimestamp"] == a["metadata"]["creationTimestamp"]
    gone = api.delete("Service", "default", "a")
    assert int(gone["metadata"]["resourceVersion"]) == api.resource_version
    with pytest.raises(KeyError):
        api.delete("Service", "default", "a")
    with pytest.raises(FileExistsError):
        api.create(svc("b", "198.19.0.2"))
    with pytest.raises(KeyError):
        api.update(svc("nope", "198.19.0.9"))


def test_unknown_paths_and_discovery(api: ApiServer) -> None:
    assert get(api, "/api/v1/pods")[0] == 404
    assert get(api, "/apis/discovery.k8s.io/v1/services")[0] == 404
    code, version = get(api, "/version")
    assert code == 200 and version["major"] == "1"
    assert "v1" in get(api, "/api")[1]["versions"]
    groups = get(api, "/apis")[1]["groups"]
    assert [g["name"] for g in groups] == ["discovery.k8s.io"]


# -- watch -------------------------------------------------------------------------------


def test_watch_replays_history_after_the_given_version_then_ends_on_timeout(
    api: ApiServer,
) -> None:
    api.create(svc("a", "198.19.0.1"))
    start = api.resource_version
    api.create(svc("b", "198.19.0.2"))
    api.create(eps("b-1", "b", ["198.18.0.1"]))  # another resource: not in this stream
    api.update(svc("a", "198.19.0.3"))
    api.delete("services", "default", "b")
    w = Watch(api, f"/api/v1/services?watch=1&resourceVersion={start}&timeoutSeconds=1")
    events = w.rest()  # the server ends the stream cleanly after timeoutSeconds
    assert summary(events) == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and rvs[-1] == api.resource_version
    assert api.watch_count("services") == 1


def test_watch_from_zero_starts_with_the_current_state_then_goes_live(api: ApiServer) -> None:
    api.create(svc("a", "198.19.0.1"))
    w = Watch(api, "/api/v1/services?watch=true&resourceVersion=0")
    assert summary(w.take(1)) == [("ADDED", "a")]
    api.create(svc("b", "198.19.0.2"))
    assert summary(w.take(1)) == [("ADDED", "b")]
    w.close()


def test_compacted_history_answers_410_expired(api: ApiServer) -> None:
    api.create(svc("a", "198.19.0.1"))
    old = api.resource_version
    api.create(svc("b", "198.19.0.2"))
    api.create(svc("c", "198.19.0.3"))
    api.compact(keep_last=1)  # only c's ADDED remains
    w = Watch(api, f"/api/v1/services?watch=1&resourceVersion={old}")
    events = w.rest()
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert status["code"] == 410 and status["reason"] == "Expired"
    assert "too old resource version" in status["message"]
    # From just before the kept event, the watch is still valid.
    w = Watch(api, f"/api/v1/services?watch=1&resourceVersion={old + 1}")
    assert summary(w.take(1)) == [("ADDED", "c")]
    w.close()


def test_history_is_bounded_by_its_limit() -> None:
    with ApiServer(history_limit=10).start() as api:
        first = api.resource_version
        for i in range(25):
            api.create(svc(f"s{i}", f"198.19.1.{i}"))
        w = Watch(api, f"/api/v1/services?watch=1&resourceVersion={first}")
        assert [e["type"] for e in w.rest()] == ["ERROR"]
        recent = api.resource_version - 5
        w = Watch(api, f"/api/v1/services?watch=1&resourceVersion={recent}")
        assert [e["type"] for e in w.take(5)] == ["ADDED"] * 5
        w.close()


def test_lagging_watch_expires_when_history_is_compacted_under_it(api: ApiServer) -> None:
    api.create(svc("a", "198.19.0.1"))
    start = api.resource_version
    api.stall_watches(60)
    w = Watch(api, f"/api/v1/services?watch=1&resourceVersion={start}")
    api.create(svc("b", "198.19.0.2"))
    api.compact(keep_last=0)
    api.release_watches()
    events = w.rest()
    assert [e["type"] for e in events] == ["ERROR"]
    assert events[0]["object"]["code"] == 410


def test_bookmarks_carry_the_global_version_only_when_asked(api: ApiServer) -> None:
    api.create(svc("a", "198.19.0.1"))
    start = api.resource_version
    with_bm = Watch(
        api, f"/api/v1/services?watch=1&resourceVersion={start}&allowWatchBookmarks=true"
    )
    without = Watch(api, f"/api/v1/services?watch=1&resourceVersion={start}")
    wait_for(lambda: api.open_watches("services") == 2, "two open watches")
    for i in range(3):  # churn in another resource moves the global version
        api.create(eps(f"x-{i}", "a", [f"198.18.0.{i + 1}"]))
    api.send_bookmarks()
    bm = with_bm.next()
    assert bm["type"] == "BOOKMARK"
    assert bm["object"]["kind"] == "Service"
    assert bm["object"]["metadata"]["resourceVersion"] == str(api.resource_version)
    api.create(svc("b", "198.19.0.2"))
    assert summary(without.take(1)) == [("ADDED", "b")]  # no bookmark came first
    assert summary(with_bm.take(1)) == [("ADDED", "b")]
    with_bm.close()
    without.close()


def test_drop_watches_breaks_streams_without_a_clean_end(api: ApiServer) -> None:
    w = Watch(api, "/api/v1/services?watch=1&resourceVersion=0")
    wait_for(lambda: api.open_watches() == 1, "the watch to open")
    assert api.drop_watches() == 1
    with pytest.raises(http.client.IncompleteRead):
        w.resp.read()
    wait_for(lambda: api.open_watches() == 0, "the watch to be gone")


def test_stalled_watch_holds_events_until_released(api: ApiServer) -> None:
    start = api.resource_version
    w = Watch(api, f"/api/v1/services?watch=1&resourceVersion={start}")
    wait_for(lambda: api.open_watches() == 1, "the watch to open")
    api.stall_watches(60)
    api.create(svc("a", "198.19.0.1"))
    # Nothing arrives while stalled (the headers were read; the socket stays quiet).
    assert select.select([w.conn.sock], [], [], 0.3)[0] == []
    api.release_watches()
    assert summary(w.take(1)) == [("ADDED", "a")]
    w.close()


def test_injected_lines_reach_open_streams_only(api: ApiServer) -> None:
    w = Watch(api, f"/api/v1/services?watch=1&resourceVersion={api.resource_version}")
    wait_for(lambda: api.open_watches() == 1, "the watch to open")
    assert api.inject_event("services", b"this is not json") == 1
    assert w.resp.readline() == b"this is not json\n"
    assert api.inject_event("endpointslices", b"{}") == 0
    w.close()


def test_label_selector_on_watch_turns_relabels_into_added_and_deleted(api: ApiServer) -> None:
    api.create(svc("a", "198.19.0.1", labels={"env": "prod"}))
    start = api.resource_version
    w = Watch(api, f"/api/v1/services?watch=1&resourceVersion={start}&labelSelector=env%3Dprod")
    api.update(svc("a", "198.19.0.1", labels={"env": "dev"}))  # leaves the selection
    api.create(svc("b", "198.19.0.2", labels={"env": "dev"}))  # never in it
    api.update(svc("a", "198.19.0.1", labels={"env": "prod"}))  # comes back
    api.update(svc("a", "198.19.0.5", labels={"env": "prod"}))
    assert summary(w.take(3)) == [("DELETED", "a"), ("ADDED", "a"), ("MODIFIED", "a")]
    w.close()


# -- label selectors ---------------------------------------------------------------------

PROXY = "service.kubernetes.io/service-proxy-name"


@pytest.mark.parametrize(
    ("selector", "labels", "want"),
    [
        ("", {}, True),
        (f"!{PROXY}", {}, True),
        (f"!{PROXY}", {PROXY: "other"}, False),
        (f"!{PROXY},!service.kubernetes.io/headless", {"x": "y"}, True),
        (
            f"!{PROXY},!service.kubernetes.io/headless",
            {"service.kubernetes.io/headless": ""},
            False,
        ),
        ("kubernetes.io/service-name=web", {"kubernetes.io/service-name": "web"}, True),
        ("kubernetes.io/service-name==web", {"kubernetes.io/service-name": "db"}, False),
        ("kubernetes.io/service-name=web", {}, False),
        ("env!=prod", {}, True),
        ("env!=prod", {"env": "prod"}, False),
        ("env!=prod", {"env": "dev"}, True),
        ("env", {"env": ""}, True),
        ("env", {}, False),
        ("env in (prod, staging)", {"env": "staging"}, True),
        ("env in (prod,staging)", {"env": "dev"}, False),
        ("env in (prod,staging)", {}, False),
        ("env notin (prod,staging)", {"env": "dev"}, True),
        ("env notin (prod,staging)", {}, True),
        ("env notin (prod,staging)", {"env": "prod"}, False),
        ("env in (a,b),tier=web", {"env": "a", "tier": "web"}, True),
        ("env in (a,b),tier=web", {"env": "a", "tier": "db"}, False),
    ],
)
def test_selector_semantics(selector: str, labels: dict[str, str], want: bool) -> None:
    obj = {"metadata": {"labels": labels}}
    assert selector_matches(parse_selector(selector), obj) is want


@pytest.mark.parametrize("bad", ["env in prod", "=x", "a,,b", "env===x", "in (a)"])
def test_invalid_selectors_are_refused(api: ApiServer, bad: str) -> None:
    with pytest.raises(ValueError):
        parse_selector(bad)
    from urllib.parse import quote

    code, body = get(api, f"/api/v1/services?labelSelector={quote(bad)}")
    assert code == 400 and body["reason"] == "BadRequest"


def test_list_filters_by_label_selector(api: ApiServer) -> None:
    api.create(svc("plain", "198.19.0.1"))
    api.create(svc("other-proxy", "198.19.0.2", labels={PROXY: "someone-else"}))
    api.create(eps("plain-1", "plain", ["198.18.0.1"]))
    api.create(eps("other-1", "other-proxy", ["198.18.0.2"]))
    _, body = get(api, f"/api/v1/services?labelSelector=%21{PROXY}")
    assert [i["metadata"]["name"] for i in body["items"]] == ["plain"]
    sel = "kubernetes.io%2Fservice-name%3Dplain"
    _, body = get(api, f"/apis/discovery.k8s.io/v1/endpointslices?labelSelector={sel}")
    assert [i["metadata"]["name"] for i in body["items"]] == ["plain-1"]


# -- serving -----------------------------------------------------------------------------


def test_serves_on_a_pre_bound_socket_that_is_not_yet_listening() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    with ApiServer().start(sock=sock) as api:
        assert api.address == ("127.0.0.1", port)
        assert get(api, "/version")[0] == 200


def test_restart_on_the_same_port_keeps_state_and_versions(api: ApiServer) -> None:
    api.create(svc("a", "198.19.0.1"))
    host, port = api.address
    rv = api.resource_version
    api.stop()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2).close()
    api.start(host=host, port=port)
    _, body = get(api, "/api/v1/services")
    assert body["metadata"]["resourceVersion"] == str(rv)
    assert [i["metadata"]["name"] for i in body["items"]] == ["a"]


def test_the_official_client_lists_watches_and_writes(api: ApiServer, tmp_path: Path) -> None:
    from kubernetes import client, config, watch

    conf = client.Configuration()
    config.load_kube_config(
        str(write_kubeconfig(tmp_path / "kc", api.url)), client_configuration=conf
    )
    with client.ApiClient(conf) as c:
        core, disc = client.CoreV1Api(c), client.DiscoveryV1Api(c)
        made = core.create_namespaced_service("default", svc("a", "198.19.0.1"))
        assert made.metadata.uid and made.spec.cluster_ip == "198.19.0.1"
        disc.create_namespaced_endpoint_slice("default", eps("a-1", "a", ["198.18.0.1"]))
        listed = core.list_service_for_all_namespaces()
        assert [s.metadata.name for s in listed.items] == ["a"]
        assert listed.metadata.resource_version == str(api.resource_version)
        slices = disc.list_endpoint_slice_for_all_namespaces()
        assert slices.items[0].endpoints[0].addresses == ["198.18.0.1"]
        assert client.VersionApi(c).get_code().major == "1"
        w = watch.Watch()
        stream = w.stream(
            core.list_service_for_all_namespaces,
            resource_version=listed.metadata.resource_version,
            timeout_seconds=5,
        )
        core.delete_namespaced_service("a", "default")
        ev = next(stream)
        assert ev["type"] == "DELETED" and ev["object"].metadata.name == "a"
        w.stop()
    assert api.get("Service", "default", "a") is None


def test_admin_api_and_process_mode(tmp_path: Path) -> None:
    objs = tmp_path / "objs.yaml"
    objs.write_text(
        json.dumps(svc("a", "198.19.0.1")) + "\n---\n" + json.dumps(eps("a-1", "a", ["198.18.0.1"]))
    )
    kc = tmp_path / "kubeconfig"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.testbed.apiserver", "--listen", "127.0.0.1:0",
         "--load", str(objs), "--kubeconfig", str(kc)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line
        url = line.split()[-1]
        assert url in kc.read_text()
        admin = AdminClient(url)
        assert admin.stats()["objects"] == {"services": 1, "endpointslices": 1, "nodes": 0}
        admin.apply(svc("b", "198.19.0.2"))
        admin.apply(node("n1"))  # a cluster-scoped object, deleted without a namespace
        assert admin.delete("nodes", "", "n1")["metadata"]["name"] == "n1"
        assert admin.delete("services", "default", "a")["metadata"]["name"] == "a"
        stats = admin.stats()
        assert stats["objects"]["services"] == 1
        assert admin.drop_watches() == 0
        assert admin.compact(0) == stats["resourceVersion"]
        admin.stall_watches(1)
        admin.release_watches()
        admin.send_bookmarks()
        assert admin.inject("services", b"x") == 0
        other = ApiServerClient("", url.removeprefix("http://"))  # the netns="" form
        other.wait_ready(10)
        other.put(svc("c", "198.19.0.3"))
        assert other.stats()["objects"]["services"] == 2
        with pytest.raises(RuntimeError, match="HTTP 404"):
            other.delete("services", "default", "nope")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


# -- Nodes and field selectors -------------------------------------------------------------


def node(name: str, zone: str = "zone-a", ip: str = "198.18.200.1") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


def test_nodes_are_cluster_scoped(api: ApiServer) -> None:
    made = api.create(node("n1") | {"metadata": {"name": "n1", "namespace": "default"}})
    assert "namespace" not in made["metadata"]
    api.create(node("n2"))
    status, body = get(api, "/api/v1/nodes")
    assert status == 200 and body["kind"] == "NodeList"
    assert sorted(i["metadata"]["name"] for i in body["items"]) == ["n1", "n2"]
    assert get(api, "/api/v1/nodes/n2")[1]["metadata"]["name"] == "n2"
    assert get(api, "/api/v1/namespaces/default/nodes")[0] == 404
    assert api.get("Node", "", "n1") is not None
    api.delete("nodes", "", "n1")
    assert get(api, "/api/v1/nodes/n1")[0] == 404


def test_field_selector_on_list_and_watch(api: ApiServer) -> None:
    api.create(node("n1"))
    api.create(node("n2"))
    status, body = get(api, "/api/v1/nodes?fieldSelector=metadata.name%3Dn2")
    assert status == 200 and [i["metadata"]["name"] for i in body["items"]] == ["n2"]
    _, body = get(api, "/api/v1/nodes?fieldSelector=metadata.name!%3Dn2")
    assert [i["metadata"]["name"] for i in body["items"]] == ["n1"]
    start = api.resource_version
    w = Watch(
        api, f"/api/v1/nodes?watch=1&resourceVersion={start}&fieldSelector=metadata.name%3Dn2"
    )
    api.update(node("n1", zone="zone-x"))  # another node: never sent
    api.update(node("n2", zone="zone-b"))
    api.delete("Node", "", "n2")
    api.create(node("n2", zone="zone-c"))
    got = w.take(3)
    assert summary(got) == [("MODIFIED", "n2"), ("DELETED", "n2"), ("ADDED", "n2")]
    assert got[2]["object"]["metadata"]["labels"]["topology.kubernetes.io/zone"] == "zone-c"
    w.close()
    # Namespaces too, on namespaced resources.
    api.create(svc("a", "198.19.0.1", ns="x"))
    api.create(svc("a", "198.19.0.1", ns="y"))
    _, body = get(api, "/api/v1/services?fieldSelector=metadata.namespace%3Dy")
    assert [i["metadata"]["namespace"] for i in body["items"]] == ["y"]


@pytest.mark.parametrize("bad", ["spec.unknown=x", "metadata.name", "=x", "metadata.name~x"])
def test_unsupported_field_selectors_are_refused(api: ApiServer, bad: str) -> None:
    status, body = get(api, f"/api/v1/nodes?fieldSelector={bad}")
    assert status == 400 and body["kind"] == "Status", body


def test_the_official_client_watches_one_node(api: ApiServer, tmp_path: Path) -> None:
    """What KubeSource sends (list_node with a field selector), through the client."""
    from kubernetes import client, config

    conf = client.Configuration()
    config.load_kube_config(
        str(write_kubeconfig(tmp_path / "kc", api.url)), client_configuration=conf
    )
    api.create(node("n1"))
    api.create(node("n2", zone="zone-b"))
    with client.ApiClient(conf) as c:
        nodes = client.CoreV1Api(c).list_node(field_selector="metadata.name=n2")
        assert [n.metadata.name for n in nodes.items] == ["n2"]
        assert nodes.items[0].metadata.labels["topology.kubernetes.io/zone"] == "zone-b"
