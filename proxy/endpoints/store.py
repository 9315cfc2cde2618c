"""The watch cache and change tracker: raw objects in, Model snapshots out.

Sources (the Kubernetes informer, the manifests reader) run in worker threads and call
`upsert` / `delete` / `replace`; the sync runner on the event loop calls `snapshot`,
which returns a consistent Model plus exactly which Services changed since the previous
snapshot (kube-proxy's ServiceChangeTracker/EndpointsChangeTracker, in one place).

Bad objects are skipped here, once, with one log line naming the object and the reason,
and counted; an invalid update to an object that was fine keeps the previous version
(as the API server would have refused the edit).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy import memory, metrics
from proxy.endpoints.parse import (
    BadObject,
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


@dataclass(frozen=True, slots=True)
class Snapshot:
    model: Model
    changed: frozenset[ServiceKey]  # Services whose record or endpoints changed
    # Earliest last-change-trigger-time (epoch s) per changed Service, for the
    # network-programming latency metric.
    trigger_times: dict[ServiceKey, float] = field(default_factory=dict)
    service_changes: int = 0  # Services whose Service object changed
    endpoint_changes: int = 0  # Services whose endpoints changed


def _uid(obj: Any) -> tuple[str, str]:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def _count(se: ServiceEndpoints) -> int:
    return sum(len(eps) for eps in se.ports.values())


class Store:
    """Thread-safe cache of Services and EndpointSlices with change tracking."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._services: dict[ServiceKey, Service] = {}
        self._slices: dict[tuple[str, str], Slice] = {}  # (ns, slice name) → Slice
        self._slices_by_svc: dict[ServiceKey, dict[str, Slice]] = {}
        self._endpoints: dict[ServiceKey, ServiceEndpoints] = {}
        # Services changed since the last snapshot, by what changed (kube-proxy's
        # *_changes_{total,pending} metrics count them apart); their union is `changed`.
        self._svc_changed: set[ServiceKey] = set()
        self._ep_changed: set[ServiceKey] = set()
        self._n_endpoints = 0  # (address, port) pairs in _endpoints, kept as it changes
        # Services whose slices may have become orphans (slice written, Service deleted).
        self._orphan_check: set[ServiceKey] = set()
        self._triggers: dict[ServiceKey, float] = {}
        self._synced: set[str] = set()
        self._listeners: list[Callable[[], None]] = []
        self._orphans_logged: set[tuple[str, str]] = set()

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
        with self._lock:
            changed = self._upsert(kind, obj)
        if changed:
            self._notify()

    def delete(self, kind: str, obj: Any) -> None:
        with self._lock:
            changed = self._delete(kind, _uid(obj))
        if changed:
            self._notify()

    def replace(self, kind: str, objs: Iterable[Any]) -> None:
        """A full list of `kind` (initial list or relist): upsert all, delete the rest."""
        with self._lock:
            seen: set[tuple[str, str]] = set()
            for obj in objs:
                seen.add(_uid(obj))
                self._upsert(kind, obj)
            current = self._services.keys() if kind == SERVICE else self._slices.keys()
            for uid in [u for u in current if u not in seen]:
                self._delete(kind, uid)
            self._synced.add(kind)
            big = len(seen) >= TRIM_AFTER_OBJECTS
        self._notify()  # always: the kind is synced now, even when nothing changed
        if big:  # the decoded list that fed this is garbage now: give it back
            memory.trim()

    # -- internals (lock held) ---------------------------------------------------------------

    def _upsert(self, kind: str, obj: Any) -> bool:
        if kind == SERVICE:
            return self._upsert_service(obj)
        return self._upsert_slice(obj)

    def _skip(self, kind: str, obj: Any, reason: str, *, keeping: bool) -> None:
        tail = "; keeping the previous version" if keeping else ""
        log.warning("skipping %s %s: %s%s", kind, object_ref(obj), reason, tail)
        metrics.SKIPPED_OBJECTS.labels(kind=kind).inc()

    def _upsert_service(self, obj: Any) -> bool:
        key = _uid(obj)
        try:
            parsed = parse_service(obj)
        except BadObject as e:
            self._skip(SERVICE, obj, str(e), keeping=key in self._services)
            return False
        for p in parsed.problems:
            log.warning("Service %s/%s: %s", key[0], key[1], p)
            metrics.SKIPPED_OBJECTS.labels(kind="ServicePort").inc()
        svc = parsed.service
        if self._services.get(key) == svc:
            return False
        self._services[key] = svc
        self._mark(key, service=True)
        return True

    def _upsert_slice(self, obj: Any) -> bool:
        uid = _uid(obj)
        try:
            sl = parse_slice(obj)
        except BadObject as e:
            self._skip(ENDPOINT_SLICE, obj, str(e), keeping=uid in self._slices)
            return False
        for p in sl.problems:
            log.warning("EndpointSlice %s/%s: %s", uid[0], uid[1], p)
            metrics.SKIPPED_OBJECTS.labels(kind="Endpoint").inc()
        old = self._slices.get(uid)
        if old == sl:
            return False
        self._slices[uid] = sl
        if old is not None and old.service != sl.service:  # relabelled to another Service
            self._slices_by_svc.get(old.service, {}).pop(sl.name, None)
            self._remerge(old.service, 0.0)
        self._slices_by_svc.setdefault(sl.service, {})[sl.name] = sl
        self._orphan_check.add(sl.service)
        return self._remerge(sl.service, sl.trigger_time)

    def _delete(self, kind: str, uid: tuple[str, str]) -> bool:
        if kind == SERVICE:
            if self._services.pop(uid, None) is None:
                return False
            self._orphan_check.add(uid)
            self._mark(uid, service=True)
            return True
        sl = self._slices.pop(uid, None)
        if sl is None:
            return False
        self._orphans_logged.discard(uid)
        self._slices_by_svc.get(sl.service, {}).pop(sl.name, None)
        return self._remerge(sl.service, 0.0)

    def _remerge(self, key: ServiceKey, trigger_time: float) -> bool:
        slices = self._slices_by_svc.get(key) or {}
        if not slices:
            self._slices_by_svc.pop(key, None)
        merged = merge_slices(list(slices.values())) if slices else EMPTY_ENDPOINTS
        old = self._endpoints.get(key, EMPTY_ENDPOINTS)
        if old == merged:
            return False
        self._n_endpoints += _count(merged) - _count(old)
        if merged is EMPTY_ENDPOINTS:
            self._endpoints.pop(key, None)
        else:
            self._endpoints[key] = merged
        self._mark(key, service=False)
        if trigger_time:
            prev = self._triggers.get(key)
            self._triggers[key] = trigger_time if prev is None else min(prev, trigger_time)
        return True

    def _mark(self, key: ServiceKey, *, service: bool) -> None:
        if service:
            self._svc_changed.add(key)
            metrics.SERVICE_CHANGES_PENDING.set(len(self._svc_changed))
        else:
            self._ep_changed.add(key)
            metrics.ENDPOINT_CHANGES_PENDING.set(len(self._ep_changed))

    # -- for the sync runner ---------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """A consistent Model and the Services changed since the previous snapshot."""
        with self._lock:
            changed = frozenset(self._svc_changed | self._ep_changed)
            n_svc, n_ep = len(self._svc_changed), len(self._ep_changed)
            self._svc_changed, self._ep_changed = set(), set()
            triggers = self._triggers
            self._triggers = {}
            model = make_model(self._services, self._endpoints)
            metrics.SERVICES.set(len(self._services))
            metrics.ENDPOINTS.set(self._n_endpoints)
            # Only Services whose slices were written or which were deleted can have
            # new orphans: no scan of every slice on every sync.
            check, self._orphan_check = self._orphan_check, set()
            orphans = [
                ((sl.namespace, sl.name), sl)
                for key in check
                if key not in self._services
                for sl in self._slices_by_svc.get(key, {}).values()
                if (sl.namespace, sl.name) not in self._orphans_logged
            ]
            for uid, _ in orphans:
                self._orphans_logged.add(uid)
        for uid, sl in orphans:
            log.warning(
                "EndpointSlice %s/%s: Service %s/%s is unknown; not programmed until it exists",
                uid[0],
                uid[1],
                sl.service[0],
                sl.service[1],
            )
            metrics.SKIPPED_OBJECTS.labels(kind="OrphanEndpointSlice").inc()
        metrics.SERVICE_CHANGES_PENDING.set(0)
        metrics.ENDPOINT_CHANGES_PENDING.set(0)
        return Snapshot(model, changed, triggers, n_svc, n_ep)
