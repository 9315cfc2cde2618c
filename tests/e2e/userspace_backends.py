"""Special backends for the userspace e2e tests (stdlib only; run inside pods).

python -m tests.e2e.userspace_backends MODE PORT [ARG]
  bulk N      receive exactly N bytes, answer "<sha256 hex>\\n", then send N bytes
              (a seeded random block repeated) followed by their sha256 hex; close.
  halfclose   read until the client's FIN, then answer "got <n>" and close.
  stream      send 64 KiB chunks until the client goes away.
  udppeer     UDP: answer each datagram with the sender's "<ip>:<port>" (who it came from).
Prints READY once listening.
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys
import threading


def bulk_block() -> bytes:
    """The 1 MiB block the bulk backend repeats."""
    return random.Random(7).randbytes(1 << 20)


def serve_bulk(conn: socket.socket, n: int) -> None:
    h = hashlib.sha256()
    got = 0
    while got < n:
        data = conn.recv(1 << 20)
        if not data:
            break
        h.update(data)
        got += len(data)
    if got < n:  # the client went away
        conn.close()
        return
    conn.sendall(h.hexdigest().encode() + b"\n")
    block = bulk_block()
    out = hashlib.sha256()
    left = n
    while left:
        chunk = block[: min(left, len(block))]
        conn.sendall(chunk)
        out.update(chunk)
        left -= len(chunk)
    conn.sendall(out.hexdigest().encode())
    conn.close()


def serve_halfclose(conn: socket.socket) -> None:
    n = 0
    while data := conn.recv(65536):
        n += len(data)
    conn.sendall(f"got {n}".encode())
    conn.close()


def serve_stream(conn: socket.socket) -> None:
    chunk = b"s" * 65536
    try:
        while True:
            conn.sendall(chunk)
    except OSError:
        conn.close()


def serve_udp_peer(port: int) -> None:
    """Answers each datagram with its sender's ip:port, on IPv4 and (where the host has
    it) IPv6."""
    socks = []
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind((addr, port))
        except OSError:
            s.close()  # no IPv6 here
            continue
        socks.append(s)
    print("READY", flush=True)
    for s in socks[1:]:
        threading.Thread(target=_udp_peer_loop, args=(s,), daemon=True).start()
    _udp_peer_loop(socks[0])


def _udp_peer_loop(s: socket.socket) -> None:
    while True:
        _, addr = s.recvfrom(65535)
        s.sendto(f"{addr[0]}:{addr[1]}".encode(), addr)


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    arg = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    if mode == "udppeer":
        serve_udp_peer(port)
        return
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    print("READY", flush=True)
    while True:
        conn, _ = s.accept()
        target = {"bulk": serve_bulk, "halfclose": serve_halfclose, "stream": serve_stream}[mode]
        args = (conn, arg) if mode == "bulk" else (conn,)
        threading.Thread(target=target, args=args, daemon=True).start()


if __name__ == "__main__":
    main()
