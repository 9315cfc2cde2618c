"""Endpoints through the API server's port-forward, in-process and without root.

The laptop-mode data plane runs on uvloop with its Kubernetes client configuration
pointed at the test API server (proxy/testbed/apiserver.py, in threads of this process),
which serves pods/portforward with the kubelet's framing and dials the Pods' podIP
(127.0.0.1 here) itself. Each "Pod" is a backend on its own loopback port.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import os
import shutil
import socket
import ssl
import subprocess
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path

import pytest
import uvloop
import yaml
from kubernetes import client as k8s

from proxy.config import Config
from proxy.endpoints.kube import load_client_config
from proxy.endpoints.store import Store
from proxy.model import Service
from proxy.testbed.apiserver import ApiServer
from proxy.userspace import portforward
from proxy.userspace.dataplane import UserspaceDataPlane
from proxy.userspace.laptop import laptop_address

from .factories import endpoint, service, slice_
from .test_userspace_engine import Backend, hello, metric

IP = laptop_address(Service("default", "web"))


def run(coro: Awaitable) -> None:
    uvloop.run(asyncio.wait_for(coro, 60))


def pod(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
    }


def web_slice(
    backends: list[Backend], *, pods: bool = True, name: str = "web-abc", host: int = 10
) -> dict:
    """One endpoint per backend; endpoint IPs are not used by port-forward (the API server
    dials the Pod), so they are documentation addresses nobody dials."""
    eps = []
    for i, b in enumerate(backends):
        ref = {"targetRef": {"kind": "Pod", "name": b.name, "namespace": "default"}}
        eps.append(endpoint(f"203.0.113.{host + i}", **(ref if pods else {})))
    ports = [{"name": "p", "port": b.port, "protocol": "TCP"} for b in backends[:1]]
    return slice_("web", name=name, endpoints=eps, ports=ports)


def slices_for(backends: list[Backend], **kw) -> list[dict]:
    # Every backend listens on its own port: one slice (one port) per backend.
    return [web_slice([b], name=f"web-{b.name}", **kw) for b in backends]


class Harness:
    def __init__(
        self, api: ApiServer, access: str = "port-forward", conf: k8s.Configuration | None = None
    ) -> None:
        if conf is None:
            conf = k8s.Configuration()
            conf.host = api.url
        self.api = api
        self.store = Store()
        cfg = Config(userspace_laptop="on", hostname="node-a", userspace_endpoint_access=access)
        self.dp = UserspaceDataPlane(cfg, k8s.ApiClient(conf))

    async def __aenter__(self) -> Harness:
        await self.dp.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.dp.stop()

    async def set(self, services: list[dict], slices: list[dict], full: bool = False) -> None:
        self.store.replace("Service", services)
        self.store.replace("EndpointSlice", slices)
        snap = self.store.snapshot()  # as the sync runner hands it on: the served model
        await self.dp.sync(dataclasses.replace(snap, model=self.dp.served(snap.model)), full)


@pytest.fixture
def api():
    server = ApiServer(portforward_grace=0.1).start()
    yield server
    server.stop()


def web() -> dict:
    return service("web", ports=[{"name": "p", "port": 8080, "protocol": "TCP"}])


async def eventually(pred, what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_connections_spread_over_pods_through_warm_tunnels(api: ApiServer) -> None:
    async def main():
        bs = [await Backend(f"web-{i}").start() for i in range(2)]
        for b in bs:
            api.apply(pod(b.name))
        async with Harness(api) as h:
            await h.set([web()], slices_for(bs), full=True)
            fwd = h.dp.forwarder
            assert fwd is not None
            got = Counter()

            async def once() -> None:
                name, echo = await hello(IP, 8080, b"ping")
                assert echo == b"ping"
                got[name] += 1

            await once()
            await once()
            assert fwd.stats == {"cold": 2}  # the first use of an endpoint opens a tunnel…
            await eventually(lambda: fwd.warm == 2, "a warm tunnel per endpoint")
            await once()
            await once()
            assert fwd.stats["warm"] == 2  # …and keeps one ready for the next connection
            for _ in range(16):
                await once()
            assert got == {"web-0": 10, "web-1": 10}
            assert set(api.portforward_requests) == {"default/web-0", "default/web-1"}
            assert metric("kubeproxy_userspace_connections_total", service="default/web:p") == 20
        for b in bs:
            await b.stop()

    run(main())


def test_megabytes_both_ways_through_a_tunnel(api: ApiServer) -> None:
    size = 6 * 1024 * 1024
    blob = os.urandom(size)

    async def sink_then_send(r, w):
        h = hashlib.sha256(await r.readexactly(size)).hexdigest().encode()
        w.write(h + b"\n" + blob)
        await w.drain()

    async def main():
        b = await Backend("bulk", sink_then_send).start()
        api.apply(pod("bulk"))
        async with Harness(api) as h:
            await h.set([web()], slices_for([b]), full=True)
            r, w = await asyncio.open_connection(IP, 8080)
            up = os.urandom(size)
            w.write(up)
            assert (await r.readline()).strip() == hashlib.sha256(up).hexdigest().encode()
            assert await r.readexactly(size) == blob
            assert await r.read() == b""  # the Pod closed: the tunnel ends, the client sees EOF
            w.close()
        await b.stop()

    run(main())


def test_refusing_pod_is_retried_on_another(api: ApiServer, caplog, monkeypatch) -> None:
    caplog.set_level(logging.WARNING, "proxy.userspace")
    # A tunnel counts as connected SETTLE after the port prefixes if no error came: the
    # kubelet dials the Pod after sending them. This API server dials from a thread of
    # this process, which under a CPU hog can wait for the GIL longer than 10 ms; the
    # refusal must still arrive before the tunnel counts as connected.
    monkeypatch.setattr(portforward, "SETTLE", 1.0)

    async def main():
        good = await Backend("good").start()
        dead = await Backend("dead").start()
        await dead.stop()  # its port now refuses: the API server's dial fails
        for b in (good, dead):
            api.apply(pod(b.name))
        async with Harness(api) as h:
            await h.set([web()], slices_for([good, dead]), full=True)
            names = [(await hello(IP, 8080))[0] for _ in range(6)]
            assert names == ["good"] * 6
            assert metric("kubeproxy_userspace_connect_failures_total", service="default/web:p")
        await good.stop()

    run(main())
    assert "Connection refused" in caplog.text and "endpoint" in caplog.text


def test_tunnel_broken_mid_connection_resets_the_client_and_the_next_one_works(
    api: ApiServer,
) -> None:
    async def main():
        b = await Backend("web-0").start()
        api.apply(pod("web-0"))
        async with Harness(api) as h:
            await h.set([web()], slices_for([b]), full=True)
            r, w = await asyncio.open_connection(IP, 8080)
            assert await r.readline() == b"web-0\n"
            assert api.drop_portforwards() >= 1  # this one and the warm ones
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), 10)
            w.close()
            assert (await hello(IP, 8080))[0] == "web-0"
        await b.stop()

    run(main())


def test_removed_endpoint_gets_no_new_connections_and_no_warm_tunnels(api: ApiServer) -> None:
    async def main():
        bs = [await Backend(f"web-{i}").start() for i in range(2)]
        for b in bs:
            api.apply(pod(b.name))
        async with Harness(api) as h:
            await h.set([web()], slices_for(bs), full=True)
            for _ in range(4):
                await hello(IP, 8080)
            fwd = h.dp.forwarder
            await eventually(lambda: ("default/web-1", bs[1].port) in fwd.pools, "a pool for web-1")
            await h.set([web()], slices_for(bs[:1]))
            assert ("default/web-1", bs[1].port) not in fwd.pools
            assert {(await hello(IP, 8080))[0] for _ in range(6)} == {"web-0"}
            # Its warm tunnels are closed (and any still opening closes once open).
            await eventually(lambda: api.open_portforwards("default/web-1") == 0, "no tunnel")
            assert api.open_portforwards("default/web-0") >= 1  # web-0 keeps its warm ones
        for b in bs:
            await b.stop()

    run(main())


def test_udp_ports_and_endpoints_without_pods_are_not_served(api: ApiServer, caplog) -> None:
    caplog.set_level(logging.INFO, "proxy.userspace")

    async def main():
        b = await Backend("web-0").start()
        api.apply(pod("web-0"))
        async with Harness(api) as h:
            dns = service("dns", ports=[{"name": "d", "port": 5353, "protocol": "UDP"}])
            nopod = web_slice([b], pods=False, name="web-nopod", host=50)
            await h.set([web(), dns], [*slices_for([b]), nopod], full=True)
            keys = set(h.dp.listeners)
            assert {k[2] for k in keys} == {"TCP"}
            backend = next(x for x in h.dp.backends.values() if x.label == "default/web:p")
            assert [e.pod for e in backend.balancer.endpoints] == ["default/web-0"]

    run(main())
    assert "default/dns:d/UDP: not served: UDP cannot be tunnelled" in caplog.text
    assert "1 endpoints have no Pod (targetRef)" in caplog.text
    assert "endpoint access: port-forward through the API server at http" in caplog.text


def test_auto_uses_direct_access_when_endpoints_answer(api: ApiServer, caplog) -> None:
    caplog.set_level(logging.INFO, "proxy.userspace")

    async def main():
        b = await Backend("web-0").start()
        async with Harness(api, access="auto") as h:
            sl = slice_(
                "web",
                endpoints=[endpoint("127.0.0.1")],
                ports=[{"name": "p", "port": b.port, "protocol": "TCP"}],
            )
            await h.set([web()], [sl], full=True)
            assert h.dp.access == "direct" and h.dp.forwarder is None
            assert (await hello(IP, 8080))[0] == "web-0"
        await b.stop()

    run(main())
    assert "endpoint access: direct (auto: endpoints answer directly (127.0.0.1:" in caplog.text


def test_api_target_from_a_kubeconfig_style_configuration(tmp_path) -> None:
    conf = k8s.Configuration()
    conf.host = "https://10.0.0.1:6443/"
    conf.api_key = {"BearerToken": "Bearer abc"}
    conf.verify_ssl = False
    conf.tls_server_name = "kubernetes"
    t = portforward.ApiTarget.from_configuration(conf)
    assert t.url == "https://10.0.0.1:6443"
    assert t.auth() == "Bearer abc"
    assert t.server_hostname == "kubernetes"
    assert not t.ssl.check_hostname  # type: ignore[union-attr]
    assert t.portforward_url(("ns-a/pod-1", 8080)).endswith(
        "/api/v1/namespaces/ns-a/pods/pod-1/portforward?ports=8080"
    )
    plain = k8s.Configuration()
    plain.host = "http://127.0.0.1:8080"
    assert portforward.ApiTarget.from_configuration(plain).ssl is False


def test_probe_sees_refused_as_reachable() -> None:
    async def main():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ok, seen = await portforward.probe_direct([("127.0.0.1", port)])
        assert ok and seen == f"127.0.0.1:{port} refused"

    run(main())


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _pki(d: Path, ca: str) -> None:
    """A CA `ca`, a server certificate for 127.0.0.1 and a client certificate, signed by it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
             "-subj", f"/CN={ca}", cwd=d)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:kubernetes\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}/O=system:masters", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)  # fmt: skip


