"""Which connections keep the client's address (pure: proxy/userspace/transparent.py)."""

from __future__ import annotations

import pytest

from proxy.model import Endpoint
from proxy.userspace.transparent import CHAIN, SourcePolicy, mangle_rules

LOCAL = Endpoint("198.18.1.11", 8080, node_name="node-a")
REMOTE = Endpoint("198.18.2.10", 8080, node_name="node-b")
NODE = "198.18.200.1"


def policy(**kw) -> SourcePolicy:
    kw.setdefault("local_ips", [NODE, "10.0.0.1"])
    return SourcePolicy("node-a", ["198.18.0.0/16"], **kw)


@pytest.mark.parametrize(
    ("client", "ep", "external", "keep", "why"),
    [
        ("198.18.1.100", LOCAL, False, True, "a pod, endpoint here"),
        ("198.18.1.100", REMOTE, False, True, "a pod, its node routes replies back here"),
        ("203.0.113.7", LOCAL, True, True, "outside, NodePort, endpoint here"),
        ("203.0.113.7", REMOTE, True, False, "outside, NodePort, endpoint elsewhere"),
        ("203.0.113.7", REMOTE, False, False, "ClusterIP from outside the cluster CIDR"),
        ("203.0.113.7", LOCAL, False, True, "…to an endpoint here: replies come back"),
        ("198.18.1.11", LOCAL, False, False, "hairpin"),
        (NODE, LOCAL, False, False, "the node itself"),
        ("127.0.0.1", LOCAL, True, False, "loopback NodePort"),
    ],
)
def test_preserve(client: str, ep: Endpoint, external: bool, keep: bool, why: str) -> None:
    assert policy().preserve(client, ep, external) is keep, why


def test_masquerade_all_and_no_cluster_cidr() -> None:
    assert not policy(masquerade_all=True).preserve("198.18.1.100", LOCAL, False)
    # Without --cluster-cidr every ClusterIP client is taken for a pod (kube-proxy does
    # not masquerade then either).
    anywhere = SourcePolicy("node-a")
    assert anywhere.preserve("203.0.113.7", REMOTE, False)
    assert not anywhere.preserve("203.0.113.7", REMOTE, True)
    # An endpoint without a node name is not known to be here.
    assert not anywhere.preserve("203.0.113.7", Endpoint("198.18.9.9", 80), True)


def test_mangle_rule_marks_replies_to_transparent_sockets_only() -> None:
    text = mangle_rules()
    assert text.startswith("*mangle\n") and text.endswith("COMMIT\n")
    assert f":{CHAIN} - [0:0]\n-F {CHAIN}\n" in text  # idempotent: flushed, then filled
    rule = next(line for line in text.splitlines() if line.startswith("-A"))
    assert "-m addrtype ! --dst-type LOCAL -m socket --transparent" in rule
    assert rule.endswith("-j MARK --set-xmark 0x2000/0x2000")
