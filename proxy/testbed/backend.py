"""A tiny backend that says who it is: `python -m proxy.testbed.backend --proto tcp --port 80`.

tcp:  each connection gets "<reply>\\n", then everything it sends is echoed back.
udp:  each datagram is answered with b"<reply>:" + datagram.
http: HTTP/1.1 (keep-alive) 200, body "<reply>\\n", headers X-Backend and X-Client-Addr;
      GET /client answers with the caller's IP instead (for source-IP tests); GET /bytes/N
      answers N pseudo-random bytes with their sha256 in X-Sha256 (downloads).
Prints READY on stdout once every socket is bound. Stdlib only: it runs inside pods.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import random
import socket
import sys


def _listen_socket(addr: str, port: int, kind: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    s.setblocking(False)
    if kind == socket.SOCK_STREAM:
        s.listen(1024)
    return s


async def _tcp(reply: bytes, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        w.write(reply + b"\n")
        await w.drain()
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()


async def _http(reply: bytes, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    peer = w.get_extra_info("peername") or ("?", 0)
    try:
        while True:
            try:
                head = await r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split()
            path = parts[1] if len(parts) > 1 else "/"
            headers = {}
            for h in lines[1:]:
                k, _, v = h.partition(":")
                headers[k.strip().lower()] = v.strip().lower()
            if n := int(headers.get("content-length", "0") or 0):
                await r.readexactly(n)
            if path.startswith("/bytes/") and path[7:].isdigit():
                body = download(int(path[7:]))
                extra = f"X-Sha256: {hashlib.sha256(body).hexdigest()}\r\n".encode()
            else:
                body = (peer[0] if path == "/client" else reply.decode()).encode() + b"\n"
                extra = b""
            close = headers.get("connection") == "close" or parts[-1] == "HTTP/1.0"
            w.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                + b"X-Backend: "
                + reply
                + b"\r\n"
                + f"X-Client-Addr: {peer[0]}:{peer[1]}\r\n".encode()
                + f"Content-Length: {len(body)}\r\n".encode()
                + extra
                + (b"Connection: close\r\n" if close else b"")
                + b"\r\n"
            )
            w.write(body)
            await w.drain()
            if close:
                return
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()


def download(n: int) -> bytes:
    """N bytes of a seeded pseudo-random pattern (GET /bytes/N), the same every time."""
    return random.Random(n).randbytes(n)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, reply: bytes):
        self.reply = reply + b":"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.transport.sendto(self.reply + data, addr)  # type: ignore[attr-defined]


async def serve(proto: str, port: int, reply: bytes, binds: list[str]) -> None:
    loop = asyncio.get_running_loop()
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    socks = [_listen_socket(a, port, kind) for a in binds]
    for s in socks:
        if proto == "udp":
            await loop.create_datagram_endpoint(lambda: _Udp(reply), sock=s)
        else:
            handler = _http if proto == "http" else _tcp
            await asyncio.start_server(lambda r, w, h=handler: h(reply, r, w), sock=s)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proto", choices=("tcp", "udp", "http"), default="tcp")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--reply", default=socket.gethostname())
    ap.add_argument("--bind", action="append", help="address to bind (repeatable)")
    a = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(a.proto, a.port, a.reply.encode(), a.bind or ["0.0.0.0"]))


if __name__ == "__main__":
    main()
