"""The sync runner on a fake clock: every wake-up is checked exactly, no real time passes.

Coalescing bursts (min period), the periodic timer (partial syncs) and hourly full
syncs, retry with backoff after a failure, waiting for the initial lists without
spinning, and the consumers fed the served model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.dataplane import NoDataPlane
from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Snapshot, Store
from proxy.health import HealthState
from proxy.model import Model, ServiceKey
from proxy.sync import SyncRunner
from tests.unit.factories import endpoint, service, slice_
from tests.unit.fakeclock import FakeClock

WEB = ("default", "web")


class RecordingPlane(NoDataPlane):
    """A data plane that records what it was asked to do and can be told to fail."""

    name = "recording"

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.calls: list[tuple[bool, frozenset[ServiceKey]]] = []
        self.at: list[float] = []  # fake time of each sync
        self.models: list[Model] = []
        self.fail_next = 0
        self.clock = clock
        self.served_calls = 0

    def served(self, model: Model) -> Model:
        self.served_calls += 1
        return Model(model.services, model.endpoints)  # a new object: "rewritten"

    async def sync(self, snap: Snapshot, full: bool) -> None:
        self.calls.append((full, snap.changed))
        self.models.append(snap.model)
        if self.clock is not None:
            self.at.append(self.clock.now)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("iptables-restore: exit status 1")


class Recorder:
    """A consumer that records what it was fed."""

    def __init__(self, name: str, after_sync: bool) -> None:
        self.name = name
        self.after_sync = after_sync
        self.fed: list[tuple[Model, frozenset[ServiceKey] | None]] = []

    async def update(self, model: Model, changed: frozenset[ServiceKey] | None) -> None:
        self.fed.append((model, changed))


class CountingStore(Store):
    """Counts how often the runner asks whether the initial lists are in."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    @property
    def has_synced(self) -> bool:
        self.checks += 1
        return super().has_synced


def _store() -> Store:
    s = Store()
    s.replace(SERVICE, [service("web"), service("db", ip="198.19.0.11")])
    s.replace(ENDPOINT_SLICE, [slice_("web")])
    return s


def _change(store: Store, i: int) -> None:
    store.upsert(ENDPOINT_SLICE, slice_("web", endpoints=[endpoint(f"198.18.2.{i}")]))


