"""Backends in pods and one-shot client requests, all from inside namespaces."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from .hosts import family_of

if TYPE_CHECKING:
    from .hosts import Host

PROTOS = ("tcp", "udp", "http")


class BadReply(RuntimeError):
    """The peer answered, but not the way a testbed backend answers."""


def start_backend(
    host: Host,
    port: int,
    *,
    proto: str = "tcp",
    reply: str | None = None,
    timeout: float = 10,
) -> subprocess.Popen:
    """Start `python -m proxy.testbed.backend` in HOST, listening on PORT on all addresses.

    tcp: greets each connection with "<reply>\\n", then echoes. udp: answers each datagram
    with b"<reply>:" + data. http: 200 with body "<reply>\\n" (GET /client: the caller's IP).
    reply defaults to host.name. Returns once the backend has bound its sockets.
    """
    if proto not in PROTOS:
        raise ValueError(f"proto must be one of {PROTOS}, not {proto!r}")
    name = reply if reply is not None else host.name
    log = host.tb.workdir / f"backend-{host.name}-{proto}-{port}.log"
    args = ["-m", "proxy.testbed.backend", "--proto", proto, "--port", str(port), "--reply", name]
    args += ["--bind", "0.0.0.0"]
    if host.ipv6:
        args += ["--bind", "::"]
    with open(log, "ab") as err:
        p = host.run(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL
        )
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if p.poll() is not None or left <= 0:
            if p.poll() is None:
                p.kill()
                p.wait()
            raise RuntimeError(
                f"backend {proto}/{port} in {host.ns} did not start (exit {p.returncode}): "
                f"{log.read_text(errors='replace').strip()[-2000:]}"
            )
        r, _, _ = select.select([p.stdout], [], [], min(left, 0.2))
        if r:
            chunk = p.stdout.read1(64) if hasattr(p.stdout, "read1") else p.stdout.read(1)
            if not chunk:
                continue
            line += chunk
    if line.strip() != b"READY":
        raise RuntimeError(f"backend in {host.ns} said {line!r} instead of READY")
    return p


def _recv_until(s: socket.socket, pred, limit: int = 1 << 20) -> bytes:
    buf = b""
    while not pred(buf):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            break
    return buf


def http_request(
    host: Host, ip: str, port: int, path: str = "/", *, timeout: float = 3
) -> tuple[int, dict[str, str], str]:
    """GET PATH from inside HOST → (status, lower-cased headers, body). Closes after one."""
    with host.socket(family_of(ip), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((ip, port))
        hostname = f"[{ip}]" if ":" in ip else ip
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {hostname}:{port}\r\nConnection: close\r\n"
            "User-Agent: kpt-testbed\r\n\r\n".encode()
        )
        raw = _recv_until(s, lambda b: False)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise BadReply(f"incomplete HTTP reply from {ip}:{port}: {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise BadReply(f"bad HTTP status line from {ip}:{port}: {lines[0]!r}") from None
    headers = {}
    for h in lines[1:]:
        k, _, v = h.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return status, headers, body.decode(errors="replace")


def client_request(
    host: Host,
    ip: str,
    port: int,
    proto: str = "tcp",
    payload: bytes = b"hi",
    timeout: float = 3,
    *,
    path: str = "/",
) -> str:
    """One request from inside HOST to a testbed backend; returns the backend's reply name.

    tcp: reads the greeting line, sends PAYLOAD and checks the echo. udp: sends PAYLOAD,
    checks the b"<name>:" + PAYLOAD answer (ICMP unreachable → ConnectionRefusedError).
    http: GET PATH, expects 200, returns the body without its trailing newline.
    Errors raise (TimeoutError, ConnectionRefusedError, other OSError, BadReply).
    """
    if proto == "http":
        status, _h, body = http_request(host, ip, port, path, timeout=timeout)
        if status != 200:
            raise BadReply(f"HTTP {status} from {ip}:{port}{path}: {body[:200]!r}")
        return body.rstrip("\n")
    if proto == "tcp":
        with host.socket(family_of(ip), socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((ip, port))
            greeting = _recv_until(s, lambda b: b"\n" in b)
            name, nl, rest = greeting.partition(b"\n")
            if not nl:
                raise BadReply(f"no greeting line from {ip}:{port}: {greeting[:200]!r}")
            if payload:
                s.sendall(payload)
                echo = rest + _recv_until(s, lambda b: len(rest) + len(b) >= len(payload))
                if echo[: len(payload)] != payload:
                    raise BadReply(f"echo mismatch from {ip}:{port}: {echo[:200]!r}")
            return name.decode(errors="replace")
    if proto == "udp":
        with host.socket(family_of(ip), socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect((ip, port))
            s.send(payload)
            data = s.recv(65536)
            if not data.endswith(b":" + payload):
                raise BadReply(f"unexpected UDP reply from {ip}:{port}: {data[:200]!r}")
            return data[: len(data) - len(payload) - 1].decode(errors="replace")
    raise ValueError(f"proto must be one of {PROTOS}, not {proto!r}")
