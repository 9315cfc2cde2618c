"""Endpoints through the API server: one `pods/portforward` WebSocket per connection.

On a laptop the cluster's pod IPs are rarely routable; the API server can reach every Pod.
With `--userspace-endpoint-access=port-forward` (or `auto` when a probe finds the
endpoints unreachable) each proxied TCP connection is carried to its endpoint's Pod (the
EndpointSlice endpoint's targetRef) through

    GET /api/v1/namespaces/NS/pods/NAME/portforward?ports=PORT   (WebSocket, v4.channel.k8s.io)

with the kubelet's framing: channel 0 carries the data, channel 1 the errors, each
message starts with its channel byte, and each channel's first message is the port
number (2 bytes, little endian). The kubelet connects to the Pod's port when the WebSocket
opens, so one WebSocket is one TCP connection in the Pod: a WebSocket cannot be shared by
two connections, and a new connection needs a new WebSocket (HTTP upgrade, over TLS on a
real cluster: 2-3 round trips to the API server).

So connection set-up does not pay that, tunnels are opened ahead of use and pooled per
endpoint (`Forwarder.take`): a pool starts when its endpoint is first used, grows by one
each time a connection finds it empty (up to WARM_MAX), is refreshed every WARM_MAX_AGE
(a warm tunnel is an idle connection at the Pod, and servers close those), and is emptied
after IDLE_KEEP without use, or at once when the endpoint leaves the Service.

A tunnel counts as connected once both port prefixes arrived and SETTLE passed without
an error: the kubelet writes the prefixes, then dials the Pod, and a refused dial comes
back on the error channel right after them. Until then nothing is read from the client,
so a failed tunnel is retried on another endpoint like a refused connect. After that,
an error or a broken WebSocket resets the client. There is no half-close through the
kubelet's port-forward: after the client's FIN the tunnel keeps carrying the endpoint's
answer while it keeps coming, and ends once the endpoint has been quiet for
QUIET_AFTER_FIN (a client that closed cannot be told from one that half-closed).

UDP cannot be carried by port-forward (the kubelet forwards TCP only).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp

if TYPE_CHECKING:
    from kubernetes.client import Configuration

    from proxy.model import Endpoint

log = logging.getLogger("proxy.userspace.portforward")

PROTOCOL = "v4.channel.k8s.io"
DATA, ERROR = 0, 1
SETTLE = 0.01  # s after the port prefixes without an error: the Pod accepted
# s: after the client's FIN, the tunnel ends once the Pod has been quiet this long (the
# protocol cannot pass the FIN on; containerd ends a port-forward 1 s after one side ends)
QUIET_AFTER_FIN = 1.0
WARM_MAX = 8  # warm tunnels per endpoint at most
WARM_MAX_AGE = 5.0  # s: warm tunnels older than this are replaced (servers close idle ones)
IDLE_KEEP = 30.0  # s: an endpoint unused this long keeps no warm tunnels
AUTH_REFRESH = 60.0  # s between re-reads of the credentials (tokens rotate, plugins expire)
# s: a taken warm tunnel is replaced this much later, so that opening the replacement (an
# HTTP request and upgrade: CPU on this loop) does not delay the connection's first bytes
REFILL_DELAY = 0.05
CHUNK = 256 * 1024
_DATA_PREFIX = bytes([DATA])

TunnelKey = tuple[str, int]  # ("namespace/name" of the Pod, port)


class TunnelError(Exception):
    """A tunnel could not be opened; `forbidden` when RBAC refused it."""

    def __init__(self, why: str, *, forbidden: bool = False) -> None:
        super().__init__(why)
        self.forbidden = forbidden


@dataclass(frozen=True)
class ApiTarget:
    """Where the API server is and how to authenticate to it, from the same client
    configuration the watch uses (kubeconfig or in-cluster)."""

    url: str  # scheme://host[:port][/prefix], no trailing slash
    ssl: ssl.SSLContext | bool  # False: plain HTTP (or verification off)
    server_hostname: str | None = None
    proxy: str | None = None
    auth: Callable[[], str | None] = lambda: None  # the Authorization header; may block

    @classmethod
    def from_configuration(cls, conf: Configuration) -> ApiTarget:
        url = str(conf.host).rstrip("/")
        ctx: ssl.SSLContext | bool = False
        if url.startswith("https:"):
            ctx = ssl.create_default_context(cafile=conf.ssl_ca_cert or None)
            if not conf.verify_ssl or conf.assert_hostname is False:
                ctx.check_hostname = False
            if not conf.verify_ssl:
                ctx.verify_mode = ssl.CERT_NONE
            if conf.cert_file:
                ctx.load_cert_chain(conf.cert_file, conf.key_file or None)

        def auth() -> str | None:
            # The client's own path: refreshes expiring tokens (exec plugins, in-cluster
            # token files) and covers bearer tokens and basic auth alike.
            value = conf.auth_settings().get("BearerToken", {}).get("value")
            return str(value) if value else None

        return cls(url, ctx, conf.tls_server_name or None, conf.proxy or None, auth)

    def portforward_url(self, key: TunnelKey) -> str:
        pod, port = key
        ns, _, name = pod.partition("/")
        path = f"/api/v1/namespaces/{quote(ns)}/pods/{quote(name)}/portforward"
        return f"{self.url}{path}?ports={port}"


class Tunnel:
    """One port-forward WebSocket to one Pod port, i.e. one TCP connection in the Pod.

    Attached to a connection, it carries the bytes itself: WebSocket messages are written
    straight to the client's socket and the client's reads go straight into messages (no
    pumps, no socket pair: one copy less and one wake-up less per message)."""

    __slots__ = (
        "_down",
        "_up",
        "born",
        "client",
        "client_done",
        "conn",
        "error",
        "flushing",
        "fwd",
        "key",
        "last_pod",
        "pending",
        "pod_done",
        "settled",
        "ws",
    )

    def __init__(self, fwd: Forwarder, key: TunnelKey, ws: aiohttp.ClientWebSocketResponse):
        self.fwd = fwd
        self.key = key
        self.ws = ws
        self.born = time.monotonic()
        self.pending: list[bytes] = []  # what the Pod said before a connection took it
        self.error = ""
        self.settled: asyncio.Future[None] = fwd.loop.create_future()
        self.conn: Any = None  # the TcpConn using it
        self.client: Any = None  # its client socket
        self.flushing = False  # attached, `pending` not yet written: keep the order
        self.pod_done = False  # the Pod's side ended cleanly (FIN passed to the client)
        self.client_done = False  # the client sent its FIN
        self.last_pod = 0.0  # when the Pod last sent something (after the client's FIN)
        self._up: asyncio.Task | None = None
        self._down: asyncio.Task | None = fwd.loop.create_task(self._read())

    @property
    def alive(self) -> bool:
        return self._down is not None and not self._down.done() and not self.error

    # -- Pod → client ---------------------------------------------------------------------

    async def _read(self) -> None:
        ws, port, loop = self.ws, self.key[1], self.fwd.loop
        prefixed = [False, False]
        try:
            while True:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        continue  # not this subprotocol's
                    if msg.type is not aiohttp.WSMsgType.CLOSE:  # no close frame: broken
                        self.error = "the connection to the API server broke"
                    break
                data = msg.data
                if not data:
                    continue
                ch = data[0]
                if ch > ERROR:
                    continue
                if not prefixed[ch]:
                    if len(data) != 3 or struct.unpack("<H", data[1:])[0] != port:
                        self.error = f"bad first frame on channel {ch}: {data[:8]!r}"
                        break
                    prefixed[ch] = True
                    if all(prefixed):
                        loop.call_later(SETTLE, self._settle)
                elif ch == ERROR:
                    self.error = bytes(data[1:]).decode(errors="replace").strip() or "error"
                    break
                elif self.client is not None and not self.flushing:
                    await loop.sock_sendall(self.client, memoryview(data)[1:])
                    conn = self.conn
                    conn.last = self.last_pod = time.monotonic()
                    conn.backend.stats.bytes_to_client += len(data) - 1
                else:
                    self.pending.append(data[1:])
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._ended()

    def _settle(self) -> None:
        if not self.settled.done() and not self.error and self._down and not self._down.done():
            self.settled.set_result(None)

    def _ended(self) -> None:
        """The Pod's side is over: fail the open, leave the pool, or end the connection."""
        if not self.settled.done():
            why = self.error or "closed before the Pod accepted"
            self.settled.set_exception(TunnelError(why))
            self.settled.exception()  # retrieved: no "never retrieved" warning
        conn = self.conn
        if conn is None:
            self.fwd._gone(self)
            self.close()
        elif self.error:
            log.debug("tunnel to %s:%d broke: %s", *self.key, self.error)
            conn.close(reset=True)
        elif self.client_done:
            conn.close()  # both ways finished
        elif self.client is not None:
            self.pod_done = True
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_WR)  # the Pod closed: FIN to the client

    # -- client → Pod ---------------------------------------------------------------------

    def attach(self, conn: Any) -> None:
        """Carry the bytes of `conn` (a TcpConn), whose endpoint this tunnel reaches."""
        self.conn = conn
        self.client = conn.csock
        self.flushing = bool(self.pending)
        self._up = self.fwd.loop.create_task(self._write())

    async def _write(self) -> None:
        loop, client, ws, conn = self.fwd.loop, self.client, self.ws, self.conn
        st = conn.backend.stats
        try:
            while self.pending:  # the reader appends here meanwhile, so order holds
                data = self.pending.pop(0)
                await loop.sock_sendall(client, data)
                st.bytes_to_client += len(data)
            self.flushing = False
            while data := await loop.sock_recv(client, CHUNK):
                await ws.send_bytes(_DATA_PREFIX + data)
                conn.last = time.monotonic()
                st.bytes_to_endpoint += len(data)
        except (OSError, aiohttp.ClientError, RuntimeError):
            if self.conn is not None:
                self.conn.close(reset=True)
            return
        except asyncio.CancelledError:
            return
        # The client is done sending (a half-close, or it closed). The kubelet's protocol
        # cannot pass that on: keep carrying the Pod's answer while it keeps coming.
        self.client_done = True
        if self.pod_done and self.conn is not None:
            self.conn.close()
        else:
            self.last_pod = time.monotonic()
            self.fwd.loop.call_later(QUIET_AFTER_FIN, self._quiet)

    def _quiet(self) -> None:
        """After the client's FIN: end the tunnel once the Pod has been quiet long enough."""
        if self.conn is None:
            return
        left = self.last_pod + QUIET_AFTER_FIN - time.monotonic()
        if left > 0:
            self.fwd.loop.call_later(left, self._quiet)
        else:
            self.conn.close()

    def close(self) -> None:
        me = asyncio.current_task()
        for task in (self._up, self._down):
            if task is not None and task is not me and not task.done():
                task.cancel()
        self._up = None
        self.client = None
        if self.ws is not None:
            self.fwd.background(self.ws.close())
            self.ws = None  # type: ignore[assignment]
            self.fwd.count_fds(-1)
        self.conn = None


