"""A fake `proxy.clock.Clock` for asyncio code: time moves only when the test says so.

    clock = FakeClock()
    task = asyncio.create_task(runner.run())     # its sleeps wait for clock.advance()
    await clock.settle()                         # let it run until it waits again
    await clock.advance(0.5)                     # wake what is due by then, settle

No real time passes: every wake-up is checked exactly, and a loaded machine cannot make a
test flaky.
"""

from __future__ import annotations

import asyncio

# Loop turns `settle` allows for a woken task to reach its next wait. Nothing here does
# I/O, so a task that has not waited again after this many turns never will.
SETTLE_TURNS = 200


class FakeClock:
    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self.now = start
        self.wall_offset = wall - start
        self.reads = 0  # monotonic() calls, to catch busy loops
        self.waits = 0  # sleep()/wait() calls entered
        self.sleeping = 0  # of those, not returned yet
        self._timers: list[tuple[float, asyncio.Future[None]]] = []

    # -- the Clock protocol ------------------------------------------------------------------

    def monotonic(self) -> float:
        self.reads += 1
        return self.now

    def time(self) -> float:
        return self.now + self.wall_offset

    async def sleep(self, seconds: float) -> None:
        self.waits += 1
        self.sleeping += 1
        try:
            if seconds > 0:
                await self._timer(self.now + seconds)
            else:
                await asyncio.sleep(0)
        finally:
            self.sleeping -= 1

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        self.waits += 1
        self.sleeping += 1
        try:
            if event.is_set():
                return True
            waiters: set[asyncio.Future[object]] = {asyncio.ensure_future(event.wait())}
            if timeout is not None:
                waiters.add(self._timer(self.now + max(0.0, timeout)))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            return event.is_set()
        finally:
            self.sleeping -= 1

    # -- driving it --------------------------------------------------------------------------

    def _timer(self, deadline: float) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if deadline <= self.now:
            fut.set_result(None)
        else:
            self._timers.append((deadline, fut))
        return fut

    @property
    def next_timer(self) -> float | None:
        live = [d for d, f in self._timers if not f.done()]
        return min(live) if live else None

    async def settle(self) -> None:
        """Run the loop until whatever was woken waits on this clock again."""
        entered = self.waits
        for _ in range(SETTLE_TURNS):
            await asyncio.sleep(0)
            if self.sleeping and self.waits > entered:
                # One more round so a wait that is already satisfied returns.
                await asyncio.sleep(0)
                if self.sleeping:
                    return
                entered = self.waits

    async def advance(self, seconds: float) -> None:
        """Move time forward, firing each timer in deadline order, settling after each."""
        target = self.now + seconds
        while True:
            nxt = self.next_timer
            if nxt is None or nxt > target:
                break
            self.now = nxt
            self._fire()
            await self.settle()
        self.now = target
        self._fire()
        await self.settle()

    def _fire(self) -> None:
        due = [(d, f) for d, f in self._timers if d <= self.now]
        self._timers = [(d, f) for d, f in self._timers if d > self.now and not f.done()]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)