async def _tls_front(api: ApiServer, d: Path) -> asyncio.Server:
    """TLS in front of the test API server, as a real one listens: the server certificate,
    and a client certificate required (plain TCP relayed behind it, upgrades included)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=d / "ca.crt")
    ctx.load_cert_chain(d / "server.crt", d / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    host, port = api.address

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    async def relay(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(host, port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    return await asyncio.start_server(relay, "127.0.0.1", 0, ssl=ctx)


def _tls_kubeconfig(d: Path, port: int, ca: str) -> Path:
    b64 = lambda name: base64.b64encode((d / name).read_bytes()).decode()  # noqa: E731
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {
            "server": f"https://127.0.0.1:{port}", "certificate-authority-data": b64(f"{ca}.crt"),
        }}],
        "users": [{"name": "u", "user": {
            "client-certificate-data": b64("client.crt"), "client-key-data": b64("client.key"),
            "token": "s3cret",
        }}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }  # fmt: skip
    path = d / f"kubeconfig-{ca}"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_tunnels_use_the_kubeconfigs_tls_client_certificate_and_token(
    api: ApiServer, tmp_path: Path
) -> None:
    """A real cluster's API server: HTTPS with its own CA, a client certificate and a bearer
    token, all from the kubeconfig (inline data, as `kind` and cloud CLIs write it), loaded
    as the daemon loads it. A CA that did not sign the server's certificate fails the
    tunnel (verification is on), not a silent plain connection."""
    assert shutil.which("openssl"), "openssl is needed to make the test certificates"
    _pki(tmp_path, "ca")
    (tmp_path / "other").mkdir()
    _pki(tmp_path / "other", "ca")
    api.token = "s3cret"

    async def main():
        b = await Backend("web-0").start()
        api.apply(pod("web-0"))
        front = await _tls_front(api, tmp_path)
        port = front.sockets[0].getsockname()[1]
        (tmp_path / "ca-other.crt").write_bytes((tmp_path / "other" / "ca.crt").read_bytes())
        try:
            conf = load_client_config(Config(kubeconfig=str(_tls_kubeconfig(tmp_path, port, "ca"))))
            async with Harness(api, conf=conf) as h:
                # Its own Service name, so its own laptop address: other runs of the tests
                # above on this machine bind default/web's (with SO_REUSEPORT).
                svc = service("web-tls", ports=[{"name": "p", "port": 8080, "protocol": "TCP"}])
                sl = web_slice([b])
                sl["metadata"]["labels"]["kubernetes.io/service-name"] = "web-tls"
                await h.set([svc], [sl], full=True)
                ip = laptop_address(Service("default", "web-tls"))
                assert [(await hello(ip, 8080))[0] for _ in range(3)] == ["web-0"] * 3
                assert h.dp.forwarder is not None and h.dp.forwarder.stats["failed"] == 0
            assert api.portforward_requests["default/web-0"] >= 3

            bad = load_client_config(
                Config(kubeconfig=str(_tls_kubeconfig(tmp_path, port, "ca-other")))
            )
            target = portforward.ApiTarget.from_configuration(bad)
            fwd = portforward.Forwarder(target, asyncio.get_running_loop())
            await fwd.start()
            with pytest.raises(portforward.TunnelError, match="CERTIFICATE_VERIFY_FAILED"):
                await fwd.open(("default/web-0", b.port), timeout=10)
            await fwd.close()
        finally:
            front.close()
            await b.stop()

    run(main())
