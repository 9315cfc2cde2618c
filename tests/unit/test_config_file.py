"""--config: every KubeProxyConfiguration field that applies, this proxy's own document,
kube-proxy's defaulting (a kubeadm ConfigMap loads unchanged), flags over the file,
unknown fields warned about with their path, wrong types as one-line errors."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import SETTINGS, Config, UsageError, parse_args
from proxy.configfile import load_file

DATA = Path(__file__).parent / "data"

# Every KubeProxyConfiguration field kube-proxy-py reads, set away from its default.
FULL = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: userspace
clusterCIDR: 198.18.0.0/16,fd00:18::/64
hostnameOverride: Node-A
bindAddress: 198.18.200.1
healthzBindAddress: 198.18.200.1:10266
metricsBindAddress: 0.0.0.0:10259
nodePortAddresses: [198.18.200.0/24]
clientConnection: {kubeconfig: /etc/kp/kubeconfig}
iptables:
  syncPeriod: 1m
  minSyncPeriod: 2s
  masqueradeAll: true
  masqueradeBit: 13
  localhostNodePorts: false
conntrack:
  maxPerCore: 0
  min: 1000
  tcpEstablishedTimeout: 2h
  tcpCloseWaitTimeout: 0s
  tcpBeLiberal: true
  udpTimeout: 30s
  udpStreamTimeout: 2m
logging: {verbosity: 4}
---
apiVersion: config.kube-proxy-py.io/v1alpha1
kind: KubeProxyPyConfiguration
ipv6: "off"
shutdownGracePeriod: 5s
iptables: {backend: legacy}
dns:
  bindAddress: 169.254.20.10:53
  clusterDomain: Example.Org.
  upstreams: [198.18.0.53, "[fd00::53]:5353"]
  ttl: 30
  nodeLocal: true
userspace:
  laptop: "off"
  portOffset: 20000
  engine: copy
  tcpIdleTimeout: 1h
  udpIdleTimeout: 10s
  udpMaxSessions: 100
  addressMode: local-route
  endpointAccess: direct
"""

FULL_EXPECTED = {
    "proxy_mode": "userspace",
    "cluster_cidrs": ("198.18.0.0/16", "fd00:18::/64"),
    "hostname": "node-a",
    "bind_address": "198.18.200.1",
    "healthz_bind": ("198.18.200.1", 10266),
    "metrics_bind": ("0.0.0.0", 10259),
    "nodeport_addresses": ("198.18.200.0/24",),
    "kubeconfig": "/etc/kp/kubeconfig",
    "sync_period": 60.0,
    "min_sync_period": 2.0,
    "masquerade_all": True,
    "masquerade_bit": 13,
    "localhost_nodeports": False,
    "conntrack_max_per_core": 0,
    "conntrack_min": 1000,
    "conntrack_tcp_timeout_established": 7200.0,
    "conntrack_tcp_timeout_close_wait": 0.0,
    "conntrack_tcp_be_liberal": True,
    "conntrack_udp_timeout": 30.0,
    "conntrack_udp_timeout_stream": 120.0,
    "log_level": "debug",
    "ipv6": "off",
    "iptables_backend": "legacy",
    "dns_bind": ("169.254.20.10", 53),
    "cluster_domain": "example.org",
    "dns_upstream": ("198.18.0.53:53", "[fd00::53]:5353"),
    "dns_ttl": 30,
    "dns_node_local": True,
    "shutdown_grace_period": 5.0,
    "userspace_laptop": "off",
    "userspace_port_offset": 20000,
    "userspace_engine": "copy",
    "userspace_tcp_idle_timeout": 3600.0,
    "udp_idle_timeout": 10.0,
    "userspace_udp_max_sessions": 100,
    "userspace_address_mode": "local-route",
    "userspace_endpoint_access": "direct",
}


def write(tmp_path: Path, text: str) -> str:
    f = tmp_path / "config.yaml"
    f.write_text(text)
    return str(f)


def test_every_field_is_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "proxy.config")
    cfg = parse_args(["--config", write(tmp_path, FULL)])
    got = {k: getattr(cfg, k) for k in FULL_EXPECTED}
    assert got == FULL_EXPECTED
    assert not caplog.records, caplog.text  # nothing unknown, nothing ignored
    defaults = Config()
    for k, v in FULL_EXPECTED.items():  # each one really moved off its default
        assert getattr(defaults, k) != v or k == "conntrack_tcp_timeout_close_wait", k


def test_every_file_setting_is_in_the_full_example() -> None:
    in_file = {s.field for s in SETTINGS if s.path or s.own} - {"manifests"}
    assert in_file - set(FULL_EXPECTED) == set()


def test_kubeadm_configmap_loads_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cm = yaml.safe_load((DATA / "kubeadm-kube-proxy-configmap.yaml").read_text())
    caplog.set_level(logging.INFO, "proxy.config")
    cfg = parse_args(["--config", write(tmp_path, cm["data"]["config.conf"])])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # "" / 0s / null are kube-proxy's defaults, never "off" or zero.
    want = dataclasses.replace(
        Config(),
        kubeconfig="/var/lib/kube-proxy/kubeconfig.conf",
        cluster_cidrs=("10.244.0.0/16",),
    )
    assert cfg == want


