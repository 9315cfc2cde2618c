"""A developer's first run against a cluster: what the log says when it cannot work yet.

The daemon runs as a normal user (as in tests/test_laptop_userspace.py) with a kubeconfig
for the test API server (in this process, on 127.0.0.1), which here authenticates a
bearer token and refuses what the user's RBAC does not allow, with kube-apiserver's
status codes and messages. Each problem must show as one log line that says what to do,
never a traceback or the HTTP library's retry chatter, and the daemon must recover by
itself once the problem is fixed (RBAC granted), reaching the Pod through port-forward.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.model import Service
from proxy.testbed.apiserver import ApiServer, write_kubeconfig
from proxy.userspace.laptop import laptop_address

from .test_laptop_userspace import REPO, curl, free_port, http_backend, unprivileged_prefix

TOKEN = "s3cret-token"


class Daemon:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, what: str | Callable[[str], bool], timeout: float = 30) -> str:
        ok = (lambda t: what in t) if isinstance(what, str) else what
        deadline = time.monotonic() + timeout
        while not ok(text := self.text()):
            assert self.proc.poll() is None, text
            assert time.monotonic() < deadline, f"waiting for {what!r}:\n{text}"
            time.sleep(0.1)
        return text


@contextlib.contextmanager
def daemon(kubeconfig: Path, *extra: str) -> Iterator[Daemon]:
    work = kubeconfig.parent
    log = work / f"daemon-{time.monotonic_ns()}.log"
    args = [
        sys.executable, "-m", "proxy", "--proxy-mode=userspace",
        "--kubeconfig", str(kubeconfig),
        "--dns-bind-address", f"127.0.0.1:{free_port()}",
        "--metrics-bind-address", f"127.0.0.1:{free_port()}",
        "--healthz-bind-address", f"127.0.0.1:{free_port()}",
        "--iptables-min-sync-period", "0.2",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*unprivileged_prefix(), *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work
        )
    d = Daemon(proc, log)
    try:
        yield d
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, d.text()[-3000:]
    assert "Traceback" not in d.text(), d.text()


@pytest.fixture
def workdir() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="kpp-laptop-api-"))
    os.chmod(work, 0o755)  # the daemon runs as nobody and reads the kubeconfig here
    yield work
    shutil.rmtree(work, ignore_errors=True)


def kubeconfig(work: Path, url: str, token: str | None = TOKEN) -> Path:
    path = write_kubeconfig(work / "kubeconfig", url, token=token)
    os.chmod(path, 0o644)
    return path


def web_objects(port: int) -> list[dict]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "default"},
            "status": {"phase": "Running", "podIP": "127.0.0.1"},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 8080}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-abc",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            # A documentation address nobody dials: only the API server reaches the Pod.
            "endpoints": [
                {
                    "addresses": ["203.0.113.10"],
                    "conditions": {"ready": True},
                    "targetRef": {"kind": "Pod", "namespace": "default", "name": "web-0"},
                }
            ],
        },
    ]


def one_line_each(text: str, needle: str) -> list[str]:
    lines = [line for line in text.splitlines() if needle in line]
    assert lines, f"no line with {needle!r}:\n{text}"
    return lines


def test_missing_rbac_says_what_to_grant_and_recovers_once_granted(workdir: Path) -> None:
    with http_backend("web-0") as port, ApiServer(portforward_grace=0.1) as api:
        api.token = TOKEN
        api.forbidden |= {"services", "pods/portforward"}
        for obj in web_objects(port):
            api.apply(obj)
        with daemon(kubeconfig(workdir, api.url), "--userspace-endpoint-access=port-forward") as d:
            text = d.wait_log("watch services: list failed")
            line = one_line_each(text, "watch services: list failed")[0]
            assert "HTTP 403 Forbidden" in line, line
            assert 'User "alice@example.com" cannot list resource "services"' in line, line
            assert "grant list and watch on services: manifests/examples/laptop-rbac.yaml" in line
            # A laptop is no Node: no Node watch, so no right to read Nodes is needed.
            assert "watching services, endpointslices at http" in text, text
            assert "urllib3" not in text, text

            api.forbidden.discard("services")  # the user was granted the watch
            d.wait_log("synced 1 services")
            ip = laptop_address(Service("default", "web"))
            url, resolve = f"http://{ip}:8080/", None
            # port-forward is still refused: the connection is reset, the log says why.
            with pytest.raises(subprocess.CalledProcessError):
                curl(url, resolve)
            text = d.wait_log("refused by the API server (403)")
            (line,) = one_line_each(text, "refused by the API server (403)")
            assert "RBAC `create` on `pods/portforward`" in line, line
            assert "manifests/examples/laptop-rbac.yaml" in line, line

            api.forbidden.discard("pods/portforward")  # and then port-forward
            deadline = time.monotonic() + 30
            while True:  # the refusal put the endpoint in backoff for a moment
                with contextlib.suppress(subprocess.CalledProcessError):
                    if curl(url, resolve) == "web-0":
                        break
                assert time.monotonic() < deadline, d.text()
                time.sleep(0.2)
            assert api.portforward_requests["default/web-0"] >= 1
            # Refused once, logged once.
            assert len(one_line_each(d.text(), "refused by the API server (403)")) == 1


def test_unreachable_api_server_and_refused_credentials_say_what_to_do(workdir: Path) -> None:
    closed = free_port()  # nothing listens there
    with daemon(kubeconfig(workdir, f"http://127.0.0.1:{closed}")) as d:
        text = d.wait_log(lambda t: t.count("list failed") >= 4)  # each informer, then again
        for line in one_line_each(text, "list failed"):
            assert "Connection refused" in line, line
            assert "is the API server up and reachable from here?" in line, line
        assert "urllib3" not in text and "Retrying" not in text, text

    with ApiServer() as api:
        api.token = TOKEN
        with daemon(kubeconfig(workdir, api.url, token="expired")) as d:
            text = d.wait_log("watch endpointslices: list failed")
            for line in one_line_each(text, "list failed"):
                assert "HTTP 401 Unauthorized" in line, line
                assert "refused the kubeconfig's credentials: renew them" in line, line


def test_port_forward_without_an_api_server_is_a_one_line_user_error(workdir: Path) -> None:
    manifests = workdir / "services.yaml"
    manifests.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\n")
    os.chmod(manifests, 0o644)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "proxy", "--proxy-mode=userspace", "--manifests", str(manifests),
            "--userspace-endpoint-access=port-forward",
            "--healthz-bind-address", f"127.0.0.1:{free_port()}",
            "--metrics-bind-address", f"127.0.0.1:{free_port()}"]  # fmt: skip
    out = subprocess.run(
        [*unprivileged_prefix(), *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("kube-proxy-py: error:")]
    assert errors == [
        "kube-proxy-py: error: --userspace-endpoint-access=port-forward goes through the API "
        "server: use --kubeconfig (or run in a pod), not --manifests"
    ], out.stderr
