"""`pods/portforward` for the test API server, framed as kubelet serves it over WebSocket.

A real cluster: the client's GET .../pods/NAME/portforward?ports=P[,P…] with
`Upgrade: websocket` is proxied by kube-apiserver to the kubelet, which answers it
(pkg/kubelet/cri/streaming/portforward/websocket.go over apimachinery's wsstream):

* subprotocols `v4.channel.k8s.io` (binary), `v4.base64.channel.k8s.io` (text, base64) or
  none (binary); the first one the client offers that is supported wins, none supported
  is refused;
* two channels per requested port, in order: data (2i, read-write) and error (2i+1,
  written by the server only). Every message starts with its channel byte (base64: the
  digit '0'+channel, then the payload in base64);
* the first message on each of the two channels is the port number, 2 bytes little endian;
* the server then connects to the port in the Pod (one TCP connection per requested port:
  a WebSocket cannot open more later) and copies both ways, in messages of at most 32 KiB
  (Go's io.Copy buffer);
* a failure (connect refused, a reset) is written as text on the error channel;
* when the Pod closes, the other direction gets up to a second to finish (containerd's
  grace), then the WebSocket is closed. There is no half-close: a client that is done
  sending can only close the whole WebSocket.

Here the server connects to the Pod's `status.podIP` from its own network namespace (in
tests that namespace can reach the pods) through a `dial` function the server is given.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("proxy.testbed.portforward")

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
V4_BINARY = "v4.channel.k8s.io"
V4_BASE64 = "v4.base64.channel.k8s.io"
SUPPORTED = ("", V4_BINARY, V4_BASE64)
CHUNK = 32 * 1024  # what the kubelet's io.Copy puts in one message
CLOSE_GRACE = 1.0  # containerd: after one direction ends, the other gets this long

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

Dial = Callable[[str, int, float], socket.socket]


def default_dial(ip: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((ip, port), timeout=timeout)


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def choose_protocol(offered: str | None, supported: tuple[str, ...] = SUPPORTED) -> str | None:
    """wsstream's handshake: the first offered subprotocol that is supported; no offer
    means ""; None when nothing offered is supported."""
    wanted = [p.strip() for p in (offered or "").split(",") if p.strip()] or [""]
    return next((p for p in wanted if p in supported), None)


def unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return data
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked (server → client) frame with FIN set."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


class WsClosed(Exception):
    pass


class ServerWebSocket:
    """The server end of one WebSocket on a blocking socket (reads from `rfile`, the
    request's buffered reader, so bytes the HTTP parser already buffered are not lost)."""

    def __init__(self, sock: socket.socket, rfile: io.BufferedIOBase, base64_codec: bool) -> None:
        self.sock = sock
        self.rfile = rfile
        self.b64 = base64_codec
        self._wlock = threading.Lock()
        self.closed = False

    def _write(self, data: bytes) -> None:
        with self._wlock:
            if self.closed:
                raise WsClosed()
            self.sock.sendall(data)

    def send(self, channel: int, data: bytes) -> None:
        if self.b64:
            self._write(frame(OP_TEXT, bytes([0x30 + channel]) + base64.b64encode(data)))
        else:
            self._write(frame(OP_BINARY, bytes([channel]) + data))

    def _read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if data is None or len(data) < n:
            raise WsClosed()
        return data

    def send_message(self, data: bytes) -> None:
        """One binary message (the SPDY tunnel's transport)."""
        self._write(frame(OP_BINARY, data))

    def recv_message(self) -> tuple[int, bytes]:
        """The next data message as (opcode of its first frame, payload); raises WsClosed
        at the end. Control frames are answered here."""
        parts: list[bytes] = []
        first_op = OP_BINARY
        while True:
            b0, b1 = self._read_exact(2)
            op, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read_exact(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read_exact(8))
            mask = self._read_exact(4) if b1 & 0x80 else b""
            payload = self._read_exact(n) if n else b""
            if mask:
                payload = unmask(payload, mask)
            if op == OP_CLOSE:
                with contextlib.suppress(OSError, WsClosed):
                    self._write(frame(OP_CLOSE, payload[:2]))
                raise WsClosed()
            if op == OP_PING:
                with contextlib.suppress(OSError, WsClosed):
                    self._write(frame(OP_PONG, payload))
                continue
            if op == OP_PONG:
                continue
            if op != OP_CONT:
                first_op = op
            parts.append(payload)
            if b0 & 0x80:
                return first_op, b"".join(parts)

    def recv(self) -> tuple[int, bytes]:
        """The next channel message as (channel, payload); (-1, b"") for an empty one."""
        op, data = self.recv_message()
        if not data:
            return -1, b""
        if self.b64 or op == OP_TEXT:
            return data[0] - 0x30, base64.b64decode(data[1:]) if self.b64 else data[1:]
        return data[0], data[1:]

    def close(self, code: int = 1000) -> None:
        with self._wlock:
            if self.closed:
                return
            with contextlib.suppress(OSError):
                self.sock.sendall(frame(OP_CLOSE, struct.pack("!H", code)))
            self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _Port:
    """One requested port: the Pod connection and what became of it."""

    def __init__(self, index: int, port: int) -> None:
        self.index = index
        self.port = port
        self.conn: socket.socket | None = None
        self.dialed = threading.Event()  # the dial finished (conn set, or failed)
        self.done = threading.Event()  # forwarding is over (Pod side)
        self.client_done = threading.Event()  # the client will send no more


def serve(
    ws: ServerWebSocket,
    pod: str,
    uid: str,
    ip: str,
    ports: list[int],
    dial: Dial,
    *,
    grace: float = CLOSE_GRACE,
    dial_timeout: float = 10.0,
) -> None:
    """Run one port-forward WebSocket until it ends (the 101 is already sent)."""
    state = [_Port(i, p) for i, p in enumerate(ports)]
    for s in state:
        prefix = struct.pack("<H", s.port)
        ws.send(2 * s.index, prefix)
        ws.send(2 * s.index + 1, prefix)

    def forward(s: _Port) -> None:
        try:
            try:
                conn = dial(ip, s.port, dial_timeout)
            except OSError as e:
                s.dialed.set()
                why = e.strerror or str(e)
                _error(ws, s, pod, uid, f"failed to connect to {ip}:{s.port}: {why}")
                return
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.conn = conn
            s.dialed.set()
            try:
                while data := conn.recv(CHUNK):
                    ws.send(2 * s.index, data)
            except OSError as e:
                if not s.client_done.is_set():
                    _error(ws, s, pod, uid, f"read from {ip}:{s.port}: {e.strerror or e}")
                return
            except WsClosed:
                return
            s.client_done.wait(grace)
        finally:
            s.done.set()
            if s.conn is not None:
                with contextlib.suppress(OSError):
                    s.conn.close()

    threads = [
        threading.Thread(target=forward, args=(s,), daemon=True, name=f"portforward-{pod}-{s.port}")
        for s in state
    ]
    for t in threads:
        t.start()
    closer = threading.Thread(target=_close_when_done, args=(ws, state), daemon=True)
    closer.start()
    try:
        while True:
            channel, data = ws.recv()
            if channel < 0 or channel % 2 or channel // 2 >= len(state) or not data:
                continue  # error channels are written by the server only
            s = state[channel // 2]
            s.dialed.wait()  # the kubelet's pipe blocks the reader the same way
            if s.conn is not None and not s.done.is_set():
                with contextlib.suppress(OSError):
                    s.conn.sendall(data)
    except (WsClosed, OSError):
        pass
    finally:
        for s in state:
            s.client_done.set()
            if s.conn is not None:
                with contextlib.suppress(OSError):
                    s.conn.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(5)
        ws.close()
        closer.join(5)


def _error(ws: ServerWebSocket, s: _Port, pod: str, uid: str, why: str) -> None:
    msg = f"error forwarding port {s.port} to pod {pod}, uid {uid}: {why}"
    log.info("%s", msg)
    with contextlib.suppress(OSError, WsClosed):
        ws.send(2 * s.index + 1, msg.encode())


def _close_when_done(ws: ServerWebSocket, state: list[_Port]) -> None:
    for s in state:
        s.done.wait()
    ws.close()


def ports_param(values: list[str]) -> list[int]:
    """The `ports` query parameters (repeatable, comma-separated) as kubelet parses them."""
    if not values:
        raise ValueError('query parameter "ports" is required')
    out = []
    for v in values:
        if not v:
            raise ValueError('query parameter "ports" cannot be empty')
        for p in v.split(","):
            if not p.isdigit() or not 0 < int(p) < 65536:
                raise ValueError(f"unable to parse {v!r} as a port")
            out.append(int(p))
    return out


def pod_address(pod: dict[str, Any]) -> str:
    status = pod.get("status") or {}
    ips = [i.get("ip") for i in status.get("podIPs") or [] if isinstance(i, dict)]
    return status.get("podIP") or next((i for i in ips if i), "")
