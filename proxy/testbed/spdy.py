"""pods/portforward over SPDY/3.1, the protocol `kubectl port-forward` speaks.

kubectl opens one SPDY session per port-forward and, for each local connection, two
streams with the headers `streamtype: error|data`, `port: P`, `requestid: N`. The server
answers each SYN_STREAM with a SYN_REPLY, dials the Pod's port once both streams of a
request are there, then copies DATA frames both ways; a failure is written to the error
stream. When the copy ends both streams are closed (FIN), as the kubelet does
(pkg/kubelet/cri/streaming/portforward/httpstream.go over moby/spdystream).

The session arrives either as an HTTP upgrade (`POST …/portforward`, `Upgrade: SPDY/3.1`,
`X-Stream-Protocol-Version: portforward.k8s.io`) or, from kubectl ≥ 1.31 against API
servers ≥ 1.31, tunnelled in WebSocket binary messages (subprotocol
`SPDY/3.1+portforward.k8s.io`), which kube-apiserver translates to SPDY for the kubelet.

Only what port-forward needs is implemented: spdystream sends no flow-control window
updates and needs none, so none are sent; SETTINGS, WINDOW_UPDATE and HEADERS are read
and ignored. Header blocks are zlib-compressed with SPDY/3's preset dictionary, one
compression context per direction for the whole session.

The test API server uses this to let the real kubectl port-forward through it, the
reference the userspace mode's tunnels are measured against (bench/portforward_bench.py).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.testbed.portforward import CHUNK, CLOSE_GRACE, Dial

log = logging.getLogger("proxy.testbed.spdy")

PROTOCOL = "portforward.k8s.io"
UPGRADE = "SPDY/3.1"
TUNNEL_PROTOCOL = "SPDY/3.1+portforward.k8s.io"

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = (
    1, 2, 3, 4, 6, 7, 8, 9,
)  # fmt: skip
FLAG_FIN = 0x01
RST_PROTOCOL_ERROR, RST_CANCEL = 1, 5


def _dictionary() -> bytes:
    """SPDY/3's zlib preset dictionary (draft 3, §2.6.10.1): length-prefixed header
    names and values, then common value fragments."""
    words = (
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    )
    head = b"".join(struct.pack(">I", len(w)) + w.encode() for w in words)
    tail = (
        "100101201202205206300302303304305306307402405406407408409410411412413414415416"
        "417502504505203 Non-Authoritative Information204 No Content301 Moved "
        "Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 "
        "Internal Server Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr "
        "May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, "
        "GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,"
        "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,"
        "deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    )
    return head + tail.encode()


DICTIONARY = _dictionary()


class Closed(Exception):
    pass


@dataclass
class _Pair:
    """The two streams of one forwarded connection (one `requestid`)."""

    request: str
    port: int = 0
    data: int = 0  # stream ids
    error: int = 0
    conn: socket.socket | None = None
    dialed: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    client_done: threading.Event = field(default_factory=threading.Event)  # its FIN came


class SpdySession:
    """The server side of one SPDY port-forward session over a byte transport."""

    def __init__(
        self,
        read: Callable[[], bytes],
        write: Callable[[bytes], None],
        pod: str,
        uid: str,
        ip: str,
        dial: Dial,
        *,
        grace: float = CLOSE_GRACE,
    ) -> None:
        self._read = read  # returns the next chunk of the byte stream; b"" or Closed at end
        self._write_raw = write
        self._wlock = threading.Lock()
        self._buf = bytearray()
        self.pod, self.uid, self.ip = pod, uid, ip
        self.dial = dial
        self.grace = grace
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zdict=DICTIONARY)
        self._pairs: dict[str, _Pair] = {}
        self._by_stream: dict[int, _Pair] = {}
        self._threads: list[threading.Thread] = []
        self.closed = False

    # -- framing ---------------------------------------------------------------------------

    def _need(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self._read()
            if not chunk:
                raise Closed()
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _send(self, frame: bytes) -> None:
        with self._wlock:
            if self.closed:
                raise Closed()
            self._write_raw(frame)

    def _control(self, typ: int, flags: int, payload: bytes) -> bytes:
        return struct.pack(">HHI", 0x8003, typ, flags << 24 | len(payload)) + payload

    def _data(self, stream: int, data: bytes, fin: bool = False) -> None:
        flags = FLAG_FIN if fin else 0
        self._send(struct.pack(">II", stream & 0x7FFFFFFF, flags << 24 | len(data)) + data)

    def _headers(self, block: bytes) -> dict[str, str]:
        raw = self._inflate.decompress(block)
        (n,) = struct.unpack(">I", raw[:4])
        out, off = {}, 4
        for _ in range(n):
            (k,) = struct.unpack(">I", raw[off : off + 4])
            name = raw[off + 4 : off + 4 + k].decode()
            off += 4 + k
            (v,) = struct.unpack(">I", raw[off : off + 4])
            out[name] = raw[off + 4 : off + 4 + v].decode()
            off += 4 + v
        return out

    def _reply(self, stream: int) -> None:
        with self._wlock:  # the compression context is shared: compress and send in order
            block = self._deflate.compress(struct.pack(">I", 0))
            block += self._deflate.flush(zlib.Z_SYNC_FLUSH)
            frame = self._control(SYN_REPLY, 0, struct.pack(">I", stream) + block)
            if not self.closed:
                self._write_raw(frame)

    # -- session ---------------------------------------------------------------------------

    def serve(self) -> None:
        """Read frames until the client goes away; then end every forwarded connection."""
        try:
            while True:
                head = self._need(8)
                w0, w1 = struct.unpack(">II", head)
                flags, length = w1 >> 24, w1 & 0xFFFFFF
                body = self._need(length) if length else b""
                if w0 & 0x80000000:
                    self._on_control(w0 & 0xFFFF, flags, body)
                else:
                    self._on_data(w0 & 0x7FFFFFFF, flags, body)
        except (Closed, OSError, zlib.error, struct.error, ValueError) as e:
            if not isinstance(e, Closed | OSError):
                log.info("spdy session for %s: protocol error: %s", self.pod, e)
        finally:
            for pair in list(self._pairs.values()):
                self._hang_up(pair)
            for t in self._threads:
                t.join(5)
            with self._wlock:
                self.closed = True

    def _on_control(self, typ: int, flags: int, body: bytes) -> None:
        if typ == SYN_STREAM:
            stream = struct.unpack(">I", body[:4])[0] & 0x7FFFFFFF
            hdrs = self._headers(body[10:])
            self._reply(stream)
            self._stream_opened(stream, hdrs)
        elif typ == PING:
            self._send(self._control(PING, 0, body[:4]))
        elif typ == RST_STREAM:
            stream = struct.unpack(">I", body[:4])[0] & 0x7FFFFFFF
            pair = self._by_stream.get(stream)
            if pair is not None:
                self._hang_up(pair)
        elif typ == GOAWAY:
            raise Closed()
        # SETTINGS, WINDOW_UPDATE, HEADERS: nothing to do for port-forward

    def _stream_opened(self, stream: int, hdrs: dict[str, str]) -> None:
        req = hdrs.get("requestid", "")
        kind = hdrs.get("streamtype", "")
        pair = self._pairs.setdefault(req, _Pair(req))
        try:
            pair.port = int(hdrs.get("port", "0"))
        except ValueError:
            pair.port = 0
        if kind == "data":
            pair.data = stream
        elif kind == "error":
            pair.error = stream
        else:
            self._send(self._control(RST_STREAM, 0, struct.pack(">II", stream, RST_PROTOCOL_ERROR)))
            return
        self._by_stream[stream] = pair
        if pair.data and pair.error:
            t = threading.Thread(target=self._forward, args=(pair,), daemon=True)
            self._threads.append(t)
            t.start()

    def _on_data(self, stream: int, flags: int, body: bytes) -> None:
        pair = self._by_stream.get(stream)
        if pair is None or stream != pair.data:
            return  # the client closing its side of the error stream, or a gone stream
        if body:
            pair.dialed.wait(10)  # the kubelet's stream pipe blocks the reader the same way
            if pair.conn is not None:
                with contextlib.suppress(OSError):
                    pair.conn.sendall(body)
        if flags & FLAG_FIN:
            # containerd: when one direction ends, the other gets a second to finish.
            pair.client_done.set()
            threading.Timer(self.grace, self._hang_up, args=(pair,)).start()

    def _hang_up(self, pair: _Pair) -> None:
        pair.client_done.set()
        conn = pair.conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _forward(self, pair: _Pair) -> None:
        try:
            try:
                conn = self.dial(self.ip, pair.port, 10.0)
            except OSError as e:
                pair.dialed.set()
                msg = (
                    f"error forwarding port {pair.port} to pod {self.pod}, uid {self.uid}: "
                    f"failed to connect to {self.ip}:{pair.port}: {e.strerror or e}"
                )
                with contextlib.suppress(Closed, OSError):
                    self._data(pair.error, msg.encode())
                return
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair.conn = conn
            pair.dialed.set()
            with contextlib.suppress(OSError, Closed):
                while data := conn.recv(CHUNK):
                    self._data(pair.data, data)
            # The Pod closed: the client's direction gets a second to finish (containerd),
            # then both streams end.
            pair.client_done.wait(self.grace)
        finally:
            pair.done.set()
            if pair.conn is not None:
                pair.conn.close()
            with contextlib.suppress(Closed, OSError):
                self._data(pair.data, b"", fin=True)
                self._data(pair.error, b"", fin=True)
            self._pairs.pop(pair.request, None)
