"""Handle on a daemon (`python -m proxy`) running inside a node namespace."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .hosts import Host

# The daemon logs "synced N services" after every successful sync (contract with daemon.py).
SYNC_RE = re.compile(r"synced \d+ services|sync done")

DEFAULT_HEALTHZ = ("0.0.0.0", 10256)
DEFAULT_METRICS = ("127.0.0.1", 10249)


class ProxyExited(RuntimeError):
    """The daemon exited while we were waiting for it."""


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """Value of `--flag=V` or `--flag V` in ARGS (last one wins), else None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1 :]
    return value


def split_hostport(text: str) -> tuple[str, int] | None:
    """ "H:P", "[v6]:P", ":P" → (address to connect to from the same namespace, port)."""
    text = text.strip()
    if not text:
        return None
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:]*):(\d+)", text)
    if not m:
        raise ValueError(f"not HOST:PORT: {text!r}")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return connect_host(host), int(port)


def connect_host(host: str) -> str:
    # A wildcard bind is reachable on loopback from inside the same namespace.
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


class ProxyProcess:
    def __init__(
        self,
        node: Host,
        popen: subprocess.Popen,
        log_path: Path,
        args: list[str],
        log_offset: int = 0,
    ):
        self.node = node
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self.args = args
        # Only this run's lines count when a log file is reused (opened in append mode).
        self._log_offset = log_offset
        hz = flag_value(args, "--healthz-bind-address")
        self.healthz_explicit = hz is not None and hz.strip() != ""
        self.healthz_addr = (
            split_hostport(hz) if hz is not None else (connect_host(DEFAULT_HEALTHZ[0]), 10256)
        )
        mb = flag_value(args, "--metrics-bind-address")
        self.metrics_addr = split_hostport(mb) if mb is not None else DEFAULT_METRICS

    def __repr__(self) -> str:
        return f"<ProxyProcess pid={self.pid} node={self.node.name} log={self.log_path}>"

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def logs(self) -> str:
        """This run's output (stdout and stderr) so far."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def sync_count(self) -> int:
        """How many successful syncs the daemon has logged so far."""
        return len(SYNC_RE.findall(self.logs()))

    def _check_alive(self, what: str) -> None:
        if self.popen.poll() is not None:
            raise ProxyExited(
                f"proxy on {self.node.name} (pid {self.pid}) exited with {self.popen.returncode} "
                f"while {what}; last log lines from {self.log_path}:\n{self.log_tail()}"
            )

    def wait_synced(self, after: int = 0, timeout: float = 30) -> int:
        """Wait until more than AFTER syncs are logged; returns the new count."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("waiting for a sync")
            n = self.sync_count()
            if n > after:
                return n
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"proxy on {self.node.name} logged no sync after #{after} within {timeout}s; "
                    f"last log lines:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait for the first successful sync ("synced N services" in the log) and, when
        --healthz-bind-address was given, for /healthz to answer 200."""
        deadline = time.monotonic() + timeout
        self.wait_synced(0, timeout)
        if not self.healthz_explicit:
            return
        last: object = None
        while True:
            self._check_alive("waiting for /healthz")
            try:
                status, body = self.healthz(timeout=1)
                if status == 200:
                    return
                last = f"HTTP {status}: {body.strip()[:200]}"
            except OSError as e:
                last = e
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"proxy on {self.node.name}: /healthz at {self.healthz_addr} not 200 within "
                    f"{timeout}s (last: {last}); last log lines:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def healthz(self, path: str = "/healthz", timeout: float = 3) -> tuple[int, str]:
        """GET /healthz from inside the node → (status, body)."""
        if self.healthz_addr is None:
            raise RuntimeError("healthz is disabled (--healthz-bind-address '')")
        host, port = self.healthz_addr
        return self.node.http_get(host, port, path, timeout=timeout)

    def metrics(self, timeout: float = 3) -> str:
        """The /metrics text, fetched from inside the node."""
        if self.metrics_addr is None:
            raise RuntimeError("metrics are disabled (--metrics-bind-address '')")
        host, port = self.metrics_addr
        status, body = self.node.http_get(host, port, "/metrics", timeout=timeout)
        if status != 200:
            raise RuntimeError(f"/metrics on {self.node.name} answered {status}: {body[:200]}")
        return body

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM this pid, SIGKILL after TIMEOUT; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode
