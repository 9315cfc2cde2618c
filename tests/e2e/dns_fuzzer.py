"""Feeds a DNS server garbage, for the fault suite (stdlib only; run inside a pod).

    python -m tests.e2e.dns_fuzzer SERVER_IP [--packets 100000] [--window 100]
                                   [--streams 500] [--seed 7]

UDP: `packets` datagrams, half random bytes (0-600 octets), half mutations of valid
queries (names in and out of the cluster zone, every common type, with and without EDNS):
octets flipped, cut short, extended, counts rewritten; as fast as the server reads them,
`window` at a time (see `udp`).
TCP: `streams` connections, 20 at a time, each carrying one malformed stream (random
bytes; a length prefix longer than what follows; half a prefix; a zero length; a valid
query followed by garbage; a burst of garbage messages) and then closing.
Prints one JSON line: what was sent and how the server reacted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import struct
import threading
import time

NAMES = [
    "web.default.svc.cluster.local",
    "db.default.svc.cluster.local",
    "_pg._tcp.db.default.svc.cluster.local",
    "nope.default.svc.cluster.local",
    "cluster.local",
    "10.0.19.198.in-addr.arpa",
    "www.example.org",
    "a.b.c.d.e.f.g.h.example.com",
]
TYPES = [1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 65, 252, 255]


def query(rnd: random.Random) -> bytes:
    name = rnd.choice(NAMES)
    qname = b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\0"
    flags = rnd.choice((0x0100, 0x0000, 0x0110, 0x8100, 0x2900))
    ar = rnd.random() < 0.5
    head = struct.pack("!HHHHHH", rnd.randrange(65536), flags, 1, 0, 0, 1 if ar else 0)
    body = qname + struct.pack("!HH", rnd.choice(TYPES), rnd.choice((1, 1, 1, 3, 255)))
    if ar:
        body += b"\x00\x00\x29" + struct.pack("!HBBHH", rnd.choice((512, 1232, 4096)), 0, 0,
                                               rnd.choice((0, 0x8000)), 0)  # fmt: skip
    return head + body


def mutate(rnd: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rnd.randrange(4)
    if op == 0:
        for _ in range(rnd.randint(1, 6)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
    elif op == 1:
        del b[rnd.randrange(len(b)) :]
    elif op == 2:
        b += rnd.randbytes(rnd.randint(1, 64))
    else:
        pos = rnd.choice((4, 6, 8, 10))
        b[pos : pos + 2] = struct.pack("!H", rnd.choice((0, 2, 3, 255, 65535)))
    return bytes(b)


BARRIER_ID = 0xBEEF


def barrier() -> bytes:
    """A plain query; its answer means the server has read everything sent before it."""
    qname = b"".join(bytes((len(p),)) + p.encode() for p in NAMES[0].split(".")) + b"\0"
    return struct.pack("!HHHHHH", BARRIER_ID, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01"


def udp(server: str, n: int, window: int, rnd: random.Random) -> tuple[int, int]:
    """Send n packets, at most `window` ahead of the server: after each window, a barrier
    query whose answer says the server has read them (UDP has no flow control; a flood
    beyond what the server can read would only measure its socket buffer). Returns
    (packets sent, barriers that had to be asked again)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((server, 53))
    sent = retries = 0
    while sent < n:
        for _ in range(min(window, n - sent)):
            garbage = rnd.random() < 0.5
            pkt = rnd.randbytes(rnd.randint(0, 600)) if garbage else mutate(rnd, query(rnd))
            with contextlib.suppress(ConnectionRefusedError):
                s.send(pkt)
            sent += 1
        while True:
            s.settimeout(2.0)
            s.send(barrier())
            try:
                while True:  # skip answers to the garbage (FORMERR and the like)
                    data = s.recv(65535)
                    if data[:2] == struct.pack("!H", BARRIER_ID) and data[2] & 0x80:
                        break
                break
            except (TimeoutError, ConnectionRefusedError):
                retries += 1
    s.close()
    return sent, retries


def stream(rnd: random.Random) -> bytes:
    kind = rnd.randrange(6)
    if kind == 0:
        return rnd.randbytes(rnd.randint(1, 2000))
    if kind == 1:
        return struct.pack("!H", rnd.randint(100, 65535)) + rnd.randbytes(rnd.randint(0, 50))
    if kind == 2:
        return bytes((rnd.randrange(256),))
    if kind == 3:
        return b"\x00\x00" * rnd.randint(1, 10)
    if kind == 4:
        q = query(rnd)
        return struct.pack("!H", len(q)) + q + rnd.randbytes(rnd.randint(1, 300))
    out = b""
    for _ in range(rnd.randint(2, 40)):
        m = mutate(rnd, query(rnd)) if rnd.random() < 0.5 else rnd.randbytes(rnd.randint(0, 80))
        out += struct.pack("!H", len(m)) + m
    return out


def tcp(server: str, n: int, seed: int) -> dict[str, int]:
    counts = {"streams": 0, "refused": 0, "closed_by_server": 0}
    lock = threading.Lock()
    jobs = list(range(n))

    def worker(wid: int) -> None:
        rnd = random.Random(seed * 1000 + wid)
        while True:
            with lock:
                if not jobs:
                    return
                jobs.pop()
            try:
                c = socket.create_connection((server, 53), timeout=5)
            except OSError:
                with lock:
                    counts["refused"] += 1
                continue
            try:
                c.settimeout(0.2)
                c.sendall(stream(rnd))
                c.shutdown(socket.SHUT_WR)
                closed = False
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    if not c.recv(65535):
                        closed = True
                        break
            except OSError:
                closed = True
            finally:
                c.close()
            with lock:
                counts["streams"] += 1
                counts["closed_by_server"] += closed

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("server")
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--streams", type=int, default=500)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    t0 = time.monotonic()
    sent, retries = udp(args.server, args.packets, args.window, rnd)
    t1 = time.monotonic()
    tcp_counts = tcp(args.server, args.streams, args.seed)
    t2 = time.monotonic()
    out = {
        "udp_packets": sent,
        "udp_s": round(t1 - t0, 1),
        "barrier_retries": retries,
        "tcp_s": round(t2 - t1, 1),
    }
    print(json.dumps({**out, **tcp_counts}), flush=True)


if __name__ == "__main__":
    main()
