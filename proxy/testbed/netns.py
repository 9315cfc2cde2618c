"""Low-level network-namespace helpers: `ip` calls, setns sockets, namespace pids.

Everything here acts on named namespaces (/run/netns/NAME) only; nothing touches the
host namespace's links, addresses, routes or rules.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
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
    stop_worker(ns)
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


class _Worker:
    """A thread that stays inside one namespace and runs small calls there."""

    def __init__(self, ns: str):
        self.ns = ns
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.entered = Future()
        self.thread = threading.Thread(target=self._loop, name=f"netns-{ns}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            _setns(self.ns)
        except BaseException as e:
            self.entered.set_exception(e)
            return
        self.entered.set_result(None)
        while (item := self.queue.get()) is not None:
            fn, fut = item
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def call(self, fn: Callable[[], T]) -> T:
        self.entered.result()
        fut: Future = Future()
        self.queue.put((fn, fut))
        return fut.result()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(5)


_workers: dict[str, _Worker] = {}
_workers_lock = threading.Lock()


def call_in(ns: str, fn: Callable[[], T]) -> T:
    """Call fn() on a thread that has entered NS (setns changes only the calling thread).

    One worker thread per namespace is kept (creating a thread per call costs more than
    the socket); a socket keeps the namespace it was created in, so results are usable
    from any thread. stop_worker(ns) must run before NS is deleted: the thread would keep
    the namespace alive.
    """
    with _workers_lock:
        w = _workers.get(ns)
        if w is None or not w.thread.is_alive():
            w = _workers[ns] = _Worker(ns)
    try:
        return w.call(fn)
    except FileNotFoundError:
        stop_worker(ns)
        raise


def stop_worker(ns: str) -> None:
    with _workers_lock:
        w = _workers.pop(ns, None)
    if w is not None:
        w.stop()


def socket_in(
    ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
) -> socket.socket:
    return call_in(ns, lambda: socket.socket(family, type))