def test_nftables_mode_reads_the_nftables_section(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "iptables: {syncPeriod: 10s, masqueradeBit: 3}\n"
        "nftables: {syncPeriod: 20s, masqueradeBit: 5, masqueradeAll: true}\n",
    )
    assert load_file(f, mode="nftables") == {
        "sync_period": 20.0,
        "masquerade_bit": 5,
        "masquerade_all": True,
    }
    assert load_file(f, mode="iptables") == {"sync_period": 10.0, "masquerade_bit": 3}


@pytest.mark.parametrize(
    "flag, field, flag_value",
    [
        ("--iptables-sync-period=45s", "sync_period", 45.0),
        ("--proxy-mode=iptables", "proxy_mode", "iptables"),
        ("--masquerade-all=false", "masquerade_all", False),
        ("--iptables-localhost-nodeports", "localhost_nodeports", True),
        ("--conntrack-min=7", "conntrack_min", 7),
        ("--healthz-bind-address=", "healthz_bind", None),
        ("--dns-bind-address=127.0.0.1:5353", "dns_bind", ("127.0.0.1", 5353)),
        ("--userspace-engine=splice", "userspace_engine", "splice"),
        ("--log-level=warning", "log_level", "warning"),
        ("--hostname-override=other", "hostname", "other"),
    ],
)
def test_flags_override_the_file(tmp_path: Path, flag: str, field: str, flag_value) -> None:
    f = write(tmp_path, FULL)
    assert getattr(parse_args(["--config", f]), field) == FULL_EXPECTED[field]
    assert getattr(parse_args(["--config", f, flag]), field) == flag_value


def test_unknown_fields_are_warned_about_with_their_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = write(
        tmp_path,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "iptables: {syncPeriodd: 10s, syncPeriod: 10s}\nbogus: 1\n"
        "ipvs: {scheduler: rr}\n---\n"
        "apiVersion: config.kube-proxy-py.io/v1alpha1\nkind: KubeProxyPyConfiguration\n"
        "dns: {bindAdress: 127.0.0.1:53}\n",
    )
    caplog.set_level(logging.INFO, "proxy.config")
    assert parse_args(["--config", f]).sync_period == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"--config {f}: unknown field iptables.syncPeriodd, ignored",
        f"--config {f}: unknown field bogus, ignored",
        f"--config {f}: KubeProxyPyConfiguration unknown field dns.bindAdress, ignored",
    ]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [f"--config {f}: set but not used by kube-proxy-py: ipvs"]


@pytest.mark.parametrize(
    "body, msg",
    [
        ("iptables: {masqueradeAll: 'yes'}", "iptables.masqueradeAll: expected true or false"),
        (
            "iptables: {syncPeriod: 30}",
            'iptables.syncPeriod: expected a duration string such as "30s", got int 30',
        ),
        ("iptables: {masqueradeBit: '14'}", "iptables.masqueradeBit: expected a whole number"),
        ("iptables: 5", "iptables: expected a mapping, got int"),
        ("clusterCIDR: banana", "clusterCIDR: 'banana' is not a CIDR"),
        ("mode: ipvs", "mode: 'ipvs' is not one of iptables, nftables, userspace, none"),
        ("healthzBindAddress: 10256", "healthzBindAddress: expected an address"),
        ("conntrack: {min: true}", "conntrack.min: expected a whole number, got bool True"),
    ],
)
def test_a_wrong_type_names_the_field(tmp_path: Path, body: str, msg: str) -> None:
    f = write(
        tmp_path,
        f"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{body}\n",
    )
    with pytest.raises(UsageError) as e:
        parse_args(["--config", f])
    assert f"--config {f}: {msg}" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_wrong_type_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "iptables: {minSyncPeriod: soon}\n",
    )
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", f], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"kube-proxy-py: error: --config {f}: iptables.minSyncPeriod: 'soon' is not a duration "
        "(examples: 30s, 1m, 500ms)"
    ]


@pytest.mark.parametrize(
    "text, msg",
    [
        ("kind: Pod\napiVersion: v1\n", "a Pod is not a KubeProxyConfiguration"),
        (
            "kind: KubeProxyConfiguration\napiVersion: kubeproxy.config.k8s.io/v1beta9\n",
            "apiVersion 'kubeproxy.config.k8s.io/v1beta9'; use kubeproxy.config.k8s.io/v1alpha1",
        ),
        ("- a\n- b\n", "is not a KubeProxyConfiguration"),
        ("a: [\n", "is not valid YAML"),
    ],
)
def test_not_a_configuration(tmp_path: Path, text: str, msg: str) -> None:
    with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        parse_args(["--config", write(tmp_path, text)])


def test_own_document_alone(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "apiVersion: config.kube-proxy-py.io/v1alpha1\nkind: KubeProxyPyConfiguration\n"
        "dns: {bindAddress: '127.0.0.1:5353'}\n",
    )
    assert parse_args(["--config", f]).dns_bind == ("127.0.0.1", 5353)


def test_ipv6_bind_address_turns_ipv6_on() -> None:
    assert parse_args(["--bind-address", "::"]).ipv6 == "on"
    assert parse_args(["--bind-address", "::", "--ipv6", "off"]).ipv6 == "off"
    assert parse_args([]).ipv6 == "auto"
