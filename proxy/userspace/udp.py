"""UDP forwarding: a session table keyed by client address.

Each client (ip, port) of a listener gets a session: a socket connected to the endpoint
the balancer picked. Client datagrams go out of that socket; endpoint replies come back
on it and are sent to the client from the listener's socket, i.e. from the Service
address and port the client talked to. Sessions expire after `idle_timeout` without
traffic either way, the table holds at most `max_sessions` (the least recently active
client is evicted first), and a session whose endpoint left the Service is dropped so the
client's next datagram starts a new one on a current endpoint. An ICMP port unreachable
from an endpoint (ECONNREFUSED on the session socket) counts as a failure for passive
health and the datagram is retried once on another endpoint.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Collection

from proxy.userspace.backend import Backend
from proxy.userspace.balancer import EpKey
from proxy.userspace.listeners import ListenerKey
from proxy.userspace.tcp import FD_ERRORS, TcpEngine
from proxy.userspace.transparent import transparent_socket

log = logging.getLogger("proxy.userspace.udp")

_AGAIN = (BlockingIOError, InterruptedError)
_BATCH = 64
_MAX_DGRAM = 65535
_UDP = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_now = time.monotonic


class UdpListener:
    __slots__ = (
        "backend",
        "closed",
        "fd",
        "fds",
        "key",
        "loop",
        "max_sessions",
        "sessions",
        "sock",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        key: ListenerKey,
        sock: socket.socket,
        backend: Backend,
        *,
        max_sessions: int,
        fds: TcpEngine,
    ) -> None:
        self.loop = loop
        self.key = key
        self.sock = sock
        self.fd = sock.fileno()
        self.backend = backend
        self.max_sessions = max_sessions
        self.fds = fds  # shares the out-of-descriptors episode logging
        self.sessions: OrderedDict[tuple, UdpSession] = OrderedDict()
        self.closed = False
        backend.udp.add(self)
        loop.add_reader(self.fd, self._on_readable)

    def retarget(self, backend: Backend) -> None:
        self.backend.udp.discard(self)
        for s in list(self.sessions.values()):
            s.close()
        self.backend = backend
        backend.udp.add(self)

    def _on_readable(self) -> None:
        sock = self.sock
        sessions = self.sessions
        st = self.backend.stats
        for _ in range(_BATCH):
            try:
                data, addr = sock.recvfrom(_MAX_DGRAM)
            except _AGAIN:
                return
            except OSError:
                continue
            sess = sessions.get(addr)
            if sess is None:
                if not self.backend.allows(addr[0]):  # loadBalancerSourceRanges
                    st.udp_dropped += 1
                    continue
                sess = self._new_session(addr, ())
                if sess is None:
                    st.udp_dropped += 1
                    continue
            else:
                sessions.move_to_end(addr)
            sess.last = _now()
            st.bytes_to_endpoint += len(data)
            try:
                sess.sock.send(data)
            except _AGAIN:
                st.udp_dropped += 1
            except OSError:
                # ICMP unreachable from an earlier datagram: try once elsewhere.
                tried = (sess.ep_key,)
                sess.failed()
                sess = self._new_session(addr, tried)
                if sess is None:
                    st.udp_dropped += 1
                    continue
                try:
                    sess.sock.send(data)
                except OSError:
                    st.udp_dropped += 1

    def _new_session(self, addr: tuple, exclude: Collection[EpKey]) -> UdpSession | None:
        b = self.backend
        ep = b.balancer.pick(addr[0], _now(), exclude)
        if ep is None:
            return None
        full = self.fds.nfds + 1 > self.fds.fd_budget
        if self.sessions and (full or len(self.sessions) >= self.max_sessions):
            _, oldest = self.sessions.popitem(last=False)  # least recently active
            oldest.close(popped=True)
        elif full:
            self.fds.out_of_fds(f"UDP session for {b.label}", None)
            return None
        fam = socket.AF_INET6 if ":" in ep.ip else socket.AF_INET
        src = self.fds.source
        s: _socket.socket | None = None  # socket.socket, or the C type (transparent)
        if src is not None and src.preserve(addr[0], ep, b.target.external):
            with contextlib.suppress(OSError):  # refused: the node's address, as without
                s = transparent_socket(fam, socket.SOCK_DGRAM, addr[:2])
        try:
            if s is None:
                s = socket.socket(fam, _UDP)
        except OSError as e:
            if e.errno in FD_ERRORS:
                self.fds.out_of_fds(f"UDP session for {b.label}", e)
            return None
        try:
            s.connect((ep.ip, ep.port))
        except OSError as e:
            s.close()
            b.balancer.failed(ep, _now())
            log.debug("%s: UDP endpoint %s: %s", b.label, ep, e)
            return None
        self.fds.nfds += 1
        sess = UdpSession(self, addr, s, (ep.ip, ep.port))
        self.sessions[addr] = sess
        b.stats.udp_sessions += 1
        b.stats.udp_sessions_total += 1
        return sess

    def purge(self, keep: Collection[EpKey]) -> int:
        """Drop sessions whose endpoint is not in `keep`; returns how many."""
        gone = [s for s in self.sessions.values() if s.ep_key not in keep]
        for s in gone:
            s.close()
        return len(gone)

    def expire(self, now: float, idle: float) -> int:
        old = [s for s in self.sessions.values() if now - s.last > idle]
        for s in old:
            s.close()
        return len(old)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in list(self.sessions.values()):
            s.close()
        self.loop.remove_reader(self.fd)
        self.sock.close()
        self.backend.udp.discard(self)


class UdpSession:
    __slots__ = ("client", "closed", "ep_key", "fd", "last", "listener", "sock")

    def __init__(
        self, listener: UdpListener, client: tuple, sock: _socket.socket, ep_key: EpKey
    ) -> None:
        self.listener = listener
        self.client = client
        self.sock = sock
        self.fd = sock.fileno()
        self.ep_key = ep_key
        self.last = _now()
        self.closed = False
        listener.loop.add_reader(self.fd, self._on_reply)

    def _on_reply(self) -> None:
        lst = self.listener
        st = lst.backend.stats
        for _ in range(_BATCH):
            try:
                data = self.sock.recv(_MAX_DGRAM)
            except _AGAIN:
                return
            except ConnectionRefusedError:
                self.failed()
                return
            except OSError:
                self.close()
                return
            self.last = _now()
            st.bytes_to_client += len(data)
            try:
                lst.sock.sendto(data, self.client)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.ENOBUFS):
                    log.debug("UDP reply to %s failed: %s", self.client, e)

    def failed(self) -> None:
        """The endpoint answered ICMP port unreachable: tell the balancer, end the session."""
        b = self.listener.backend
        ep = next((e for e in b.balancer.endpoints if (e.ip, e.port) == self.ep_key), None)
        if ep is not None:
            b.balancer.failed(ep, _now())
            b.stats.connect_failures += 1
        self.close()

    def close(self, popped: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        lst = self.listener
        if not popped:
            lst.sessions.pop(self.client, None)
        lst.loop.remove_reader(self.fd)
        self.sock.close()
        lst.fds.nfds -= 1
        lst.backend.stats.udp_sessions -= 1
