"""The machine a run measured (figures mean nothing without it) and the reference tools.

A missing reference tool is installed with apt (Debian's package) or reported as missing
in the report; a contender is never dropped without saying so.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Any

# tool → Debian package that provides it
PACKAGES = {
    "haproxy": "haproxy",
    "iperf3": "iperf3",
    "wrk": "wrk",
    "dnsperf": "dnsperf",
    "dnsmasq": "dnsmasq-base",  # the binary without the system service
    "nsd": "nsd",
    "dig": "dnsutils",
    "taskset": "util-linux",
    "iptables-nft-restore": "iptables",
    "nft": "nftables",
}
# Debian starts these on install; the benchmarks run their own copies.
SERVICES = ("haproxy", "nsd")


def ensure_tools(tools: list[str], install: bool) -> dict[str, str]:
    """Install what is missing (when `install`); return {tool: why it is missing}."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing and install and shutil.which("apt-get") and os.geteuid() == 0:
        pkgs = sorted({PACKAGES.get(t, t) for t in missing})
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs]
        r = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if r.returncode != 0:  # a stale package list: refresh once
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, check=False)
            subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        for svc in SERVICES:
            if shutil.which("systemctl"):
                subprocess.run(
                    ["systemctl", "disable", "--now", "-q", svc], capture_output=True, check=False
                )
        missing = [t for t in tools if shutil.which(t) is None]
    how = "install failed" if install else "not installed"
    return {t: f"`{t}` {how} (apt-get install {PACKAGES.get(t, t)})" for t in missing}


def _version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0].strip() if out else None


def _cpu_model() -> str:
    for line in _lines("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _mem_gib() -> float | None:
    for line in _lines("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def describe() -> dict[str, Any]:
    """CPU, memory, kernel, load and the versions of every contender's software."""
    return {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            k: v
            for k, v in {
                "iptables": _version(["iptables", "--version"]),
                "nft": _version(["nft", "--version"]),
                "haproxy": _version(["haproxy", "-v"]),
                "iperf3": _version(["iperf3", "--version"]),
                "wrk": _version(["wrk", "--version"]),
                "dnsperf": _version(["dnsperf", "-h"]),
                "dnsmasq": _version(["dnsmasq", "--version"]),
                "nsd": _version(["nsd", "-v"]),
            }.items()
            if v
        },
    }


def _os_name() -> str:
    for line in _lines("/etc/os-release"):
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def rss_kib(pid: int, field: str = "VmRSS") -> int | None:
    """A /proc/PID/status memory field in KiB (VmRSS now, VmHWM the peak so far)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU time of a process so far (`children`: plus that of its children
    it has waited for, e.g. each `nft -f` it ran)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")