@contextlib.asynccontextmanager
async def running(runner: SyncRunner, clock: FakeClock) -> AsyncIterator[None]:
    task = asyncio.create_task(runner.run())
    await clock.settle()
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def scenario(fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(fn(), 60)

    asyncio.run(main())


def make(
    store: Store | None = None, *, period: float = 30, min_period: float = 1, **kw: Any
) -> tuple[SyncRunner, RecordingPlane, FakeClock, Store]:
    clock = FakeClock()
    plane = RecordingPlane(clock)
    store = store if store is not None else _store()
    runner = SyncRunner(
        store,
        plane,
        period=period,
        min_period=min_period,
        health=HealthState(60, clock=clock.time),
        clock=clock,
        **kw,
    )
    return runner, plane, clock, store


def test_first_sync_is_full_and_immediate() -> None:
    async def main() -> None:
        runner, plane, clock, _ = make()
        async with running(runner, clock):
            assert plane.calls == [(True, frozenset({WEB, ("default", "db")}))]
            assert plane.at == [clock.now]

    scenario(main)


def test_burst_coalesces_into_one_sync_after_min_period() -> None:
    async def main() -> None:
        runner, plane, clock, store = make(min_period=1.0)
        async with running(runner, clock):
            start = clock.now
            await clock.advance(0.25)
            for i in range(50):
                _change(store, i)
                await clock.settle()
            assert len(plane.calls) == 1  # waiting out min_period since the first sync
            await clock.advance(0.5)
            assert len(plane.calls) == 1
            await clock.advance(0.25)  # exactly min_period after the first sync started
            assert plane.calls[1:] == [(False, frozenset({WEB}))]
            assert plane.at[1] == pytest.approx(start + 1.0)
            await clock.advance(5)
            assert len(plane.calls) == 2  # nothing more until something changes

    scenario(main)


def test_a_change_after_a_quiet_spell_syncs_at_once() -> None:
    async def main() -> None:
        runner, plane, clock, store = make(min_period=1.0)
        async with running(runner, clock):
            await clock.advance(10)
            _change(store, 1)
            await clock.settle()
            assert plane.calls[-1] == (False, frozenset({WEB}))
            assert plane.at[-1] == clock.now

    scenario(main)


def test_periodic_syncs_are_partial_between_full_syncs() -> None:
    """Like kube-proxy: the sync-period timer forces a (partial) sync that rewrites the
    top-level chains; full syncs are hourly (or after a failure)."""

    async def main() -> None:
        runner, plane, clock, _ = make(period=30, min_period=1, full_period=3600)
        async with running(runner, clock):
            start = clock.now
            await clock.advance(95)
            assert plane.at == [start, start + 30, start + 60, start + 90]
            assert all(c == (False, frozenset()) for c in plane.calls[1:])
            await clock.advance(3600 - 95)
            assert plane.calls[-1][0] is True  # the hourly full sync
            assert plane.at[-1] == start + 3600

    scenario(main)


def test_failure_is_retried_full_with_backoff_and_keeps_changes() -> None:
    async def main() -> None:
        runner, plane, clock, store = make(period=30, min_period=1)
        async with running(runner, clock):
            await clock.advance(5)
            plane.fail_next = 3
            _change(store, 1)
            await clock.settle()
            t_fail = clock.now
            assert plane.calls[-1] == (False, frozenset({WEB}))
            # Retries 1 s, 2 s, 4 s after each failed attempt; every retry is full and
            # still carries the change.
            await clock.advance(1 + 2 + 4)
            assert plane.at[-3:] == [t_fail + 1, t_fail + 3, t_fail + 7]
            assert [c[0] for c in plane.calls[-3:]] == [True, True, True]
            assert all(WEB in c[1] for c in plane.calls[-3:])
            await clock.advance(30)
            assert plane.at[-1] == t_fail + 7 + 30  # success: back to the period

    scenario(main)


def test_waiting_for_the_initial_lists_costs_nothing() -> None:
    """Bug 1: before the initial lists the wait loop spun with a zero timeout
    (`_last_start` = -inf), burning a core while the API server did not answer."""

    async def main() -> None:
        store = CountingStore()
        store.upsert(SERVICE, service("web"))  # no initial list yet: not synced
        runner, plane, clock, _ = make(store, period=30, min_period=0.01)
        async with running(runner, clock):
            for _ in range(1000):  # the loop turns freely: a spinning runner would use them
                await asyncio.sleep(0)
            await clock.advance(3600)  # and no timer fires for it either
            assert store.checks <= 3, store.checks
            assert clock.reads <= 3, clock.reads
            assert plane.calls == []
            store.replace(SERVICE, [service("web")])
            store.replace(ENDPOINT_SLICE, [slice_("web")])
            await clock.settle()
            assert plane.calls == [(True, frozenset({WEB}))]  # synced: one full sync

    scenario(main)


def test_waiting_for_the_initial_lists_blocks_on_the_system_clock() -> None:
    """Bug 1 again, with the real clock (this test also runs against the old runner,
    which had no clock to inject): while unsynced the runner must block, not poll."""

    async def main() -> None:
        store = CountingStore()
        runner = SyncRunner(
            store, RecordingPlane(), period=30, min_period=0.01, health=HealthState(60)
        )
        task = asyncio.create_task(runner.run())
        for _ in range(1000):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert store.checks <= 3, store.checks

    scenario(main)


def test_consumers_get_the_served_model_before_and_after_the_sync() -> None:
    async def main() -> None:
        dns, hc = Recorder("dns", after_sync=False), Recorder("hc", after_sync=True)
        runner, plane, clock, store = make(consumers=[dns, hc])
        async with running(runner, clock):
            served = plane.models[0]
            assert dns.fed == [(served, None)]  # the first model whole
            assert hc.fed == [(served, None)]
            assert runner.model is served
            assert plane.served_calls == 1  # computed once per snapshot
            plane.fail_next = 1
            await clock.advance(5)
            _change(store, 1)
            await clock.settle()
            # The sync failed: DNS follows anyway, the health servers wait for the rules.
            assert len(dns.fed) == 2 and dns.fed[-1][1] == frozenset({WEB})
            assert len(hc.fed) == 1
            await clock.advance(1)  # the retry succeeds
            assert hc.fed[-1] == (plane.models[-1], frozenset({WEB}))
            assert len(dns.fed) == 2  # nothing new for DNS in the retry's snapshot
            await clock.advance(60)  # periodic syncs with no change feed nobody
            assert (len(dns.fed), len(hc.fed)) == (2, 2)

    scenario(main)


def test_a_failing_consumer_is_logged_and_fed_everything_next_time() -> None:
    class Flaky(Recorder):
        fail = True

        async def update(self, model: Model, changed: frozenset[ServiceKey] | None) -> None:
            await super().update(model, changed)
            if self.fail:
                self.fail = False
                raise RuntimeError("boom")

    async def main() -> None:
        flaky = Flaky("flaky", after_sync=False)
        runner, plane, clock, store = make(consumers=[flaky])
        async with running(runner, clock):
            await clock.advance(5)
            _change(store, 1)
            await clock.settle()
            assert plane.calls[-1] == (False, frozenset({WEB}))  # the sync went on
            assert [c for _, c in flaky.fed] == [None, None]  # after a failure: everything

    scenario(main)


def test_a_node_change_makes_the_next_sync_full() -> None:
    """This node's zone or IPs decide every Service's endpoints (topology): a change to
    its Node alone syncs at once, in full (kube-proxy's proxier does the same)."""
    from proxy.endpoints.store import NODE

    async def main() -> None:
        node = {"metadata": {"name": "n", "labels": {"topology.kubernetes.io/zone": "z2"}}}
        runner, plane, clock, store = make(min_period=1.0)
        async with running(runner, clock):
            await clock.advance(10)
            store.upsert(NODE, node)
            await clock.settle()
            assert plane.calls[-1] == (True, frozenset())
            assert plane.at[-1] == clock.now
            store.upsert(NODE, node)  # the same again: nothing to do
            await clock.advance(10)
            assert len(plane.calls) == 2

    scenario(main)
