"""Helpers for the iptables-mode end-to-end tests: manifests, daemon flags, traffic, waits.

Not a conftest: the test modules import what they use. Everything acts inside testbed
namespaces only.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.testbed import BadReply, Host, Node, ProxyExited, ProxyProcess, client_request

T = TypeVar("T")

CLUSTER_CIDR = "198.18.0.0/16"
HEALTHZ_PORT = 10256
SERVICE_LABEL = "kubernetes.io/service-name"
TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"

# What a failed attempt in `until_synced` may raise before the rules are in place.
RETRYABLE = (AssertionError, OSError, BadReply)


# -- objects -------------------------------------------------------------------------------


def service(
    name: str,
    cluster_ip: str | Sequence[str],
    ports: Sequence[dict[str, Any]],
    *,
    namespace: str = "default",
    **spec: Any,
) -> dict[str, Any]:
    """A Service; `cluster_ip` is one IP or a list (dual stack); spec extras as camelCase."""
    ips = [cluster_ip] if isinstance(cluster_ip, str) else list(cluster_ip)
    body: dict[str, Any] = {"clusterIP": ips[0], "clusterIPs": ips, "ports": list(ports)}
    if len(ips) > 1:
        body["ipFamilyPolicy"] = "RequireDualStack"
        body["ipFamilies"] = ["IPv6" if ":" in ip else "IPv4" for ip in ips]
    body.update(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def port(
    port: int,
    target: int,
    *,
    name: str = "p",
    protocol: str = "TCP",
    node_port: int = 0,
) -> dict[str, Any]:
    p: dict[str, Any] = {"name": name, "port": port, "targetPort": target, "protocol": protocol}
    if node_port:
        p["nodePort"] = node_port
    return p


def endpoint_slice(
    service_name: str,
    endpoints: Iterable[Host | tuple[str, str]],
    *,
    port: int,
    name: str | None = None,
    port_name: str = "p",
    protocol: str = "TCP",
    namespace: str = "default",
    ipv6: bool = False,
    trigger_time: float | None = None,
) -> dict[str, Any]:
    """An EndpointSlice of SERVICE_NAME; endpoints are pods (their node is the endpoint's
    nodeName) or (ip, node name) pairs."""
    eps = []
    for e in endpoints:
        if isinstance(e, Host):
            ip = e.ipv6 if ipv6 else e.ip
            assert ip, f"{e.name} has no IPv{6 if ipv6 else 4} address"
            node = e.node.name if e.node else ""
            ref = {"kind": "Pod", "name": e.name, "namespace": namespace}
            eps.append(
                {
                    "addresses": [ip],
                    "conditions": {"ready": True},
                    "nodeName": node,
                    "targetRef": ref,
                }
            )
        else:
            ip, node = e
            eps.append({"addresses": [ip], "conditions": {"ready": True}, "nodeName": node})
    meta: dict[str, Any] = {
        "name": name or f"{service_name}-{'v6' if ipv6 else 'v4'}",
        "namespace": namespace,
        "labels": {SERVICE_LABEL: service_name},
    }
    if trigger_time is not None:
        stamp = datetime.fromtimestamp(trigger_time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["annotations"] = {TRIGGER_ANNOTATION: stamp}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv6" if ipv6 else "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": protocol}],
        "endpoints": eps,
    }


class ManifestDir:
    """A --manifests directory; each write replaces a file atomically (no half-read)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.path)

    def write(self, fname: str, *objs: dict[str, Any]) -> Path:
        target = self.path / f"{fname}.yaml"
        tmp = self.path / f".{fname}.yaml.tmp"  # hidden: the source ignores it
        tmp.write_text(yaml.safe_dump_all(list(objs), sort_keys=False), encoding="utf-8")
        os.replace(tmp, target)
        return target

    def remove(self, fname: str) -> None:
        (self.path / f"{fname}.yaml").unlink()


# -- the daemon ----------------------------------------------------------------------------


MODES = ("iptables", "nftables")  # the kernel data planes the e2e tests run in both


