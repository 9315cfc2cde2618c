"""The iptables applier against a real kernel, inside throwaway network namespaces.

The data plane runs in a driver process started with `ip netns exec NODE`, so it and
every iptables/conntrack command it runs stay in the node's namespace; the test's own
iptables commands go through `ip netns exec` too. Nothing touches the host namespace.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.iptables import names
from proxy.testbed import Node, Testbed, start_backend

pytestmark = pytest.mark.kernel

WEB = ("default", "web")
API = ("default", "api")


def svc(key, ip, port=80, proto="TCP", pname="http", node_port=0) -> dict[str, Any]:
    return {"ns": key[0], "name": key[1], "ips": [ip], "ports": [[pname, proto, port, node_port]]}


def model(*services: tuple[dict, list[tuple[str, int]]], proto="TCP", pname="http") -> dict:
    out: dict[str, Any] = {"services": [], "endpoints": {}}
    for s, eps in services:
        out["services"].append(s)
        out["endpoints"][f"{s['ns']}/{s['name']}"] = [[pname, proto, ip, p, True] for ip, p in eps]
    return out


def two_services(api_ep: str = "198.18.1.20") -> dict:
    return model(
        (svc(WEB, "198.19.0.1"), [("198.18.1.10", 8080)]),
        (svc(API, "198.19.0.2"), [(api_ep, 8080)]),
    )


def chains_of(key, port_name="http", proto="tcp") -> str:
    return names.service_chain(f"{key[0]}/{key[1]}:{port_name}", proto)


def sep_of(key, ep: str, port_name="http", proto="tcp") -> str:
    return names.endpoint_chain(f"{key[0]}/{key[1]}:{port_name}", proto, ep)


class Driver:
    """The JSON-lines driver (tests/e2e/iptables_driver.py) running inside a node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.log = node.tb.workdir / f"driver-{node.name}-{time.monotonic_ns()}.log"
        with open(self.log, "ab") as err:
            self.proc = node.run(
                [sys.executable, "-m", "tests.e2e.iptables_driver"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )

    def call(self, op: str, timeout: float = 60, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"driver gave no answer to {op}; log:\n{self.log.read_text()}")
        return json.loads(line)

    def ok(self, op: str, **kw: Any) -> dict[str, Any]:
        reply = self.call(op, **kw)
        assert reply["ok"], f"{op} failed: {reply}\n{self.log.read_text()[-3000:]}"
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def node(testbed: Testbed) -> Node:
    return testbed.add_node("a", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")


@pytest.fixture
def driver(node: Node) -> Iterator[Driver]:
    d = Driver(node)
    try:
        yield d
    finally:
        d.close()


def save(node: Node, binary: str = "iptables-nft-save", table: str | None = None) -> str:
    argv = [binary, *(["-t", table] if table else [])]
    out = node.exec(argv).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


def rules_of(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def declared(text: str) -> set[str]:
    return {line[1:].split()[0] for line in text.splitlines() if line.startswith(":")}


def start(driver: Driver, backend: str = "nft", ipv6: str = "off", **cfg: Any) -> dict:
    cfg = {"hostname": "node", "iptables_backend": backend, "ipv6": ipv6, **cfg}
    return driver.ok("start", cfg=cfg)


# -- syncs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_full_sync_programs_chains_and_jumps(node: Node, driver: Driver, backend: str) -> None:
    reply = start(driver, backend, ipv6="auto")
    assert reply["backends"]["4"] == f"iptables-{backend}"
    driver.ok("sync", model=two_services(), full=True)

    nat = save(node, f"iptables-{backend}-save", "nat")
    svc_web, sep_web = chains_of(WEB), sep_of(WEB, "198.18.1.10:8080")
    assert {"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", svc_web, sep_web} <= declared(
        nat
    )
    assert any(
        "-d 198.19.0.1/32" in r and f"-j {svc_web}" in r for r in rules_of(nat, "KUBE-SERVICES")
    )
    assert any("--to-destination 198.18.1.10:8080" in r for r in rules_of(nat, sep_web))
    for builtin in ("PREROUTING", "OUTPUT"):
        assert rules_of(nat, builtin) == [
            f'-A {builtin} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
        ]
    assert len(rules_of(nat, "POSTROUTING")) == 1
    filt = save(node, f"iptables-{backend}-save", "filter")
    assert any("-j KUBE-FORWARD" in r for r in rules_of(filt, "FORWARD"))
    assert "KUBE-IPTABLES-HINT" in declared(save(node, f"iptables-{backend}-save", "mangle"))
    # IPv6 works in the namespace, so ip6tables got the base chains too.
    assert "KUBE-SERVICES" in declared(save(node, f"ip6tables-{backend}-save", "nat"))
    # Nothing leaked into the other backend.
    other = "legacy" if backend == "nft" else "nft"
    assert "KUBE-SERVICES" not in save(node, f"iptables-{other}-save")

    # A second full sync keeps exactly one copy of each jump.
    driver.ok("sync", model=two_services(), full=True)
    nat2 = save(node, f"iptables-{backend}-save", "nat")
    assert len(rules_of(nat2, "PREROUTING")) == 1
    m = driver.ok("metrics")
    assert m["total_nat"] and m["total_nat"] > 0


def test_partial_sync_rewrites_only_the_changed_service(node: Node, driver: Driver) -> None:
    start(driver)
    driver.ok("sync", model=two_services("198.18.1.20"), full=True)
    before = save(node, table="nat")

    reply = driver.ok("sync", model=two_services("198.18.1.21"), changed=["default/api"])
    after = save(node, table="nat")

    # The restore input named only the changed Service's chains (plus the top-level ones).
    text = reply["texts"]["4"]
    assert chains_of(API) in declared(text)
    assert chains_of(WEB) not in declared(text)
    assert sep_of(WEB, "198.18.1.10:8080") not in declared(text)
    # In the kernel: web's chains are untouched, api's moved to the new endpoint.
    for chain in (chains_of(WEB), sep_of(WEB, "198.18.1.10:8080")):
        assert rules_of(before, chain) and rules_of(before, chain) == rules_of(after, chain)
    old_sep, new_sep = sep_of(API, "198.18.1.20:8080"), sep_of(API, "198.18.1.21:8080")
    assert old_sep in declared(before) and old_sep not in declared(after)
    assert any("--to-destination 198.18.1.21:8080" in r for r in rules_of(after, new_sep))
    assert rules_of(after, chains_of(API)) == [
        f'-A {chains_of(API)} -m comment --comment "default/api:http -> 198.18.1.21:8080" '
        f"-j {new_sep}"
    ]


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_failed_restore_keeps_old_rules_and_raises(
    node: Node, driver: Driver, backend: str
) -> None:
    start(driver, backend)
    driver.ok("sync", model=two_services("198.18.1.20"), full=True)
    before = save(node, f"iptables-{backend}-save")
    m0 = driver.ok("metrics")

    driver.ok("inject", line="-A KUBE-SERVICES -j KUBE-NO-SUCH-CHAIN")
    reply = driver.call("sync", model=two_services("198.18.1.21"), changed=["default/api"])
    assert not reply["ok"]
    assert reply["type"] == "RestoreError"
    assert "table nat" in reply["error"] and "KUBE-NO-SUCH-CHAIN" in reply["error"]
    assert "\n" not in reply["error"]
    # The kernel still holds the previous rules, untouched: nothing was flushed.
    assert save(node, f"iptables-{backend}-save") == before
    m1 = driver.ok("metrics")
    key = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
    assert m1[key] == m0[key] + 1
    pkey = "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total"
    assert m1[pkey] == m0[pkey] + 1

    # The runner's retry is a full sync; it succeeds and programs the change.
    reply = driver.ok("sync", model=two_services("198.18.1.21"), full=True)
    assert chains_of(WEB) in declared(reply["texts"]["4"])  # it was full
    after = save(node, f"iptables-{backend}-save", "nat")
    assert sep_of(API, "198.18.1.21:8080") in declared(after)
    assert sep_of(API, "198.18.1.20:8080") not in declared(after)


def test_chunked_full_sync_failing_in_a_chunk_keeps_rules_and_retries(
    node: Node, driver: Driver
) -> None:
    """nft: a full sync restores whole Services in chunks, the next chunk written while the
    current one loads. A chunk that fails stops the sync there: earlier chunks are in,
    later ones and the top level are not, nothing is flushed, every jump still resolves,
    and the retry (a full sync) programs everything."""
    keys = [("default", f"s{i}") for i in range(8)]

    def eight(ep_base: int) -> dict:
        return model(
            *((svc(k, f"198.19.0.{i + 1}"), [(f"198.18.1.{ep_base + i}", 8080)])
              for i, k in enumerate(keys))
        )  # fmt: skip

    start(driver, "nft")
    driver.ok("chunks", chains=4)  # 2 Services (SVC + SEP each) per restore: 4 chunks
    reply = driver.ok("sync", model=eight(10), full=True)
    nat = save(node, "iptables-nft-save", "nat")
    for i, k in enumerate(keys):
        assert chains_of(k) not in declared(reply["texts"]["4"])  # in a chunk, not the text
        sep = sep_of(k, f"198.18.1.{10 + i}:8080")
        assert rules_of(nat, chains_of(k))[-1].endswith(f"-j {sep}")
    before = nat
    m0 = driver.ok("metrics")

    driver.ok("inject", line="-A KUBE-MARK-MASQ -j KUBE-NO-SUCH-CHAIN", chunk=2)
    reply = driver.call("sync", model=eight(30), full=True)
    assert not reply["ok"] and reply["type"] == "RestoreError"
    assert "KUBE-NO-SUCH-CHAIN" in reply["error"]
    nat = save(node, "iptables-nft-save", "nat")
    have = declared(nat)
    for i, k in enumerate(keys):
        old, new = sep_of(k, f"198.18.1.{10 + i}:8080"), sep_of(k, f"198.18.1.{30 + i}:8080")
        assert old in have  # stale chains go with the top level, which did not run
        assert (new in have) == (i < 4), k  # chunks 0 and 1 only
        assert rules_of(nat, chains_of(k))[-1].endswith(f"-j {new if i < 4 else old}")
    assert rules_of(nat, "KUBE-SERVICES") == rules_of(before, "KUBE-SERVICES")
    for line in nat.splitlines():  # every jump resolves
        if line.startswith("-A ") and " -j KUBE-" in line:
            assert line.rsplit("-j ", 1)[1].split()[0] in have, line
    m1 = driver.ok("metrics")
    key = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
    assert m1[key] == m0[key] + 1

    driver.ok("sync", model=eight(30), full=True)  # the runner's retry
    nat = save(node, "iptables-nft-save", "nat")
    for i, k in enumerate(keys):
        assert sep_of(k, f"198.18.1.{10 + i}:8080") not in declared(nat)
        sep = sep_of(k, f"198.18.1.{30 + i}:8080")
        assert rules_of(nat, chains_of(k))[-1].endswith(f"-j {sep}")


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_a_chain_held_by_a_rule_outside_the_product(
    node: Node, driver: Driver, backend: str
) -> None:
    """Deleting a Service whose chain a rule of somebody else's still jumps to: the
    restore fails, and the log names the line, the chain, the rule, iptables' reason and
    what holds it, in the kernel's own words (bug 7: nft used to give "unknown place").
    The sync still succeeds (the chain is flushed and kept) so later changes are
    programmed; once nothing jumps to the chain, a periodic sync deletes it."""
    start(driver, backend)
    driver.ok("sync", model=two_services(), full=True)
    api, ipt = chains_of(API), f"iptables-{backend}"
    node.exec([ipt, "-t", "nat", "-N", "FOREIGN"])
    node.exec([ipt, "-t", "nat", "-A", "FOREIGN", "-d", "198.19.0.2/32", "-j", api])
    only_web = model((svc(WEB, "198.19.0.1"), [("198.18.1.10", 8080)]))
    m0 = driver.ok("metrics")

    reply = driver.ok("sync", model=only_web, changed=["default/api"])
    lineno = reply["texts"]["4"].splitlines().index(f"-X {api}") + 1
    warning = next(ln for ln in driver.log.read_text().splitlines() if "holds the chain" in ln)
    assert (
        f"iptables-{backend}: iptables-restore failed (table nat, chain {api}, line {lineno})"
        in warning
    ), warning
    assert f"[rule: -X {api}] [still referenced by: -A FOREIGN -d 198.19.0.2/32 -j {api}]" in (
        warning
    )
    if backend == "nft":
        assert f"line {lineno}): CHAIN_DEL failed (Device or resource busy) [rule:" in warning
    key = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
    assert driver.ok("metrics")[key] == m0[key] + 1
    nat = save(node, f"{ipt}-save", "nat")
    assert api in declared(nat) and not rules_of(nat, api)  # flushed, kept
    assert sep_of(API, "198.18.1.20:8080") not in declared(nat)  # the rest went
    assert not any(api in r for r in rules_of(nat, "KUBE-SERVICES"))

    # Later changes are programmed (nothing blocks), and the held chain stays meanwhile.
    moved = model((svc(WEB, "198.19.0.1"), [("198.18.1.11", 8080)]))
    driver.ok("sync", model=moved, changed=["default/web"])
    driver.ok("sync", model=moved)  # periodic: tries the held chain again
    nat = save(node, f"{ipt}-save", "nat")
    assert sep_of(WEB, "198.18.1.11:8080") in declared(nat) and api in declared(nat)

    # The obstacle goes: the next periodic sync deletes the chain.
    node.exec([ipt, "-t", "nat", "-F", "FOREIGN"])
    driver.ok("sync", model=moved)
    assert api not in declared(save(node, f"{ipt}-save", "nat"))
    assert f"deleted chain nat/{api}: nothing jumps to it any more" in driver.log.read_text()


def test_full_sync_restores_flushed_jumps(node: Node, driver: Driver) -> None:
    start(driver)
    driver.ok("sync", model=two_services(), full=True)
    node.exec(["iptables-nft", "-t", "nat", "-F", "PREROUTING"])  # e.g. a firewall reload
    driver.ok("sync", model=two_services(), full=True)
    assert rules_of(save(node, table="nat"), "PREROUTING") == [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
    ]
    assert "were missing and were re-added" in driver.log.read_text()


def test_a_partial_sync_after_a_failure_is_made_full(node: Node, driver: Driver) -> None:
    start(driver)
    driver.ok("sync", model=two_services(), full=True)
    driver.ok("inject", line="-A KUBE-SERVICES -j KUBE-NO-SUCH-CHAIN")
    assert not driver.call("sync", model=two_services("198.18.1.22"), changed=["default/api"])["ok"]
    # Even if asked for a partial sync, the data plane no longer trusts its state.
    reply = driver.ok("sync", model=two_services("198.18.1.22"), changed=["default/api"])
    assert chains_of(WEB) in declared(reply["texts"]["4"])


def test_full_sync_removes_stale_and_leftover_chains(node: Node, driver: Driver) -> None:
    # Leftovers of an earlier run (or of kube-proxy) that no Service needs any more.
    leftover_svc, leftover_sep = "KUBE-SVC-LEFTOVER00000000", "KUBE-SEP-LEFTOVER00000000"
    for argv in (
        ["-N", leftover_sep],
        ["-N", leftover_svc],
        ["-A", leftover_svc, "-j", leftover_sep],
        ["-N", "MY-OWN-CHAIN"],
    ):
        node.exec(["iptables-nft", "-t", "nat", *argv])
    start(driver)
    driver.ok("sync", model=two_services(), full=True)
    nat = declared(save(node, table="nat"))
    assert leftover_svc not in nat and leftover_sep not in nat
    assert "MY-OWN-CHAIN" in nat  # not ours: kept
    assert chains_of(API) in nat

    # api deleted; the next full sync removes its chains.
    only_web = model((svc(WEB, "198.19.0.1"), [("198.18.1.10", 8080)]))
    driver.ok("sync", model=only_web, full=True)
    nat = declared(save(node, table="nat"))
    assert chains_of(API) not in nat and sep_of(API, "198.18.1.20:8080") not in nat
    assert chains_of(WEB) in nat


# -- cleanup --------------------------------------------------------------------------------


def kube_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith(":KUBE-") or ("-j KUBE-" in line and line.startswith("-A "))
    ]


def test_cleanup_removes_every_chain_and_jump_in_both_backends(node: Node, driver: Driver) -> None:
    start(driver, ipv6="auto")
    driver.ok("sync", model=two_services(), full=True)
    # kube-proxy leftovers in the other backend, and rules that are not ours.
    for argv in (
        ["iptables-legacy", "-t", "nat", "-N", "KUBE-SERVICES"],
        ["iptables-legacy", "-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
        ["iptables-legacy", "-t", "filter", "-N", "KUBE-FORWARD"],
        ["iptables-legacy", "-t", "filter", "-A", "FORWARD", "-j", "KUBE-FORWARD"],
        ["iptables-nft", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"],  # noqa: E501
        ["iptables-nft", "-t", "nat", "-N", "MY-CHAIN"],
        ["iptables-nft", "-t", "nat", "-A", "MY-CHAIN", "-j", "KUBE-SERVICES"],
    ):  # fmt: skip
        node.exec(argv)

    driver.ok("cleanup")
    for binary in (
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ):
        assert kube_lines(save(node, binary)) == [], binary
    nft = save(node, "iptables-nft-save")
    assert "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT" in nft
    assert ":MY-CHAIN - [0:0]" in nft

    driver.ok("cleanup")  # idempotent: nothing left, still fine


def test_cleanup_with_nothing_there_is_fine(node: Node, driver: Driver) -> None:
    driver.ok("cleanup")
    assert kube_lines(save(node)) == []


# -- backend detection ----------------------------------------------------------------------


def test_backend_detection(node: Node, driver: Driver) -> None:
    assert driver.ok("detect")["mode"] == "nft"  # nothing anywhere: nft
    node.exec(["iptables-legacy", "-t", "nat", "-N", "KUBE-SERVICES"])
    node.exec(["iptables-legacy", "-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"])
    assert driver.ok("detect")["mode"] == "legacy"

    reply = start(driver, backend="auto")
    assert reply["backends"]["4"] == "iptables-legacy"
    driver.ok("sync", model=two_services(), full=True)
    assert chains_of(WEB) in declared(save(node, "iptables-legacy-save", "nat"))
    assert kube_lines(save(node, "iptables-nft-save")) == []

    # kubelet's hint outranks rule counts.
    node.exec(["iptables-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"])
    node.exec(["iptables-legacy", "-t", "mangle", "-X", "KUBE-IPTABLES-HINT"])
    assert driver.ok("detect")["mode"] == "nft"


# -- conntrack ------------------------------------------------------------------------------


def udp_ask(sock: socket.socket, ip: str, port: int, payload: bytes) -> str:
    sock.sendto(payload, (ip, port))
    data, _ = sock.recvfrom(65536)
    assert data.endswith(b":" + payload), data
    return data[: -len(payload) - 1].decode()


def test_udp_flow_to_a_removed_endpoint_is_deleted(
    testbed: Testbed, node: Node, driver: Driver
) -> None:
    ep1 = testbed.add_pod(node, "ep1", "198.18.1.2")
    ep2 = testbed.add_pod(node, "ep2", "198.18.1.3")
    client = testbed.add_pod(node, "client", "198.18.1.9")
    start_backend(ep1, 5353, proto="udp")
    start_backend(ep2, 5353, proto="udp")
    dns = svc(("kube-system", "dns"), "198.19.0.53", 53, "UDP", "dns")
    start(driver)
    driver.ok("sync", model=model((dns, [(ep1.ip, 5353)]), proto="UDP", pname="dns"), full=True)

    with client.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.bind((client.ip, 40000))  # one 5-tuple: one conntrack entry for every datagram
        assert udp_ask(s, "198.19.0.53", 53, b"q1") == "ep1"

        listing = node.exec(["conntrack", "-L", "-p", "udp", "--orig-dst", "198.19.0.53"])
        assert f"src={ep1.ip}" in listing.stdout

        # ep1 stops being an endpoint (it keeps running, so a stale entry would still
        # answer): the entry must go, and the same 5-tuple now reaches ep2.
        new = model((dns, [(ep2.ip, 5353)]), proto="UDP", pname="dns")
        driver.ok("sync", model=new, changed=["kube-system/dns"])
        listing = node.exec(["conntrack", "-L", "-p", "udp", "--orig-dst", "198.19.0.53"])
        assert f"src={ep1.ip}" not in listing.stdout
        assert udp_ask(s, "198.19.0.53", 53, b"q2") == "ep2"


def test_takeover_finds_the_nftables_modes_tables_by_netlink(node: Node) -> None:
    """The iptables mode's first sync looks the nftables mode's tables up in the kernel's
    list of tables (nft would fetch the whole ruleset first) and deletes only those."""
    code = (
        "import asyncio\n"
        "from proxy.nftables.dataplane import remove_tables_on_takeover, tables_present\n"
        "print(tables_present())\n"
        "asyncio.run(remove_tables_on_takeover())\n"
        "print(tables_present())\n"
    )
    assert node.python(code).stdout.split("\n")[:2] == ["()", "()"]
    node.exec(["nft", "add", "table", "ip6", "kube-proxy"])
    node.exec(["nft", "add", "table", "ip", "other"])
    assert node.python(code).stdout.split("\n")[:2] == ["(6,)", "()"]
    tables = node.exec(["nft", "list", "tables"]).stdout.split("\n")
    assert "table ip other" in tables and "table ip6 kube-proxy" not in tables
