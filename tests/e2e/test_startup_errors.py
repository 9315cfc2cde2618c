"""A daemon that stops on a user error must not have touched the node first."""

from __future__ import annotations

import sys

import pytest

from proxy.testbed import Testbed

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kubeconfig", "/definitely/not/here"], "--kubeconfig: cannot read"),
        (["--healthz-bind-address", "198.18.99.99:10256"], "no such local address"),
        (["--dns-bind-address", "198.18.99.99:53"], "--dns-bind-address"),
    ],
)
def test_user_error_exits_2_before_programming_anything(
    testbed: Testbed, tmp_path, args: list[str], message: str
) -> None:
    node = testbed.add_node("node-a", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
    manifests = tmp_path / "m"
    manifests.mkdir()
    base = [] if "--kubeconfig" in args else ["--manifests", str(manifests)]
    r = node.exec([sys.executable, "-m", "proxy", *base, *args], check=False, timeout=60)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kube-proxy-py: error:") and message in last, r.stderr
    assert "Traceback" not in r.stderr
    for save in ("iptables-save", "ip6tables-save"):
        out = node.exec([save], check=False).stdout
        assert "KUBE-" not in out, f"{save} in the node after a failed start:\n{out}"


def test_cleanup_without_privileges_fails_instead_of_claiming_success(testbed: Testbed) -> None:
    node = testbed.add_node("node-a", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
    # Not root; dac_read_search only so the interpreter under /root can be read.
    drop = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]  # fmt: skip
    r = node.exec([*drop, sys.executable, "-m", "proxy", "--cleanup"], check=False, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "needs CAP_NET_ADMIN" in r.stderr.strip().splitlines()[-1]
    assert "cleanup done" not in r.stderr
