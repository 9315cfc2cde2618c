"""pods/portforward on the test API server, checked with the official client.

`kubernetes.stream.portforward` is the reference client of the kubelet's WebSocket framing
(v4.channel.k8s.io): it checks the 2-byte port prefix on each channel's first message and
reads errors from the error channel, so a framing mistake here fails these tests.
The SPDY/3.1 variant (what kubectl speaks) is checked with a client written here from
the protocol; bench/portforward_bench.py runs the real kubectl through it.
Backends are threads on 127.0.0.1 and the Pods' podIP is 127.0.0.1: no root needed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterator

import pytest
import websocket
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward

from proxy.testbed.apiserver import ApiServer, wait_for
from proxy.testbed.portforward import choose_protocol, ports_param, unmask
from proxy.testbed.spdy import DICTIONARY


def pod(name: str, ip: str = "127.0.0.1", ns: str = "default") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


class Backend:
    """A TCP server on 127.0.0.1 running `handle(conn)` per connection in a thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        self.peers: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.peers.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def greet_echo(name: bytes) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        conn.sendall(name + b"\n")
        while data := conn.recv(65536):
            conn.sendall(data)

    return handle


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(1 << 20, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


@pytest.fixture
def api() -> Iterator[ApiServer]:
    server = ApiServer(portforward_grace=0.1).start()
    server.apply(pod("web"))
    yield server
    server.stop()


@pytest.fixture
def core(api: ApiServer) -> client.CoreV1Api:
    conf = client.Configuration()
    conf.host = api.url
    return client.CoreV1Api(client.ApiClient(conf))


def test_official_client_forwards_two_ports_over_one_websocket(api, core) -> None:
    a, b = Backend(greet_echo(b"a")), Backend(greet_echo(b"b"))
    try:
        ports = f"{a.port},{b.port}"
        pf = portforward(core.connect_get_namespaced_pod_portforward, "web", "default", ports=ports)
        for port, name in ((a.port, b"a"), (b.port, b"b")):
            s = pf.socket(port)
            s.settimeout(10)
            assert recv_exactly(s, 2) == name + b"\n"
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"
        assert api.portforward_requests["default/web"] == 1
        assert api.open_portforwards() == 1
        for port in (a.port, b.port):
            pf.socket(port).close()
        wait_for(lambda: api.open_portforwards() == 0, "the WebSocket to close")
    finally:
        a.close()
        b.close()


def test_megabytes_both_ways_arrive_intact(core) -> None:
    size = 4 << 20
    blob = os.urandom(size)

    def handle(conn: socket.socket) -> None:
        h = hashlib.sha256(recv_exactly(conn, size)).hexdigest().encode()
        conn.sendall(h + blob)

    be = Backend(handle)
    try:
        pf = portforward(
            core.connect_get_namespaced_pod_portforward, "web", "default", ports=str(be.port)
        )
        s = pf.socket(be.port)
        s.settimeout(20)
        up = os.urandom(size)
        threading.Thread(target=s.sendall, args=(up,), daemon=True).start()
        assert recv_exactly(s, 64) == hashlib.sha256(up).hexdigest().encode()
        assert recv_exactly(s, size) == blob
    finally:
        be.close()


def test_refused_port_is_reported_on_the_error_channel(core) -> None:
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    pf = portforward(core.connect_get_namespaced_pod_portforward, "web", "default", ports=str(port))
    s = pf.socket(port)
    s.settimeout(10)
    assert s.recv(10) == b""
    err = pf.error(port)
    assert err.startswith(f"error forwarding port {port} to pod web_default, uid ")
    assert "Connection refused" in err


def test_pod_closing_ends_the_tunnel(api, core) -> None:
    be = Backend(lambda conn: conn.sendall(b"bye"))
    try:
        pf = portforward(
            core.connect_get_namespaced_pod_portforward, "web", "default", ports=str(be.port)
        )
        s = pf.socket(be.port)
        s.settimeout(10)
        assert recv_exactly(s, 3) == b"bye"
        assert s.recv(10) == b""  # after the close grace, the WebSocket is closed
        assert pf.error(be.port) is None
        wait_for(lambda: api.open_portforwards() == 0, "the WebSocket to close")
    finally:
        be.close()


def test_unknown_pod_and_bad_requests_are_refused(api, core) -> None:
    with pytest.raises(ApiException, match="404"):
        portforward(core.connect_get_namespaced_pod_portforward, "nope", "default", ports="80")
    url = api.url.replace("http", "ws") + "/api/v1/namespaces/default/pods/web/portforward"
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(url, timeout=5)  # no ports
    assert e.value.status_code == 400
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(url + "?ports=80", subprotocols=["v5.channel.k8s.io"])
    assert e.value.status_code == 403
    api.apply({**pod("pending"), "status": {"phase": "Pending"}})
    with pytest.raises(ApiException, match="400"):
        portforward(core.connect_get_namespaced_pod_portforward, "pending", "default", ports="80")


def test_base64_subprotocol(api) -> None:
    be = Backend(greet_echo(b"b64"))
    try:
        url = api.url.replace("http", "ws") + (
            f"/api/v1/namespaces/default/pods/web/portforward?ports={be.port}"
        )
        ws = websocket.create_connection(url, subprotocols=["v4.base64.channel.k8s.io"], timeout=5)
        try:
            assert ws.subprotocol == "v4.base64.channel.k8s.io"
            prefix = base64.b64encode(struct.pack("<H", be.port)).decode()
            assert {ws.recv(), ws.recv()} == {"0" + prefix, "1" + prefix}
            assert ws.recv() == "0" + base64.b64encode(b"b64\n").decode()
            ws.send("0" + base64.b64encode(b"hello").decode())
            assert base64.b64decode(ws.recv()[1:]) == b"hello"
        finally:
            ws.close()
    finally:
        be.close()


def test_dropped_tunnels_break_without_a_close_frame(api, core) -> None:
    be = Backend(greet_echo(b"x"))
    try:
        pf = portforward(
            core.connect_get_namespaced_pod_portforward, "web", "default", ports=str(be.port)
        )
        s = pf.socket(be.port)
        s.settimeout(10)
        assert recv_exactly(s, 2) == b"x\n"
        assert api.drop_portforwards() == 1
        assert s.recv(10) == b""
        wait_for(lambda: api.open_portforwards() == 0, "the tunnel to be gone")
    finally:
        be.close()


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (None, ""),
        ("v5.channel.k8s.io,v4.channel.k8s.io", "v4.channel.k8s.io"),
        ("v4.base64.channel.k8s.io, v4.channel.k8s.io", "v4.base64.channel.k8s.io"),
        ("v5.channel.k8s.io", None),
    ],
)
def test_subprotocol_negotiation(offered: str | None, chosen: str | None) -> None:
    assert choose_protocol(offered) == chosen


