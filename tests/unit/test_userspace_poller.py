"""The TCP engine's own epoll (proxy/userspace/poller.py) on real sockets and uvloop."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

import uvloop

from proxy.userspace.poller import Poller


def run(coro: Awaitable) -> None:
    uvloop.run(asyncio.wait_for(coro, 60))


async def until(pred: Callable[[], bool]) -> None:
    while not pred():  # run_until the state holds: wait_for's deadline bounds it
        await asyncio.sleep(0.005)


def test_readers_and_writers_fire_while_registered_and_leave_nothing_behind():
    async def main():
        p = Poller(asyncio.get_running_loop())
        a, b = socket.socketpair()
        a.setblocking(False)
        got: list[bytes] = []
        writable: list[int] = []
        try:
            p.add_reader(a.fileno(), lambda: got.append(a.recv(100)))
            p.add_writer(a.fileno(), lambda: writable.append(1))
            assert len(p) == 1  # one registration for both interests
            await until(lambda: bool(writable))
            p.remove_writer(a.fileno())
            b.send(b"hello")
            await until(lambda: got == [b"hello"])
            n = len(writable)
            b.send(b"again")
            await until(lambda: got == [b"hello", b"again"])
            assert len(writable) == n  # no writer callbacks once removed
            p.remove_reader(a.fileno())
            p.remove_reader(a.fileno())  # twice: a no-op, like the loop's
            assert len(p) == 0
            b.send(b"unseen")
            marker_a, marker_b = socket.socketpair()
            seen: list[int] = []
            p.add_reader(marker_a.fileno(), lambda: seen.append(marker_a.recv(10) and 1))
            marker_b.send(b"x")
            await until(lambda: bool(seen))  # a later dispatch has run
            assert got == [b"hello", b"again"]
            p.remove_reader(marker_a.fileno())
            marker_a.close()
            marker_b.close()
        finally:
            a.close()
            b.close()
            p.close()

    run(main())


def test_event_of_a_descriptor_replaced_within_the_batch_is_not_delivered():
    """One callback closes another socket, whose number a fresh socket takes at once: the
    readiness epoll reported for the old socket must not reach the new one's callback."""

    async def main():
        p = Poller(asyncio.get_running_loop())
        pairs = [socket.socketpair() for _ in range(2)]
        fresh: list[socket.socket] = []
        stale: list[int] = []
        first: list[int] = []

        def on_readable(me: int) -> None:
            if first:
                return
            first.append(me)
            other = pairs[1 - me][0]
            fd = other.fileno()
            p.remove_reader(fd)
            new, _peer = socket.socketpair()
            fresh.extend([new, _peer])
            os.dup2(new.fileno(), fd)  # the number now names a socket with nothing to read
            p.add_reader(fd, lambda: stale.append(fd))

        try:
            for i, (s, _) in enumerate(pairs):
                p.add_reader(s.fileno(), lambda i=i: on_readable(i))
            for _, peer in pairs:
                peer.send(b"x")  # both readable: one batch holds both events
            await until(lambda: bool(first))
            marker_a, marker_b = socket.socketpair()
            seen: list[int] = []
            p.add_reader(marker_a.fileno(), lambda: seen.append(1))
            marker_b.send(b"x")
            await until(lambda: bool(seen))
            assert stale == []
            p.remove_reader(marker_a.fileno())
            marker_a.close()
            marker_b.close()
        finally:
            for s in [x for pr in pairs for x in pr] + fresh:
                s.close()
            p.close()

    run(main())
