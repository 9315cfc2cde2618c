"""Low-level network-namespace helpers: `ip` calls, setns sockets, namespace pids.

Everything here acts on named namespaces (/run/netns/NAME) only; nothing touches the
host namespace's links, addresses, routes or rules.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class CommandError(subprocess.CalledProcessError):
    """A failed command whose message includes its stderr (CalledProcessError hides it)."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip() if isinstance(self.stderr, str) else ""
        argv = " ".join(map(str, self.cmd)) if isinstance(self.cmd, list | tuple) else self.cmd
        return f"{argv!s} exited {self.returncode}: {err or '(no stderr)'}"


def run(argv: Sequence[str], *, timeout: float = 30, check: bool = True):
    """Run a command with captured text output; failures raise CommandError with stderr."""
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise CommandError(p.returncode, list(argv), p.stdout, p.stderr)
    return p


def ip(ns: str, *args: str, check: bool = True):
    """`ip -n NS args...` (netlink socket opened inside NS)."""
    return run(["ip", "-n", ns, *args], check=check)


def ip_batch(ns: str, lines: Sequence[str]) -> None:
    """Several `ip` commands in one process (fewer forks); stops at the first failure."""
    p = subprocess.run(
        ["ip", "-n", ns, "-batch", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if p.returncode != 0:
        raise CommandError(
            p.returncode, ["ip", "-n", ns, "-batch", "-", *lines], p.stdout, p.stderr
        )


def sysctl(ns: str, settings: dict[str, str | int]) -> None:
    """Write sysctls inside NS (/proc/sys/net is per namespace)."""
    args = [f"{k}={v}" for k, v in settings.items()]
    run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *args])


def add(ns: str) -> None:
    run(["ip", "netns", "add", ns])


def delete(ns: str) -> None:
    run(["ip", "netns", "del", ns], check=False)


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def exists(ns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, ns))


def pids(ns: str) -> list[int]:
    """PIDs whose network namespace is NS (like `ip netns pids`), excluding ourselves."""
    try:
        target = os.stat(os.path.join(NETNS_DIR, ns))
    except FileNotFoundError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            out.append(int(entry))
    return out


def _setns(ns: str) -> None:
    fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({ns}): {os.strerror(e)}")
    finally:
        os.close(fd)


def call_in(ns: str, fn: Callable[[], T]) -> T:
    """Call fn() in a short-lived thread that has entered NS.

    setns(CLONE_NEWNET) changes only the calling thread; a socket keeps the namespace it
    was created in, so the result is usable from any thread afterwards.
    """
    box: dict[str, object] = {}

    def body() -> None:
        try:
            _setns(ns)
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def socket_in(
    ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
) -> socket.socket:
    return call_in(ns, lambda: socket.socket(family, type))
