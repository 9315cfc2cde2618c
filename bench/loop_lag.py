"""Loop lag during a relist: how long DNS answers wait while the daemon relists N Services.

The daemon (in `--proxy-mode none` or the userspace mode in laptop mode) watches a test API
server (another process) holding N Services with one 10-endpoint EndpointSlice each and
answers DNS. A prober sends one A query at a time (every 2 ms) and records each answer's
round trip. After a quiet baseline, the API server's history is compacted and every watch
dropped, so both watches get 410 and relist everything (as after a long outage), with a
few changes made meanwhile. DNS is answered on the event loop, so the round trips during
the relist show how long the loop waited behind control-plane work.

    sudo .venv/bin/python -m bench.loop_lag                       # this tree, 10k Services
    sudo .venv/bin/python -m bench.loop_lag --tree old=/tmp/old-core --tree new=.

Several `--tree LABEL=DIR` compare source trees side by side, alternating rounds (the
machine is shared). Writes bench/results/loop_lag.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from dnslib import DNSRecord

from proxy.testbed.apiserver import AdminClient

from .control_plane import changed_slice, objects

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 50.0  # issue 7: no answer waits more than this behind control-plane work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Prober:
    """One DNS query in flight at a time; (send time, round trip or None on timeout)."""

    port: int
    name: str = "svc-0.bench.svc.cluster.local"
    samples: list[tuple[float, float | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(2.0)
        while not self._stop.is_set():
            q = DNSRecord.question(self.name)
            q.header.id = random.randrange(65536)
            t0 = time.monotonic()
            sock.sendto(q.pack(), ("127.0.0.1", self.port))
            rtt: float | None = None
            try:
                while True:
                    data = sock.recv(4096)
                    if DNSRecord.parse(data).header.id == q.header.id:
                        rtt = time.monotonic() - t0
                        break
            except TimeoutError:
                pass
            self.samples.append((t0, rtt))
            time.sleep(0.002)
        sock.close()

    def stop(self) -> None:
        self._stop.set()

    def window(self, start: float, end: float) -> list[float | None]:
        return [r for t, r in self.samples if start <= t < end]


def summary(rtts: list[float | None]) -> dict[str, Any]:
    got = sorted(r * 1e3 for r in rtts if r is not None)
    if not got:
        return {"answers": 0, "timeouts": len(rtts)}
    return {
        "answers": len(got),
        "timeouts": len(rtts) - len(got),
        "over_target": sum(1 for r in got if r > TARGET_MS),
        "p50_ms": round(statistics.median(got), 2),
        "p99_ms": round(got[min(len(got) - 1, int(len(got) * 0.99))], 2),
        "max_ms": round(got[-1], 2),
    }


def count_lines(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except OSError:
        return 0


def wait_lines(path: Path, needle: str, count: int, timeout: float, proc: Any) -> None:
    deadline = time.monotonic() + timeout
    while count_lines(path, needle) < count:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited ({proc.returncode}); see {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{needle!r} ×{count} not in {path} after {timeout:.0f}s")
        time.sleep(0.05)


@contextlib.contextmanager
def process(argv: list[str], log: Path, cwd: Path, cpu: str | None) -> Iterator[Any]:
    if cpu is not None:
        argv = ["taskset", "-c", cpu, *argv]
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one_round(tree: Path, n: int, mode: str, work: Path, pin: bool) -> dict[str, Any]:
    py = sys.executable
    objs = work / "objects.yaml"
    if not objs.exists():
        svcs, slices = objects(n)
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        objs.write_text(yaml.dump_all([*svcs, *slices], Dumper=dumper))
    api_port, dns_port = free_port(), free_port()
    kc = work / "kubeconfig"
    api_log = work / "apiserver.log"
    px_log = work / f"daemon-{tree.name}-{time.strftime('%H%M%S')}.log"
    api_argv = [py, "-m", "proxy.testbed.apiserver", "--listen", f"127.0.0.1:{api_port}"]
    api_argv += ["--load", str(objs), "--kubeconfig", str(kc)]
    with process(api_argv, api_log, ROOT, "0" if pin else None) as api_proc:
        admin = AdminClient(f"http://127.0.0.1:{api_port}")
        admin.wait_ready(600)
        while api_proc.poll() is None and not kc.exists():
            time.sleep(0.05)
        px_argv = [py, "-m", "proxy", "--kubeconfig", str(kc), "--proxy-mode", mode]
        px_argv += ["--dns-bind-address", f"127.0.0.1:{dns_port}", "--hostname-override", "node-a"]
        px_argv += ["--healthz-bind-address", "", "--metrics-bind-address", ""]
        if mode == "userspace":
            px_argv += ["--userspace-laptop", "on"]
        with process(px_argv, px_log, tree, "1" if pin else None) as px:
            wait_lines(px_log, "synced ", 1, 900, px)
            prober = Prober(dns_port)
            thread = threading.Thread(target=prober.run, daemon=True)
            thread.start()
            try:
                time.sleep(5)  # baseline
                t_base, t_relist = prober.samples[0][0], time.monotonic()
                wall_relist = time.time()
                synced = count_lines(px_log, "synced ")
                listed = count_lines(px_log, "listed ")
                admin.stall_watches(600)  # the watches hear nothing of what follows
                for i in range(0, n, max(1, n // 100)):  # changed while "away"
                    admin.apply(changed_slice(i, 10, 2))
                admin.compact(0)
                admin.drop_watches()
                admin.release_watches()
                wait_lines(px_log, "listed ", listed + 2, 900, px)
                wait_lines(px_log, "synced ", synced + 1, 900, px)
                t_done = time.monotonic()
                time.sleep(2)  # what follows the relist's sync (consumers, trim)
                t_end = time.monotonic()
            finally:
                prober.stop()
                thread.join(5)
    worst = sorted(
        ((r, t - t_relist) for t, r in prober.samples if t_relist <= t < t_end and r),
        reverse=True,
    )[:5]
    return {
        "baseline": summary(prober.window(t_base, t_relist)),
        "relist": summary(prober.window(t_relist, t_end)),
        "relist_seconds": round(t_done - t_relist, 2),
        # the slowest answers: (ms, seconds after the relist began), to match with the log
        "worst": [(round(r * 1e3, 1), round(at, 2)) for r, at in worst],
        "relist_began": time.strftime("%H:%M:%S", time.localtime(wall_relist)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loop_lag", description=__doc__.split("\n")[0])
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--mode", choices=("none", "userspace"), default="none")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tree", action="append", default=[], help="LABEL=DIR (default: this tree)")
    p.add_argument("--no-pin", action="store_true", help="do not pin API server/daemon to CPUs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "loop_lag.json"))
    p.add_argument("--keep", help="keep the logs and objects in this directory")
    a = p.parse_args(argv)
    # A terminated run still stops the API servers and daemons it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    trees = [t.split("=", 1) for t in a.tree] or [["this", str(ROOT)]]
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in trees}
    with tempfile.TemporaryDirectory(prefix="loop-lag-") as tmp:
        work = Path(a.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for r in range(a.rounds):
            order = trees if r % 2 == 0 else list(reversed(trees))  # alternate
            for label, tree in order:
                res = one_round(Path(tree).resolve(), a.services, a.mode, work, not a.no_pin)
                results[label].append(res)
                print(f"round {r + 1} {label}: {json.dumps(res)}", flush=True)
    doc = {
        "command": "python -m bench.loop_lag " + " ".join(argv or sys.argv[1:]),
        "services": a.services,
        "endpoints_per_service": 10,
        "mode": a.mode,
        "target_max_ms": TARGET_MS,
        "results": results,
        "worst_relist_max_ms": {
            label: max((r["relist"].get("max_ms", float("inf")) for r in rs), default=None)
            for label, rs in results.items()
        },
    }
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["worst_relist_max_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
