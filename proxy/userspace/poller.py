"""Readiness of the proxied sockets through one epoll of the TCP engine's own.

The event loop watches only this epoll's descriptor; the engine's sockets are registered
here. Why not the loop's add_reader/add_writer: uvloop (libuv) makes a poll handle per
descriptor and drops it when its last interest goes, so every connection paid an
O_NONBLOCK ioctl per socket and about 14 epoll_ctl calls, half of them failing with
EEXIST (libuv adds, then modifies); here each change of interest is one epoll_ctl, about
6 per proxied connection, and no ioctl. Level-triggered, like the loop's readers.

Callbacks run inside `_dispatch`; one may close a socket and another may open one that
reuses its number before the batch is through: events of a descriptor whose registration
went away during the batch are skipped (level-triggered, the next poll reports again
whatever is still pending on a descriptor registered anew).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import Callable

# EPOLLRDHUP: the peer's FIN shows in the event that also reports its last bytes.
# EPOLLPRI: TCP urgent data stops a read short of the end (at the mark) even with the FIN
# in; such an event is not taken for the last one.
_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLPRI
_FIN = select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLPRI
_TROUBLE = select.EPOLLERR | select.EPOLLHUP
_OUT = select.EPOLLOUT
# An error or hang-up wakes whichever side is registered (its recv/send then reports it).
_READ = select.EPOLLIN | select.EPOLLPRI | select.EPOLLERR | select.EPOLLHUP
_WRITE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
MAX_EVENTS = 256  # per dispatch; more stay pending and the loop calls again


class Poller:
    """add_reader/add_writer/remove_reader/remove_writer like the loop's, for raw fds."""

    __slots__ = (
        "_dropped",
        "_ep",
        "_loop",
        "_mask",
        "_readers",
        "_writers",
        "fd",
        "peer_closed",
        "trouble",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ep = select.epoll()  # close-on-exec
        self.fd = self._ep.fileno()
        self._readers: dict[int, Callable[[], object]] = {}
        self._writers: dict[int, Callable[[], object]] = {}
        self._mask: dict[int, int] = {}
        self._dropped: set[int] = set()  # unregistered during the current dispatch
        # In a reader callback: the peer had sent its FIN (no error) when the event was
        # reported, so a read that drains the socket has read everything it will send.
        self.peer_closed = False
        # In a writer callback: the event carried an error or hang-up; without either, a
        # connect in progress has succeeded (no getsockopt(SO_ERROR) needed to tell).
        self.trouble = False
        loop.add_reader(self.fd, self._dispatch)

    def __len__(self) -> int:
        """Descriptors registered (tests: nothing left behind)."""
        return len(self._mask)

    # add_* and remove_* do their one epoll_ctl inline: they run about six times per
    # proxied connection.
    def add_reader(self, fd: int, cb: Callable[[], object]) -> None:
        self._readers[fd] = cb
        old = self._mask.get(fd, 0)
        if not old & _IN:
            self._mask[fd] = mask = old | _IN
            try:
                if old:
                    self._ep.modify(fd, mask)
                else:
                    self._ep.register(fd, mask)
            except OSError:
                self._resync(fd, mask)

    def add_writer(self, fd: int, cb: Callable[[], object]) -> None:
        self._writers[fd] = cb
        old = self._mask.get(fd, 0)
        if not old & _OUT:
            self._mask[fd] = mask = old | _OUT
            try:
                if old:
                    self._ep.modify(fd, mask)
                else:
                    self._ep.register(fd, mask)
            except OSError:
                self._resync(fd, mask)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._lower(fd, self._mask[fd] & ~_IN)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._lower(fd, self._mask[fd] & ~_OUT)

    def _lower(self, fd: int, mask: int) -> None:
        if mask:
            self._mask[fd] = mask
            try:
                self._ep.modify(fd, mask)
            except OSError:
                self._resync(fd, mask)
            return
        del self._mask[fd]
        self._dropped.add(fd)
        # Already closed (EBADF) or gone with its last reference (ENOENT): nothing left.
        with contextlib.suppress(OSError):
            self._ep.unregister(fd)

    def _resync(self, fd: int, mask: int) -> None:
        """The kernel's view and ours differ: only after a descriptor was closed while
        registered (a bug elsewhere). Follow the kernel rather than fail the connection."""
        try:
            self._ep.register(fd, mask)
        except FileExistsError:
            self._ep.modify(fd, mask)

    def _dispatch(self) -> None:
        try:
            events = self._ep.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        dropped = self._dropped
        dropped.clear()
        readers, writers = self._readers, self._writers
        for fd, ev in events:
            cb = None
            try:
                if ev & _READ and not (dropped and fd in dropped):
                    cb = readers.get(fd)
                    if cb is not None:
                        self.peer_closed = ev & _FIN == select.EPOLLRDHUP
                        cb()
                if ev & _WRITE and not (dropped and fd in dropped):
                    cb = writers.get(fd)
                    if cb is not None:
                        self.trouble = ev & _TROUBLE != 0
                        cb()
            except Exception as e:  # like the loop's handles: report it, serve the others
                self._loop.call_exception_handler(
                    {"message": f"exception in callback {cb!r}", "exception": e}
                )
        dropped.clear()

    def close(self) -> None:
        if self._ep.closed:
            return
        with contextlib.suppress(OSError, RuntimeError):  # the loop may be closed already
            self._loop.remove_reader(self.fd)
        self._ep.close()
        self._readers.clear()
        self._writers.clear()
        self._mask.clear()
