"""The image as an operator runs it: the DaemonSet's own command from the rendered
manifests, in podman inside a virtual node (`--network ns:/run/netns/<node>`,
`--privileged`, never the host network), with the ConfigMap's file mounted where the
DaemonSet mounts it and a kubeconfig for the test API server (in this process, listening
inside the node). Taking over from kube-proxy and rolling back; a rolling restart that
loses no DNS query, no connection and no byte of a long transfer.

The image is built by `bash .ci/setup image` (or `test`); without it these tests fail.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from proxy.endpoints.parse import merge_slices, parse_service, parse_slice
from proxy.iptables.names import service_chain
from proxy.iptables.render import BASE_JUMPS, RenderConfig, render
from proxy.model import make_model
from proxy.testbed import Host, Node, Testbed, client_request, start_backend
from proxy.testbed.apiserver import ApiServer, wait_for
from proxy.testbed.podman import IMAGE, Containers

from .iptables_helpers import endpoint_slice, port, service

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
NODE = "node-a"
NODE_IP = "198.18.200.1"
WEB_IP, ECHO_IP, GONE_IP = "198.19.50.10", "198.19.50.11", "198.19.50.99"
KUBECONFIG = "/etc/kube-proxy-py-test/kubeconfig"


@dataclass
class Rendered:
    command: list[str]  # the container's command, $(NODE_NAME) expanded
    files: dict[str, str]  # the ConfigMap's data
    mount: str  # where the DaemonSet mounts it
    host_paths: dict[str, str]  # hostPath volumes: host path → container path


def rendered(kustomization: str) -> Rendered:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed (`.ci/setup test` installs it)"
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "manifests" / kustomization)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    objs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    pod = objs["DaemonSet"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    host_paths = {
        vols[n]["hostPath"]["path"]: path for n, path in mounts.items() if "hostPath" in vols[n]
    }
    config_vol = next(n for n, v in vols.items() if "configMap" in v)
    assert vols[config_vol]["configMap"]["name"] == objs["ConfigMap"]["metadata"]["name"]
    return Rendered(
        [a.replace("$(NODE_NAME)", NODE) for a in c["command"]],
        objs["ConfigMap"]["data"],
        mounts[config_vol],
        host_paths,
    )


@dataclass
class Site:
    tb: Testbed
    node: Node
    webs: list[Host]
    client: Host
    api: ApiServer
    pods: Containers
    work: Path

    def start(self, kustomization: str, *extra: str, name: str = "") -> str:
        """The DaemonSet's container, as the kubelet would start it; its ID."""
        r = rendered(kustomization)
        conf = self.work / f"config-{kustomization.replace('/', '-') or 'base'}"
        conf.mkdir(exist_ok=True)
        for fname, text in r.files.items():
            (conf / fname).write_text(text)
        mounts = {str(conf): f"{r.mount}:ro", str(self.work / "kubeconfig"): f"{KUBECONFIG}:ro"}
        for host, path in r.host_paths.items():
            if host == "/run/xtables.lock":
                Path(host).touch()  # hostPath type FileOrCreate
            if Path(host).exists():  # this machine has no /lib/modules
                mounts[host] = path
        return self.pods.run(
            self.node.ns,
            IMAGE,
            [f"--kubeconfig={KUBECONFIG}", *extra],
            command=r.command,
            mounts=mounts,
            env={"NODE_NAME": NODE},
            name=name or None,
        )

    def wait_ready(self, cid: str, syncs: int = 1) -> None:
        def ready() -> bool:
            assert self.pods.running(cid), f"container exited:\n{self.pods.logs(cid)[-3000:]}"
            return self.pods.logs(cid).count(" synced ") >= syncs and self.healthz() == 200

        wait_for(ready, f"container {cid[:12]} ready", timeout=90, interval=0.2)

    def healthz(self) -> int:
        try:
            return self.node.http_get("127.0.0.1", 10256, "/healthz", timeout=2)[0]
        except OSError:
            return 0

    def iptables_save(self) -> str:
        return self.node.exec(["iptables-save"]).stdout

    def cleanup_with_image(self) -> None:
        """Rollback step: the image's own `kube-proxy-py --cleanup` on the node."""
        p = self.pods.exec_once(self.node.ns, IMAGE, ["--cleanup"])
        assert p.returncode == 0, p.stdout


