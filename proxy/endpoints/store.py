"""The watch cache and change tracker: raw objects in, Model snapshots out.

Sources (the Kubernetes informer, the manifests reader) run in worker threads and call
`upsert` / `delete` / `replace`; the sync runner on the event loop calls `snapshot`,
which returns a consistent Model plus exactly which Services changed since the previous
snapshot (kube-proxy's ServiceChangeTracker/EndpointsChangeTracker, in one place).

Two locks, so the loop never waits behind control-plane work: writers (source threads)
parse with no lock held, then take `_write` (writers only) to work out what changed,
and `_lock` only to publish it, a few dict assignments; `snapshot` takes only `_lock`.
A relist of 10k Services is parsed and diffed while snapshots go on.

Bad objects are skipped here, once, with one log line naming the object and the reason,
and counted; an invalid update to an object that was fine keeps the previous version
(as the API server would have refused the edit).

Metrics as kube-proxy's trackers keep them: `…_changes_total` count every event, when it
arrives (so a failed sync loses none); `…_changes_pending` the Services changed since the
last snapshot; last-change-trigger-times are kept per Service, one per change, only for
changes made after this store was created (the daemon's start), and dropped when a slice
is deleted (its annotation then dates from an earlier update).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy import memory, metrics
from proxy.endpoints.parse import (
    BadObject,
    ParsedService,
    Slice,
    merge_slices,
    object_ref,
    parse_service,
    parse_slice,
)
from proxy.model import EMPTY_ENDPOINTS, Model, Service, ServiceEndpoints, ServiceKey, make_model

log = logging.getLogger("proxy.store")

SERVICE = "Service"
ENDPOINT_SLICE = "EndpointSlice"
KINDS = (SERVICE, ENDPOINT_SLICE)
TRIM_AFTER_OBJECTS = 2000  # relists at least this large are followed by memory.trim()

Uid = tuple[str, str]  # (namespace, name) of an object


@dataclass(frozen=True, slots=True)
class Snapshot:
    model: Model
    changed: frozenset[ServiceKey]  # Services whose record or endpoints changed
    # last-change-trigger-times (epoch s) of the changes to each changed Service's
    # endpoints, for the network-programming latency metric.
    trigger_times: dict[ServiceKey, tuple[float, ...]] = field(default_factory=dict)


def _uid(obj: Any) -> Uid:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def _count(se: ServiceEndpoints) -> int:
    return sum(len(eps) for eps in se.ports.values())


@dataclass(slots=True)
class _Parsed:
    """One object, parsed with no lock held: a record, or why it cannot be one."""

    uid: Uid
    ref: str  # "kind ns/name" of a bad object, for its log line; "" otherwise
    record: Service | Slice | None
    error: str = ""
    problems: tuple[str, ...] = ()


def _parse(kind: str, obj: Any) -> _Parsed:
    uid = _uid(obj)
    try:
        if kind == SERVICE:
            ps: ParsedService = parse_service(obj)
            return _Parsed(uid, "", ps.service, problems=ps.problems)
        sl = parse_slice(obj)
        return _Parsed(uid, "", sl, problems=sl.problems)
    except BadObject as e:
        # No reference to the raw object is kept: a list's decoded dicts are freed one by
        # one as they are parsed (see Store.replace), not all at the end.
        return _Parsed(uid, object_ref(obj), None, str(e))


class _Txn:
    """What one write changes in the published state, staged while only `_write` is
    held and applied under `_lock` by `Store._publish`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.services: dict[ServiceKey, Service | None] = {}  # None: deleted
        self.endpoints: dict[ServiceKey, ServiceEndpoints] = {}  # EMPTY_ENDPOINTS: none
        self.svc_changed: set[ServiceKey] = set()
        self.ep_changed: set[ServiceKey] = set()
        self.triggers: dict[ServiceKey, list[float]] = {}
        self.dropped_triggers: set[ServiceKey] = set()
        self.orphan_check: set[ServiceKey] = set()
        self.deleted_slices: set[Uid] = set()
        self.service_events = 0
        self.endpoint_events = 0

    def service(self, key: ServiceKey) -> Service | None:
        if key in self.services:
            return self.services[key]
        return self.store._services.get(key)

    def endpoints_of(self, key: ServiceKey) -> ServiceEndpoints:
        if key in self.endpoints:
            return self.endpoints[key]
        return self.store._endpoints.get(key, EMPTY_ENDPOINTS)

    @property
    def changed(self) -> bool:
        return bool(self.svc_changed or self.ep_changed)


