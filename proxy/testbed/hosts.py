"""Hosts of a testbed: anything living in one of its network namespaces."""

from __future__ import annotations

import ipaddress
import os
import socket as _socket
import subprocess
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import netns
from .netns import CommandError

if TYPE_CHECKING:
    from .proxyproc import ProxyProcess
    from .testbed import Testbed

REPO_ROOT = Path(__file__).resolve().parents[2]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment plus what a python child needs to import this checkout."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def family_of(ip: str) -> int:
    return _socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else _socket.AF_INET


class Host:
    """One network namespace of the testbed (a pod, an outside host, or a node)."""

    def __init__(self, tb: Testbed, name: str, ns: str, ip: str, ipv6: str | None = None):
        self.tb = tb
        self.name = name
        self.ns = ns
        self.ip = ip
        self.ipv6 = ipv6
        self.node: Node | None = None  # the node a pod lives on
        self._sockets: weakref.WeakSet[_socket.socket] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ns={self.ns} ip={self.ip}>"

    # -- processes -------------------------------------------------------------------------

    def run(self, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen:
        """Start `ip netns exec NS argv...` in the background; the testbed kills it on close.

        `env` entries are added to the inherited environment (not a replacement). The child
        gets its own session so a terminal ^C reaches only the test process, which then
        cleans up. `ip netns exec` execs the command, so popen.pid is the command's pid.
        """
        popen_kw["env"] = child_env(popen_kw.get("env"))
        popen_kw.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns, *map(str, argv)], **popen_kw)
        self.tb._track(p)
        return p

    def exec(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = True,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run argv inside the namespace to completion; text stdout/stderr captured.

        With check, a nonzero exit raises CommandError whose message includes stderr.
        """
        cmd = ["ip", "netns", "exec", self.ns, *map(str, argv)]
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=child_env(env),
            check=False,
        )
        if check and p.returncode != 0:
            raise CommandError(p.returncode, cmd, p.stdout, p.stderr)
        return p

    def python(
        self,
        code_or_args: str | Sequence[str],
        *,
        background: bool = False,
        timeout: float = 30,
        check: bool = True,
        **popen_kw: Any,
    ) -> Any:
        """Run sys.executable inside the namespace.

        A str is code (`python -c CODE`); a list is arguments (e.g. ["-m", "http.server"]).
        Returns a CompletedProcess, or with background=True a tracked Popen.
        """
        if isinstance(code_or_args, str):
            argv = [sys.executable, "-c", code_or_args]
        else:
            argv = [sys.executable, *code_or_args]
        if background:
            return self.run(argv, **popen_kw)
        return self.exec(argv, timeout=timeout, check=check, **popen_kw)

    # -- sockets and routes -----------------------------------------------------------------

    def socket(
        self, family: int = _socket.AF_INET, type: int = _socket.SOCK_STREAM
    ) -> _socket.socket:
        """A socket created inside this namespace, usable from any thread of this process.

        The testbed closes sockets still open on close, since an open socket would keep the
        deleted namespace (and its veths) alive.
        """
        s = netns.socket_in(self.ns, family, type)
        self._sockets.add(s)
        return s

    def route(self, cidr: str, via: str) -> None:
        """Route CIDR via a next hop on a connected network (e.g. a node's underlay IP)."""
        fam = "-6" if ipaddress.ip_network(cidr, strict=False).version == 6 else "-4"
        netns.ip(self.ns, fam, "route", "replace", cidr, "via", via)

    def http_get(self, ip: str, port: int, path: str = "/", timeout: float = 3) -> tuple[int, str]:
        """Plain HTTP GET from inside this namespace → (status, body text)."""
        from .traffic import http_request

        status, _headers, body = http_request(self, ip, port, path, timeout=timeout)
        return status, body

    def _close_sockets(self) -> None:
        for s in list(self._sockets):
            s.close()


class Node(Host):
    """A node namespace: forwards between its pods and the underlay, runs the daemon."""

    def __init__(
        self,
        tb: Testbed,
        name: str,
        ns: str,
        ip: str,
        pod_cidr: str,
        *,
        ipv6: str | None = None,
        pod_cidr_v6: str | None = None,
    ):
        super().__init__(tb, name, ns, ip, ipv6)
        self.pod_cidr = pod_cidr
        self.pod_cidr_v6 = pod_cidr_v6
        self.pods: list[Host] = []
        self._proxies = 0

    def start_proxy(
        self,
        args: Sequence[str],
        *,
        log: Path | None = None,
        env: dict[str, str] | None = None,
        wrap: Sequence[str] = (),
    ) -> ProxyProcess:
        """Run `python -m proxy ARGS` inside this node; output (stdout+stderr) goes to LOG.
        `wrap` is a command prefix that execs its arguments (e.g. one dropping privileges)."""
        from .proxyproc import ProxyProcess

        self._proxies += 1
        if log is None:
            log = self.tb.workdir / f"proxy-{self.name}-{self._proxies}.log"
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            offset = out.tell()  # a reused log: only this run's lines count
            p = self.run(
                [*wrap, sys.executable, "-m", "proxy", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        return ProxyProcess(self, p, log, list(args), offset)
