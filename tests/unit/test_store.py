"""The watch cache: change tracking, relists, bad objects, orphans."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Snapshot, Store
from tests.unit.factories import endpoint, service, slice_


@pytest.fixture
def store() -> Store:
    s = Store()
    s.replace(SERVICE, [service("web"), service("db", ip="198.19.0.11")])
    s.replace(ENDPOINT_SLICE, [slice_("web"), slice_("db")])
    return s


def test_initial_snapshot_has_everything(store: Store) -> None:
    assert store.has_synced
    snap = store.snapshot()
    assert set(snap.model.services) == {("default", "web"), ("default", "db")}
    assert snap.changed == {("default", "web"), ("default", "db")}
    assert store.snapshot().changed == frozenset()  # consumed


def test_endpoint_change_marks_only_its_service(store: Store) -> None:
    store.snapshot()
    store.upsert(ENDPOINT_SLICE, slice_("web", endpoints=[endpoint("198.18.1.99")]))
    snap = store.snapshot()
    assert snap.changed == {("default", "web")}
    eps = snap.model.endpoints[("default", "web")].ports[("http", "TCP")]
    assert [e.ip for e in eps] == ["198.18.1.99"]


def test_identical_update_is_not_a_change(store: Store) -> None:
    first = store.snapshot()
    store.upsert(SERVICE, service("web"))
    store.upsert(ENDPOINT_SLICE, slice_("web"))
    snap = store.snapshot()
    assert snap.changed == frozenset()
    # records of unchanged Services are shared between snapshots (cheap snapshots)
    assert snap.model.services[("default", "web")] is first.model.services[("default", "web")]


def test_relist_deletes_what_vanished(store: Store) -> None:
    store.snapshot()
    store.replace(SERVICE, [service("web")])
    store.replace(ENDPOINT_SLICE, [slice_("web")])
    snap = store.snapshot()
    assert set(snap.model.services) == {("default", "web")}
    assert ("default", "db") not in snap.model.endpoints
    assert snap.changed == {("default", "db")}


def test_delete_slice_empties_endpoints(store: Store) -> None:
    store.snapshot()
    store.delete(ENDPOINT_SLICE, slice_("web"))
    snap = store.snapshot()
    assert snap.model.endpoints_of(("default", "web")).ports == {}
    assert snap.changed == {("default", "web")}


def test_bad_new_object_is_skipped_and_logged(store: Store, caplog) -> None:
    store.snapshot()
    with caplog.at_level(logging.WARNING):
        store.upsert(SERVICE, service("bad", ip="999.1.1.1"))
    assert "skipping Service default/bad" in caplog.text
    assert ("default", "bad") not in store.snapshot().model.services


def test_bad_update_keeps_previous_version(store: Store, caplog) -> None:
    store.snapshot()
    with caplog.at_level(logging.WARNING):
        store.upsert(SERVICE, service("web", ip="not-an-ip"))
    assert "keeping the previous version" in caplog.text
    svc = store.snapshot().model.services[("default", "web")]
    assert svc.cluster_ips == ("198.19.0.10",)


def test_multiple_slices_merge_and_relabel() -> None:
    s = Store()
    s.replace(SERVICE, [service("web"), service("api", ip="198.19.0.12")])
    s.replace(
        ENDPOINT_SLICE,
        [
            slice_("web", "web-1", endpoints=[endpoint("198.18.1.1")]),
            slice_("web", "web-2", endpoints=[endpoint("198.18.1.2"), endpoint("198.18.1.1")]),
        ],
    )
    m = s.snapshot().model
    assert [e.ip for e in m.endpoints[("default", "web")].ports[("http", "TCP")]] == [
        "198.18.1.1",
        "198.18.1.2",
    ]
    # web-2 now belongs to api: both Services change.
    s.upsert(ENDPOINT_SLICE, slice_("api", "web-2", endpoints=[endpoint("198.18.1.2")]))
    snap = s.snapshot()
    assert snap.changed == {("default", "web"), ("default", "api")}
    assert [e.ip for e in snap.model.endpoints[("default", "web")].ports[("http", "TCP")]] == [
        "198.18.1.1"
    ]


def test_orphan_slice_logged_once_and_used_when_service_arrives(caplog) -> None:
    s = Store()
    s.replace(SERVICE, [])
    s.replace(ENDPOINT_SLICE, [slice_("late")])
    with caplog.at_level(logging.WARNING):
        s.snapshot()
        s.snapshot()
    assert caplog.text.count("Service default/late is unknown") == 1
    s.upsert(SERVICE, service("late"))
    snap = s.snapshot()
    assert snap.model.endpoints_for(
        snap.model.services[("default", "late")], snap.model.services[("default", "late")].ports[0]
    )


ANN = "endpoints.kubernetes.io/last-change-trigger-time"
START = 1_800_000_000.0  # the store's (the daemon's) start, epoch seconds


def _at(seconds_after_start: float) -> dict[str, str]:
    ts = datetime.fromtimestamp(START + seconds_after_start, UTC)
    return {ANN: ts.isoformat().replace("+00:00", "Z")}


def test_trigger_times_are_kept_per_change_after_start() -> None:
    s = Store(start_time=START)
    s.replace(SERVICE, [service("web")])
    s.replace(ENDPOINT_SLICE, [])
    s.snapshot()
    s.upsert(ENDPOINT_SLICE, slice_("web", annotations=_at(10)))
    s.upsert(ENDPOINT_SLICE, slice_("web", endpoints=[endpoint("198.18.1.5")], annotations=_at(20)))
    s.upsert(ENDPOINT_SLICE, slice_("web", endpoints=[endpoint("198.18.1.5")], annotations=_at(20)))
    snap = s.snapshot()
    # kube-proxy observes one latency per change (the repeat is no change).
    assert snap.trigger_times == {("default", "web"): (START + 10, START + 20)}
    assert s.snapshot().trigger_times == {}


def test_trigger_times_from_before_start_are_ignored_on_start_and_relist() -> None:
    """Bug 5: the initial list (and every relist) fed trigger times older than the
    daemon to the network-programming latency metric."""
    s = Store(start_time=START)
    old = slice_("web", annotations=_at(-3600))
    s.replace(SERVICE, [service("web")])
    s.replace(ENDPOINT_SLICE, [old])
    assert s.snapshot().trigger_times == {}
    s.replace(ENDPOINT_SLICE, [old])  # a relist: nothing changed
    assert s.snapshot().trigger_times == {}
    # A relist that carries a change made while the watch was down counts, as kube-proxy's.
    moved = slice_("web", endpoints=[endpoint("198.18.1.7")], annotations=_at(30))
    s.replace(ENDPOINT_SLICE, [moved])
    assert s.snapshot().trigger_times == {("default", "web"): (START + 30,)}


def test_deleting_a_slice_drops_its_services_pending_trigger_times() -> None:
    s = Store(start_time=START)
    s.replace(SERVICE, [service("web")])
    s.replace(
        ENDPOINT_SLICE,
        [slice_("web", "web-1"), slice_("web", "web-2", endpoints=[endpoint("198.18.1.9")])],
    )
    s.snapshot()
    s.upsert(ENDPOINT_SLICE, slice_("web", "web-1", annotations=_at(5), endpoints=[]))
    s.delete(ENDPOINT_SLICE, slice_("web", "web-2"))
    snap = s.snapshot()
    assert snap.changed == {("default", "web")}
    assert snap.trigger_times == {}  # as kube-proxy: a deletion's annotation is stale


def test_listeners_are_notified() -> None:
    s = Store()
    calls = []
    s.subscribe(lambda: calls.append(1))
    s.upsert(SERVICE, service("web"))
    s.upsert(SERVICE, service("web"))  # no change: no call
    assert calls == [1]


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_service_and_endpoint_changes_are_counted_per_event(store: Store) -> None:
    """Bug 5: the totals were added at sync time (lost when a sync failed); kube-proxy
    counts every event as it arrives, pending ones by Service."""
    store.snapshot()
    svc0 = _sample("kubeproxy_sync_proxy_rules_service_changes_total")
    ep0 = _sample("kubeproxy_sync_proxy_rules_endpoint_changes_total")
    store.upsert(SERVICE, service("web", ip="198.19.0.99"))
    store.upsert(ENDPOINT_SLICE, slice_("db", endpoints=[endpoint("198.18.9.9")]))
    store.upsert(ENDPOINT_SLICE, slice_("web", endpoints=[endpoint("198.18.9.8")]))
    store.upsert(ENDPOINT_SLICE, slice_("web", endpoints=[endpoint("198.18.9.7")]))
    assert _sample("kubeproxy_sync_proxy_rules_service_changes_total") == svc0 + 1
    assert _sample("kubeproxy_sync_proxy_rules_endpoint_changes_total") == ep0 + 3
    assert _sample("kubeproxy_sync_proxy_rules_service_changes_pending") == 1
    assert _sample("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 2
    snap = store.snapshot()
    assert snap.changed == {("default", "web"), ("default", "db")}
    assert _sample("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    store.replace(SERVICE, [service("web", ip="198.19.0.99")])  # a relist: one event each
    assert _sample("kubeproxy_sync_proxy_rules_service_changes_total") == svc0 + 1 + 2


def test_snapshot_does_not_wait_for_a_relist_being_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug 2: the store's lock was held while a whole list was parsed, and the loop takes
    it for every snapshot: a relist of 3k Services stalled DNS and new connections for
    hundreds of ms. Here the parse of one object blocks until the snapshot has returned."""
    from proxy.endpoints import store as store_module

    store = Store()
    store.replace(SERVICE, [service("web")])
    store.replace(ENDPOINT_SLICE, [slice_("web")])
    store.snapshot()
    parsing, release = threading.Event(), threading.Event()
    real_parse = store_module.parse_service

    def parse(obj: dict) -> object:
        if obj["metadata"]["name"] == "blocker":
            parsing.set()
            release.wait(60)
        return real_parse(obj)

    monkeypatch.setattr(store_module, "parse_service", parse)
    relist = [service("web"), service("blocker", ip="198.19.0.12"), service("db", ip="198.19.0.11")]
    writer = threading.Thread(target=store.replace, args=(SERVICE, relist))
    writer.start()
    try:
        assert parsing.wait(60), "the relist never reached the blocking parse"
        snaps: list[Snapshot] = []
        reader = threading.Thread(target=lambda: snaps.append(store.snapshot()))
        reader.start()
        reader.join(60)  # a generous deadline for the state asserted below
        assert snaps, "snapshot() waited for the relist's parse"
        assert set(snaps[0].model.services) == {("default", "web")}  # the relist is not half in
    finally:
        release.set()
        writer.join(60)
    assert set(store.snapshot().model.services) == {
        ("default", "web"),
        ("default", "blocker"),
        ("default", "db"),
    }


