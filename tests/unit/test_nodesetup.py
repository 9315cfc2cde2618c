"""The node's set-up plan (proxy/nodesetup.py): kube-proxy's conntrack sysctls and
route_localnet, as pure decisions over what the kernel holds."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.config import Config, UsageError, parse_args
from proxy.nodesetup import (
    CONNTRACK_MAX,
    HASHSIZE,
    NETFILTER,
    ROUTE_LOCALNET,
    Write,
    apply,
    conntrack_max,
    localhost_nodeports_by_nat,
    localnet_plan,
    plan,
)

KERNEL = {  # a fresh kernel's values (this machine's, in a new network namespace)
    CONNTRACK_MAX: 262144,
    HASHSIZE: 262144,
    NETFILTER + "nf_conntrack_tcp_timeout_established": 432000,
    NETFILTER + "nf_conntrack_tcp_timeout_close_wait": 60,
    NETFILTER + "nf_conntrack_udp_timeout": 30,
    NETFILTER + "nf_conntrack_udp_timeout_stream": 120,
    NETFILTER + "nf_conntrack_tcp_be_liberal": 0,
    ROUTE_LOCALNET: 0,
}


def cfg(**kw) -> Config:
    return dataclasses.replace(Config(hostname="node-a"), **kw)


@pytest.mark.parametrize(
    ("per_core", "minimum", "ncpu", "want"),
    [
        (32768, 131072, 2, 131072),  # the floor
        (32768, 131072, 8, 262144),  # scaled
        (67890, 1, 3, 203670),
        (1, 123456, 4, 123456),  # Min is considered
        (0, 123456, 4, 0),  # leave the system's value
        (65536, 0, 64, 1 << 22),  # no cap (kube-proxy's getConntrackMax has none)
    ],
)
def test_conntrack_max_is_kube_proxys(per_core: int, minimum: int, ncpu: int, want: int) -> None:
    assert conntrack_max(per_core, minimum, ncpu) == want


def test_defaults_write_kube_proxys_timeouts_and_route_localnet() -> None:
    writes, notes = plan(cfg(), 2, KERNEL.get, host_netns=False)
    assert writes == [
        # 32768 per core x 2 is below the minimum, 131072: set (lowered), as kube-proxy does
        Write(CONNTRACK_MAX, 131072, optional=True),
        Write(NETFILTER + "nf_conntrack_tcp_timeout_established", 86400),
        Write(NETFILTER + "nf_conntrack_tcp_timeout_close_wait", 3600),
    ]
    assert notes == []  # hashsize 262144 >= 131072 / 4: nothing to say
    assert localnet_plan(cfg(), KERNEL.get) == [Write(ROUTE_LOCALNET, 1)]
    assert localnet_plan(cfg(), {ROUTE_LOCALNET: 1}.get) == []
    assert localnet_plan(cfg(localhost_nodeports=False), KERNEL.get) == []


def test_values_already_right_are_not_written() -> None:
    done = dict(KERNEL)
    for w in plan(cfg(), 2, KERNEL.get, host_netns=False)[0]:
        done[w.path] = w.value
    assert plan(cfg(), 2, done.get, host_netns=False) == ([], [])


def test_udp_timeouts_be_liberal_and_zero_means_leave() -> None:
    c = cfg(
        conntrack_udp_timeout=45.9,
        conntrack_udp_timeout_stream=300,
        conntrack_tcp_be_liberal=True,
        conntrack_tcp_timeout_established=0,
        conntrack_tcp_timeout_close_wait=0,
        localhost_nodeports=False,
    )
    writes, _ = plan(c, 2, {**KERNEL, CONNTRACK_MAX: 131072}.get, host_netns=False)
    assert writes == [
        Write(NETFILTER + "nf_conntrack_udp_timeout", 45),
        Write(NETFILTER + "nf_conntrack_udp_timeout_stream", 300),
        Write(NETFILTER + "nf_conntrack_tcp_be_liberal", 1),
    ]


def test_conntrack_max_set_when_it_differs_hashsize_only_from_the_host() -> None:
    small = {**KERNEL, CONNTRACK_MAX: 65536, HASHSIZE: 16384}
    c = cfg(conntrack_max_per_core=32768, conntrack_min=0, localhost_nodeports=False)
    host, _ = plan(c, 8, small.get, host_netns=True)
    assert Write(CONNTRACK_MAX, 262144, optional=True) in host
    assert Write(HASHSIZE, 65536, optional=True) in host
    node, notes = plan(c, 8, small.get, host_netns=False)
    assert Write(CONNTRACK_MAX, 262144, optional=True) in node
    assert not any(w.path == HASHSIZE for w in node)
    assert "host-wide" in notes[0]
    # Lowered too (kube-proxy's SetMax writes any other value), never written when equal.
    big = {**KERNEL, CONNTRACK_MAX: 1 << 20}
    assert Write(CONNTRACK_MAX, 262144, optional=True) in plan(c, 8, big.get, host_netns=True)[0]
    same = {**KERNEL, CONNTRACK_MAX: 262144}
    assert not any(w.path == CONNTRACK_MAX for w in plan(c, 8, same.get, host_netns=True)[0])


def test_route_localnet_only_for_iptables_localhost_nodeports() -> None:
    assert localhost_nodeports_by_nat(cfg())
    assert not localhost_nodeports_by_nat(cfg(localhost_nodeports=False))
    assert not localhost_nodeports_by_nat(cfg(proxy_mode="userspace"))
    assert not localhost_nodeports_by_nat(cfg(nodeport_addresses=("198.18.200.0/24",)))
    assert localhost_nodeports_by_nat(cfg(nodeport_addresses=("198.18.200.0/24", "127.0.0.0/8")))
    assert localhost_nodeports_by_nat(cfg(nodeport_addresses=("fd00::/8",)))  # no IPv4 CIDR
    assert not localhost_nodeports_by_nat(cfg(nodeport_primary=True))


def test_apply_required_failure_says_what_to_do(tmp_path) -> None:
    ok = tmp_path / "ok"
    ok.write_text("0\n")
    apply([Write(str(ok), 7)])
    assert ok.read_text() == "7\n"
    apply([Write(str(tmp_path / "missing" / "x"), 1, optional=True)])  # logged, not raised
    with pytest.raises(UsageError, match="--init-only"):
        apply([Write(str(tmp_path / "missing" / "x"), 1)])


def test_nodeport_addresses_primary_keyword() -> None:
    c = parse_args(["--nodeport-addresses", "primary", "--hostname-override", "n"])
    assert c.nodeport_primary and c.nodeport_addresses == ()
    c = parse_args(["--nodeport-addresses", "10.0.0.0/8", "--hostname-override", "n"])
    assert not c.nodeport_primary and c.nodeport_addresses == ("10.0.0.0/8",)
    with pytest.raises(UsageError, match="alone"):
        parse_args(["--nodeport-addresses", "primary,10.0.0.0/8", "--hostname-override", "n"])


def test_nodeport_addresses_primary_in_both_kernel_modes() -> None:
    """`primary` is the Node object's IP of each family (else the default route's source,
    else every address) in the iptables and the nftables mode's render configs."""
    from proxy.iptables.dataplane import IptablesDataPlane, nodeport_cidrs
    from proxy.model import NodeInfo
    from proxy.nftables.dataplane import NftablesDataPlane

    c = cfg(nodeport_primary=True)
    assert nodeport_cidrs(c, 4, "198.18.200.1") == ("198.18.200.1/32",)
    assert nodeport_cidrs(c, 6, "fd00:18::1") == ("fd00:18::1/128",)
    assert nodeport_cidrs(c, 4, "") == () and nodeport_cidrs(c, 4, "127.0.0.1") == ()
    listed = cfg(nodeport_addresses=("10.0.0.0/8", "fd00::/8"))
    assert nodeport_cidrs(listed, 4, "198.18.200.1") == ("10.0.0.0/8",)
    for plane in (IptablesDataPlane(c), NftablesDataPlane(c)):
        plane.node_ips = {4: "198.18.200.9"}  # the default route's source
        assert plane.render_config(4).nodeport_addresses == ("198.18.200.9/32",)
        plane.node = NodeInfo(addresses=("198.18.200.1", "fd00:18::1"))
        assert plane.render_config(4).nodeport_addresses == ("198.18.200.1/32",)
        assert plane.render_config(6).nodeport_addresses == ("fd00:18::1/128",)
        assert plane.render_config(4).node_ip == "198.18.200.1"
