"""A steady client for the fault tests: requests to a Service at a fixed pace, counted.

    python -m tests.e2e.loadgen --target IP:PORT --status FILE [--proto http|tcp|dns]
                                [--interval 0.05] [--timeout 2] [--name NAME]

Run inside a pod's namespace (stdlib only). Each request is a new connection: `http` GETs
/ from a testbed backend and wants a 200, `tcp` wants the testbed backend's greeting line,
`dns` asks NAME (A, UDP) and wants an answer with the same ID. Every outcome is counted;
the counts are written to FILE (JSON, replaced atomically) a few times a second and once
more on SIGTERM, which ends the run:

    {"sent", "ok", "failed", "errors": {kind: n}, "failures": [[time, kind], ...],
     "latencies_ms": {"p50", "p99", "max"}, "done": bool}

Times are time.time(); `failures` keeps the last 200.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import struct
import time
from collections import Counter


def http_once(ip: str, port: int, timeout: float) -> None:
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data.startswith(b"HTTP/1.") or data.split(b" ", 2)[1] != b"200":
        raise ValueError(f"bad reply {data[:40]!r}")


def tcp_once(ip: str, port: int, timeout: float) -> None:
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.settimeout(timeout)
        data = b""
        while b"\n" not in data:
            chunk = s.recv(256)
            if not chunk:
                raise ValueError("closed before the greeting")
            data += chunk


def dns_once(ip: str, port: int, timeout: float, name: str) -> None:
    qid = random.randrange(65536)
    qname = b"".join(bytes((len(p),)) + p.encode() for p in name.strip(".").split(".")) + b"\0"
    query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((ip, port))
        s.send(query)
        deadline = time.monotonic() + timeout
        while True:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            data = s.recv(65535)
            if len(data) >= 12 and struct.unpack("!H", data[:2])[0] == qid:
                break
    rcode, answers = data[3] & 0x0F, struct.unpack("!H", data[6:8])[0]
    if rcode != 0 or answers == 0:
        raise ValueError(f"rcode {rcode}, {answers} answers")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--status", required=True)
    ap.add_argument("--proto", choices=("http", "tcp", "dns"), default="http")
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--name", default="")
    args = ap.parse_args()
    ip, _, port_text = args.target.rpartition(":")
    port = int(port_text)

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    sent = ok = 0
    errors: Counter[str] = Counter()
    failures: list[tuple[float, str]] = []
    lat: list[float] = []
    last_write = 0.0

    def write(done: bool) -> None:
        srt = sorted(lat)
        pct = {
            "p50": srt[len(srt) // 2] if srt else 0.0,
            "p99": srt[min(len(srt) - 1, len(srt) * 99 // 100)] if srt else 0.0,
            "max": srt[-1] if srt else 0.0,
        }
        body = {
            "sent": sent,
            "ok": ok,
            "failed": sent - ok,
            "errors": dict(errors),
            "failures": failures[-200:],
            "latencies_ms": {k: round(v * 1e3, 3) for k, v in pct.items()},
            "done": done,
        }
        tmp = args.status + ".tmp"
        with open(tmp, "w") as f:
            json.dump(body, f)
        os.replace(tmp, args.status)

    write(False)
    nxt = time.monotonic()
    while not stopping:
        t0 = time.monotonic()
        sent += 1
        try:
            if args.proto == "http":
                http_once(ip, port, args.timeout)
            elif args.proto == "tcp":
                tcp_once(ip, port, args.timeout)
            else:
                dns_once(ip, port, args.timeout, args.name)
            ok += 1
            lat.append(time.monotonic() - t0)
        except (OSError, ValueError) as e:
            kind = type(e).__name__
            errors[kind] += 1
            failures.append((time.time(), kind))
        now = time.monotonic()
        if now - last_write >= 0.2:
            write(False)
            last_write = now
        nxt += args.interval
        pause = nxt - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            nxt = time.monotonic()  # late (a slow request): no burst to catch up
    write(True)


if __name__ == "__main__":
    main()
