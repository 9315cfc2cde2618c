"""TCP forwarding on raw non-blocking sockets driven by the event loop's fd callbacks.

Per connection: accept → pick an endpoint → non-blocking connect with a timeout → on
refusal/timeout/unreachable report it to the balancer (passive health) and try another
endpoint, up to len(CONNECT_TIMEOUTS) attempts (kube-proxy's old userspace proxy used the
same escalating timeouts) → then two one-way pumps.

A pump moves bytes src → dst: read a chunk, write it, and when dst cannot take it all,
stop reading src until dst drains (backpressure: at most one chunk buffered per direction).
EOF on src becomes shutdown(SHUT_WR) on dst once everything is written (half-close: the
other direction keeps flowing); the connection closes when both directions are done. A
reset on either side is passed on as a reset (SO_LINGER 0) to the other.

Two pump engines: `copy` (recv_into one shared buffer, send) and `splice` (os.splice
socket → pipe → socket, the bytes never enter user space). Pipes come from a small pool
and are held by a pump only while it has bytes stuck in one, so an idle connection costs
two sockets and a few small objects, never a pipe or a buffer.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import resource
import select
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from proxy.userspace.backend import Backend
from proxy.userspace.balancer import ep_key
from proxy.userspace.listeners import ListenerKey, fmt_key
from proxy.userspace.metrics import GLOBAL
from proxy.userspace.poller import IN, OUT, Poller
from proxy.userspace.transparent import SourcePolicy, transparent_socket

if TYPE_CHECKING:
    from proxy.model import Endpoint
    from proxy.userspace.portforward import Forwarder, Tunnel

log = logging.getLogger("proxy.userspace.tcp")

CONNECT_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
# Through the API server's port-forward a tunnel costs an HTTP upgrade (over TLS, on a
# real cluster) and the kubelet's dial: allow for a remote API server.
TUNNEL_TIMEOUTS = (5.0, 5.0, 10.0, 10.0)
ENGINES = ("auto", "splice", "copy")
CONNECT_CHECK = 0.05  # seconds between checks of connect deadlines
ACCEPT_BATCH = 64
ACCEPT_PAUSE = 0.25  # seconds without accepting after EMFILE/ENFILE
FD_LOG_INTERVAL = 60.0
FD_RESERVE = 4


def fd_headroom(limit: int) -> int:
    """Descriptors the proxy leaves to the rest of the daemon (watch, DNS, metrics, files)."""
    return min(max(64, limit // 100), 1024)


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        return 32


FD_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_LINGER0 = struct.pack("ii", 1, 0)
_F_SETPIPE_SZ = 1031
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_AGAIN = (BlockingIOError, InterruptedError)
# Event masks (edge-triggered, poller.py). An error or hang-up wakes both directions (the
# recv or send then reports it). RDHUP without ERR or PRI: the peer's FIN had come with
# the event, so a short read has read everything. A short read proves nothing with PRI
# (urgent data stops a read at the mark) nor with ERR or HUP (a reset behind the bytes
# is reported by the next recv only, and edge-triggered, no later event would ask).
_READ = IN | select.EPOLLERR | select.EPOLLHUP
_WRITE = OUT | select.EPOLLERR | select.EPOLLHUP
_TROUBLE = select.EPOLLERR | select.EPOLLHUP
_FIN = select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLPRI
_RDHUP = select.EPOLLRDHUP
_UNSURE = select.EPOLLPRI | select.EPOLLERR | select.EPOLLHUP
# Reads per event before yielding to the other connections (a bulk flow on the copy
# engine); the rest is read in a later loop iteration.
READS_PER_EVENT = 4
_now = time.monotonic


def splice_available() -> bool:
    return hasattr(os, "splice")


class TcpEngine:
    """Owns the accept and forwarding machinery of one data plane."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        engine: str = "auto",
        connect_timeouts: tuple[float, ...] = CONNECT_TIMEOUTS,
        buffer_size: int = 256 * 1024,
        pipe_size: int = 1024 * 1024,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"TCP engine {engine!r} not in {ENGINES}")
        if engine != "copy" and not splice_available():
            engine = "copy"
        self.loop = loop
        # The proxied sockets' readiness (the listeners stay with the loop): see poller.py.
        self.poller = Poller(loop)
        self.engine = engine
        self.connect_timeouts = connect_timeouts
        self.buf = memoryview(bytearray(buffer_size))
        self.pipe_size = pipe_size
        self._pipes: list[tuple[int, int]] = []  # empty pipes ready for use; [-1] is "shared"
        self._fd_logged = float("-inf")
        self._fd_hits = 0
        # Descriptors held back for connections already accepted: when the limit is hit,
        # they are freed so the backend socket or a pipe can still be made, and accepting
        # stops until they can be taken again. Nobody accepted gets reset for want of fds.
        self._reserve: list[int] = []
        self.fill_reserve()
        # Admission control: the proxy's sockets and pipes (counted in `nfds`) stay within
        # the open files limit minus what the daemon had at start and a headroom, so that
        # 10,000 clients cannot starve the watch, DNS or metrics of descriptors.
        self.nfds = 0
        self.base_fds = _open_fds()
        self.fd_budget = 0
        self.update_budget()
        self.listeners: set[TcpListener] = set()
        # Connects in progress → deadline; one periodic check instead of a timer per connect.
        self.connecting: dict[TcpConn, float] = {}
        self._checking = False
        # Endpoints through the API server's port-forward instead of connects (laptop).
        self.forwarder: Forwarder | None = None
        # Node mode: connections to endpoints from the client's address where possible.
        self.source: SourcePolicy | None = None

    # -- connect timeouts --------------------------------------------------------------------

    def connect_deadline(self, conn: TcpConn, deadline: float) -> None:
        self.connecting[conn] = deadline
        if not self._checking:
            self._checking = True
            self.loop.call_later(CONNECT_CHECK, self._check_connects)

    def _check_connects(self) -> None:
        now = _now()
        late = [c for c, d in self.connecting.items() if d <= now]
        for c in late:
            if self.connecting.pop(c, None) is not None:
                c.on_timeout()
        if self.connecting:
            self.loop.call_later(CONNECT_CHECK, self._check_connects)
        else:
            self._checking = False

    # -- listeners -------------------------------------------------------------------------

    def listen(self, key: ListenerKey, sock: socket.socket, backend: Backend) -> TcpListener:
        # Accepted sockets inherit TCP_NODELAY from the listener (Linux): one setsockopt
        # here instead of one per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lst = TcpListener(self, key, sock, backend)
        self.listeners.add(lst)
        lst.resume()
        return lst

    def stop_accepting(self, where: str, e: OSError | None) -> None:
        """Descriptors ran out: pause every listener for ACCEPT_PAUSE."""
        self.out_of_fds(where, e)
        for lst in list(self.listeners):
            lst.pause(ACCEPT_PAUSE)

    def out_of_fds(self, where: str, e: OSError | None) -> None:
        """Descriptors ran out: counted always, logged once a minute at most."""
        GLOBAL.accept_pauses += 1
        self._fd_hits += 1
        now = _now()
        if now - self._fd_logged >= FD_LOG_INTERVAL:
            log.warning(
                "out of file descriptors (%s; %s): pausing accepts for %.2fs at a time "
                "until descriptors free up (%d times; logged at most once a minute)",
                "budget" if e is None else errno.errorcode.get(e.errno or 0, e),
                where,
                ACCEPT_PAUSE,
                self._fd_hits,
            )
            self._fd_logged = now
            self._fd_hits = 0

    def update_budget(self) -> int:
        """Re-read the limit (it can change at run time: prlimit); returns the budget."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        self.fd_budget = soft - fd_headroom(soft) - self.base_fds
        return self.fd_budget

    def fill_reserve(self) -> bool:
        try:
            while len(self._reserve) < FD_RESERVE:
                self._reserve.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return False
        return True

    def use_reserve(self, where: str, e: OSError) -> bool:
        """Out of descriptors while serving an accepted connection: stop accepting and
        free the reserve; True when the caller may retry."""
        self.stop_accepting(where, e)
        if not self._reserve:
            return False
        for fd in self._reserve:
            os.close(fd)
        self._reserve.clear()
        return True

    # -- pipes (splice engine) ---------------------------------------------------------------

    def pipe(self) -> tuple[int, int]:
        """The shared empty pipe (made on first use); raises OSError on EMFILE."""
        if self._pipes:
            return self._pipes[-1]
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.nfds += 2
        # Over the per-user pipe budget the default 64 KiB works too.
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, _F_SETPIPE_SZ, self.pipe_size)
        self._pipes.append((r, w))
        return (r, w)

    def take_pipe(self, p: tuple[int, int]) -> None:
        """A pump keeps `p` (bytes are stuck in it); it is no longer shared."""
        if self._pipes and self._pipes[-1] == p:
            self._pipes.pop()

    def release_pipe(self, p: tuple[int, int], empty: bool) -> None:
        if empty and len(self._pipes) < 16:
            self._pipes.append(p)
        else:
            os.close(p[0])
            os.close(p[1])
            self.nfds -= 2

    def close(self) -> None:
        for lst in list(self.listeners):
            lst.close()
        for r, w in self._pipes:
            os.close(r)
            os.close(w)
            self.nfds -= 2
        self._pipes.clear()
        for fd in self._reserve:
            os.close(fd)
        self._reserve.clear()
        self.poller.close()


class TcpListener:
    __slots__ = (
        "_handle",
        "backend",
        "closed",
        "engine",
        "family",
        "fd",
        "key",
        "listening",
        "sock",
    )

    def __init__(self, engine: TcpEngine, key: ListenerKey, sock: socket.socket, backend: Backend):
        self.engine = engine
        self.key = key
        self.sock = sock
        self.fd = sock.fileno()
        self.family = int(sock.family)
        self.backend = backend
        self.closed = False
        self.listening = False
        self._handle: asyncio.TimerHandle | None = None

    def resume(self) -> None:
        self._handle = None
        if self.closed or self.listening:
            return
        eng = self.engine
        if len(eng._reserve) < FD_RESERVE and not eng.fill_reserve():
            self._handle = eng.loop.call_later(ACCEPT_PAUSE, self.resume)
            return
        eng.loop.add_reader(self.fd, self._on_accept)
        self.listening = True

    def pause(self, seconds: float) -> None:
        if self.listening:
            self.engine.loop.remove_reader(self.fd)
            self.listening = False
        if self._handle is None:
            self._handle = self.engine.loop.call_later(seconds, self.resume)

    def _on_accept(self) -> None:
        eng = self.engine
        sock = self.sock
        for _ in range(ACCEPT_BATCH):
            if eng.nfds + 2 > eng.fd_budget:
                used = eng.nfds + eng.base_fds
                eng.stop_accepting(f"{used} in use, the rest kept for the daemon", None)
                return
            try:
                fd, addr = sock._accept()
            except _AGAIN:
                return
            except OSError as e:
                if e.errno in FD_ERRORS:
                    eng.stop_accepting(f"accept on {fmt_key(self.key)}", e)
                    return
                continue  # ECONNABORTED & co: that client gave up; the next may not have
            # The C socket type: socket.socket's Python __init__ and enum conversions cost
            # more than the accept itself at high connection rates.
            csock = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
            b = self.backend
            if b.ranges and not b.allows(addr[0]):
                b.stats.reject("source_range")  # loadBalancerSourceRanges: not for this client
                csock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                csock.close()
                continue
            TcpConn(eng, b, csock, addr).connect()
            if not self.listening:  # descriptors ran short serving it: accept no more now
                return

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.listening:
            self.engine.loop.remove_reader(self.fd)
            self.listening = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.sock.close()
        self.engine.listeners.discard(self)


class TcpConn:
    """One proxied connection: connect phase, then two pumps."""

    __slots__ = (
        "attempt",
        "backend",
        "bsock",
        "client",
        "client_ip",
        "closed",
        "connect_pending",
        "csock",
        "down",
        "engine",
        "ep",
        "last",
        "tried",
        "tunnel",
        "up",
    )

    def __init__(self, engine: TcpEngine, backend: Backend, csock: Any, client: tuple):
        self.engine = engine
        self.backend = backend
        self.csock = csock
        self.client = client  # (ip, port, …) as accept() gave it
        self.client_ip = client[0]
        self.bsock: Any = None  # _socket.socket
        self.ep = None
        self.tried: list = []
        self.attempt = 0
        self.connect_pending = False
        self.up: Pump | None = None
        self.down: Pump | None = None
        self.closed = False
        self.tunnel: Tunnel | asyncio.Task | None = None  # port-forward: the tunnel, or its opening
        self.last = _now()
        csock.setblocking(False)  # TCP_NODELAY: inherited from the listener
        engine.nfds += 1
        backend.conns.add(self)
        st = backend.stats
        st.accepted += 1
        st.active += 1

    # -- connect phase ---------------------------------------------------------------------

    def connect(self) -> None:
        eng = self.engine
        bal = self.backend.balancer
        now = _now()
        ep = bal.pick(self.client_ip, now, self.tried)
        if ep is None and self.tried:  # every endpoint tried once: go round again
            ep = bal.pick(self.client_ip, now)
        if ep is None:
            self.reject("no_endpoints" if not bal.endpoints else "endpoints_failed")
            return
        self.ep = ep
        self.tried.append(ep_key(ep))
        if eng.forwarder is not None:
            self._open_tunnel(eng.forwarder, ep)
            return
        fam = socket.AF_INET6 if ":" in ep.ip else socket.AF_INET
        typ = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        src = eng.source
        bs: Any
        try:
            if src is not None and src.preserve(self.client_ip, ep, self.backend.target.external):
                bs = transparent_socket(fam, socket.SOCK_STREAM, self.client[:2])
            else:
                bs = _socket.socket(fam, typ)
        except OSError as e:
            bs = None
            # Out of descriptors: the reserve frees some. The client's address refused
            # (it cannot be bound here): the node's address, as without the feature.
            fds = e.errno in FD_ERRORS
            if not fds or eng.use_reserve(f"connect for {self.backend.label}", e):
                with contextlib.suppress(OSError):
                    bs = _socket.socket(fam, typ)
            if bs is None:
                self.reject("fd_limit")
                return
        self.bsock = bs
        eng.nfds += 1
        bs.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = bs.connect_ex((ep.ip, ep.port))
        if err and err != errno.EINPROGRESS:
            self._failed(err)
            return
        # Registered once for the connection's whole life: the connect's completion, then
        # the endpoint's bytes and its room for ours.
        eng.poller.watch(bs.fileno(), IN | OUT, self._on_backend)
        if err:
            self.connect_pending = True
            timeouts = eng.connect_timeouts
            eng.connect_deadline(self, now + timeouts[min(self.attempt, len(timeouts) - 1)])
        else:
            self._connected()

    def _connect_over(self) -> None:
        """The connect is over (done, failed or timed out): no deadline any more."""
        if self.connect_pending:
            self.connect_pending = False
            self.engine.connecting.pop(self, None)

    def _on_backend(self, ev: int) -> None:
        """Events of the endpoint's socket."""
        if self.connect_pending:
            if not ev & _WRITE:
                return
            self._connect_over()
            # Writable with no error or hang-up reported: connected, no syscall to ask.
            if ev & _TROUBLE:
                err = self.bsock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._failed(err)
                    return
            self._connected()
            if self.closed:
                return
        if ev & _READ:
            self.down.on_readable(ev)  # type: ignore[union-attr]
        if ev & _WRITE and not self.closed:
            up = self.up
            if up is not None and up.pending is not None:
                up.on_writable()

    def _on_client(self, ev: int) -> None:
        """Events of the client's socket (registered once connected to an endpoint)."""
        if ev & _READ:
            self.up.on_readable(ev)  # type: ignore[union-attr]
        if ev & _WRITE and not self.closed:
            down = self.down
            if down is not None and down.pending is not None:
                down.on_writable()

    def on_timeout(self) -> None:
        self._connect_over()
        self._failed(errno.ETIMEDOUT)

    # -- connect phase through the API server (port-forward) -----------------------------

    def _open_tunnel(self, fwd: Forwarder, ep: Endpoint) -> None:
        key = (ep.pod, ep.port)
        t = fwd.take(key)
        if t is not None:  # warm: already settled, no round trip
            self._attach(t, ep)
            return
        timeout = TUNNEL_TIMEOUTS[min(self.attempt, len(TUNNEL_TIMEOUTS) - 1)]
        task = fwd.loop.create_task(fwd.open(key, timeout))
        task.add_done_callback(functools.partial(self._tunnel_opened, ep))
        self.tunnel = task

    def _tunnel_opened(self, ep: Endpoint, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        e = task.exception()
        if self.closed:
            if e is None:
                task.result().close()
            return
        self.tunnel = None
        if e is not None:
            self._failed(errno.ECONNREFUSED, str(e))
        else:
            self._attach(task.result(), ep)

    def _attach(self, t: Tunnel, ep: Endpoint) -> None:
        """The tunnel carries the client's bytes itself (no pumps: see portforward.py)."""
        b = self.backend
        if b.balancer.succeeded(ep):
            log.info("%s: endpoint %s answers again", b.label, ep)
        self.tried = None  # type: ignore[assignment]
        self.tunnel = t
        t.attach(self)

    def _failed(self, err: int, why: str = "") -> None:
        if self.bsock is not None:
            self.engine.poller.forget(self.bsock.fileno())
            self.bsock.close()
            self.bsock = None
            self.engine.nfds -= 1
        b = self.backend
        b.stats.connect_failures += 1
        ep = self.ep
        wait = b.balancer.failed(ep, _now())
        if wait and b.balancer.failures(ep) == b.balancer.policy.threshold:
            log.warning(
                "%s: endpoint %s failed (%s); skipping it for %gs",
                b.label,
                ep,
                why or os.strerror(err),
                wait,
            )
        self.attempt += 1
        if self.attempt < len(self.engine.connect_timeouts):
            b.stats.retries += 1
            self.connect()
        else:
            self.reject("endpoints_failed")

    @property
    def established(self) -> bool:
        """Connected to an endpoint (or tunnel), bytes flowing."""
        return self.tried is None

    def _connected(self) -> None:
        b = self.backend
        if b.balancer.succeeded(self.ep):
            log.info("%s: endpoint %s answers again", b.label, self.ep)
        self.tried = None
        self.up = Pump(self, self.csock, self.bsock, True)
        self.down = Pump(self, self.bsock, self.csock, False)
        # The client's bytes that came while connecting are reported at once; room to
        # write to the client is asked for only when it falls behind (Pump._block).
        self.engine.poller.watch(self.csock.fileno(), IN, self._on_client)

    def reject(self, reason: str) -> None:
        """No endpoint could take the connection: reset the client (like a REJECT)."""
        self.backend.stats.reject(reason)
        log.debug("%s: connection from %s rejected: %s", self.backend.label, self.client_ip, reason)
        self.close(reset=True)

    # -- end -------------------------------------------------------------------------------

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bsock is not None:
            self._connect_over()
        if self.tunnel is not None:
            if isinstance(self.tunnel, asyncio.Task):
                self.tunnel.cancel()
            else:
                self.tunnel.close()
            self.tunnel = None
        for p in (self.up, self.down):
            if p is not None:
                p.stop()
        self.up = self.down = None  # no conn <-> pump cycle left for the GC to find
        poller = self.engine.poller
        for s in (self.csock, self.bsock):
            if s is not None:
                poller.forget(s.fileno())
                if reset:
                    with contextlib.suppress(OSError):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                s.close()
                self.engine.nfds -= 1
        b = self.backend
        b.conns.discard(self)
        b.stats.active -= 1


class Pump:
    """src → dst. Copy mode: recv_into the engine's shared buffer, send. Splice mode:
    os.splice socket → pipe → socket, the bytes never enter user space. A pump of the
    `auto` engine starts copying and turns to splicing the first time a read fills the
    whole buffer (a bulk flow): small request/response traffic costs two syscalls per
    message, bulk traffic no copies. When dst cannot take everything, the leftover
    (bytes, or the pipe holding them) stays with this pump and src is not read until dst
    drains: at most one chunk is buffered per direction."""

    __slots__ = (
        "conn",
        "dfd",
        "done",
        "dst",
        "eng",
        "eof",
        "off",
        "pending",
        "pipe",
        "poll",
        "sfd",
        "splicing",
        "src",
        "up",
    )

    def __init__(self, conn: TcpConn, src: Any, dst: Any, up: bool):
        eng = conn.engine
        self.conn = conn
        self.eng = eng
        self.poll = eng.poller
        self.src = src
        self.dst = dst
        self.sfd = src.fileno()
        self.dfd = dst.fileno()
        self.up = up
        self.eof = False
        self.done = False
        self.splicing = eng.engine == "splice"
        self.pending: bytes | int | None = None  # bytes (copy) or a count in self.pipe
        self.off = 0
        self.pipe: tuple[int, int] | None = None  # held only while bytes are stuck in it

    def stop(self) -> None:
        if self.pipe is not None:
            self.eng.release_pipe(self.pipe, empty=False)
            self.pipe = None
        self.pending = None
        self.eof = True

    def _count(self, n: int) -> None:
        conn = self.conn
        conn.last = _now()
        st = conn.backend.stats
        if self.up:
            st.bytes_to_endpoint += n
        else:
            st.bytes_to_client += n

    def on_readable(self, ev: int) -> None:
        """src reported readiness (`ev`; 0: reading again after dst drained, nothing
        known). Edge-triggered: read until a short read (when `ev` proves it the last
        one) or EAGAIN, as long as dst takes everything."""
        if self.pending is not None or self.eof:
            return  # dst is full (on_writable reads again), or this direction is over
        if self.splicing:
            self._splice()
            return
        buf = self.eng.buf
        size = len(buf)
        src, dst = self.src, self.dst
        for _ in range(READS_PER_EVENT):
            try:
                n = src.recv_into(buf)
            except _AGAIN:
                return
            except OSError:
                self.conn.close(reset=True)
                return
            if not n:
                self._eof()
                return
            self._count(n)
            try:
                sent = dst.send(buf[:n])
            except _AGAIN:
                sent = 0
            except OSError:
                self.conn.close(reset=True)
                return
            # A short read emptied the socket (unless the event was _UNSURE); when the
            # FIN had come with the event, that was the last read: no recv just to see
            # the EOF, one syscall and one wake-up less per connection.
            last = n < size and ev and not ev & _UNSURE
            if sent < n:
                self.pending = buf[sent:n].tobytes()
                self.off = 0
                self.eof = bool(last) and ev & _FIN == _RDHUP  # on_writable finishes
                self._block()
                return
            if last:
                if ev & _FIN == _RDHUP:
                    self._eof()
                return
            if n == size and self.eng.engine == "auto":
                self.splicing = True  # a bulk flow: zero-copy from the next read on
                self._splice()
                return
        self.eng.loop.call_soon(self.on_readable, 0)  # the other connections' turn first

    def _splice(self) -> None:
        """Splice until EAGAIN: a short splice does not prove the socket empty (the pipe
        fills by pages, not bytes)."""
        eng = self.eng
        for _ in range(READS_PER_EVENT):
            try:
                pipe = eng.pipe()
            except OSError as e:
                pipe = None
                if e.errno in FD_ERRORS and eng.use_reserve(
                    f"pipe for {self.conn.backend.label}", e
                ):
                    with contextlib.suppress(OSError):
                        pipe = eng.pipe()
                if pipe is None:
                    self.conn.close(reset=True)
                    return
            try:
                n = os.splice(self.sfd, pipe[1], eng.pipe_size, flags=_SPLICE_FLAGS)
            except _AGAIN:
                return
            except OSError:
                self.conn.close(reset=True)
                return
            if not n:
                self._eof()
                return
            self._count(n)
            left = n
            try:
                while left:
                    left -= os.splice(pipe[0], self.dfd, left, flags=_SPLICE_FLAGS)
                continue
            except _AGAIN:
                pass
            except OSError:
                eng.take_pipe(pipe)
                eng.release_pipe(pipe, empty=False)
                self.conn.close(reset=True)
                return
            eng.take_pipe(pipe)  # dst is full: these bytes wait in this pipe
            self.pipe = pipe
            self.pending = left
            self._block()
            return
        self.eng.loop.call_soon(self.on_readable, 0)

    def _block(self) -> None:
        """dst is full: have its room reported (the endpoint's socket reports it always)."""
        self.poll.want(self.dfd, OUT)

    def on_writable(self) -> None:
        pipe = self.pipe
        try:
            if pipe is not None:
                left = self.pending
                while left:
                    left -= os.splice(pipe[0], self.dfd, left, flags=_SPLICE_FLAGS)
                    self.pending = left
            else:
                data = self.pending
                self.off += self.dst.send(memoryview(data)[self.off :])
                if self.off < len(data):
                    return
        except _AGAIN:
            return
        except OSError:
            self.conn.close(reset=True)
            return
        if pipe is not None:
            self.pipe = None
            self.eng.release_pipe(pipe, empty=True)
        self.pending = None
        self.conn.last = _now()
        if self.eof:
            self._finish()
        else:
            self.on_readable(0)  # src's edges while dst was full went unheeded

    def _eof(self) -> None:
        self.eof = True
        if self.pending is None:
            self._finish()

    def _finish(self) -> None:
        """Everything from src is written: pass the FIN on (half-close)."""
        self.done = True
        conn = self.conn
        other = conn.down if self.up else conn.up
        if other.done:
            conn.close()  # both ways finished: close() sends the last FIN itself
            return
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
