"""A laptop reaches a cluster's Services through the API server's port-forward.

The virtual cluster: node-a with three web pods, an "apiserver" host on the underlay
that routes to the pods (the test API server runs there as its own process, and dials
the pods itself, as a kubelet would), and two laptops:
- "laptop" reaches only the API server's address (its OUTPUT chain rejects the rest), so
  `auto` must pick port-forward and everything goes through tunnels;
- "devbox" routes the pod range to the node, so `auto` must pick direct access.
The daemon runs on each as `nobody` with a kubeconfig and DNS on 127.0.0.1:5353, as a
developer runs it. Services live in 198.19.50.0/24.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.testbed import Host, ProxyProcess, Testbed, start_backend
from proxy.testbed.apiserver import ApiServerClient, wait_for
from proxy.testbed.backend import download

pytestmark = pytest.mark.kernel

API = "198.18.200.50"
API_PORT = 6443
POD_CIDR = "198.18.1.0/24"
WEB_IPS = {"web-1": "198.18.1.11", "web-2": "198.18.1.12", "web-3": "198.18.1.13"}
NAME = "web.default.svc.cluster.local"


@dataclass
class Site:
    tb: Testbed
    api: ApiServerClient
    laptop: Host
    devbox: Host
    kubeconfig: Path


def pod(name: str, ip: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": "node-a", "containers": [{"name": "web", "image": "web"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def service(name: str, ip: str, port: int, proto: str = "TCP") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": port, "protocol": proto}]},
    }


def slice_(service: str, port: int, pods: list[str], proto: str = "TCP") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-abc",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": port, "protocol": proto}],
        "endpoints": [
            {
                "addresses": [WEB_IPS[p]],
                "conditions": {"ready": True},
                "nodeName": "node-a",
                "targetRef": {"kind": "Pod", "namespace": "default", "name": p},
            }
            for p in pods
        ],
    }


WEBS = list(WEB_IPS)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with Testbed(workdir=tmp_path_factory.mktemp("portforward")) as tb:
        node = tb.add_node("node-a", underlay_ip="198.18.200.1", pod_cidr=POD_CIDR)
        for name, ip in WEB_IPS.items():
            web = tb.add_pod(node, name, ip)
            start_backend(web, 8080, proto="http")
            start_backend(web, 7070, proto="tcp")
            start_backend(web, 7007, proto="udp")
        apihost = tb.add_external("apiserver", API)
        apihost.route(POD_CIDR, via=node.ip)
        laptop = tb.add_external("laptop", "198.18.200.60")
        # The laptop reaches the API server and nothing else of the cluster.
        laptop.exec(
            ["iptables-restore"],
            input="*filter\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -o lo -j ACCEPT\n"
            f"-A OUTPUT -d {API}/32 -p tcp --dport {API_PORT} -j ACCEPT\n"
            "-A OUTPUT -j REJECT --reject-with icmp-net-prohibited\nCOMMIT\n",
        )
        devbox = tb.add_external("devbox", "198.18.200.61")
        devbox.route(POD_CIDR, via=node.ip)

        # The kubeconfig must be readable by `nobody`.
        conf_dir = Path(tempfile.mkdtemp(prefix="kpt-portforward-"))
        os.chmod(conf_dir, 0o755)
        kubeconfig = conf_dir / "kubeconfig"
        proc = apihost.python(
            ["-m", "proxy.testbed.apiserver", "--listen", f"{API}:{API_PORT}",
             "--kubeconfig", str(kubeconfig)],
            background=True, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"serving on"), "test API server did not start"
        os.chmod(kubeconfig, 0o644)
        api = ApiServerClient(apihost.ns, f"{API}:{API_PORT}")
        api.apply(*(pod(n, ip) for n, ip in WEB_IPS.items()))
        api.apply(
            service("web", "198.19.50.10", 8080),
            slice_("web", 8080, WEBS),
            service("echo", "198.19.50.11", 7070),
            slice_("echo", 7070, WEBS),
            service("dns", "198.19.50.12", 7007, "UDP"),
            slice_("dns", 7007, WEBS, "UDP"),
        )
        try:
            yield Site(tb, api, laptop, devbox, kubeconfig)
        finally:
            shutil.rmtree(conf_dir, ignore_errors=True)


def start_daemon(site: Site, host: Host) -> ProxyProcess:
    px = host.start_proxy(
        [
            "--proxy-mode=userspace",
            "--kubeconfig", str(site.kubeconfig),
            "--dns-bind-address", "127.0.0.1:5353",
            "--healthz-bind-address", "127.0.0.1:10256",
            "--metrics-bind-address", "127.0.0.1:10249",
            "--iptables-min-sync-period", "0.1",
        ],
        user="nobody",
    )  # fmt: skip
    px.wait_ready(timeout=60)
    uid = re.search(r"^Uid:\s+(\d+)", Path(f"/proc/{px.pid}/status").read_text(), re.M)
    assert uid is not None and uid[1] != "0", "the daemon must run unprivileged"
    return px


def lookup(host: Host, name: str = NAME) -> str:
    out = host.exec(["dig", "+short", "+time=2", "+tries=3", "-p", "5353", "@127.0.0.1", name])
    return out.stdout.strip()


def curl(host: Host, ip: str, path: str = "/") -> str:
    url = f"http://{NAME}:8080{path}"
    argv = ["curl", "-sS", "--max-time", "20", "--resolve", f"{NAME}:8080:{ip}", url]
    return host.exec(argv, timeout=30).stdout


def test_laptop_reaches_services_through_port_forward(site: Site) -> None:
    laptop = site.laptop
    px = start_daemon(site, laptop)
    try:
        logs = px.logs()
        assert "laptop mode (not running as root)" in logs
        assert "endpoint access: port-forward through the API server at http://" in logs
        assert "(auto: endpoints unreachable (198.18.1." in logs
        assert "default/dns:p/UDP: not served: UDP cannot be tunnelled" in logs

        # DNS answers the Service's laptop address; 20 requests reach every backend.
        ip = lookup(laptop)
        assert re.fullmatch(r"127\.\d+\.\d+\.\d+", ip), ip
        got = Counter(curl(laptop, ip).strip() for _ in range(20))
        assert set(got) == set(WEBS), got
        assert all(n >= 4 for n in got.values()), got
        assert set(site.api.stats()["portforwards"]) == {f"default/{w}" for w in WEBS}

        # A 5 MB download arrives intact.
        n = 5 * 1024 * 1024
        head_body = laptop.exec(
            ["sh", "-c", f"curl -sS --max-time 20 --resolve {NAME}:8080:{ip} -D - "
             f"-o /tmp/kpt-dl-$$ http://{NAME}:8080/bytes/{n} && sha256sum /tmp/kpt-dl-$$ "
             "&& rm -f /tmp/kpt-dl-$$"],
            timeout=60,
        ).stdout  # fmt: skip
        sent = re.search(r"(?im)^x-sha256: ([0-9a-f]{64})", head_body)
        assert sent is not None, head_body
        assert f"{sent[1]}  /tmp/kpt-dl-" in head_body, head_body
        assert sent[1] == hashlib.sha256(download(n)).hexdigest()

        # A tunnel that breaks mid-connection ends that connection; the next one works.
        with socket_in(laptop) as s:
            s.settimeout(20)
            echo_ip = lookup(laptop, "echo.default.svc.cluster.local")
            s.connect((echo_ip, 7070))
            assert s.recv(64).strip() in {w.encode() for w in WEBS}
            assert site.api.drop_portforwards() >= 1
            with pytest.raises(ConnectionResetError):  # a reset, not a clean end
                while s.recv(64):
                    pass
        assert curl(laptop, ip).strip() in WEBS

        # An endpoint removed from the Service gets no new connections within 5 s.
        site.api.apply(slice_("web", 8080, WEBS[:2]))
        wait_for(
            lambda: {curl(laptop, ip).strip() for _ in range(6)} <= set(WEBS[:2]),
            "web-3 to leave the Service",
            timeout=5,
        )
        assert {curl(laptop, ip).strip() for _ in range(6)} <= set(WEBS[:2])
    finally:
        site.api.apply(slice_("web", 8080, WEBS))
        px.stop()
    assert px.returncode == 0, px.log_tail()


def test_auto_goes_direct_where_pods_are_routable(site: Site) -> None:
    before = site.api.stats()["portforwards"]
    px = start_daemon(site, site.devbox)
    try:
        assert "endpoint access: direct (auto: endpoints answer directly (198.18.1." in px.logs()
        ip = lookup(site.devbox)
        assert {curl(site.devbox, ip).strip() for _ in range(6)} == set(WEBS)
        assert site.api.stats()["portforwards"] == before  # no tunnel was opened
    finally:
        px.stop()
    assert px.returncode == 0, px.log_tail()


def socket_in(host: Host) -> socket.socket:
    return host.socket(socket.AF_INET, socket.SOCK_STREAM)
