"""The watch cache: change tracking, relists, bad objects, orphans."""

from __future__ import annotations

import logging

import pytest

from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Store
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


def test_trigger_time_is_earliest_pending() -> None:
    s = Store()
    s.replace(SERVICE, [service("web")])
    s.replace(ENDPOINT_SLICE, [])
    s.snapshot()
    ann = "endpoints.kubernetes.io/last-change-trigger-time"
    s.upsert(ENDPOINT_SLICE, slice_("web", annotations={ann: "2026-01-01T00:00:10Z"}))
    s.upsert(
        ENDPOINT_SLICE,
        slice_(
            "web", endpoints=[endpoint("198.18.1.5")], annotations={ann: "2026-01-01T00:00:20Z"}
        ),
    )
    snap = s.snapshot()
    assert snap.trigger_times[("default", "web")] == 1767225610.0


def test_listeners_are_notified() -> None:
    s = Store()
    calls = []
    s.subscribe(lambda: calls.append(1))
    s.upsert(SERVICE, service("web"))
    s.upsert(SERVICE, service("web"))  # no change: no call
    assert calls == [1]


def test_service_and_endpoint_changes_are_counted_apart(store: Store) -> None:
    store.snapshot()
    store.upsert(SERVICE, service("web", ip="198.19.0.99"))
    store.upsert(ENDPOINT_SLICE, slice_("db", endpoints=[endpoint("198.18.9.9")]))
    store.upsert(ENDPOINT_SLICE, slice_("web", endpoints=[endpoint("198.18.9.8")]))
    snap = store.snapshot()
    assert snap.changed == {("default", "web"), ("default", "db")}
    assert (snap.service_changes, snap.endpoint_changes) == (1, 2)
