"""Flags and KubeProxyConfiguration: kube-proxy names, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxy.config import UsageError, parse_args, parse_duration, parse_hostport


def test_defaults_follow_kube_proxy() -> None:
    c = parse_args([])
    assert c.proxy_mode == "iptables"
    assert c.sync_period == 30 and c.min_sync_period == 1
    assert c.healthz_bind == ("0.0.0.0", 10256)
    assert c.metrics_bind == ("127.0.0.1", 10249)
    assert c.dns_bind is None and c.cluster_domain == "cluster.local"
    assert c.masquerade_mark == "0x4000"


@pytest.mark.parametrize(
    "text, secs", [("30s", 30), ("1m30s", 90), ("500ms", 0.5), ("2", 2), ("1h", 3600)]
)
def test_durations(text: str, secs: float) -> None:
    assert parse_duration(text) == secs


@pytest.mark.parametrize("bad", ["", "3x", "s", "1m 2s"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(bad)


def test_hostport_forms() -> None:
    assert parse_hostport(":53", "x") == ("0.0.0.0", 53)
    assert parse_hostport("[::1]:53", "x") == ("::1", 53)
    assert parse_hostport("", "x", allow_empty=True) is None
    with pytest.raises(UsageError, match="not an IP"):
        parse_hostport("localhost:53", "x")


def test_config_file_and_flag_precedence(tmp_path) -> None:
    f = tmp_path / "kp.yaml"
    f.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "mode: iptables\nclusterCIDR: 198.18.0.0/16\nhostnameOverride: Node-A\n"
        "iptables: {syncPeriod: 10s, minSyncPeriod: 500ms, masqueradeAll: true}\n"
        "metricsBindAddress: 0.0.0.0:10249\nnodePortAddresses: [198.18.200.0/24]\n"
    )
    c = parse_args(["--config", str(f), "--iptables-sync-period", "20s"])
    assert c.sync_period == 20 and c.min_sync_period == 0.5
    assert c.cluster_cidrs == ("198.18.0.0/16",) and c.masquerade_all
    assert c.hostname == "node-a" and c.metrics_bind == ("0.0.0.0", 10249)
    assert c.nodeport_addresses == ("198.18.200.0/24",)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--cluster-cidr", "banana"], "not a CIDR"),
        (["--iptables-min-sync-period", "1m", "--iptables-sync-period", "30s"], "must not exceed"),
        (["--manifests", "/definitely/not/here"], "does not exist"),
        (["--config", "/definitely/not/here.yaml"], "cannot read"),
        (["--dns-bind-address", "nonsense"], "HOST:PORT"),
    ],
)
def test_user_errors_are_usage_errors(argv: list[str], msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        parse_args(argv)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--proxy-mode", "ipvs"], "invalid choice"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--manifests", "/nope"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(argv: list[str], msg: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "proxy", *argv], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert msg in lines[0] and lines[0].startswith("kube-proxy-py: error:")
