"""Readiness of the proxied sockets through one epoll of the TCP engine's own, edge-triggered.

The event loop watches only this epoll's descriptor; the engine's sockets are registered
here. Why not the loop's add_reader/add_writer: uvloop (libuv) makes a poll handle per
descriptor and drops it when its last interest goes, so every connection paid an
O_NONBLOCK ioctl per socket and about 14 epoll_ctl calls, half of them failing with
EEXIST (libuv adds, then modifies).

Why edge-triggered: a level-triggered registration must follow every change of interest
(connect done: writable → readable; a direction at its end: stop reading it, or the
loop spins on the EOF), 6 epoll_ctl per proxied connection. Edge-triggered, a socket is
registered once for everything it can report and unregistered once, before its close:
4 per connection. The price is the edge-triggered contract, kept by the TCP engine: a
handler reads until a short read or EAGAIN (a short read of a stream socket empties its
queue; data coming later is a new edge), and a reader that stopped reading (its
destination full) reads again by itself once the destination drains.

Handlers run inside `_dispatch` and get the event mask. One may close a socket and
another may open one that reuses its number before the batch is through: events of a
descriptor unregistered during the batch are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import Callable

IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLPRI
OUT = select.EPOLLOUT
_ET = select.EPOLLET
MAX_EVENTS = 256  # per dispatch; more stay pending and the loop calls again

Handler = Callable[[int], object]


class Poller:
    """watch/want/forget for raw fds; a handler gets each event's mask."""

    __slots__ = ("_dropped", "_ep", "_handlers", "_loop", "_mask", "fd")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ep = select.epoll()  # close-on-exec
        self.fd = self._ep.fileno()
        self._handlers: dict[int, Handler] = {}
        self._mask: dict[int, int] = {}
        self._dropped: set[int] = set()  # unregistered during the current dispatch
        loop.add_reader(self.fd, self._dispatch)

    def __len__(self) -> int:
        """Descriptors registered (tests: nothing left behind)."""
        return len(self._mask)

    def watch(self, fd: int, mask: int, handler: Handler) -> None:
        """Report `mask` (IN, OUT or both) of `fd` to `handler` until `forget(fd)`.
        Readiness already there is reported too (epoll checks it on registration)."""
        self._handlers[fd] = handler
        self._mask[fd] = mask
        try:
            self._ep.register(fd, mask | _ET)
        except FileExistsError:  # a closed descriptor's registration (a bug elsewhere)
            self._ep.modify(fd, mask | _ET)

    def want(self, fd: int, mask: int) -> None:
        """Add `mask` to what `fd` reports (rare: a client that reads slower than its
        endpoint sends); edge-triggered, nothing ever needs taking away."""
        old = self._mask[fd]
        if old | mask != old:
            self._mask[fd] = old | mask
            self._ep.modify(fd, old | mask | _ET)

    def forget(self, fd: int) -> None:
        """Unregister `fd` before it is closed (a no-op when it is not registered)."""
        if self._handlers.pop(fd, None) is None:
            return
        del self._mask[fd]
        self._dropped.add(fd)
        with contextlib.suppress(OSError):  # closed already: nothing left to remove
            self._ep.unregister(fd)

    def _dispatch(self) -> None:
        try:
            events = self._ep.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        dropped = self._dropped
        dropped.clear()
        handlers = self._handlers
        for fd, ev in events:
            if dropped and fd in dropped:
                continue
            h = handlers.get(fd)
            if h is None:
                continue
            try:
                h(ev)
            except Exception as e:  # like the loop's handles: report it, serve the others
                self._loop.call_exception_handler(
                    {"message": f"exception in handler {h!r}", "exception": e}
                )
        dropped.clear()

    def close(self) -> None:
        if self._ep.closed:
            return
        with contextlib.suppress(OSError, RuntimeError):  # the loop may be closed already
            self._loop.remove_reader(self.fd)
        self._ep.close()
        self._handlers.clear()
        self._mask.clear()