def proxy_args(
    node: Node,
    *,
    mode: str = "iptables",
    manifests: ManifestDir | Path | str | None = None,
    kubeconfig: Path | str | None = None,
    min_sync: str = "0s",
    cluster_cidr: str = CLUSTER_CIDR,
    extra: Sequence[str] = (),
) -> list[str]:
    """The flags every iptables/nftables e2e daemon runs with (kube-proxy's names)."""
    args = [
        f"--proxy-mode={mode}",
        "--hostname-override",
        node.name,
        "--cluster-cidr",
        cluster_cidr,
        "--iptables-min-sync-period",
        min_sync,
        "--healthz-bind-address",
        f"{node.ip}:{HEALTHZ_PORT}",
    ]
    if manifests is not None:
        args += ["--manifests", str(manifests)]
    if kubeconfig is not None:
        args += ["--kubeconfig", str(kubeconfig)]
    return [*args, *extra]


def cleanup_node(node: Node) -> None:
    """`python -m proxy --cleanup` in NODE; fails loudly when it does not exit 0."""
    p = node.exec([sys.executable, "-m", "proxy", "--cleanup"], check=False, timeout=60)
    assert p.returncode == 0, (
        f"--cleanup on {node.name} exited {p.returncode}:\n{p.stdout}{p.stderr}"
    )


def stop_checked(proxy: ProxyProcess) -> str | None:
    """Stop a daemon; a problem (it had died, or SIGTERM did not end it with 0) as text."""
    if not proxy.alive():
        if proxy.returncode == 0:  # the test stopped it
            return traceback_in(proxy)
        return (
            f"proxy on {proxy.node.name} died during the test (exit {proxy.returncode}):\n"
            f"{proxy.log_tail()}"
        )
    rc = proxy.stop()
    if rc != 0:
        return f"proxy on {proxy.node.name} exited {rc} on SIGTERM:\n{proxy.log_tail()}"
    return traceback_in(proxy)


def failed_syncs(proxy: ProxyProcess) -> str | None:
    """A failed sync is retried as a full one, so traffic checks cannot see it; in the
    nftables mode, where no test provokes one, any is a bug (a transaction nft refused)."""
    lines = [ln for ln in proxy.logs().splitlines() if "sync failed" in ln]
    if not lines:
        return None
    return f"proxy on {proxy.node.name} logged failed syncs:\n" + "\n".join(lines[:5])


def traceback_in(proxy: ProxyProcess) -> str | None:
    """A traceback in the daemon's log is a bug even when the test passed."""
    text = proxy.logs()
    at = text.find("Traceback (most recent call last)")
    if at < 0:
        return None
    start = text.rfind("\n", 0, max(0, at - 1)) + 1
    return (
        f"proxy on {proxy.node.name} logged a traceback ({proxy.log_path}):\n{text[start:][:3000]}"
    )


def until_synced(
    proxies: ProxyProcess | Sequence[ProxyProcess],
    check: Callable[[], T],
    *,
    timeout: float = 20.0,
    what: str = "",
) -> T:
    """check() now, and again after every further sync (of any of PROXIES), until it passes.

    A change made just before may need one sync or two (a Service and its slices can land
    in separate syncs), so the check is retried after each new sync, never on a timer; when
    no further sync comes, the last failure is raised with the daemons' log tails.
    """
    procs = [proxies] if isinstance(proxies, ProxyProcess) else list(proxies)
    deadline = time.monotonic() + timeout
    while True:
        counts = [p.sync_count() for p in procs]
        try:
            return check()
        except RETRYABLE as e:
            last = e
        # Wait for any daemon to log another sync.
        while all(p.sync_count() <= n for p, n in zip(procs, counts, strict=True)):
            for p in procs:
                if not p.alive():
                    raise ProxyExited(
                        f"proxy on {p.node.name} exited with {p.returncode} while a check "
                        f"waited for it to sync:\n{p.log_tail()}"
                    )
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.node.name}:\n{p.log_tail(15)}" for p in procs)
                raise AssertionError(
                    f"{what or 'check'} still failing after the last sync "
                    f"({type(last).__name__}: {last})\n{tails}"
                ) from last
            time.sleep(0.05)


# -- traffic -------------------------------------------------------------------------------


