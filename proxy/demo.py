"""The embedded default: kube-proxy-py on a virtual node, no cluster needed.

`python -m proxy.demo` (root) builds a node in a network namespace with three web pods,
a client pod and an outside host, serves the bundled manifests/examples to the daemon,
and shows a client reaching the Services through it: spread across backends, a NodePort,
UDP, session affinity, a Service with no endpoints, DNS, and an endpoint removed while
running. Then it cleans up everything it made. The host's own rules are never touched.
Exit status 0 when every step behaved as it should.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import yaml

NODE_IP = "198.18.200.1"
OUTSIDE_IP = "198.18.200.100"
WEB = ("198.19.0.10", 80)
NODEPORT = 30080
ECHO = ("198.19.0.20", 7)
STICKY = ("198.19.0.30", 80)
EMPTY = ("198.19.0.40", 80)
PODS = {"web-1": "198.18.1.11", "web-2": "198.18.1.12", "web-3": "198.18.1.13"}


def _examples_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "manifests" / "examples"
    if here.is_dir():
        return here
    raise SystemExit("demo: manifests/examples not found; run it from a checkout of the repo")


class Demo:
    def __init__(self, mode: str, verbose: bool) -> None:
        self.mode = mode
        self.verbose = verbose
        self.failures: list[str] = []
        self.step = 0

    def say(self, text: str) -> None:
        self.step += 1
        print(f"[{self.step}] {text}", flush=True)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)
            print(f"    !! {what}", flush=True)

    def tally(self, host, ip: str, port: int, n: int, proto: str = "http") -> collections.Counter:
        from proxy.testbed import client_request

        c: collections.Counter = collections.Counter()
        for _ in range(n):
            try:
                c[client_request(host, ip, port, proto, timeout=3)] += 1
            except OSError as e:
                c[f"error: {e.__class__.__name__}"] += 1
        return c

    def run(self) -> int:
        from proxy.testbed import Testbed, start_backend

        work = Path(tempfile.mkdtemp(prefix="kube-proxy-py-demo-"))
        manifests = work / "manifests"
        shutil.copytree(_examples_dir(), manifests)
        print(
            f"kube-proxy-py demo ({self.mode} mode): a virtual node in a network namespace, "
            "3 web pods, a client pod, an outside host;\n"
            f"Services from {manifests} (a copy of manifests/examples)\n",
            flush=True,
        )
        try:
            with Testbed() as tb:
                node = tb.add_node("node-a", underlay_ip=NODE_IP, pod_cidr="198.18.1.0/24")
                pods = {name: tb.add_pod(node, name, ip) for name, ip in PODS.items()}
                client = tb.add_pod(node, "client", "198.18.1.100")
                outside = tb.add_external("outside", OUTSIDE_IP)
                for name, pod in pods.items():
                    start_backend(pod, 8080, proto="http")
                    if name != "web-3":
                        start_backend(pod, 7007, proto="udp")
                args = [
                    f"--proxy-mode={self.mode}",
                    f"--manifests={manifests}",
                    "--hostname-override=node-a",
                    "--cluster-cidr=198.18.0.0/16",
                    f"--nodeport-addresses={NODE_IP}/32",
                    f"--healthz-bind-address={NODE_IP}:10256",
                    "--metrics-bind-address=127.0.0.1:10249",
                    "--iptables-min-sync-period=100ms",
                    f"--dns-bind-address={NODE_IP}:53",
                ]
                t0 = time.monotonic()
                proxy = node.start_proxy(args, log=work / "kube-proxy-py.log")
                try:
                    proxy.wait_ready(timeout=60)
                    self.say(
                        f"daemon up (pid {proxy.pid}) in {time.monotonic() - t0:.2f}s: "
                        f"kube-proxy-py {' '.join(args)}"
                    )
                    self.scenario(tb, node, client, outside, pods, proxy, manifests)
                finally:
                    code = proxy.stop()
                    print(f"\ndaemon stopped (exit {code}); log: {work / 'kube-proxy-py.log'}")
                    r = node.exec(
                        [sys.executable, "-m", "proxy", "--cleanup"], check=False, timeout=60
                    )
                    print(f"kube-proxy-py --cleanup: exit {r.returncode}")
                    self.check(r.returncode == 0, "--cleanup failed")
                    left = node.exec(["iptables-save"], check=False).stdout.count("KUBE-")
                    self.check(left == 0, f"{left} KUBE- lines left after --cleanup")
            print("virtual node and pods removed")
        finally:
            if self.failures and self.verbose:
                print((work / "kube-proxy-py.log").read_text(errors="replace")[-4000:])
        if self.failures:
            print(f"\nDEMO FAILED: {len(self.failures)} step(s) misbehaved: {self.failures}")
            return 1
        print("\ndemo OK: every step behaved as expected")
        return 0

    def scenario(self, tb, node, client, outside, pods, proxy, manifests: Path) -> None:
        from proxy.testbed import client_request

        c = self.tally(client, *WEB, 60)
        self.say(
            f"ClusterIP web {WEB[0]}:{WEB[1]} from the client pod, 60 requests: "
            + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        )
        self.check(set(c) == set(PODS) and min(c.values()) >= 5, "ClusterIP did not spread")

        c = self.tally(outside, NODE_IP, NODEPORT, 30)
        self.say(
            f"NodePort {NODE_IP}:{NODEPORT} from the outside host, 30 requests: "
            + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        )
        self.check(set(c) <= set(PODS) and sum(c.values()) == 30, "NodePort failed")

        try:
            who = client_request(client, *ECHO, "udp", payload=b"ping")
            self.say(f"UDP echo {ECHO[0]}:{ECHO[1]}: answered by {who}")
            self.check(who in PODS, "UDP answer from an unknown backend")
        except OSError as e:
            self.say(f"UDP echo {ECHO[0]}:{ECHO[1]}: FAILED ({e})")
            self.check(False, "UDP echo failed")

        c = self.tally(client, *STICKY, 20)
        self.say(
            f"sessionAffinity ClientIP {STICKY[0]}:{STICKY[1]}, 20 requests: "
            + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        )
        self.check(len(c) == 1 and next(iter(c)) in PODS, "affinity did not stick")

        t = time.perf_counter()
        try:
            client_request(client, *EMPTY, "http", timeout=3)
            outcome = "answered (unexpected)"
            self.check(False, "Service without endpoints answered")
        except ConnectionRefusedError:
            outcome = f"connection refused after {(time.perf_counter() - t) * 1000:.1f} ms"
        except ConnectionResetError:
            # userspace mode keeps the listener (it holds the port) and resets at once
            outcome = f"connection reset after {(time.perf_counter() - t) * 1000:.1f} ms"
            self.check(self.mode == "userspace", "Service without endpoints reset, not refused")
        except OSError as e:
            outcome = f"{e.__class__.__name__} after {time.perf_counter() - t:.1f}s"
            self.check(False, "Service without endpoints was not refused at once")
        self.say(f"Service 'empty' {EMPTY[0]}:{EMPTY[1]} (no endpoints): {outcome}")

        self.dns(client)

        # Remove web-3 from the EndpointSlice, as a rollout would.
        f = manifests / "web.yaml"
        docs = list(yaml.safe_load_all(f.read_text()))
        for d in docs:
            if d.get("kind") == "EndpointSlice":
                d["endpoints"] = [e for e in d["endpoints"] if e["addresses"][0] != PODS["web-3"]]
        n = proxy.sync_count()
        t = time.monotonic()
        f.write_text(yaml.safe_dump_all(docs))
        proxy.wait_synced(after=n, timeout=30)
        took = time.monotonic() - t
        c = self.tally(client, *WEB, 40)
        self.say(
            f"removed web-3 from the web EndpointSlice: programmed {took:.2f}s after the "
            "edit (file poll 1s); 40 requests: "
            + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        )
        self.check(set(c) == {"web-1", "web-2"}, "removed endpoint still got traffic")

        if self.mode == "iptables":
            rules = node.exec(["iptables-save", "-t", "nat"]).stdout.splitlines()
            web = [r for r in rules if "default/web:http" in r and r.startswith("-A")]
            self.say(
                "the nat rules for web (iptables-save -t nat):\n      " + "\n      ".join(web[:8])
            )
            self.check(any("KUBE-SVC-" in r for r in web), "no KUBE-SVC chain for web")
        status, body = proxy.healthz()
        self.say(f"/healthz on {NODE_IP}:10256: {status} {body.strip()}")
        self.check(status == 200, "/healthz not 200")
        m = [
            ln
            for ln in proxy.metrics().splitlines()
            if ln.startswith(
                (
                    "kubeproxy_sync_proxy_rules_duration_seconds_count",
                    "kubeproxy_sync_proxy_rules_iptables_total",
                    "kubeproxy_py_services",
                )
            )
        ]
        self.say("metrics (127.0.0.1:10249/metrics): " + "; ".join(m))

    def dns(self, client) -> None:
        if shutil.which("dig") is None:
            self.say("DNS: dig not installed, skipped (apt-get install dnsutils)")
            return
        qs = [
            ("web.default.svc.cluster.local", "A"),
            ("db.default.svc.cluster.local", "A"),
            ("_pg._tcp.db.default.svc.cluster.local", "SRV"),
            ("docs.default.svc.cluster.local", "CNAME"),
        ]
        out = []
        for name, qtype in qs:
            r = client.exec(
                ["dig", "+short", "+time=2", "+tries=1", f"@{NODE_IP}", name, qtype], check=False
            )
            ans = " ".join(r.stdout.split()) or f"(no answer, exit {r.returncode})"
            out.append(f"{name} {qtype} → {ans}")
        self.say("DNS from the client pod (dig @" + NODE_IP + "):\n      " + "\n      ".join(out))
        self.check("198.19.0.10" in out[0], "DNS A for web wrong")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proxy.demo", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("iptables", "userspace"), default="iptables")
    p.add_argument("--verbose", action="store_true", help="print the daemon log on failure")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print(
            "demo: needs root to build network namespaces: sudo .venv/bin/python -m proxy.demo",
            file=sys.stderr,
        )
        return 2
    for tool in ("ip", "iptables-restore"):
        if shutil.which(tool) is None:
            print(f"demo: {tool} not found; install iproute2 and iptables", file=sys.stderr)
            return 2
    socket.setdefaulttimeout(10)
    return Demo(a.mode, a.verbose).run()


if __name__ == "__main__":
    sys.exit(main())