# -- this node ----------------------------------------------------------------------------


def _node(name: str, zone: str) -> dict:
    return {
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.18.200.1"}]},
    }


def test_this_node_only_and_node_changes_flagged() -> None:
    from proxy.endpoints.store import NODE

    st = Store(node_name="node-a")
    st.replace("Service", [])
    st.replace("EndpointSlice", [])
    assert st.has_synced  # the Node never gates the first sync
    first = st.snapshot()
    assert first.model.node.zone == "" and not first.node_changed
    st.replace(NODE, [_node("node-b", "zone-b"), _node("node-a", "zone-a")])
    snap = st.snapshot()
    assert snap.model.node.zone == "zone-a" and snap.node_changed and not snap.changed
    st.upsert(NODE, _node("node-b", "zone-x"))  # another node: ignored
    assert not st.snapshot().node_changed
    st.upsert(NODE, _node("node-a", "zone-a"))  # the same: nothing changed
    assert not st.snapshot().node_changed
    st.delete(NODE, _node("node-a", "zone-a"))
    snap = st.snapshot()
    assert snap.node_changed and snap.model.node.zone == ""


def test_leading_zero_ips_are_programmed_with_a_warning(caplog) -> None:
    st = Store()
    with caplog.at_level("WARNING", logger="proxy.store"):
        st.replace("Service", [service(ip="198.19.000.010")])
        st.replace("Service", [service(ip="198.19.000.010")])  # unchanged: not again
    snap = st.snapshot()
    assert snap.model.services[("default", "web")].cluster_ips == ("198.19.0.10",)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "Service default/web: clusterIP '198.19.000.010' has leading zeros; read as decimal "
        "198.19.0.10, as kube-proxy does"
    ]