def spread(client: Host, ip: str, port: int, n: int, proto: str = "http") -> Counter[str]:
    """N one-shot requests (a new connection each) → how many each backend answered."""
    return Counter(client_request(client, ip, port, proto, timeout=3) for _ in range(n))


def assert_fair(counts: Counter[str], backends: Iterable[str], *, max_share: float = 0.6) -> None:
    want = set(backends)
    total = sum(counts.values())
    assert set(counts) == want, f"expected answers from exactly {sorted(want)}, got {counts}"
    top, most = counts.most_common(1)[0]
    assert most <= max_share * total, f"{top} got {most}/{total} requests: {counts}"


def refused(
    client: Host, ip: str, port: int, proto: str = "tcp", *, timeout: float = 3
) -> BaseException | None:
    """The error of one request expected to fail (None when it succeeded)."""
    try:
        client_request(client, ip, port, proto, timeout=timeout)
    except (OSError, BadReply) as e:
        return e
    return None


def wait_http(host: Host, ip: str, port: int, path: str = "/", timeout: float = 10):
    """GET from HOST once something listens there: (status, body). The daemon opens
    health check nodePorts right after a sync, so the first attempts may be refused."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return host.http_get(ip, port, path)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class UdpFlow:
    """One UDP 5-tuple: a socket bound to a fixed source port in CLIENT, connected to the
    Service, so every datagram reuses the same conntrack entry."""

    def __init__(self, client: Host, ip: str, port: int, src_port: int) -> None:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.sock = client.socket(fam, socket.SOCK_DGRAM)
        self.sock.bind((client.ipv6 if fam == socket.AF_INET6 else client.ip, src_port))
        self.sock.connect((ip, port))
        self.seq = 0

    def ask(self, timeout: float = 2.0) -> str:
        """Send one datagram, return the name of the backend that echoed it."""
        self.seq += 1
        payload = f"seq-{self.seq}".encode()
        self.sock.settimeout(timeout)
        self.sock.send(payload)
        deadline = time.monotonic() + timeout
        while True:
            data = self.sock.recv(65536)
            if data.endswith(b":" + payload):
                return data[: -len(payload) - 1].decode()
            if time.monotonic() > deadline:  # late answers to earlier datagrams only
                raise TimeoutError(f"no answer to {payload!r}")

    def close(self) -> None:
        self.sock.close()


# -- kernel state and metrics -------------------------------------------------------------


def kube_lines(node: Node, family: int = 4, *, save: str | None = None) -> list[str]:
    """Every line of `iptables-save` (or ip6tables-save) in NODE that mentions KUBE-."""
    binary = save or ("ip6tables-save" if family == 6 else "iptables-save")
    out = node.exec([binary]).stdout
    return [line for line in out.splitlines() if "KUBE-" in line]


def nft_tables(node: Node) -> list[str]:
    """`nft list tables` in NODE: e.g. ["table ip kube-proxy", "table ip6 kube-proxy"]."""
    return [ln.strip() for ln in node.exec(["nft", "list", "tables"]).stdout.splitlines()]


def programmed(node: Node, mode: str) -> str:
    """What the data plane of MODE holds in NODE, as text (iptables-save lines that
    mention KUBE-, or our nftables tables), for checks that something is gone."""
    if mode == "nftables":
        return "\n".join(
            node.exec(["nft", "list", "table", fam, "kube-proxy"], check=False).stdout
            for fam in ("ip", "ip6")
        )
    return "\n".join(kube_lines(node, 4) + kube_lines(node, 6))


def node_addresses(node: Node) -> set[str]:
    out = node.exec(["ip", "-o", "addr", "show"]).stdout
    addrs = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            addrs.add(parts[parts.index("inet") + 1].split("/")[0])
        if "inet6" in parts:
            addrs.add(parts[parts.index("inet6") + 1].split("/")[0])
    return addrs


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text → {(sample name, labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of NAME's samples whose labels include LABELS (0 when there are none)."""
    want = set(labels.items())
    return sum(
        v for (n, lbls), v in metric_samples(text).items() if n == name and want <= set(lbls)
    )
