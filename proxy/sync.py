"""The sync runner: turns store changes into data-plane syncs, kube-proxy style.

Like kube-proxy's BoundedFrequencyRunner: a change requests a sync; syncs are at least
`min_period` apart (a burst of changes coalesces into one sync), and a sync runs at
least every `period`. A failed sync is retried with capped exponential backoff and
the retry is always full, because a partial restore that failed leaves the previous
state unknown. Until the source has delivered its initial lists the runner only waits
for the store's notification: no timer, no rules (as kube-proxy waits for its informers).

As in kube-proxy (proxyutil.FullSyncPeriod), the `period` timer only forces a sync; a
*full* one (every chain rewritten, jumps from built-in chains re-checked) runs at most
hourly, or after a failure. A periodic sync is partial: it rewrites the top-level chains
and whatever changed. At 10k Services on iptables-nft a full sync takes ~35 s, longer
than the default 30 s period.

Each sync: snapshot → the data plane's served model (computed once) → consumers that
want it at once (DNS) → the data plane's sync → consumers that want it programmed
(health check nodePorts). Metrics and health bookkeeping happen here, once, for every
data plane. Time comes from an injected `Clock`, so tests step it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Sequence

from proxy import memory, metrics
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.dataplane import Consumer, DataPlane
from proxy.endpoints.store import Store
from proxy.health import HealthState
from proxy.model import Model, ServiceKey

log = logging.getLogger("proxy.sync")

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
        consumers: Sequence[Consumer] = (),
        full_period: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.dataplane = dataplane
        self.period = period
        self.full_period = max(period, FULL_SYNC_PERIOD if full_period is None else full_period)
        self.min_period = min_period
        self.health = health
        self.consumers = tuple(consumers)
        self.clock = clock
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._periodic_due = False
        self._last_start = -math.inf
        self._last_full = -math.inf
        self._need_full = True
        self._failures = 0
        # Changes not yet programmed (a failed sync keeps them for the retry).
        self._pending_changed: frozenset[ServiceKey] = frozenset()
        self._pending_triggers: dict[ServiceKey, tuple[float, ...]] = {}
        self._fed: set[str] = set()  # consumers that have had a first model
        self.syncs = 0
        self.model: Model | None = None  # the served model of the last snapshot

    # -- requests ----------------------------------------------------------------------------

    def request(self) -> None:
        """Ask for a sync soon; safe to call from any thread."""
        loop = self._loop
        if loop is None:
            return
        if _on_loop(loop):
            self._request_on_loop()
        else:
            loop.call_soon_threadsafe(self._request_on_loop)

    def _request_on_loop(self) -> None:
        if not self._wake.is_set():
            self.health.queued_update()
            metrics.SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP.set(self.clock.time())
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.store.subscribe(self.request)
        self._wake.set()
        while True:
            await self.wait_turn()
            await self.sync_once()

    async def wait_turn(self) -> None:
        """Wait until the next sync is due: a change, the periodic timer or a retry,
        then at least `min_period` after the previous sync started."""
        clock = self.clock
        while not self.store.has_synced:
            # No timer before the initial lists: only the store's notification can help.
            # (Cleared before the check: a notification after the check sets it again.)
            self._wake.clear()
            if not self.store.has_synced:
                await clock.wait(self._wake, None)
        if not self._wake.is_set():
            timeout = max(0.0, self.next_deadline() - clock.monotonic())
            if not await clock.wait(self._wake, timeout):
                self._periodic_due = True
        # Bound the frequency: a burst of events inside min_period is one sync.
        gap = self._last_start + self.min_period - clock.monotonic()
        if gap > 0:
            await clock.sleep(gap)
        self._wake.clear()

    def next_deadline(self) -> float:
        """When the runner syncs without a request: the periodic timer, or a retry."""
        deadline = self._last_start + self.period
        if self._failures:
            deadline = min(deadline, self._last_start + self.backoff())
        return deadline

    def backoff(self) -> float:
        base = max(self.min_period, 0.5)
        return min(base * 2 ** (self._failures - 1), max(self.period, base))

    # -- one sync ------------------------------------------------------------------------------

    async def sync_once(self) -> bool:
        """Take a snapshot, feed it on and sync it; returns True on success."""
        snap = self.store.snapshot()
        served = self.dataplane.served(snap.model)
        first = self.model is None
        self.model = served
        if snap.changed or first:
            await self._feed(served, None if first else snap.changed, after_sync=False)

        now = self.clock.monotonic()
        self._last_start = now
        # A new zone or node IP can change any Service's endpoints: a full sync.
        full = self._need_full or snap.node_changed or now - self._last_full >= self.full_period
        periodic, self._periodic_due = self._periodic_due, False
        # Changes from a failed sync must not be forgotten.
        changed = self._pending_changed | snap.changed
        triggers = _merge_triggers(self._pending_triggers, snap.trigger_times)
        snap = dataclasses.replace(snap, model=served, changed=changed, trigger_times=triggers)
        svc_count = len(served.services)
        if not full and not changed and not periodic:
            self.health.updated()  # nothing to do is a successful sync
            return True
        t0 = self.clock.monotonic()
        try:
            await self.dataplane.sync(snap, full)
        except Exception as e:
            self._failures += 1
            self._need_full = True
            self._pending_changed = changed
            self._pending_triggers = triggers
            log.error(
                "sync failed (%s attempt %d, retrying in %.1fs): %s",
                "full" if full else "partial",
                self._failures,
                self.backoff(),
                e,
            )
            return False
        dt = self.clock.monotonic() - t0
        self._failures = 0
        self._need_full = False
        self._pending_changed = frozenset()
        self._pending_triggers = {}
        if full:
            self._last_full = now
            metrics.SYNC_FULL_PROXY_RULES_DURATION.observe(dt)
            if svc_count >= TRIM_AFTER_SERVICES:
                await asyncio.to_thread(memory.trim)
        else:
            metrics.SYNC_PARTIAL_PROXY_RULES_DURATION.observe(dt)
        metrics.SYNC_PROXY_RULES_DURATION.observe(dt)
        wall = self.clock.time()
        metrics.SYNC_PROXY_RULES_LAST_TIMESTAMP.set(wall)
        for times in triggers.values():
            for trig in times:
                if trig <= wall:
                    metrics.NETWORK_PROGRAMMING_DURATION.observe(wall - trig)
        self.health.updated()
        self.syncs += 1
        log.info(
            "synced %d services (%s, %d changed) in %.3fs",
            svc_count,
            "full" if full else "partial",
            len(changed),
            dt,
        )
        await self._feed(served, changed, after_sync=True)
        return True

    async def _feed(
        self, model: Model, changed: frozenset[ServiceKey] | None, *, after_sync: bool
    ) -> None:
        for c in self.consumers:
            if c.after_sync != after_sync:
                continue
            if c.name in self._fed and changed is not None and not changed:
                continue  # nothing new for it
            try:
                await c.update(model, changed if c.name in self._fed else None)
            except Exception:
                log.exception("%s failed to follow the model; it gets the next one", c.name)
                self._fed.discard(c.name)  # its next update gets everything
                continue
            self._fed.add(c.name)


def _merge_triggers(
    a: dict[ServiceKey, tuple[float, ...]], b: dict[ServiceKey, tuple[float, ...]]
) -> dict[ServiceKey, tuple[float, ...]]:
    if not a:
        return b
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, ()) + v
    return out


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
