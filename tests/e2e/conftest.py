"""End-to-end fixtures: virtual nodes in network namespaces (root, real kernel).

Kernel tests are never skipped: when root, `ip netns`, veth/bridge or iptables are
missing, the run stops with a message saying what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.testbed import Cluster, Testbed, cleanup_stale
from proxy.testbed import cluster as _cluster

E2E_DIR = Path(__file__).parent


def _environment_problems() -> list[str]:
    if os.geteuid() != 0:
        return ["not running as root (network namespaces, iptables and nft need root)"]
    problems = []
    for tool in ("ip", "iptables", "iptables-save", "iptables-restore", "nft"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` not found on PATH")
    if problems:
        return problems
    try:
        cleanup_stale()
        # Build a real node and pod: proves netns, veth, bridge, sysctls and iptables work.
        with Testbed() as tb:
            node = tb.add_node("check", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
            tb.add_pod(node, "check-pod", "198.18.1.2")
            for argv in (["iptables", "-t", "nat", "-S"], ["iptables-save"]):
                p = node.exec(argv, check=False)
                if p.returncode != 0:
                    problems.append(f"`{' '.join(argv)}` in a node namespace: {p.stderr.strip()}")
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        problems.append(f"cannot build a testbed (ip netns / veth / bridge): {e}")
    return problems


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.kernel)


def pytest_collection_finish(session: pytest.Session) -> None:
    if not any(item.get_closest_marker("kernel") for item in session.items):
        return
    if problems := _environment_problems():
        pytest.exit(
            "kernel e2e tests cannot run (they are never skipped):\n  - "
            + "\n  - ".join(problems)
            + "\nRun as root on a Linux host with iproute2 and iptables, or deselect them "
            "with -m 'not kernel'.",
            returncode=pytest.ExitCode.TESTS_FAILED,
        )


@pytest.fixture
def testbed(tmp_path: Path) -> Iterator[Testbed]:
    """A fresh testbed per test; logs (proxy, backends) stay in tmp_path for debugging."""
    with Testbed(workdir=tmp_path) as tb:
        yield tb
    if left := tb.namespaces():
        pytest.fail(f"testbed left namespaces behind: {left}")


@pytest.fixture
def two_node_cluster(testbed: Testbed) -> Cluster:
    """node-a (pods a-web, client), node-b (pod b-web) and an outside host; IPv4.

    See proxy.testbed.cluster.Cluster for the addresses.
    """
    return _cluster.two_node_cluster(testbed)


@pytest.fixture
def two_node_cluster_dual(testbed: Testbed) -> Cluster:
    """Like two_node_cluster, dual-stack (pods fd00:18::/64, underlay fd00:200::/64)."""
    return _cluster.two_node_cluster(testbed, dual_stack=True)