class _Pool:
    """Warm tunnels of one endpoint (Pod, port)."""

    __slots__ = ("idle", "last_use", "opening", "retry_at", "want")

    def __init__(self, now: float) -> None:
        self.idle: collections.deque[Tunnel] = collections.deque()
        self.opening = 0
        self.want = 0  # warm tunnels to keep
        self.last_use = now
        self.retry_at = 0.0  # after a failed warm open: not before this


class Forwarder:
    """Opens and pools port-forward tunnels for one data plane (on the event loop)."""

    def __init__(
        self,
        target: ApiTarget,
        loop: asyncio.AbstractEventLoop,
        *,
        warm_max: int = WARM_MAX,
        count_fds: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.target = target
        self.loop = loop
        self.warm_max = warm_max
        self.count_fds = count_fds
        self.pools: dict[TunnelKey, _Pool] = {}
        self.stats = collections.Counter[str]()  # warm, cold, failed, …
        self._session: aiohttp.ClientSession | None = None
        self._auth: str | None = None
        self._auth_at = float("-inf")
        self._tasks: set[asyncio.Task] = set()
        self._forbidden_logged = False

    async def start(self) -> None:
        """Read the credentials once (blocking: exec plugins run here, off the loop)."""
        await self._refresh_auth()

    async def _refresh_auth(self) -> None:
        self._auth = await asyncio.to_thread(self.target.auth)
        self._auth_at = time.monotonic()

    def background(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- opening -----------------------------------------------------------------------------

    def _session_for(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ssl=self.target.ssl)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def open(self, key: TunnelKey, timeout: float = 10.0) -> Tunnel:
        """A new settled tunnel to `key`; TunnelError when it cannot be had."""
        headers = {"Authorization": self._auth} if self._auth else None
        try:
            async with asyncio.timeout(timeout):
                ws = await self._session_for().ws_connect(
                    self.target.portforward_url(key),
                    protocols=(PROTOCOL,),
                    headers=headers,
                    proxy=self.target.proxy,
                    server_hostname=self.target.server_hostname,
                    autoping=True,
                    max_msg_size=0,
                    compress=0,
                )
                self.count_fds(1)
                t = Tunnel(self, key, ws)
                try:
                    await asyncio.shield(t.settled)
                except BaseException:
                    t.close()
                    raise
        except TimeoutError:
            self.stats["failed"] += 1
            raise TunnelError(f"no tunnel within {timeout:g}s") from None
        except aiohttp.WSServerHandshakeError as e:
            self.stats["failed"] += 1
            if e.status == 401 and time.monotonic() - self._auth_at > 1.0:
                await self._refresh_auth()  # expired credentials: the next try has new ones
            if e.status == 403:
                self._log_forbidden(key)
            raise TunnelError(f"HTTP {e.status} {e.message}", forbidden=e.status == 403) from None
        except aiohttp.ClientError as e:
            self.stats["failed"] += 1
            raise TunnelError(f"{type(e).__name__}: {e}") from None
        except TunnelError:
            self.stats["failed"] += 1
            raise
        return t

    def _log_forbidden(self, key: TunnelKey) -> None:
        if not self._forbidden_logged:
            self._forbidden_logged = True
            log.warning(
                "port-forward to pod %s refused by the API server (403): the user needs "
                "RBAC `create` on `pods/portforward` (see manifests/examples/laptop-rbac.yaml)",
                key[0],
            )

    # -- the pool ----------------------------------------------------------------------------

    def take(self, key: TunnelKey) -> Tunnel | None:
        """A warm tunnel to `key` for a new connection, or None (open a cold one). Either
        way the pool learns it is used and keeps tunnels warm for the next ones."""
        now = time.monotonic()
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = _Pool(now)
        pool.last_use = now
        t = None
        while pool.idle and t is None:
            t = pool.idle.popleft()
            if not t.alive:
                t.close()
                t = None
        if t is None:
            pool.want = min(self.warm_max, pool.want + 1)
            self.stats["cold"] += 1
            self._refill(key, pool, now)
        else:
            self.stats["warm"] += 1
            self.loop.call_later(REFILL_DELAY, self._refill_later, key, pool)
        return t

    def _refill_later(self, key: TunnelKey, pool: _Pool) -> None:
        if self.pools.get(key) is pool:
            self._refill(key, pool, time.monotonic())

    def _refill(self, key: TunnelKey, pool: _Pool, now: float) -> None:
        if now < pool.retry_at:
            return
        while len(pool.idle) + pool.opening < pool.want:
            pool.opening += 1
            self.background(self._warm(key, pool))

    async def _warm(self, key: TunnelKey, pool: _Pool) -> None:
        try:
            t = await self.open(key)
        except TunnelError as e:
            pool.retry_at = time.monotonic() + 1.0
            log.debug("warm tunnel to %s:%d: %s", *key, e)
            return
        except asyncio.CancelledError:
            return
        finally:
            pool.opening -= 1
        if self.pools.get(key) is pool and pool.want > len(pool.idle):
            pool.idle.append(t)
        else:
            t.close()

    def _gone(self, t: Tunnel) -> None:
        """An unused tunnel ended (the Pod closed it, or it broke)."""
        pool = self.pools.get(t.key)
        if pool is not None and t in pool.idle:
            pool.idle.remove(t)
            if time.monotonic() - t.born < 1.0:
                pool.retry_at = time.monotonic() + 1.0  # dying young: do not spin

    def retain(self, keys: Iterable[TunnelKey]) -> int:
        """Endpoints that left every Service get no new tunnels; returns pools dropped."""
        keep = set(keys)
        gone = [k for k in self.pools if k not in keep]
        for k in gone:
            for t in self.pools.pop(k).idle:
                t.close()
        return len(gone)

    def sweep(self, now: float) -> None:
        """Replace old warm tunnels, forget endpoints not used lately, refresh credentials."""
        for key, pool in list(self.pools.items()):
            if now - pool.last_use > IDLE_KEEP:
                pool.want = 0
            while pool.idle and (
                len(pool.idle) > pool.want or now - pool.idle[0].born > WARM_MAX_AGE
            ):
                pool.idle.popleft().close()
            if pool.want:
                self._refill(key, pool, now)
            elif not pool.idle and not pool.opening:
                del self.pools[key]
        if now - self._auth_at > AUTH_REFRESH:
            self._auth_at = now  # one refresh at a time
            self.background(self._refresh_auth())

    @property
    def warm(self) -> int:
        return sum(len(p.idle) for p in self.pools.values())

    async def close(self) -> None:
        self.retain(())
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()


def tunnel_key(ep: Endpoint) -> TunnelKey:
    return (ep.pod, ep.port)


async def probe_direct(endpoints: list[tuple[str, int]], timeout: float = 1.0) -> tuple[bool, str]:
    """Can this host reach endpoints directly? Tries TCP connects to a few of them at once:
    any that connects or is refused (a host answered) means yes. Returns (reachable, what
    was seen, for the log)."""
    loop = asyncio.get_running_loop()

    async def one(ip: str, port: int) -> str:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            try:
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(s, (ip, port))
                return "connected"
            except ConnectionRefusedError:
                return "refused"
            except TimeoutError:
                return "timed out"
            except OSError as e:
                return e.strerror or str(e)

    results = await asyncio.gather(*(one(ip, port) for ip, port in endpoints))
    seen = ", ".join(f"{ip}:{port} {r}" for (ip, port), r in zip(endpoints, results, strict=True))
    return any(r in ("connected", "refused") for r in results), seen
