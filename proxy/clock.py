"""The clock the sync runner reads and sleeps on, injected so tests can drive time.

kube-proxy's BoundedFrequencyRunner takes a `clock.Clock` for the same reason: its tests
step a fake clock and check every wake-up, instead of sleeping and hoping.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, gaps)."""
        ...

    def time(self) -> float:
        """Wall-clock epoch seconds (timestamps in metrics and health)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        """Until `event` is set (True) or `timeout` seconds pass (False); None: no timeout."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        if timeout is None:
            await event.wait()
            return True
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return event.is_set()
        return True


SYSTEM_CLOCK = SystemClock()
