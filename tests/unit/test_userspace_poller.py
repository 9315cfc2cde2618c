"""The TCP engine's own edge-triggered epoll (proxy/userspace/poller.py) on real sockets
and uvloop."""

from __future__ import annotations

import asyncio
import os
import select
import socket
from collections.abc import Awaitable, Callable

import uvloop

from proxy.userspace.poller import IN, OUT, Poller


def run(coro: Awaitable) -> None:
    uvloop.run(asyncio.wait_for(coro, 60))


async def until(pred: Callable[[], bool]) -> None:
    while not pred():  # run_until the state holds: wait_for's deadline bounds it
        await asyncio.sleep(0.005)


async def a_later_dispatch(p: Poller) -> None:
    """Wait until the poller has dispatched again (an event registered after now)."""
    a, b = socket.socketpair()
    seen: list[int] = []
    p.watch(a.fileno(), IN, seen.append)
    b.send(b"x")
    await until(lambda: bool(seen))
    p.forget(a.fileno())
    a.close()
    b.close()


def test_a_handler_gets_each_new_readiness_once_and_nothing_after_forget():
    async def main():
        p = Poller(asyncio.get_running_loop())
        a, b = socket.socketpair()
        a.setblocking(False)
        events: list[int] = []
        try:
            p.watch(a.fileno(), IN, events.append)
            assert len(p) == 1
            b.send(b"hello")
            await until(lambda: len(events) == 1)
            assert events[0] & select.EPOLLIN and not events[0] & OUT
            await a_later_dispatch(p)
            assert len(events) == 1  # not drained, yet not reported again: edge-triggered
            assert a.recv(100) == b"hello"
            b.send(b"again")
            await until(lambda: len(events) == 2)  # new bytes: a new edge
            assert a.recv(100) == b"again"
            b.shutdown(socket.SHUT_WR)
            await until(lambda: len(events) == 3)
            assert events[2] & select.EPOLLRDHUP  # the FIN shows in the event
            p.forget(a.fileno())
            p.forget(a.fileno())  # twice: a no-op
            assert len(p) == 0
            a.shutdown(socket.SHUT_RDWR)  # a hang-up it would report if still registered
            await a_later_dispatch(p)
            assert len(events) == 3
        finally:
            a.close()
            b.close()
            p.close()

    run(main())


def test_want_adds_room_to_write_and_reports_what_is_there_already():
    async def main():
        p = Poller(asyncio.get_running_loop())
        a, b = socket.socketpair()
        events: list[int] = []
        try:
            p.watch(a.fileno(), IN, events.append)
            await a_later_dispatch(p)
            assert events == []  # writable, but not asked for
            p.want(a.fileno(), OUT)
            await until(lambda: bool(events))
            assert events[0] & OUT
            p.want(a.fileno(), OUT)  # asked already: no change, no new event
            await a_later_dispatch(p)
            assert len(events) == 1
            p.forget(a.fileno())
        finally:
            a.close()
            b.close()
            p.close()

    run(main())


def test_event_of_a_descriptor_replaced_within_the_batch_is_not_delivered():
    """One handler closes another socket, whose number a fresh socket takes at once: the
    readiness epoll reported for the old socket must not reach the new one's handler."""

    async def main():
        p = Poller(asyncio.get_running_loop())
        pairs = [socket.socketpair() for _ in range(2)]
        fresh: list[socket.socket] = []
        stale: list[int] = []
        first: list[int] = []

        def on_event(me: int) -> None:
            if first:
                return
            first.append(me)
            other = pairs[1 - me][0]
            fd = other.fileno()
            p.forget(fd)
            new, _peer = socket.socketpair()
            fresh.extend([new, _peer])
            os.dup2(new.fileno(), fd)  # the number now names a socket with nothing to read
            p.watch(fd, IN, stale.append)

        try:
            for i, (s, _) in enumerate(pairs):
                p.watch(s.fileno(), IN, lambda ev, i=i: on_event(i))
            for _, peer in pairs:
                peer.send(b"x")  # both readable: one batch holds both events
            await until(lambda: bool(first))
            await a_later_dispatch(p)
            assert stale == []
        finally:
            for s in [x for pr in pairs for x in pr] + fresh:
                s.close()
            p.close()

    run(main())
