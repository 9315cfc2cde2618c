"""Faults survived, DNS: the daemon's DNS server fed garbage while real clients ask.

    node-a 198.18.200.1: `python -m proxy --proxy-mode=none --dns-bind-address :53`
    prober 198.18.1.10: real queries (tests/e2e/loadgen.py --proto dns), one per 20 ms
    fuzzer 198.18.1.11: tests/e2e/dns_fuzzer.py, 100k random and mutated UDP packets
                        (as fast as the server reads them) and 500 malformed TCP streams

The prober's queries are counted (sent, lost, latency) during the fuzz and after it; the
daemon's resident memory is read before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from proxy.testbed import Testbed

from .fault_helpers import Load, report, rss_bytes
from .iptables_helpers import traceback_in

__all__ = ["report"]

pytestmark = pytest.mark.kernel

NODE_IP = "198.18.200.1"
NAME = "web.default.svc.cluster.local"
RSS_BOUND = 50 << 20
# A query answered after the fuzz must take at most this long (see the README's "Faults
# survived": what a query takes with the machine loaded).
ANSWER_BOUND_MS = 100.0


def manifests(path: Path) -> Path:
    objs = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "198.19.56.10", "ports": [{"name": "http", "port": 80}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "db-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "db"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
            "endpoints": [
                {
                    "addresses": [f"198.18.1.{i}"],
                    "conditions": {"ready": True},
                    "hostname": f"db-{i}",
                }
                for i in range(20, 30)
            ],
        },
    ]
    path.write_text(yaml.safe_dump_all(objs))
    return path


def test_dns_answers_through_garbage(testbed: Testbed, report, tmp_path: Path) -> None:
    node = testbed.add_node("node-a", underlay_ip=NODE_IP, pod_cidr="198.18.1.0/24")
    prober = testbed.add_pod(node, "prober", "198.18.1.10")
    fuzzer = testbed.add_pod(node, "fuzzer", "198.18.1.11")
    px = node.start_proxy(
        [
            "--proxy-mode=none",
            "--manifests", str(manifests(tmp_path / "m.yaml")),
            "--dns-bind-address", f"{NODE_IP}:53",
            "--dns-upstream", "127.0.0.1:5399",  # nothing there: forwarded names fail fast
            "--hostname-override", "node-a",
            "--healthz-bind-address", "",
            "--metrics-bind-address", "127.0.0.1:10249",
        ]
    )  # fmt: skip
    try:
        px.wait_ready()
        warm = Load(prober, NODE_IP, 53, proto="dns", name=NAME, interval=0.02, label="warm")
        warm.wait_ok(50)
        assert warm.summary()["lost"] == 0
        rss0 = rss_bytes(px.pid)

        during = Load(prober, NODE_IP, 53, proto="dns", name=NAME, interval=0.02, label="during")
        during.wait_ok(5)
        out = fuzzer.python(["-m", "tests.e2e.dns_fuzzer", NODE_IP], timeout=600).stdout
        fuzz = json.loads(out.strip().splitlines()[-1])
        during.wait_ok(5)
        during_st = during.stop()
        assert px.alive(), px.log_tail()

        after = Load(prober, NODE_IP, 53, proto="dns", name=NAME, interval=0.02, label="after")
        after.wait_ok(100)
        after_st = after.stop()
        rss1 = rss_bytes(px.pid)
        report(
            "dns_garbage",
            fuzz=fuzz,
            during={
                "queries": during_st["sent"],
                "lost": during_st["failed"],
                "latency_ms": during_st["latencies_ms"],
            },
            after={
                "queries": after_st["sent"],
                "lost": after_st["failed"],
                "latency_ms": after_st["latencies_ms"],
            },
            rss_mb={"before": round(rss0 / 2**20, 1), "after": round(rss1 / 2**20, 1)},
        )
        assert fuzz["udp_packets"] == 100_000 and fuzz["streams"] == 500, fuzz
        assert during_st["failed"] == 0, during_st
        assert after_st["failed"] == 0, after_st
        assert after_st["latencies_ms"]["max"] <= ANSWER_BOUND_MS, after_st
        assert rss1 - rss0 < RSS_BOUND, (rss0, rss1)
        assert traceback_in(px) is None, traceback_in(px)
    finally:
        rc = px.stop()
    assert rc == 0, px.log_tail()
