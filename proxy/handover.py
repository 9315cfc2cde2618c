"""Seamless restarts: two instances on one node hand the listening sockets over.

During a DaemonSet rolling update (maxSurge: 1) the new pod starts while the old one
runs. Both bind the same DNS, userspace, health and metrics ports with SO_REUSEPORT. What
must not happen is a query or a connection lost in between, and the kernel drops what is
queued on a socket that leaves a reuseport group (UDP datagrams; TCP connections in the
accept queue). So:

- Steering. Each UDP/TCP socket of ours gets a classic BPF reuseport program that picks
  the group's socket at index 0, the oldest: a successor's sockets (index 1) receive
  nothing until it is ready (`steer_to_oldest`).
- The channel. The serving instance listens on an abstract unix socket, which is scoped
  to the network namespace: with hostNetwork, the node's. A new instance connects at
  start; once its first sync is done and its listeners are open it sends "ready".
- Handing over (old instance). UDP groups are steered to index 1, the successor
  (`steer_to_newest`), while the old sockets stay open and keep reading, so nothing that
  was already queued is lost and replies still leave from the right address; TCP
  listeners are closed, and net.ipv4.tcp_migrate_req=1 moves their accept queues (and
  half-open connections) to the successor's listener. Then "done".
- After the predecessor exits (its end of the channel closes) the new instance is alone
  at index 0 and steers to the oldest again, ready for the next upgrade.

On SIGTERM the old instance lets established proxied connections finish for up to
--shutdown-grace-period, then exits 0 (proxy/daemon.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

log = logging.getLogger("proxy.handover")

CHANNEL = b"\0kube-proxy-py/handover/"  # + key; abstract: scoped to the network namespace
SO_ATTACH_REUSEPORT_CBPF = 51
TCP_MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: "return k", here the index in the reuseport group


def _steer(sock: socket.socket, index: int) -> None:
    """Attach "pick the group's socket at `index`" (an invalid index falls back to the
    kernel's hash, e.g. while a socket is alone in its group)."""
    insn = (ctypes.c_uint8 * 8).from_buffer_copy(struct.pack("HBBI", _BPF_RET_K, 0, 0, index))
    prog = struct.pack("HL", 1, ctypes.addressof(insn))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, prog)


def steer_to_oldest(sock: socket.socket) -> None:
    _steer(sock, 0)


def steer_to_newest(sock: socket.socket) -> None:
    _steer(sock, 1)


def reuseport(sock: socket.socket) -> None:
    """SO_REUSEPORT before bind; steering after bind (`steer_to_oldest`)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def enable_tcp_migration() -> None:
    """net.ipv4.tcp_migrate_req=1 in this network namespace (the node's), so a closing
    listener's accept queue moves to another listener of its group instead of being reset."""
    try:
        with open(TCP_MIGRATE_REQ, encoding="ascii") as f:
            if f.read().strip() == "1":
                return
        with open(TCP_MIGRATE_REQ, "w", encoding="ascii") as f:
            f.write("1")
        log.info("set net.ipv4.tcp_migrate_req=1: listeners hand their queues over on upgrades")
    except OSError as e:
        log.warning(
            "cannot set net.ipv4.tcp_migrate_req (%s); an upgrade may reset "
            "connections still in an accept queue",
            e.strerror or e,
        )


def channel_key(*binds: tuple[str, int] | None) -> str | None:
    """The channel of instances that bind the same addresses (two daemons with different
    ports in one namespace never hand over to each other); None (no handover) when a port
    is chosen by the kernel, as such an instance shares nothing with another."""
    if any(b is not None and b[1] == 0 for b in binds):
        return None
    return ",".join("-" if b is None else f"{b[0]}:{b[1]}" for b in binds)


class Handover:
    """The channel between this instance and its predecessor or successor."""

    def __init__(self, key: str | None) -> None:
        self.channel = CHANNEL + key.encode() if key is not None else None
        self.predecessor: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.handed_over = asyncio.Event()  # we gave our sockets to a successor
        self.successor_waiting = False  # a successor connected, not ready yet
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._give_up: Callable[[], Awaitable[None]] | None = None
        self._held: list[asyncio.StreamWriter] = []

    async def connect(self) -> None:
        """At start: is there an instance serving this node? Then it is our predecessor."""
        if self.channel is None:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.channel)  # a local unix connect does not block; uvloop cannot do
            s.setblocking(False)  # abstract names (EINVAL), so the socket is made here
            self.predecessor = await asyncio.open_unix_connection(sock=s)
        except OSError:
            s.close()
            return
        log.info("another instance serves this node; taking over once synced")

    async def ready(
        self,
        give_up: Callable[[], Awaitable[None]],
        alone: Callable[[], None],
        timeout: float = 60.0,
    ) -> None:
        """After the first sync: take over from the predecessor (if any), then serve the
        channel. `give_up` hands our sockets to a successor; `alone` is called when the
        predecessor is gone (steer back to the oldest)."""
        self._give_up = give_up
        if self.predecessor is not None:
            reader, writer = self.predecessor
            try:
                writer.write(b"ready\n")
                await writer.drain()
                async with asyncio.timeout(timeout):
                    line = await reader.readline()
                if line == b"done\n":
                    log.info("handover: the previous instance stopped accepting; serving")
                else:
                    log.warning("handover: the previous instance went away (%r)", line)
            except (OSError, TimeoutError) as e:
                log.warning("handover: no answer from the previous instance (%s)", e)
            self._spawn(self._wait_gone(reader, writer, alone))
        await self._listen(timeout)

    async def _listen(self, timeout: float) -> None:
        if self.channel is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:  # the predecessor releases the name right after "done"
            try:
                self._server = await asyncio.start_unix_server(self._successor, self.channel)
                return
            except OSError:
                if loop.time() > deadline:
                    log.warning("handover: channel busy; a later upgrade will not be seamless")
                    return
                await asyncio.sleep(0.05)

    async def _wait_gone(self, reader, writer, alone: Callable[[], None]) -> None:
        with contextlib.suppress(OSError):
            await reader.read()  # EOF: the predecessor exited
        writer.close()
        log.info("handover: the previous instance exited")
        alone()

    async def _successor(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.successor_waiting = True
        try:
            line = await reader.readline()
            if line != b"ready\n" or self.handed_over.is_set() or self._give_up is None:
                return
            log.info("handover: a new instance is ready; it takes the listening sockets")
            await self._give_up()
            self.handed_over.set()
            if self._server is not None:
                self._server.close()  # the successor binds the channel next
            writer.write(b"done\n")
            await writer.drain()
            self._held.append(writer)  # open until we exit: the successor sees us go
        except OSError:
            pass
        finally:
            self.successor_waiting = False

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def wait_for_successor(self, timeout: float) -> None:
        """On SIGTERM while a successor is connected but not ready: give it time."""
        if self.successor_waiting and not self.handed_over.is_set():
            log.info("SIGTERM: waiting up to %.0fs for the new instance to take over", timeout)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.handed_over.wait()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