def _image_built() -> None:
    p = subprocess.run(["podman", "image", "exists", IMAGE], capture_output=True)
    if p.returncode != 0:
        pytest.fail(f"{IMAGE} is not built: run `bash .ci/setup image` first", pytrace=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    _image_built()
    work = tmp_path_factory.mktemp("container")
    with Testbed(workdir=work) as tb, Containers(work) as pods:
        node = tb.add_node(NODE, underlay_ip=NODE_IP, pod_cidr="198.18.1.0/24")
        webs = [tb.add_pod(node, f"web-{i}", f"198.18.1.1{i}") for i in (1, 2)]
        client = tb.add_pod(node, "client", "198.18.1.100")
        for w in webs:
            start_backend(w, 8080, proto="http")
            start_backend(w, 9000, proto="tcp")
        api = ApiServer()
        for name, ip, target in (("web", WEB_IP, 8080), ("echo", ECHO_IP, 9000)):
            api.apply(service(name, ip, [port(80 if name == "web" else 7, target)]))
            api.apply(endpoint_slice(name, webs, port=target))
        sock = node.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        api.start(sock=sock)
        api.kubeconfig(work / "kubeconfig")
        try:
            yield Site(tb, node, webs, client, api, pods, work)
        finally:
            api.stop()


def kube_proxy_rules(webs: list[Host]) -> str:
    """What kube-proxy (iptables mode) leaves on a node serving `web`, `echo` and a Service
    `gone` that no longer exists: its chains, rendered in its format (the renderer's output
    is kube-proxy's, tests/unit/test_iptables_render.py), its jumps from the built-in
    chains and its canary chains."""
    services, endpoints = {}, {}
    for name, ip, p, target in (
        ("web", WEB_IP, 80, 8080),
        ("echo", ECHO_IP, 7, 9000),
        ("gone", GONE_IP, 80, 8080),
    ):
        svc = parse_service(service(name, ip, [port(p, target)])).service
        sl = parse_slice(endpoint_slice(name, webs, port=target))
        services[svc.key], endpoints[svc.key] = svc, merge_slices([sl])
    cfg = RenderConfig(family=4, node_name=NODE, cluster_cidrs=("198.18.0.0/16",))
    text = render(make_model(services, endpoints), cfg).text
    for table in ("filter", "nat"):
        jumps = [
            f"-I {builtin} 1 {' '.join(_quote(a) for a in args)}"
            for t, builtin, _, args in reversed(BASE_JUMPS)
            if t == table
        ]
        head, sep, rest = text.partition(f"*{table}\n")
        body, commit, tail = rest.partition("COMMIT\n")
        text = head + sep + ":KUBE-PROXY-CANARY - [0:0]\n" + body + "\n".join(jumps)
        text += "\n" + commit + tail
    return text + "*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n"


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def load_kube_proxy_rules(site: Site) -> None:
    site.node.exec(["iptables-restore", "--noflush"], input=kube_proxy_rules(site.webs))


def _dns_sent(clients: subprocess.Popen) -> int:
    """The next progress line of steady_clients ("dns=N http=N", once a second)."""
    line = clients.stdout.readline() if clients.stdout else ""
    while line.startswith("transfer done"):
        line = clients.stdout.readline() if clients.stdout else ""
    assert line.startswith("dns="), f"steady_clients stopped: {line!r}"
    return int(line.split()[0].removeprefix("dns="))


class Conn:
    """A TCP connection from the client pod to the echo Service, kept open."""

    def __init__(self, client: Host) -> None:
        self.s = client.socket()
        self.s.settimeout(5)
        self.s.connect((ECHO_IP, 7))
        self.backend = self._line()

    def _line(self) -> str:
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.s.recv(1)
            assert chunk, "connection closed"
            data += chunk
        return data.decode().strip()

    def echo(self, text: str) -> None:
        self.s.sendall(text.encode() + b"\n")
        assert self._line() == text

    def close(self) -> None:
        self.s.close()


def test_takeover_from_kube_proxy_and_rollback(site: Site) -> None:
    load_kube_proxy_rules(site)
    gone_chain = service_chain("default/gone:p", "TCP")
    assert gone_chain in site.iptables_save()
    assert client_request(site.client, WEB_IP, 80, "http") in ("web-1", "web-2")
    conn = Conn(site.client)  # open through kube-proxy's rules
    conn.echo("before")
    cid = site.start("")  # the base: iptables mode, as the DaemonSet runs it
    try:
        site.wait_ready(cid)
        conn.echo("during")  # survived the takeover
        assert client_request(site.client, WEB_IP, 80, "http") in ("web-1", "web-2")
        saved = site.iptables_save()
        assert gone_chain not in saved, "the chains of a Service nothing serves are deleted"
        assert service_chain("default/web:p", "TCP") in saved
        # SIGTERM: in order, exit 0 within podman's 10 s (then it would SIGKILL: 137).
        assert site.pods.stop(cid, grace=10) == 0, site.pods.logs(cid)[-3000:]
        logs = site.pods.logs(cid)
        assert "Traceback" not in logs, logs
        assert "shutting down; iptables state is left in place" in logs
    finally:
        site.pods.remove(cid)
    conn.echo("stopped")  # rules left in place
    assert client_request(site.client, WEB_IP, 80, "http") in ("web-1", "web-2")

    # Rollback: the image's --cleanup, then kube-proxy's rules again.
    site.cleanup_with_image()
    assert "KUBE-SVC" not in site.iptables_save()
    load_kube_proxy_rules(site)
    # The flow opened through kube-proxy, kept through our whole stay, goes on with it.
    # (Between --cleanup and kube-proxy's return it pauses: its packets are retransmitted.)
    conn.echo("rolled back")
    assert client_request(site.client, WEB_IP, 80, "http") in ("web-1", "web-2")
    conn.close()
    site.cleanup_with_image()


def test_config_file_flags_override_and_report(site: Site) -> None:
    """The ConfigMap's file as mounted, a flag over it, warnings with their path."""
    cid = site.start("", "--iptables-sync-period=7s", "--metrics-bind-address=127.0.0.1:10259")
    try:
        site.wait_ready(cid)
        logs = site.pods.logs(cid)
        assert "sync_period=7.0" in logs and "metrics_bind=('127.0.0.1', 10259)" in logs
        assert "cluster_cidrs=('10.244.0.0/16',)" in logs  # from the ConfigMap's file
        status, body = site.node.http_get("127.0.0.1", 10259, "/metrics", timeout=3)
        assert status == 200 and "kubeproxy_sync_proxy_rules_duration_seconds" in body
        assert site.pods.stop(cid, grace=10) == 0
    finally:
        site.pods.remove(cid)
    site.cleanup_with_image()


def test_rolling_restart_loses_nothing(site: Site) -> None:
    """Userspace mode and DNS: the new container starts beside the old one (maxSurge),
    takes the sockets over, then the old one gets SIGTERM and drains."""
    args = [f"--dns-bind-address={NODE_IP}:53"]
    old = site.start("overlays/userspace", *args)
    new = None
    out = site.work / "steady.json"
    clients = None
    try:
        site.wait_ready(old)
        assert client_request(site.client, WEB_IP, 80, "http") in ("web-1", "web-2")
        clients = site.client.python(
            [
                "-m",
                "tests.e2e.steady_clients",
                f"--dns={NODE_IP}:53",
                "--name=web.default.svc.cluster.local",
                f"--expect={WEB_IP}",
                f"--http={WEB_IP}:80",
                f"--echo={ECHO_IP}:7",
                f"--out={out}",
            ],
            background=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert clients.stdout.readline().strip() == "started"
        new = site.start("overlays/userspace", *args)
        wait_for(
            lambda: "handover: the previous instance stopped accepting" in site.pods.logs(new),
            "the new container to take over",
            timeout=120,
            interval=0.2,
        )
        # The kubelet's SIGTERM to the old pod: it drains the transfer still running.
        site.pods.signal(old, "TERM")
        wait_for(
            lambda: "draining 1 proxied connections" in site.pods.logs(old),
            "the old container to drain the transfer",
            timeout=30,
            interval=0.1,
        )
        clients.send_signal(signal.SIGUSR1)  # the transfer ends: every byte echoed back
        assert site.pods.wait(old, timeout=60) == 0, site.pods.logs(old)[-3000:]
        assert "every proxied connection finished" in site.pods.logs(old)
        wait_for(
            lambda: "handover: the previous instance exited" in site.pods.logs(new),
            "the new container to see the old one gone",
            timeout=30,
            interval=0.2,
        )
        # Keep the clients going on the new container alone: 25 more DNS queries.
        after = _dns_sent(clients) + 25
        while _dns_sent(clients) < after:
            pass
    finally:
        if clients is not None and clients.poll() is None:
            clients.send_signal(signal.SIGTERM)
            clients.wait(60)
        old_logs = site.pods.logs(old)
        for what, cid in (("old", old), ("new", new)):
            if cid is not None:
                print(f"--- {what} container log:\n{site.pods.logs(cid)}", file=sys.stderr)
                site.pods.remove(cid)
    res = json.loads(out.read_text())
    print(f"rolling restart: {json.dumps(res)}", file=sys.stderr)
    assert "handed over to the new instance" in old_logs, old_logs[-3000:]
    for kind in ("dns", "http"):
        r = res[kind]
        assert r["failures"] == [] and r["ok"] == r["sent"] > 50, (kind, r)
    t = res["transfer"]
    assert "error" not in t and t["intact"] and t["received"] == t["sent"] > 0, t


def test_node_local_dns(site: Site) -> None:
    """overlays/node-local-dns: the node owns 169.254.20.10, pods resolve there, and DNS
    to it skips conntrack (raw-table NOTRACK); --cleanup takes both away."""
    cid = site.start("overlays/node-local-dns")
    try:
        site.wait_ready(cid)
        assert (
            "169.254.20.10" in site.node.exec(["ip", "-o", "addr", "show", "kube-proxy-dns"]).stdout
        )
        raw = site.node.exec(["iptables-save", "-t", "raw"]).stdout
        assert "-A PREROUTING" in raw and "-j KUBE-PY-NODE-DNS" in raw
        assert "-A KUBE-PY-NODE-DNS -d 169.254.20.10/32 -p udp -m udp --dport 53 -j NOTRACK" in raw
        site.node.exec(["conntrack", "-F"], check=False)
        for _ in range(5):
            p = site.client.exec(
                [
                    "dig",
                    "+short",
                    "+time=2",
                    "+tries=1",
                    "@169.254.20.10",
                    "web.default.svc.cluster.local",
                ]
            )
            assert p.stdout.split() == [WEB_IP], p.stdout + p.stderr
        tracked = site.node.exec(["conntrack", "-L", "-d", "169.254.20.10"], check=False)
        assert "dport=53" not in tracked.stdout, tracked.stdout
        assert site.pods.stop(cid, grace=10) == 0
    finally:
        site.pods.remove(cid)
    site.cleanup_with_image()
    assert site.node.exec(["ip", "link", "show", "kube-proxy-dns"], check=False).returncode != 0
    assert "KUBE-PY-NODE-DNS" not in site.node.exec(["iptables-save", "-t", "raw"]).stdout
