"""Clients that keep using a node while it is upgraded: a DNS query every 20 ms, a new
HTTP connection through a Service every 20 ms, and one long transfer through an echo
Service (16 KiB every 20 ms, until SIGUSR1). Runs in a client pod until SIGTERM, then
writes what it saw as JSON; prints progress lines meanwhile.

    python -m tests.e2e.steady_clients --dns 198.18.200.1:53 --name web.default.svc.cluster.local \
        --expect 198.19.50.10 --http 198.19.50.10:80 --echo 198.19.50.11:7 --out FILE
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import threading
import time

from dnslib import QTYPE, DNSRecord

stop = threading.Event()
finish_transfer = threading.Event()  # SIGUSR1: end the transfer (the rest keeps going)


def dns_loop(server: tuple[str, int], name: str, expect: str, every: float, res: dict) -> None:
    while not stop.is_set():
        q = DNSRecord.question(name, "A")
        res["sent"] += 1
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # new port each time
                s.settimeout(2.0)
                s.sendto(q.pack(), server)
                reply = DNSRecord.parse(s.recv(4096))
            got = [str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A]
            if reply.header.id == q.header.id and got == [expect]:
                res["ok"] += 1
            else:
                res["failures"].append(f"{time.time():.3f} answer {got}")
        except OSError as e:
            res["failures"].append(f"{time.time():.3f} {type(e).__name__}: {e}")
        stop.wait(every)


def http_loop(target: tuple[str, int], every: float, res: dict) -> None:
    while not stop.is_set():
        res["sent"] += 1
        try:
            with socket.create_connection(target, timeout=3.0) as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            if data.startswith(b"HTTP/1.0 200") or data.startswith(b"HTTP/1.1 200"):
                res["ok"] += 1
            else:
                res["failures"].append(f"{time.time():.3f} reply {data[:40]!r}")
        except OSError as e:
            res["failures"].append(f"{time.time():.3f} {type(e).__name__}: {e}")
        stop.wait(every)


def transfer(target: tuple[str, int], res: dict) -> None:
    """Echo 16 KiB every 20 ms until stopped; every byte must come back, in order."""
    sent, got = hashlib.sha256(), hashlib.sha256()
    try:
        s = socket.create_connection(target, timeout=10.0)
        greeting = b""
        while not greeting.endswith(b"\n"):
            greeting += s.recv(1)
        res["backend"] = greeting.decode().strip()
        counts = {"received": 0}

        def reader() -> None:
            while chunk := s.recv(65536):
                got.update(chunk)
                counts["received"] += len(chunk)

        t = threading.Thread(target=reader)
        t.start()
        n = 0
        while not (stop.is_set() or finish_transfer.is_set()):
            block = os.urandom(16384)
            s.sendall(block)
            sent.update(block)
            n += len(block)
            stop.wait(0.02)
        s.shutdown(socket.SHUT_WR)
        t.join(30)
        res.update(sent=n, received=counts["received"], intact=sent.digest() == got.digest())
        print(f"transfer done: {n} bytes", flush=True)
    except OSError as e:
        res["error"] = f"{type(e).__name__}: {e}"


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dns", type=hostport, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--expect", required=True)
    p.add_argument("--http", type=hostport, required=True)
    p.add_argument("--echo", type=hostport, required=True)
    p.add_argument("--every", type=float, default=0.02)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: finish_transfer.set())
    res = {
        "dns": {"sent": 0, "ok": 0, "failures": []},
        "http": {"sent": 0, "ok": 0, "failures": []},
        "transfer": {},
    }
    threads = [
        threading.Thread(target=dns_loop, args=(a.dns, a.name, a.expect, a.every, res["dns"])),
        threading.Thread(target=http_loop, args=(a.http, a.every, res["http"])),
        threading.Thread(target=transfer, args=(a.echo, res["transfer"])),
    ]
    for t in threads:
        t.start()
    print("started", flush=True)
    while not stop.wait(1.0):  # progress, for the test to wait on
        print(f"dns={res['dns']['sent']} http={res['http']['sent']}", flush=True)
    for t in threads:
        t.join()
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