def test_ports_parameter_and_unmasking() -> None:
    assert ports_param(["80,443", "8080"]) == [80, 443, 8080]
    for bad in ([], [""], ["0"], ["65536"], ["http"]):
        with pytest.raises(ValueError):
            ports_param(bad)
    data = os.urandom(1001)
    mask = b"\x01\x02\x03\x04"
    assert unmask(unmask(data, mask), mask) == data
    assert unmask(b"\x00" * 5, mask) == mask + mask[:1]


# -- SPDY/3.1 (kubectl port-forward) ----------------------------------------------------------


class SpdyClient:
    """The client side of a SPDY port-forward session, as client-go's portforward does it:
    per forwarded connection an error stream and a data stream with `streamtype`, `port`
    and `requestid` headers, each answered by a SYN_REPLY."""

    def __init__(self, api: ApiServer, pod_name: str = "web") -> None:
        self.sock = socket.create_connection(api.address, timeout=10)
        self.sock.sendall(
            f"POST /api/v1/namespaces/default/pods/{pod_name}/portforward HTTP/1.1\r\n"
            "Host: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            "X-Stream-Protocol-Version: portforward.k8s.io\r\nContent-Length: 0\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        self.status = int(head.split()[1])
        self.response = head.decode()
        self.deflate = zlib.compressobj(zdict=DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=DICTIONARY)
        self.next_id = 1

    def _control(self, typ: int, flags: int, body: bytes) -> None:
        self.sock.sendall(struct.pack(">HHI", 0x8003, typ, flags << 24 | len(body)) + body)

    def open(self, kind: str, port: int, request: int) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        hdrs = {"streamtype": kind, "port": str(port), "requestid": str(request)}
        raw = struct.pack(">I", len(hdrs)) + b"".join(
            struct.pack(">I", len(k)) + k.encode() + struct.pack(">I", len(v)) + v.encode()
            for k, v in hdrs.items()
        )
        block = self.deflate.compress(raw) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self._control(1, 0, struct.pack(">IIH", sid, 0, 0) + block)
        return sid

    def data(self, sid: int, payload: bytes, fin: bool = False) -> None:
        self.sock.sendall(struct.pack(">II", sid, (1 if fin else 0) << 24 | len(payload)) + payload)

    def frame(self) -> tuple[str, int, int, bytes]:
        """(kind, stream or control type, flags, body); SYN_REPLY headers inflated."""
        w0, w1 = struct.unpack(">II", recv_exactly(self.sock, 8))
        body = recv_exactly(self.sock, w1 & 0xFFFFFF)
        if w0 & 0x80000000:
            typ = w0 & 0xFFFF
            if typ == 2:
                self.inflate.decompress(body[4:])
                return "control", typ, w1 >> 24, body[:4]
            return "control", typ, w1 >> 24, body
        return "data", w0, w1 >> 24, body


def test_spdy_upgrade_as_kubectl_uses_it(api: ApiServer) -> None:
    be = Backend(greet_echo(b"spdy"))
    try:
        c = SpdyClient(api)
        assert c.status == 101 and "X-Stream-Protocol-Version: portforward.k8s.io" in c.response
        err, data = c.open("error", be.port, 0), c.open("data", be.port, 0)
        c.data(err, b"", fin=True)  # kubectl closes its side of the error stream at once
        replies = {struct.unpack(">I", c.frame()[3])[0] for _ in range(2)}
        assert replies == {err, data}
        c._control(6, 0, struct.pack(">I", 7))  # PING is echoed
        seen, got = [], b""
        while got != b"spdy\nhello":
            kind, sid, flags, body = c.frame()
            seen.append((kind, sid))
            if kind == "data" and sid == data:
                got += body
                if got == b"spdy\n":
                    c.data(data, b"hello")
        assert ("control", 6) in seen
        c.data(data, b"", fin=True)  # done: the Pod connection is closed after the grace
        fins = set()
        while fins != {err, data}:
            kind, sid, flags, body = c.frame()
            if kind == "data" and flags & 1:
                fins.add(sid)
        c.sock.close()
        assert api.portforward_requests["default/web"] == 1
    finally:
        be.close()


def test_spdy_refused_port_is_written_to_the_error_stream(api: ApiServer) -> None:
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    c = SpdyClient(api)
    err, data = c.open("error", port, 5), c.open("data", port, 5)
    message, fins = b"", set()
    while fins != {err, data}:
        kind, sid, flags, body = c.frame()
        if kind == "data" and sid == err:
            message += body
        if kind == "data" and flags & 1:
            fins.add(sid)
    assert message.startswith(f"error forwarding port {port} to pod web_default".encode())
    assert b"Connection refused" in message
    c.sock.close()


def test_spdy_dictionary_is_spdy3s() -> None:
    # The preset dictionary must be byte-exact: zlib stores its checksum in every header
    # block, and kubectl's inflater refuses a mismatch.
    assert len(DICTIONARY) == 1423
    assert hashlib.sha256(DICTIONARY).hexdigest() == (
        "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
    )
