"""The sync runner: coalescing bursts, periodic full syncs, retry after failure."""

from __future__ import annotations

import asyncio
import contextlib

from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Snapshot, Store
from proxy.health import HealthState
from proxy.sync import SyncRunner
from tests.unit.factories import endpoint, service, slice_


class RecordingPlane:
    """A data plane that records what it was asked to do and can be told to fail."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[bool, frozenset]] = []
        self.fail_next = 0

    async def sync(self, snap: Snapshot, full: bool) -> None:
        self.calls.append((full, snap.changed))
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("iptables-restore: exit status 1")


def _store() -> Store:
    s = Store()
    s.replace(SERVICE, [service("web"), service("db", ip="198.19.0.11")])
    s.replace(ENDPOINT_SLICE, [slice_("web")])
    return s


async def _run_for(runner: SyncRunner, seconds: float, during=None) -> None:
    task = asyncio.create_task(runner.run())
    if during is not None:
        await during()
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_burst_coalesces_into_few_syncs() -> None:
    store, plane = _store(), RecordingPlane()
    runner = SyncRunner(store, plane, period=30, min_period=0.3, health=HealthState(60))

    async def burst() -> None:
        await asyncio.sleep(0.05)
        for i in range(50):
            store.upsert(ENDPOINT_SLICE, slice_("web", endpoints=[endpoint(f"198.18.2.{i}")]))
            await asyncio.sleep(0.001)

    asyncio.run(_run_for(runner, 0.8, burst))
    assert plane.calls[0][0] is True  # the first sync is full
    partial = [c for c in plane.calls[1:] if not c[0]]
    assert 1 <= len(partial) <= 2, plane.calls  # 50 events → at most 2 syncs (min period)
    assert all(c[1] == {("default", "web")} for c in partial)


def test_no_sync_before_initial_lists() -> None:
    store, plane = Store(), RecordingPlane()
    store.upsert(SERVICE, service("web"))  # no replace() yet: not synced
    runner = SyncRunner(store, plane, period=30, min_period=0.01, health=HealthState(60))
    asyncio.run(_run_for(runner, 0.1))
    assert plane.calls == []


def test_failure_is_retried_full_and_keeps_changes() -> None:
    store, plane = _store(), RecordingPlane()
    health = HealthState(60)
    runner = SyncRunner(store, plane, period=30, min_period=0.01, health=health)

    async def scenario() -> None:
        assert await runner.sync_once()  # initial full
        store.upsert(ENDPOINT_SLICE, slice_("web", endpoints=[endpoint("198.18.3.1")]))
        plane.fail_next = 1
        assert not await runner.sync_once()  # partial fails
        assert await runner.sync_once()  # retried: full, still knows web changed

    asyncio.run(scenario())
    assert [c[0] for c in plane.calls] == [True, False, True]
    assert ("default", "web") in plane.calls[2][1]


def test_periodic_full_resync() -> None:
    store, plane = _store(), RecordingPlane()
    runner = SyncRunner(
        store, plane, period=0.2, min_period=0.01, health=HealthState(60), full_period=0.2
    )
    asyncio.run(_run_for(runner, 0.75))
    fulls = [c for c in plane.calls if c[0]]
    assert len(fulls) >= 3  # initial + about one per full period


def test_periodic_syncs_are_partial_between_full_syncs() -> None:
    """Like kube-proxy: the sync-period timer forces a (partial) sync that rewrites the
    top-level chains; full syncs are hourly (or after a failure)."""
    store, plane = _store(), RecordingPlane()
    runner = SyncRunner(store, plane, period=0.15, min_period=0.01, health=HealthState(60))
    asyncio.run(_run_for(runner, 0.7))
    assert plane.calls[0][0] is True
    periodic = plane.calls[1:]
    assert len(periodic) >= 2, plane.calls  # the timer drove syncs with nothing changed
    assert all(not full and changed == frozenset() for full, changed in periodic)


def test_listeners_get_every_model() -> None:
    store, plane = _store(), RecordingPlane()
    seen = []
    runner = SyncRunner(
        store,
        plane,
        period=30,
        min_period=0.0,
        health=HealthState(60),
        listeners=[lambda m: seen.append(len(m.services))],
    )
    asyncio.run(runner.sync_once())
    assert seen == [2]
