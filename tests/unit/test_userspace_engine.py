"""The userspace data plane in-process on loopback (laptop mode, no root needed).

Real sockets, real uvloop, backends on 127.0.0.1 in the same loop: forwarding, half-close,
failover, draining, resets, idle timeouts, UDP sessions, metrics. Kernel-level ownership
of Service addresses is tested in tests/e2e/test_userspace_mode.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import socket
import threading
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from prometheus_client import generate_latest

from proxy.config import Config
from proxy.endpoints.store import Store
from proxy.userspace.dataplane import UserspaceDataPlane
from proxy.userspace.laptop import laptop_address
from proxy.userspace.metrics import STATS

from .factories import endpoint, service, slice_

ENGINES = ["copy", "splice", "auto"]


def run(coro: Awaitable) -> None:
    uvloop.run(asyncio.wait_for(coro, 60))


class Backend:
    """A loopback TCP server: greets with its name, then echoes (or runs `handler`)."""

    def __init__(self, name: str, handler: Callable | None = None):
        self.name = name
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.port = 0
        self.conns = 0

    async def start(self, port: int = 0) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.conns += 1
        try:
            if self.handler is not None:
                await self.handler(r, w)
                return
            w.write(self.name.encode() + b"\n")
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


class Harness:
    """A store + laptop-mode data plane; `sync()` applies the store to it."""

    def __init__(self, **cfg_kw):
        cfg_kw.setdefault("hostname", "node-a")
        self.cfg = Config(userspace_laptop="on", **cfg_kw)
        self.store = Store()
        self.dp = UserspaceDataPlane(self.cfg)

    async def __aenter__(self) -> Harness:
        await self.dp.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.dp.stop()

    def set(self, services: list[dict], slices: list[dict]) -> None:
        self.store.replace("Service", services)
        self.store.replace("EndpointSlice", slices)

    async def sync(self, full: bool = False) -> None:
        snap = self.store.snapshot()  # as the sync runner hands it on: the served model
        await self.dp.sync(dataclasses.replace(snap, model=self.dp.served(snap.model)), full)

    def addr(self, name: str, ns: str = "default") -> str:
        model = self.dp.served(self.store.snapshot().model)
        return model.services[(ns, name)].cluster_ips[0]

    async def serve(self, *ports: int, port: int = 8080, proto: str = "TCP", **spec) -> str:
        """`web` on `port`, one endpoint per backend port, fully synced; its address."""
        self.set([web(port, proto, **spec)], slices(*ports, proto=proto))
        await self.sync(full=True)
        return self.addr("web")


def web(port: int = 8080, proto: str = "TCP", **spec) -> dict:
    return service("web", ports=[{"name": "p", "port": port, "protocol": proto}], **spec)


def eps(port: int, proto: str = "TCP", name: str = "web-abc") -> dict:
    """One slice with one endpoint on 127.0.0.1:`port`."""
    return slice_(
        "web",
        name=name,
        endpoints=[endpoint("127.0.0.1")],
        ports=[{"name": "p", "port": port, "protocol": proto}],
    )


def slices(*ports: int, proto: str = "TCP") -> list[dict]:
    return [eps(p, proto=proto, name=f"web-{i}") for i, p in enumerate(ports)]


async def hello(ip: str, port: int, payload: bytes = b"ping") -> tuple[str, bytes]:
    r, w = await asyncio.open_connection(ip, port)
    try:
        name = (await r.readline()).decode().strip()
        w.write(payload)
        await w.drain()
        echo = await r.readexactly(len(payload))
        return name, echo
    finally:
        w.close()


def metric(name: str, **labels: str) -> float:
    text = generate_latest().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- TCP -------------------------------------------------------------------------------------


def test_round_robin_over_ready_endpoints_and_metrics():
    async def main():
        bs = [await Backend(f"web-{i}").start() for i in range(3)]
        async with Harness() as h:
            ip = await h.serve(*(b.port for b in bs))
            assert ip == laptop_address(h.store.snapshot().model.services[("default", "web")])
            got = Counter([(await hello(ip, 8080))[0] for _ in range(30)])
            assert got == {"web-0": 10, "web-1": 10, "web-2": 10}
            assert metric("kubeproxy_userspace_connections_total", service="default/web:p") == 30
            # The proxy sees each client's close a moment later: wait for it, not for time.
            for _ in range(1000):
                if metric("kubeproxy_userspace_active_connections", service="default/web:p") == 0:
                    break
                await asyncio.sleep(0.01)
            assert metric("kubeproxy_userspace_active_connections", service="default/web:p") == 0
            assert (
                metric(
                    "kubeproxy_userspace_bytes_total",
                    service="default/web:p",
                    direction="to_endpoint",
                )
                == 30 * 4
            )
        for b in bs:
            await b.stop()

    run(main())


def test_terminating_endpoints_used_only_when_none_ready():
    async def main():
        ready = await Backend("ready").start()
        term = await Backend("term").start()
        async with Harness() as h:
            s_ready = slice_(
                "web",
                name="a",
                endpoints=[endpoint("127.0.0.1")],
                ports=[{"name": "p", "port": ready.port, "protocol": "TCP"}],
            )
            s_term = slice_(
                "web",
                name="b",
                endpoints=[endpoint("127.0.0.1", ready=False, serving=True, terminating=True)],
                ports=[{"name": "p", "port": term.port, "protocol": "TCP"}],
            )
            h.set([web()], [s_ready, s_term])
            await h.sync(full=True)
            ip = h.addr("web")
            assert {(await hello(ip, 8080))[0] for _ in range(6)} == {"ready"}
            h.set([web()], [s_term])
            await h.sync()
            assert {(await hello(ip, 8080))[0] for _ in range(3)} == {"term"}
        await ready.stop()
        await term.stop()

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_bulk_transfer_intact_both_ways(engine):
    size = 24 * 1024 * 1024

    async def sink_then_send(r, w):
        h = hashlib.sha256()
        n = 0
        while n < size:
            data = await r.read(1 << 20)
            if not data:
                break
            h.update(data)
            n += len(data)
        w.write(h.hexdigest().encode() + b"\n")
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            w.write(block)
            await w.drain()
        w.write(hashlib.sha256(block * (size >> 20)).hexdigest().encode())
        await w.drain()

    async def main():
        b = await Backend("bulk", sink_then_send).start()
        async with Harness(userspace_engine=engine) as h:
            await h.serve(b.port)
            r, w = await asyncio.open_connection(h.addr("web"), 8080)
            data = os.urandom(size)

            async def send():
                for i in range(0, size, 1 << 20):
                    w.write(data[i : i + (1 << 20)])
                    await w.drain()

            sender = asyncio.create_task(send())
            assert (await r.readline()).decode().strip() == hashlib.sha256(data).hexdigest()
            await sender
            back = hashlib.sha256()
            n = 0
            while n < size:
                chunk = await r.read(1 << 20)
                assert chunk
                back.update(chunk[: size - n])
                tail = chunk[size - n :]
                n += len(chunk)
            tail += await r.read()
            assert tail.decode() == back.hexdigest()
            w.close()
            assert h.dp.tcp.engine == engine
        await b.stop()

    run(main())


def test_connections_leave_no_registration_behind_and_inherit_nodelay():
    """The engine's epoll holds exactly the live connections' sockets; accepted sockets
    get TCP_NODELAY from the listener (no setsockopt per connection)."""

    async def main():
        b = await Backend("a").start()
        async with Harness() as h:
            ip = await h.serve(b.port)
            poller = h.dp.tcp.poller
            idle = len(poller)
            r, w = await asyncio.open_connection(ip, 8080)
            assert (await r.readline()).strip() == b"a"
            (conn,) = [c for be in h.dp.backends.values() for c in be.conns]
            assert conn.csock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert conn.bsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert len(poller) == idle + 2  # client and endpoint sockets
            w.close()
            for _ in range(20):  # each way: client closes, endpoint closes first, reset
                assert (await hello(ip, 8080))[0] == "a"
            r2, w2 = await asyncio.open_connection(ip, 8080)
            await r2.readline()
            w2.transport.abort()  # a reset from the client
            while h.dp.open_connections() or len(poller) != idle:
                await asyncio.sleep(0.01)  # wait for the state; run()'s deadline bounds it
        await b.stop()

    run(main())


def test_urgent_data_before_the_fin_does_not_cut_the_stream():
    """Bytes, an urgent byte, bytes and the FIN all queued before the proxy reads: the read
    stops at the urgent mark with the FIN already in, which must not pass for the end."""

    async def collect(r, w):
        w.write(await r.read())  # everything until the FIN, back
        await w.drain()

    async def main():
        b = await Backend("urgent", collect).start()
        async with Harness(userspace_engine="copy") as h:
            ip = await h.serve(b.port)
            loop = asyncio.get_running_loop()
            c = socket.create_connection((ip, 8080))
            try:
                # Blocking sends in one go: the proxy runs on this loop, so it reads only
                # once all of this (and the FIN) is queued on its side.
                c.sendall(b"abc")
                c.send(b"!", socket.MSG_OOB)
                c.sendall(b"def")
                c.shutdown(socket.SHUT_WR)
                c.setblocking(False)
                got = b""
                while chunk := await loop.sock_recv(c, 100):
                    got += chunk
            finally:
                c.close()
            assert got == b"abcdef"  # the urgent byte is not inline (as before), no more lost
        await b.stop()

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_half_close_keeps_the_other_direction_open(engine):
    async def read_all_then_answer(r, w):
        data = await r.read()  # until the client's FIN
        await asyncio.sleep(0.05)
        w.write(b"got " + str(len(data)).encode())
        await w.drain()
        w.write_eof()

    async def main():
        b = await Backend("hc", read_all_then_answer).start()
        async with Harness(userspace_engine=engine) as h:
            await h.serve(b.port)
            r, w = await asyncio.open_connection(h.addr("web"), 8080)
            w.write(b"x" * 300000)
            w.write_eof()  # FIN toward the endpoint; its answer must still arrive
            assert await r.read() == b"got 300000"
            w.close()
        await b.stop()

    run(main())


def test_refusing_endpoint_fails_over_and_is_backed_off():
    async def main():
        good = await Backend("good").start()
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()  # nothing listens there: connection refused
        async with Harness() as h:
            ip = await h.serve(dead_port, good.port)
            names = [(await hello(ip, 8080))[0] for _ in range(10)]
            assert names == ["good"] * 10
            label = "default/web:p"
            assert metric("kubeproxy_userspace_connect_failures_total", service=label) >= 1
            assert metric("kubeproxy_userspace_connect_retries_total", service=label) >= 1
            # Passive health: the dead endpoint was skipped, not retried for every connect.
            assert metric("kubeproxy_userspace_connect_failures_total", service=label) < 5
        await good.stop()

    run(main())


def test_endpoint_that_never_answers_times_out_and_fails_over():
    async def main():
        good = await Backend("good").start()
        # A listener whose accept queue is full drops SYNs: connects to it hang.
        black = socket.socket()
        black.bind(("127.0.0.1", 0))
        black.listen(0)
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(black.getsockname())
            fillers.append(s)
        await asyncio.sleep(0.1)
        async with Harness() as h:
            h.dp.cfg.userspace_engine = "copy"
            h.set([web()], slices(black.getsockname()[1], good.port))
            await h.sync(full=True)
            h.dp.tcp.connect_timeouts = (0.2, 0.2, 0.2)
            ip = h.addr("web")
            assert [(await hello(ip, 8080))[0] for _ in range(4)] == ["good"] * 4
            assert (
                metric("kubeproxy_userspace_connect_failures_total", service="default/web:p") >= 1
            )
        for s in [*fillers, black]:
            s.close()
        await good.stop()

    run(main())


def test_all_endpoints_failing_resets_the_client_and_keeps_serving():
    async def main():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
        s.close()
        async with Harness() as h:
            ip = await h.serve(dead_port)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await hello(ip, 8080)
            assert (
                metric(
                    "kubeproxy_userspace_rejected_connections_total",
                    service="default/web:p",
                    reason="endpoints_failed",
                )
                >= 1
            )
            good = await Backend("good").start()
            h.set([web()], slices(good.port))
            await h.sync()
            assert (await hello(ip, 8080))[0] == "good"
            await good.stop()

    run(main())


def test_no_endpoints_rejects_with_reset():
    async def main():
        async with Harness() as h:
            h.set([web()], [])
            await h.sync(full=True)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await hello(h.addr("web"), 8080)

    run(main())


def test_endpoint_reset_is_passed_to_the_client():
    async def reset(r, w):
        await r.read(4)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        w.transport.abort()

    async def main():
        bad = await Backend("rst", reset).start()
        async with Harness() as h:
            await h.serve(bad.port)
            r, w = await asyncio.open_connection(h.addr("web"), 8080)
            w.write(b"ping")
            with pytest.raises(ConnectionResetError):
                await r.read(10)
                await r.read(10)
            w.close()
            await asyncio.sleep(0.05)
            assert metric("kubeproxy_userspace_active_connections", service="default/web:p") == 0

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_endpoint_bytes_then_reset_in_one_event_reach_the_client_as_a_reset(engine):
    """Edge-triggered: the event that brings the endpoint's last bytes also brings its
    reset; a short read must not end the reading there (no later event would report the
    reset). The endpoint is a thread that sends and resets while the loop is held, so the
    proxy sees both in one event."""
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    got_ping, go, done = threading.Event(), threading.Event(), threading.Event()

    def endpoint_thread() -> None:
        for _ in range(3):
            c, _ = lst.accept()
            c.recv(4)
            got_ping.set()
            go.wait(10)
            go.clear()
            c.send(b"last words")
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            c.close()
            done.set()

    async def read_all(r: asyncio.StreamReader) -> bytes:
        got = b""
        while data := await r.read(100):
            got += data
        return got

    async def main():
        async with Harness(userspace_engine=engine) as h:
            await h.serve(port)
            for _ in range(3):
                got_ping.clear()
                done.clear()
                r, w = await asyncio.open_connection(h.addr("web"), 8080)
                w.write(b"ping")
                while not got_ping.is_set():
                    await asyncio.sleep(0.005)
                go.set()
                assert done.wait(10)  # holds the loop: bytes and reset arrive together
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(read_all(r), 10)  # a hang fails, as EOF does
                w.close()

    t = threading.Thread(target=endpoint_thread, daemon=True)
    t.start()
    try:
        run(main())
    finally:
        lst.close()
        t.join(10)


def test_endpoint_removal_drains_established_connections():
    async def main():
        a = await Backend("a").start()
        b = await Backend("b").start()
        async with Harness() as h:
            ip = await h.serve(a.port, b.port)
            # Find a connection on "a" and keep it open.
            while True:
                r, w = await asyncio.open_connection(ip, 8080)
                if (await r.readline()).strip() == b"a":
                    break
                w.close()
            h.set([web()], slices(b.port))
            await h.sync()
            assert {(await hello(ip, 8080))[0] for _ in range(5)} == {"b"}  # new: not "a"
            w.write(b"still here")  # established: keeps working until it closes
            await w.drain()
            assert await r.readexactly(10) == b"still here"
            w.close()
        await a.stop()
        await b.stop()

    run(main())


def test_service_removal_closes_listener_and_connections():
    async def main():
        a = await Backend("a").start()
        async with Harness() as h:
            ip = await h.serve(a.port)
            r, _w = await asyncio.open_connection(ip, 8080)
            await r.readline()
            h.set([], [])
            await h.sync()
            with pytest.raises(ConnectionResetError):  # cut, not drained: the Service is gone
                await r.read()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(ip, 8080)
            assert not h.dp.listeners
            assert ("default/web:p", "TCP") not in STATS
        await a.stop()

    run(main())


def test_session_affinity_client_ip():
    async def main():
        bs = [await Backend(f"web-{i}").start() for i in range(3)]
        async with Harness() as h:
            spec = {
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
            }
            ip = await h.serve(*(b.port for b in bs), **spec)
            names = {(await hello(ip, 8080))[0] for _ in range(9)}
            assert len(names) == 1
        for b in bs:
            await b.stop()

    run(main())


def test_idle_timeout_closes_only_idle_connections():
    async def main():
        a = await Backend("a").start()
        async with Harness(userspace_tcp_idle_timeout=0.6) as h:
            ip = await h.serve(a.port)
            r1, w1 = await asyncio.open_connection(ip, 8080)
            r2, w2 = await asyncio.open_connection(ip, 8080)
            await r1.readline()
            await r2.readline()
            for _ in range(8):  # keep conn 2 busy, leave conn 1 idle
                await asyncio.sleep(0.15)
                w2.write(b"k")
                await r2.readexactly(1)
            assert await asyncio.wait_for(r1.read(), 5) == b""
            w2.write(b"alive")
            assert await r2.readexactly(5) == b"alive"
            w1.close()
            w2.close()
        await a.stop()

    run(main())


def test_silent_clients_do_not_block_others():
    async def main():
        a = await Backend("a").start()
        async with Harness() as h:
            ip = await h.serve(a.port)
            silent = [socket.create_connection((ip, 8080)) for _ in range(200)]
            assert (await hello(ip, 8080))[0] == "a"
            assert metric("kubeproxy_userspace_active_connections", service="default/web:p") >= 200
            for s in silent:
                s.close()
            for _ in range(100):
                await asyncio.sleep(0.02)
                if not metric("kubeproxy_userspace_active_connections", service="default/web:p"):
                    break
            assert metric("kubeproxy_userspace_active_connections", service="default/web:p") == 0
        await a.stop()

    run(main())


def test_port_in_use_is_logged_and_everything_else_served(caplog):
    async def main():
        a = await Backend("a").start()
        async with Harness() as h:
            api = service("api", ip="198.19.0.11", ports=[{"name": "p", "port": 8080}])
            api_slice = slice_(
                "api",
                endpoints=[endpoint("127.0.0.1")],
                ports=[{"name": "p", "port": a.port, "protocol": "TCP"}],
            )
            h.set([web(), api], [*slices(a.port), api_slice])
            squat = socket.socket()
            squat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAITs of others
            squat.bind((h.addr("web"), 8080))
            squat.listen(1)
            await h.sync(full=True)
            assert "port already in use" in caplog.text
            assert (await hello(h.addr("api"), 8080))[0] == "a"
            squat.close()
            await h.sync(full=True)
            assert (await hello(h.addr("web"), 8080))[0] == "a"
            assert "listening on" in caplog.text
        await a.stop()

    caplog.set_level("INFO")
    run(main())


def test_listeners_follow_port_changes_and_retarget():
    async def main():
        a = await Backend("a").start()
        async with Harness() as h:
            ip = await h.serve(a.port)
            h.set([web(9090)], slices(a.port))
            await h.sync()
            assert (await hello(ip, 9090))[0] == "a"
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(ip, 8080)
        await a.stop()

    run(main())


# -- UDP -------------------------------------------------------------------------------------


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, name: str):
        self.name = name.encode()
        self.peers: set = set()

    def connection_made(self, transport):
        self.t = transport

    def datagram_received(self, data, addr):
        self.peers.add(addr)
        self.t.sendto(self.name + b":" + data, addr)


async def udp_backend(name: str) -> tuple[asyncio.DatagramTransport, UdpEcho, int]:
    loop = asyncio.get_running_loop()
    t, p = await loop.create_datagram_endpoint(lambda: UdpEcho(name), local_addr=("127.0.0.1", 0))
    return t, p, t.get_extra_info("sockname")[1]


class UdpClient(asyncio.DatagramProtocol):
    """One client address (one session on the proxy) asking questions in turn."""

    def __init__(self):
        self.q: asyncio.Queue = asyncio.Queue()

    def connection_made(self, transport):
        self.t = transport

    def datagram_received(self, data, addr):
        self.q.put_nowait((data, addr))

    @classmethod
    async def open(cls) -> UdpClient:
        loop = asyncio.get_running_loop()
        _, p = await loop.create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0))
        return p

    async def ask(self, ip: str, port: int, payload: bytes, timeout: float = 3) -> bytes:
        self.t.sendto(payload, (ip, port))
        data, src = await asyncio.wait_for(self.q.get(), timeout)
        assert src == (ip, port)  # the reply comes from the Service address
        return data

    def close(self):
        self.t.close()


async def udp_ask(ip: str, port: int, payload: bytes, client: UdpClient | None = None) -> bytes:
    c = client or await UdpClient.open()
    try:
        return await c.ask(ip, port, payload)
    finally:
        if client is None:
            c.close()


def test_udp_sessions_spread_expire_and_follow_endpoint_changes():
    async def main():
        b1 = await udp_backend("u1")
        b2 = await udp_backend("u2")
        async with Harness(udp_idle_timeout=0.5) as h:
            ip = await h.serve(b1[2], b2[2], port=5353, proto="UDP")
            answers = {await udp_ask(ip, 5353, b"q") for _ in range(6)}
            assert answers == {b"u1:q", b"u2:q"}  # six clients, round robin
            # One client keeps its session (same endpoint) across datagrams.
            c = await UdpClient.open()
            first = await udp_ask(ip, 5353, b"1", c)
            second = await udp_ask(ip, 5353, b"2", c)
            assert first[:3] == second[:3]
            label = "default/web:p"
            assert metric("kubeproxy_userspace_udp_sessions", service=label) >= 1
            # Its endpoint leaves: the next datagram goes to the other one.
            keep = b2 if first.startswith(b"u1") else b1
            h.set([web(5353, "UDP")], slices(keep[2], proto="UDP"))
            await h.sync()
            third = await udp_ask(ip, 5353, b"3", c)
            assert third == keep[1].name + b":3"
            c.close()
            for _ in range(50):
                await asyncio.sleep(0.1)
                if metric("kubeproxy_userspace_udp_sessions", service=label) == 0:
                    break
            assert metric("kubeproxy_userspace_udp_sessions", service=label) == 0
        b1[0].close()
        b2[0].close()

    run(main())


def test_udp_session_table_is_bounded():
    async def main():
        b = await udp_backend("u")
        async with Harness(userspace_udp_max_sessions=5) as h:
            ip = await h.serve(b[2], port=5353, proto="UDP")
            for i in range(12):
                assert await udp_ask(ip, 5353, str(i).encode()) == f"u:{i}".encode()
            (lst,) = h.dp.listeners.values()
            assert len(lst.sessions) == 5
            assert len(b[1].peers) == 12
        b[0].close()

    run(main())


def test_udp_unreachable_endpoint_fails_over():
    async def main():
        good = await udp_backend("good")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        s.close()
        async with Harness() as h:
            ip = await h.serve(dead, good[2], port=5353, proto="UDP")
            got = []
            c = await UdpClient.open()
            for i in range(6):
                with contextlib.suppress(TimeoutError):
                    got.append(await udp_ask(ip, 5353, b"%d" % i, c))
            c.close()
            assert got and all(g.startswith(b"good:") for g in got)
            assert len(got) >= 5  # at most the first datagram is lost to the dead endpoint
        good[0].close()

    run(main())


def test_load_balancer_source_ranges_apply_to_lb_ip_listeners_only():
    async def main():
        a = await Backend("a").start()
        async with Harness() as h:
            # Serve the model as is (no laptop rewrite, which drops LB IPs), on loopback
            # addresses that need no ownership.
            h.dp.rewriter = None
            spec = {
                "type": "LoadBalancer",
                "loadBalancerSourceRanges": ["10.0.0.0/8"],
            }
            svc = service("lb", ip="127.0.0.2", ports=[{"name": "p", "port": 18080}], **spec)
            svc["status"] = {"loadBalancer": {"ingress": [{"ip": "127.0.0.3"}]}}
            lb_slice = slice_(
                "lb",
                endpoints=[endpoint("127.0.0.1")],
                ports=[{"name": "p", "port": a.port, "protocol": "TCP"}],
            )
            h.set([svc], [lb_slice])
            await h.sync(full=True)
            assert (await hello("127.0.0.2", 18080))[0] == "a"  # ClusterIP: no ranges
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await hello("127.0.0.3", 18080)  # LB IP: 127.0.0.1 is not in 10.0.0.0/8
            assert (
                metric(
                    "kubeproxy_userspace_rejected_connections_total",
                    service="default/lb:p",
                    reason="source_range",
                )
                >= 1
            )
        await a.stop()

    run(main())


def test_partial_sync_touches_only_changed_services():
    def svc_n(i: int, port: int = 8080) -> dict:
        return service(f"s{i}", ip=f"198.19.1.{i}", ports=[{"name": "p", "port": port}])

    def slice_n(i: int, ips: list[str]) -> dict:
        return slice_(
            f"s{i}",
            endpoints=[endpoint(ip) for ip in ips],
            ports=[{"name": "p", "port": 8080, "protocol": "TCP"}],
        )

    async def main():
        async with Harness() as h:
            n = 120
            h.set([svc_n(i) for i in range(n)], [slice_n(i, ["127.0.0.1"]) for i in range(n)])
            await h.sync(full=True)
            assert len(h.dp.listeners) == n
            before = dict(h.dp.listeners)
            balancers = {t: b.balancer for t, b in h.dp.backends.items()}
            eps_before = {t: b.balancer.endpoints for t, b in h.dp.backends.items()}
            # One Service changes port, another gets a second endpoint.
            svcs = [svc_n(i, 9090 if i == 7 else 8080) for i in range(n)]
            slices = [
                slice_n(i, ["127.0.0.1", "127.0.0.2"] if i == 9 else ["127.0.0.1"])
                for i in range(n)
            ]
            h.set(svcs, slices)
            await h.sync()
            changed = {k for k in h.dp.listeners if before.get(k) is not h.dp.listeners[k]}
            assert changed == {(h.addr("s7"), 9090, "TCP")}
            for t, b in h.dp.backends.items():
                assert b.balancer is balancers[t]  # balancers (affinity, health) survive
                if t.service != ("default", "s9"):
                    assert b.balancer.endpoints == eps_before[t]
                else:
                    assert len(b.balancer.endpoints) == 2

    run(main())


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_localhost_nodeports_served_by_the_engine_tcp_and_udp() -> None:
    """The component other data planes use for loopback NodePorts: TCP and UDP on
    127.0.0.1, Cluster policy even under externalTrafficPolicy: Local (the node itself
    connects), following endpoint changes."""
    from proxy.userspace.localhost import LocalhostNodePorts

    async def main() -> None:
        tcp_np, udp_np = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
        b = await Backend("b1").start()
        echo, _, uport = await udp_backend("u1")
        store = Store()
        svc = service(
            "web",
            type="NodePort",
            externalTrafficPolicy="Local",
            ports=[
                {"name": "t", "port": 80, "protocol": "TCP", "nodePort": tcp_np},
                {"name": "u", "port": 53, "protocol": "UDP", "nodePort": udp_np},
            ],
        )
        remote = endpoint("127.0.0.1", node="node-x")  # not on this node
        sl = slice_(
            "web",
            endpoints=[remote],
            ports=[{"name": "t", "port": b.port, "protocol": "TCP"}],
        )
        usl = slice_(
            "web",
            name="web-udp",
            endpoints=[remote],
            ports=[{"name": "u", "port": uport, "protocol": "UDP"}],
        )
        store.replace("Service", [svc])
        store.replace("EndpointSlice", [sl, usl])
        lh = LocalhostNodePorts(Config(hostname="node-a"), ("127.0.0.1",))
        await lh.start()
        try:
            await lh.sync(store.snapshot(), True)
            assert set(lh.listening) == {("127.0.0.1", tcp_np, "TCP"), ("127.0.0.1", udp_np, "UDP")}
            r, w = await asyncio.open_connection("127.0.0.1", tcp_np)
            assert await r.readline() == b"b1\n"
            w.close()
            assert await udp_ask("127.0.0.1", udp_np, b"hi") == b"u1:hi"
            # The Service goes: so do its listeners.
            store.replace("Service", [])
            await lh.sync(store.snapshot(), False)
            assert lh.listening == ()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", tcp_np)
        finally:
            await lh.stop()
            await b.stop()
            echo.close()

    run(main())
