"""Load generators run inside a client pod (`python -m kube_proxy_py_bench.loadgen KIND …`);
each prints one JSON line.

  cps IP PORT SECONDS INFLIGHT   new connections per second: connect, send an HTTP/1.0
                                 request, read to EOF, close (INFLIGHT at once); the
                                 warm-up only: the measured rate is wrk's (`wrk_argv`),
                                 a C client fast enough not to be the bottleneck
  lat IP PORT COUNT              round trips of a small request on one kept-alive connection
"""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import statistics
import sys
import time
from typing import Any

REQ = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
KREQ = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def cps(ip: str, port: int, seconds: float, inflight: int) -> dict[str, Any]:
    sel = selectors.DefaultSelector()
    done = errors = 0
    end = time.monotonic() + seconds

    def launch() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((ip, port))
        sel.register(s, selectors.EVENT_WRITE, "connecting")

    t0 = time.monotonic()
    for _ in range(inflight):
        launch()
    while sel.get_map():
        for key, _ in sel.select(1.0):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                if key.data == "connecting":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    s.send(REQ)
                    sel.modify(s, selectors.EVENT_READ, "reading")
                    continue
                if s.recv(65536):
                    continue
                done += 1
            except OSError:
                errors += 1
            sel.unregister(s)
            s.close()
            if time.monotonic() < end:
                launch()
    elapsed = time.monotonic() - t0
    return {"conns": done, "errors": errors, "seconds": elapsed, "per_second": done / elapsed}


def wrk_argv(ip: str, port: int, seconds: float, inflight: int) -> list[str]:
    """wrk with a new connection per request: `Connection: close`, the server closes
    after its response and wrk connects again (one thread: the load has one CPU)."""
    return [
        "wrk",
        "-t1",
        f"-c{inflight}",
        f"-d{max(1, round(seconds))}s",
        "-H",
        "Connection: close",
        f"http://{ip}:{port}/",
    ]


_WRK_RATE = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)
_WRK_COUNT = re.compile(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m)", re.M)
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_STATUS = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_wrk(out: str) -> dict[str, Any]:
    """wrk's summary → the same keys as `cps` (pure; raises ValueError on other text)."""
    rate, count = _WRK_RATE.search(out), _WRK_COUNT.search(out)
    if rate is None or count is None:
        raise ValueError(f"not wrk's summary: {out.strip()[-300:]!r}")
    sock, status = _WRK_SOCKET.search(out), _WRK_STATUS.search(out)
    errors = sum(int(x) for x in sock.groups()) if sock else 0
    errors += int(status.group(1)) if status else 0
    return {
        "conns": int(count.group(1)),
        "errors": errors,
        "seconds": float(count.group(2)) * _UNIT[count.group(3)],
        "per_second": float(rate.group(1)),
    }


def latency(ip: str, port: int, count: int) -> dict[str, Any]:
    s = socket.create_connection((ip, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def one() -> None:
        s.sendall(KREQ)
        buf = b""
        while True:
            buf += s.recv(4096)
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                length = 0
                for h in head.split(b"\r\n"):
                    if h.lower().startswith(b"content-length"):
                        length = int(h.split(b":")[1])
                if len(body) >= length:
                    return

    for _ in range(min(200, count)):
        one()
    samples = []
    for _ in range(count):
        t = time.perf_counter_ns()
        one()
        samples.append((time.perf_counter_ns() - t) / 1000)
    s.close()
    samples.sort()
    return {
        "count": count,
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[int(len(samples) * 0.99)],
        "mean_us": statistics.fmean(samples),
    }


def main(argv: list[str]) -> int:
    kind, *rest = argv
    if kind == "cps":
        out = cps(rest[0], int(rest[1]), float(rest[2]), int(rest[3]))
    elif kind == "lat":
        out = latency(rest[0], int(rest[1]), int(rest[2]))
    else:
        print(f"loadgen: unknown kind {kind!r} (cps | lat)", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