class Store:
    """Thread-safe cache of Services and EndpointSlices with change tracking."""

    def __init__(self, *, start_time: float | None = None) -> None:
        self._write = threading.Lock()  # writers only: held while working out a change
        self._lock = threading.Lock()  # the published state: held only to publish/snapshot
        # Published (written under both locks, read by snapshot under _lock).
        self._services: dict[ServiceKey, Service] = {}
        self._endpoints: dict[ServiceKey, ServiceEndpoints] = {}
        # Services changed since the last snapshot, by what changed (kube-proxy's
        # *_changes_pending metrics count them apart); their union is `changed`.
        self._svc_changed: set[ServiceKey] = set()
        self._ep_changed: set[ServiceKey] = set()
        self._n_endpoints = 0  # (address, port) pairs in _endpoints, kept as it changes
        self._triggers: dict[ServiceKey, list[float]] = {}
        # Services whose slices may have become orphans (slice written, Service deleted),
        # with the slices they had then.
        self._orphan_check: dict[ServiceKey, tuple[Uid, ...]] = {}
        self._synced: set[str] = set()
        # Writers' own (under _write only).
        self._slices: dict[Uid, Slice] = {}
        self._slices_by_svc: dict[ServiceKey, dict[str, Slice]] = {}
        self._orphans_logged: set[Uid] = set()
        self._listeners: list[Callable[[], None]] = []
        self.start_time = time.time() if start_time is None else start_time

    # -- wiring ---------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[], None]) -> None:
        """`callback()` is called (from any thread) after every change."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for cb in self._listeners:
            cb()

    def mark_synced(self, kind: str) -> None:
        """The source has delivered its initial list of `kind`."""
        with self._lock:
            self._synced.add(kind)
        self._notify()

    @property
    def has_synced(self) -> bool:
        return all(k in self._synced for k in KINDS)

    # -- events from sources ----------------------------------------------------------------

    def upsert(self, kind: str, obj: Any) -> None:
        p = _parse(kind, obj)
        with self._write:
            txn = _Txn(self)
            self._apply(kind, p, txn)
            self._publish(txn)
        if txn.changed:
            self._notify()

    def delete(self, kind: str, obj: Any) -> None:
        with self._write:
            txn = _Txn(self)
            self._remove(kind, _uid(obj), txn)
            self._publish(txn)
        if txn.changed:
            self._notify()

    def replace(self, kind: str, objs: Iterable[Any]) -> None:
        """A full list of `kind` (initial list or relist): upsert all, delete the rest.

        `objs` is consumed once; an iterator that hands over each decoded object and keeps
        no reference to it (the Kubernetes source does this) lets the decoded list be
        freed while it is parsed: at 100k endpoints that halves the list's peak memory."""
        parsed = [_parse(kind, obj) for obj in objs]  # the bulk of the work: no lock
        with self._write:
            txn = _Txn(self)
            seen: set[Uid] = set()
            for p in parsed:
                seen.add(p.uid)
                self._apply(kind, p, txn)
            current = self._services.keys() if kind == SERVICE else self._slices.keys()
            for uid in [u for u in current if u not in seen]:
                self._remove(kind, uid, txn)
            self._publish(txn, synced=kind)
        self._notify()  # always: the kind is synced now, even when nothing changed
        if len(parsed) >= TRIM_AFTER_OBJECTS:  # the decoded list is garbage now
            del parsed
            memory.trim()

    # -- working out a change (_write held) --------------------------------------------------

    def _apply(self, kind: str, p: _Parsed, txn: _Txn) -> None:
        if kind == SERVICE:
            txn.service_events += 1
            self._apply_service(p, txn)
        else:
            txn.endpoint_events += 1
            self._apply_slice(p, txn)

    def _skip(self, kind: str, p: _Parsed, *, keeping: bool) -> None:
        tail = "; keeping the previous version" if keeping else ""
        log.warning("skipping %s %s: %s%s", kind, p.ref, p.error, tail)
        metrics.SKIPPED_OBJECTS.labels(kind=kind).inc()

    def _apply_service(self, p: _Parsed, txn: _Txn) -> None:
        key = p.uid
        if not isinstance(p.record, Service):
            self._skip(SERVICE, p, keeping=txn.service(key) is not None)
            return
        for problem in p.problems:
            log.warning("Service %s/%s: %s", key[0], key[1], problem)
            metrics.SKIPPED_OBJECTS.labels(kind="ServicePort").inc()
        if txn.service(key) == p.record:
            return
        txn.services[key] = p.record
        txn.svc_changed.add(key)

    def _apply_slice(self, p: _Parsed, txn: _Txn) -> None:
        uid = p.uid
        sl = p.record
        if not isinstance(sl, Slice):
            self._skip(ENDPOINT_SLICE, p, keeping=uid in self._slices)
            return
        for problem in p.problems:
            log.warning("EndpointSlice %s/%s: %s", uid[0], uid[1], problem)
            metrics.SKIPPED_OBJECTS.labels(kind="Endpoint").inc()
        old = self._slices.get(uid)
        if old == sl:
            return
        self._slices[uid] = sl
        if old is not None and old.service != sl.service:  # relabelled to another Service
            self._slices_by_svc.get(old.service, {}).pop(sl.name, None)
            self._remerge(old.service, txn)
        self._slices_by_svc.setdefault(sl.service, {})[sl.name] = sl
        txn.orphan_check.add(sl.service)
        if self._remerge(sl.service, txn) and sl.trigger_time > self.start_time:
            txn.triggers.setdefault(sl.service, []).append(sl.trigger_time)

    def _remove(self, kind: str, uid: Uid, txn: _Txn) -> None:
        if kind == SERVICE:
            txn.service_events += 1
            if txn.service(uid) is None:
                return
            txn.services[uid] = None
            txn.svc_changed.add(uid)
            txn.orphan_check.add(uid)
            return
        txn.endpoint_events += 1
        sl = self._slices.pop(uid, None)
        if sl is None:
            return
        self._slices_by_svc.get(sl.service, {}).pop(sl.name, None)
        txn.orphan_check.add(sl.service)
        txn.deleted_slices.add(uid)
        if self._remerge(sl.service, txn):
            # kube-proxy: a deleted slice's trigger time dates from its last update.
            txn.triggers.pop(sl.service, None)
            txn.dropped_triggers.add(sl.service)

    def _remerge(self, key: ServiceKey, txn: _Txn) -> bool:
        slices = self._slices_by_svc.get(key) or {}
        if not slices:
            self._slices_by_svc.pop(key, None)
        merged = merge_slices(list(slices.values())) if slices else EMPTY_ENDPOINTS
        if txn.endpoints_of(key) == merged:
            return False
        txn.endpoints[key] = merged
        txn.ep_changed.add(key)
        return True

    # -- publishing (_write held; takes _lock) ----------------------------------------------

    def _publish(self, txn: _Txn, synced: str = "") -> None:
        orphans = {
            key: tuple((sl.namespace, sl.name) for sl in self._slices_by_svc.get(key, {}).values())
            for key in txn.orphan_check
        }
        with self._lock:
            services, endpoints = self._services, self._endpoints
            for key, svc in txn.services.items():
                if svc is None:
                    services.pop(key, None)
                else:
                    services[key] = svc
            n = self._n_endpoints
            for key, se in txn.endpoints.items():
                n -= _count(endpoints.get(key, EMPTY_ENDPOINTS))
                if se is EMPTY_ENDPOINTS:
                    endpoints.pop(key, None)
                else:
                    endpoints[key] = se
                    n += _count(se)
            self._n_endpoints = n
            self._svc_changed |= txn.svc_changed
            self._ep_changed |= txn.ep_changed
            for key in txn.dropped_triggers:
                self._triggers.pop(key, None)
            for key, times in txn.triggers.items():
                self._triggers.setdefault(key, []).extend(times)
            self._orphan_check.update(orphans)
            self._orphans_logged -= txn.deleted_slices  # logged again if it comes back
            if synced:
                self._synced.add(synced)
            n_svc, n_ep = len(self._svc_changed), len(self._ep_changed)
        # Counted per event, when it arrives (kube-proxy's OnServiceUpdate/…SliceUpdate).
        if txn.service_events:
            metrics.SERVICE_CHANGES_TOTAL.inc(txn.service_events)
            metrics.SERVICE_CHANGES_PENDING.set(n_svc)
        if txn.endpoint_events:
            metrics.ENDPOINT_CHANGES_TOTAL.inc(txn.endpoint_events)
            metrics.ENDPOINT_CHANGES_PENDING.set(n_ep)

    # -- for the sync runner ---------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """A consistent Model and the Services changed since the previous snapshot."""
        with self._lock:
            changed = frozenset(self._svc_changed | self._ep_changed)
            self._svc_changed, self._ep_changed = set(), set()
            triggers = {k: tuple(v) for k, v in self._triggers.items()}
            self._triggers = {}
            model = make_model(self._services, self._endpoints)
            n_services, n_endpoints = len(self._services), self._n_endpoints
            # Only Services whose slices were written or which were deleted can have
            # new orphans: no scan of every slice on every sync.
            check, self._orphan_check = self._orphan_check, {}
            orphans = [
                (uid, key)
                for key, uids in check.items()
                if key not in self._services
                for uid in uids
                if uid not in self._orphans_logged
            ]
            self._orphans_logged.update(uid for uid, _ in orphans)
        for uid, key in orphans:
            log.warning(
                "EndpointSlice %s/%s: Service %s/%s is unknown; not programmed until it exists",
                uid[0],
                uid[1],
                key[0],
                key[1],
            )
            metrics.SKIPPED_OBJECTS.labels(kind="OrphanEndpointSlice").inc()
        metrics.SERVICES.set(n_services)
        metrics.ENDPOINTS.set(n_endpoints)
        metrics.SERVICE_CHANGES_PENDING.set(0)
        metrics.ENDPOINT_CHANGES_PENDING.set(0)
        return Snapshot(model, changed, triggers)
