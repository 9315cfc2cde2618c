"""Containers on virtual nodes, with podman: the image as an operator runs it, inside a
node's network namespace (`--network ns:/run/netns/<node>`), never on the host network.

This machine needs a podman configuration of its own, which `containers_conf` writes and
every call here uses (CONTAINERS_CONF): runc with cgroupfs (crun rejects the hybrid
cgroup layout), and default ulimits at the hard limits (the defaults are above them, and
raising a hard limit needs CAP_SYS_RESOURCE). It is test set-up, not the product's.

    with Containers(workdir) as pods:
        cid = pods.run(node, IMAGE, ["--config=/c/config.yaml"], mounts={src: "/c"})
        pods.logs(cid); pods.stop(cid)          # SIGTERM, then the exit code
    # every container started here is removed (by ID), also on errors
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

IMAGE = "localhost/kube-proxy-py:latest"


def containers_conf(path: str | Path) -> Path:
    """Write a containers.conf that works on this machine; returns its path."""
    path = Path(path)
    lim = []
    # nproc: conmon, which starts runc, runs with at most 32768 here, whatever `ulimit -H -u`
    # says; a higher value fails with "error setting rlimit type 6".
    for name, which, cap in (
        ("nofile", resource.RLIMIT_NOFILE, 1 << 20),
        ("nproc", resource.RLIMIT_NPROC, 32768),
    ):
        hard = resource.getrlimit(which)[1]
        n = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        lim.append(f'"{name}={n}:{n}"')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by proxy.testbed.podman: runc + cgroupfs, ulimits within the hard limits.\n"
        f"[containers]\ndefault_ulimits = [{', '.join(lim)}]\n"
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    return path


class PodmanError(RuntimeError):
    pass


class Containers:
    """Runs containers in virtual nodes and removes every one it started, by ID."""

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir)
        self.env = dict(
            os.environ, CONTAINERS_CONF=str(containers_conf(self.workdir / "containers.conf"))
        )
        self.ids: list[str] = []

    def __enter__(self) -> Containers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def podman(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess:
        p = subprocess.run(
            ["podman", *args], capture_output=True, text=True, timeout=timeout, env=self.env
        )
        if check and p.returncode != 0:
            raise PodmanError(
                f"podman {' '.join(args[:3])}… exited {p.returncode}: {p.stderr.strip()}"
            )
        return p

    def run(
        self,
        ns: str,
        image: str,
        args: Sequence[str],
        *,
        command: Sequence[str] | None = None,
        mounts: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> str:
        """Start a detached, privileged container in network namespace NS; its ID."""
        argv = ["run", "-d", "--pull=never", "--privileged", f"--network=ns:/run/netns/{ns}"]
        argv += ["--log-driver=k8s-file", "--stop-timeout=15"]
        for src, dst in (mounts or {}).items():
            argv += ["-v", f"{src}:{dst}"]
        for k, v in (env or {}).items():
            argv += ["-e", f"{k}={v}"]
        if name:
            argv += ["--name", name]
        if command is not None:
            argv += ["--entrypoint", command[0]]
            args = [*command[1:], *args]
        p = self.podman(*argv, image, *args, timeout=120)
        cid = p.stdout.strip().splitlines()[-1]
        self.ids.append(cid)
        return cid

    def exec_once(
        self, ns: str, image: str, args: Sequence[str], **kw
    ) -> subprocess.CompletedProcess:
        """Run a command in a fresh container to completion (removed after)."""
        cid = self.run(ns, image, args, **kw)
        code = self.wait(cid)
        out = self.logs(cid)
        self.remove(cid)
        return subprocess.CompletedProcess(args, code, out, "")

    def logs(self, cid: str) -> str:
        p = self.podman("logs", cid, check=False)
        return p.stdout + p.stderr

    def running(self, cid: str) -> bool:
        p = self.podman("inspect", "--format", "{{.State.Running}}", cid, check=False)
        return p.stdout.strip() == "true"

    def wait(self, cid: str, timeout: float = 120) -> int:
        p = self.podman("wait", cid, timeout=timeout)
        return int(p.stdout.strip().splitlines()[-1])

    def signal(self, cid: str, sig: str = "TERM") -> None:
        self.podman("kill", "--signal", sig, cid)

    def stop(self, cid: str, grace: int = 10) -> int:
        """SIGTERM, SIGKILL after `grace` seconds (exit code 137 then); the exit code."""
        self.podman("stop", "--time", str(grace), cid, timeout=grace + 60)
        return self.wait(cid)

    def remove(self, cid: str) -> None:
        self.podman("rm", "-f", "--time", "0", cid, check=False)
        if cid in self.ids:
            self.ids.remove(cid)

    def close(self) -> None:
        for cid in list(self.ids):
            try:
                self.remove(cid)
            except Exception as e:  # keep removing the others
                print(f"podman: cannot remove container {cid}: {e}", file=sys.stderr)
