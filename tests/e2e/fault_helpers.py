"""Shared pieces of the fault suite (tests/e2e/test_faults_*.py).

- `Load`: client traffic through a Service while a fault happens (tests/e2e/loadgen.py
  in a pod), with the count of what was lost;
- `report`: the figures of each case, one JSON line per case, appended to the file named by
  $KPP_FAULTS_REPORT (else `faults.jsonl` under pytest's base temp directory) and printed;
- helpers to read rulesets, process trees and memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.testbed import Host

Report = Callable[..., None]


class Load:
    """Requests at a steady pace from HOST to ip:port until stop(); counts what was lost."""

    def __init__(
        self,
        host: Host,
        ip: str,
        port: int,
        *,
        proto: str = "http",
        interval: float = 0.05,
        timeout: float = 2.0,
        name: str = "",
        label: str = "load",
    ) -> None:
        work = host.tb.workdir
        self.status_path = work / f"{label}-{host.name}-{time.monotonic_ns()}.json"
        self.log_path = self.status_path.with_suffix(".log")
        argv = ["-m", "tests.e2e.loadgen", "--target", f"{ip}:{port}", "--proto", proto]
        argv += ["--interval", str(interval), "--timeout", str(timeout), "--name", name]
        argv += ["--status", str(self.status_path)]
        with open(self.log_path, "ab") as err:
            self.proc = host.python(argv, background=True, stdout=subprocess.DEVNULL, stderr=err)
        self.final: dict[str, Any] | None = None

    def status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"sent": 0, "ok": 0, "failed": 0, "errors": {}, "failures": []}

    def wait_ok(self, more: int = 10, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until `more` further requests have succeeded (traffic flows)."""
        start = self.status()["ok"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["ok"] >= start + more:
                return st
            assert self.proc.poll() is None, f"load generator exited: {self.log_path.read_text()}"
            assert time.monotonic() < deadline, f"traffic stopped flowing: {st}"
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        """End the run; its final counts."""
        if self.final is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(30)
            self.final = self.status()
            assert self.final.get("done"), f"load generator did not finish: {self.final}"
        return self.final

    def summary(self) -> dict[str, Any]:
        st = self.stop()
        return {"requests": st["sent"], "lost": st["failed"], "errors": st["errors"]}


@pytest.fixture(scope="session")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Report]:
    """report(case, **figures): record one case's figures (see the module doc)."""
    path = Path(
        os.environ.get("KPP_FAULTS_REPORT") or tmp_path_factory.getbasetemp() / "faults.jsonl"
    )

    def _report(case: str, **figures: Any) -> None:
        line = json.dumps({"case": case, "time": time.time(), **figures}, sort_keys=True)
        with open(path, "a") as f:
            f.write(line + "\n")
        print(f"FAULT {line}")

    yield _report


def ruleset(save_output: str) -> dict[str, dict[str, list[str]]]:
    """iptables-save → {table: {chain: [rules in order]}}, counters and comments dropped:
    what two runs must agree on (nft lists chains in creation order, so chain order is
    not part of it; rule order within a chain is)."""
    out: dict[str, dict[str, list[str]]] = {}
    table: dict[str, list[str]] = {}
    for line in save_output.splitlines():
        if line.startswith("*"):
            table = out.setdefault(line[1:].strip(), {})
        elif line.startswith(":"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            table.setdefault(line.split()[1], []).append(line)
    return out


def children(pid: int) -> list[int]:
    """Direct children of a process (from /proc)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            out += [int(c) for c in text.split()]
    except (FileNotFoundError, ProcessLookupError):  # it (or a thread) exited meanwhile
        pass
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):  # exited (ESRCH while it is exiting)
        return ""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def wait_until(pred: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll `pred` until it returns something true (returned); fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
