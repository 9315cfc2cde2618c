"""Laptop mode, the way a developer runs it: no network namespaces, no root.

The daemon runs as an unprivileged user (as `nobody` via setpriv when the test runs as
root; directly otherwise) with a manifests file whose endpoints are local servers on
127.0.0.1. Services must be reachable on their 127.x.y.z addresses, the built-in DNS must
answer with those addresses, privileged ports must be served at port+10000, and nothing
in the kernel (addresses, links) may change. Traffic stays on loopback.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from proxy.model import Service
from proxy.userspace.laptop import laptop_address

REPO = Path(__file__).resolve().parents[1]


_taken: set[int] = set()


def free_port(lo: int = 20000, hi: int = 60000) -> int:
    """A port free for both TCP and UDP on 127.0.0.1, not handed out before."""
    for port in range(lo, hi):
        if port in _taken:
            continue
        try:
            with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        _taken.add(port)
        return port
    raise AssertionError("no free port")


class NamedHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.name.encode() + b"\n"  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_backend(name: str) -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NamedHandler)
    srv.name = name  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def manifests(path: Path, ports: list[int], node_port: int) -> None:
    objs = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "NodePort",
                "clusterIP": "10.96.0.10",
                "ports": [
                    {"name": "http", "port": 80, "nodePort": node_port},
                    {"name": "alt", "port": 8080},
                ],
            },
        }
    ]
    for i, p in enumerate(ports):
        objs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"web-{i}",
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "web"},
                },
                "addressType": "IPv4",
                "ports": [
                    {"name": "http", "port": p, "protocol": "TCP"},
                    {"name": "alt", "port": p, "protocol": "TCP"},
                ],
                "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
            }
        )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(objs))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def unprivileged_prefix() -> list[str]:
    """How to run the daemon as a normal user from here."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run the daemon as nobody"
    base = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    ok = subprocess.run([*base, sys.executable, "-c", "pass"], capture_output=True)
    if ok.returncode == 0:
        return base
    # The interpreter lives where nobody cannot read (e.g. under /root): let the process
    # read files as root would, and nothing else (it stays non-root, no bind capability).
    return [*base, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


def curl(url: str, resolve: str | None = None) -> str:
    argv = ["curl", "-sS", "--max-time", "5", url]
    if resolve:
        argv[1:1] = ["--resolve", resolve]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def addresses_and_links() -> str:
    return subprocess.run(["ip", "-o", "address"], capture_output=True, text=True).stdout


def test_laptop_mode_serves_services_on_loopback_as_a_normal_user():
    for tool in ("curl", "dig", "ip"):
        assert shutil.which(tool), f"`{tool}` is needed for this test"
    work = Path(tempfile.mkdtemp(prefix="kpp-laptop-"))
    os.chmod(work, 0o755)
    mf = work / "services.yaml"
    log = work / "daemon.log"
    dns_port, metrics_port, healthz_port = free_port(), free_port(), free_port()
    node_port = free_port(lo=30000, hi=32768)
    before = addresses_and_links()
    with http_backend("one") as p1, http_backend("two") as p2:
        manifests(mf, [p1, p2], node_port)
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        args = [
            sys.executable,
            "-m",
            "proxy",
            "--proxy-mode=userspace",
            "--manifests",
            str(mf),
            "--dns-bind-address",
            f"127.0.0.1:{dns_port}",
            "--metrics-bind-address",
            f"127.0.0.1:{metrics_port}",
            "--healthz-bind-address",
            f"127.0.0.1:{healthz_port}",
            "--iptables-min-sync-period",
            "0.2",
        ]
        with open(log, "wb") as out:
            daemon = subprocess.Popen(
                [*unprivileged_prefix(), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=work,
            )
        try:
            deadline = time.monotonic() + 30
            while "synced 1 services" not in log.read_text():
                assert daemon.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            text = log.read_text()
            assert "laptop mode (not running as root)" in text
            uid = next(
                line.split()[1]
                for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines()
                if line.startswith("Uid:")
            )
            assert uid != "0"

            ip = laptop_address(Service("default", "web"))
            # Step 1 of the walkthrough: the cluster name resolves to the served address.
            name = "web.default.svc.cluster.local"
            dig = subprocess.run(
                ["dig", "+short", "+time=2", "+tries=2", "-p", str(dns_port), "@127.0.0.1", name],
                capture_output=True,
                text=True,
            )
            assert dig.stdout.split() == [ip], (dig.stdout, dig.stderr, log.read_text())
            # Step 2: curl http://web.default.svc.cluster.local:8080 reaches the backends.
            got = {curl(f"http://{name}:8080/", f"{name}:8080:{ip}") for _ in range(6)}
            assert got == {"one", "two"}
            # Port 80 is privileged for a normal user: served at 10080, said in the log.
            assert curl(f"http://{ip}:10080/") in {"one", "two"}
            assert "ports below 1024 served at port+10000" in text
            # NodePort on 127.0.0.1.
            assert curl(f"http://127.0.0.1:{node_port}/") in {"one", "two"}
            # Edits to the manifests are followed: only "two" is left.
            manifests(mf, [p2], node_port)
            deadline = time.monotonic() + 15
            while {curl(f"http://{ip}:8080/") for _ in range(4)} != {"two"}:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            # Nothing in the kernel changed.
            assert addresses_and_links() == before
            assert (
                "kube-proxy-py0"
                not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
            )
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(10)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        assert daemon.returncode == 0, log.read_text()[-3000:]
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
