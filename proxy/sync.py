"""The sync runner: turns store changes into data-plane syncs, kube-proxy style.

Like kube-proxy's BoundedFrequencyRunner: a change requests a sync; syncs are at least
`min_period` apart (a burst of changes coalesces into one sync), and a sync runs at
least every `period`. A failed sync is retried with capped exponential backoff and
the retry is always full, because a partial restore that failed leaves the previous
state unknown.

As in kube-proxy (proxyutil.FullSyncPeriod), the `period` timer only forces a sync; a
*full* one (every chain rewritten, jumps from built-in chains re-checked) runs at most
hourly, or after a failure. A periodic sync is partial: it rewrites the top-level chains
and whatever changed. At 10k Services on iptables-nft a full sync takes ~35 s, longer
than the default 30 s period. Metrics and health bookkeeping happen here, once, for
every data plane.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from proxy import memory, metrics
from proxy.dataplane import DataPlane
from proxy.endpoints.store import Snapshot, Store
from proxy.health import HealthState
from proxy.model import Model

log = logging.getLogger("proxy.sync")

ModelListener = Callable[[Model], None]

# Full syncs of clusters this large free a lot of heap (render text, restore input).
TRIM_AFTER_SERVICES = 1000
FULL_SYNC_PERIOD = 3600.0  # kube-proxy's proxyutil.FullSyncPeriod


class SyncRunner:
    def __init__(
        self,
        store: Store,
        dataplane: DataPlane,
        *,
        period: float,
        min_period: float,
        health: HealthState,
        listeners: list[ModelListener] | None = None,
        after_sync: Callable[[Snapshot], Awaitable[None] | None] | None = None,
        full_period: float | None = None,
    ) -> None:
        self.store = store
        self.dataplane = dataplane
        self.period = period
        self.full_period = max(period, FULL_SYNC_PERIOD if full_period is None else full_period)
        self._periodic_due = False
        self.min_period = min_period
        self.health = health
        self.listeners = listeners or []
        self.after_sync = after_sync
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_start = float("-inf")
        self._last_full = float("-inf")
        self._need_full = True
        self._failures = 0
        self._pending_changed: set = set()
        self._pending_triggers: dict = {}
        self.syncs = 0
        self.model: Model | None = None

    def request(self) -> None:
        """Ask for a sync soon; safe to call from any thread."""
        loop = self._loop
        if loop is None:
            return
        if threading_is_loop(loop):
            self._request_on_loop()
        else:
            loop.call_soon_threadsafe(self._request_on_loop)

    def _request_on_loop(self) -> None:
        if not self._wake.is_set():
            self.health.queued_update()
            metrics.SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP.set(time.time())
        self._wake.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.store.subscribe(self.request)
        self._wake.set()
        while True:
            now = time.monotonic()
            # Wait for a change, or for the periodic-resync timer.
            timeout = max(0.0, self._last_start + self.period - now)
            if self._failures:
                timeout = min(timeout, self._backoff())
            if not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    self._periodic_due = True
            # Bound the frequency: a burst of events inside min_period is one sync.
            gap = self._last_start + self.min_period - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            self._wake.clear()
            if not self.store.has_synced:
                continue  # like kube-proxy: no rules until the initial lists are in
            await self.sync_once()

    def _backoff(self) -> float:
        base = max(self.min_period, 0.5)
        return min(base * 2 ** (self._failures - 1), max(self.period, base))

    async def sync_once(self) -> bool:
        """Take a snapshot and sync it; returns True on success."""
        snap = self.store.snapshot()
        now_mono = time.monotonic()
        self._last_start = now_mono
        full = self._need_full or now_mono - self._last_full >= self.full_period
        periodic, self._periodic_due = self._periodic_due, False
        # Changes from a failed partial sync must not be forgotten.
        if self._pending_changed:
            changed = frozenset(self._pending_changed | snap.changed)
            triggers = {**self._pending_triggers, **snap.trigger_times}
            snap = Snapshot(
                snap.model, changed, triggers, snap.service_changes, snap.endpoint_changes
            )
        self.model = snap.model
        for listener in self.listeners:
            try:
                listener(snap.model)
            except Exception:
                log.exception("model listener failed")
        svc_count = len(snap.model.services)
        if not full and not snap.changed and not periodic:
            self.health.updated()  # nothing to do is a successful sync
            return True
        t0 = time.perf_counter()
        try:
            await self.dataplane.sync(snap, full)
        except Exception as e:
            self._failures += 1
            self._need_full = True
            self._pending_changed = set(snap.changed)
            self._pending_triggers = dict(snap.trigger_times)
            log.error(
                "sync failed (%s attempt %d, retrying in %.1fs): %s",
                "full" if full else "partial",
                self._failures,
                self._backoff(),
                e,
            )
            return False
        dt = time.perf_counter() - t0
        self._failures = 0
        self._need_full = False
        self._pending_changed = set()
        self._pending_triggers = {}
        if full:
            self._last_full = now_mono
            metrics.SYNC_FULL_PROXY_RULES_DURATION.observe(dt)
            if svc_count >= TRIM_AFTER_SERVICES:
                await asyncio.to_thread(memory.trim)
        else:
            metrics.SYNC_PARTIAL_PROXY_RULES_DURATION.observe(dt)
        metrics.SYNC_PROXY_RULES_DURATION.observe(dt)
        wall = time.time()
        metrics.SYNC_PROXY_RULES_LAST_TIMESTAMP.set(wall)
        for trig in snap.trigger_times.values():
            if 0 < trig <= wall:
                metrics.NETWORK_PROGRAMMING_DURATION.observe(wall - trig)
        n_changed = len(snap.changed)
        metrics.SERVICE_CHANGES_TOTAL.inc(snap.service_changes)
        metrics.ENDPOINT_CHANGES_TOTAL.inc(snap.endpoint_changes)
        self.health.updated()
        self.syncs += 1
        log.info(
            "synced %d services (%s, %d changed) in %.3fs",
            svc_count,
            "full" if full else "partial",
            n_changed,
            dt,
        )
        if self.after_sync is not None:
            res = self.after_sync(snap)
            if res is not None:
                await res
        return True


def threading_is_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
