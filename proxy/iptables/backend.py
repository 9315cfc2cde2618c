"""Which iptables to drive: legacy or nft, IPv4 and IPv6, and whether we may at all.

A node must use one backend: rules written with iptables-nft are invisible to
iptables-legacy and the other way round, and packets go through both. So, like
kube-proxy's image (kubernetes-sigs/iptables-wrappers), the backend is the one the node
already uses: kubelet leaves KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY in the mangle table
of its backend; failing that, the backend holding more rules wins; nft is the default.
`--iptables-backend legacy|nft` skips the guess.

Subprocesses run in worker threads (see `run`) so the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.config import Config, PrivilegeError, UsageError

log = logging.getLogger("proxy.iptables")

MODES = ("nft", "legacy")
INSTALL_HINT = "iptables-restore not found: install the iptables package (apt-get install iptables)"
PRIVILEGE_HINT = (
    "iptables mode needs CAP_NET_ADMIN: run as root or with CAP_NET_ADMIN, "
    "or use --proxy-mode=userspace"
)
CAP_NET_ADMIN = 12
# Extra places to look: sbin is often missing from PATH for non-login shells.
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_KUBELET_HINT_RE = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)\b", re.M)


@dataclass(frozen=True, slots=True)
class Backend:
    """The three binaries for one (mode, family)."""

    mode: str  # "nft" | "legacy"
    family: int  # 4 | 6
    iptables: str
    save: str
    restore: str

    def __str__(self) -> str:
        return f"{'ip6tables' if self.family == 6 else 'iptables'}-{self.mode}"


@dataclass(frozen=True, slots=True)
class Result:
    rc: int
    out: str
    err: str


async def run(argv: Sequence[str], stdin: str | None = None, timeout: float = 60.0) -> Result:
    """Run a command without blocking the loop; a missing binary is rc 127.

    The child is started and waited for in a worker thread with `subprocess`, which
    vfork()s, not with the loop's spawn: uvloop fork()s, copying the daemon's page tables
    in the loop's thread (at 170-230 MB RSS ~4 ms of CPU and 10-17 ms of wall per
    command against 0.4 ms and 2 ms; a full sync at 10k Services runs 217 restores)."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        return await asyncio.to_thread(_run, argv, stdin, timeout, started)
    except asyncio.CancelledError:
        for proc in started:  # the thread's communicate() then returns at once
            proc.kill()
        raise


def _run(
    argv: Sequence[str], stdin: str | None, timeout: float, started: list[subprocess.Popen[bytes]]
) -> Result:
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        return Result(127, "", f"{argv[0]}: not found")
    started.append(proc)
    with proc:
        try:
            out, err = proc.communicate(stdin.encode() if stdin is not None else None, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"{argv[0]} did not finish in {timeout:g}s") from None
    return Result(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


def which(name: str) -> str | None:
    path = os.environ.get("PATH", "")
    return shutil.which(name, path=os.pathsep.join([path, *_SBIN]))


def _names(mode: str, family: int) -> tuple[str, str, str]:
    base = "ip6tables" if family == 6 else "iptables"
    return f"{base}-{mode}", f"{base}-{mode}-save", f"{base}-{mode}-restore"


def _generic(family: int) -> tuple[str | None, str | None, str | None]:
    base = "ip6tables" if family == 6 else "iptables"
    return which(base), which(f"{base}-save"), which(f"{base}-restore")


async def generic_mode(family: int = 4) -> str | None:
    """The mode the plain `iptables` binary implements (from its --version), if any."""
    ipt = _generic(family)[0]
    if ipt is None:
        return None
    res = await run([ipt, "--version"], timeout=10)
    text = res.out + res.err
    if "nf_tables" in text:
        return "nft"
    if "legacy" in text or res.rc == 0:
        return "legacy"  # iptables < 1.8 has no suffix and is always legacy
    return None


async def binaries(mode: str, family: int) -> Backend | None:
    """The binaries for (mode, family): the suffixed ones, else the plain ones when
    they implement that mode (distributions without the -nft/-legacy names)."""
    paths = [which(n) for n in _names(mode, family)]
    if all(paths):
        return Backend(mode, family, *paths)  # type: ignore[arg-type]
    plain = _generic(family)
    if all(plain) and await generic_mode(family) == mode:
        return Backend(mode, family, *plain)  # type: ignore[arg-type]
    return None


def parse_version(text: str) -> tuple[int, ...]:
    """ "iptables v1.8.9 (nf_tables)" → (1, 8, 9); () when there is no version. Pure."""
    m = re.search(r"v(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else ()


async def supports_random_fully(backend: Backend) -> bool:
    """MASQUERADE --random-fully needs iptables >= 1.6.2 (kube-proxy's check)."""
    res = await run([backend.iptables, "--version"], timeout=10)
    version = parse_version(res.out + res.err)
    return not version or version >= (1, 6, 2)


def kubelet_hint(save_text: str) -> bool:
    """True when an iptables-save dump holds kubelet's backend hint chains."""
    return bool(_KUBELET_HINT_RE.search(save_text))


def count_rules(save_text: str) -> int:
    """Rules plus KUBE-* chains in a dump: how much a backend is in use."""
    n = 0
    for line in save_text.splitlines():
        if line.startswith("-A ") or line.startswith(":KUBE-"):
            n += 1
    return n


def choose_mode(nft_dumps: Sequence[str], legacy_dumps: Sequence[str]) -> tuple[str, str]:
    """(mode, reason) from iptables-save dumps (IPv4 and IPv6) of each backend. Pure."""
    if any(kubelet_hint(d) for d in nft_dumps):
        return "nft", "kubelet's hint chain is in iptables-nft"
    if any(kubelet_hint(d) for d in legacy_dumps):
        return "legacy", "kubelet's hint chain is in iptables-legacy"
    n_nft = sum(count_rules(d) for d in nft_dumps)
    n_legacy = sum(count_rules(d) for d in legacy_dumps)
    if n_legacy > n_nft:
        return "legacy", f"iptables-legacy holds more rules ({n_legacy} vs {n_nft})"
    return "nft", f"default (iptables-nft {n_nft} rules, iptables-legacy {n_legacy})"


async def dump(backend: Backend, table: str | None = None) -> str:
    """iptables-save output ('' when it fails). Without `table` legacy creates nothing."""
    argv = [backend.save] + (["-t", table] if table else [])
    res = await run(argv, timeout=30)
    return res.out if res.rc == 0 else ""


async def detect_mode() -> tuple[str, str]:
    """Guess the node's backend the way kube-proxy's iptables-wrapper does."""
    dumps: dict[str, list[str]] = {"nft": [], "legacy": []}
    for mode in MODES:
        for family in (4, 6):
            be = await binaries(mode, family)
            if be is not None:
                dumps[mode].append(await dump(be))
    if not any(dumps.values()):
        return "nft", "default"
    return choose_mode(dumps["nft"], dumps["legacy"])


def has_net_admin() -> bool:
    """CAP_NET_ADMIN in the effective set (root normally has it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def check_privileges() -> None:
    if not has_net_admin():
        raise PrivilegeError(PRIVILEGE_HINT)


async def ipv6_works(backend: Backend) -> bool:
    """IPv6 is usable when the kernel has it and ip6tables can read its tables."""
    if not os.path.exists("/proc/net/if_inet6"):
        return False
    res = await run([backend.save], timeout=30)
    return res.rc == 0


async def select(cfg: Config) -> dict[int, Backend]:
    """The backend per IP family to program, honouring --iptables-backend and --ipv6.

    Raises UsageError when iptables is missing or (with --ipv6=on) ip6tables is.
    """
    wanted = cfg.iptables_backend
    if wanted == "auto":
        mode, reason = await detect_mode()
        available = [m for m in (mode, *MODES) if await binaries(m, 4) is not None]
        if not available:
            raise UsageError(INSTALL_HINT)
        if available[0] != mode:
            reason = f"{mode} wanted ({reason}) but only {available[0]} is installed"
            mode = available[0]
        log.info("iptables backend %s: %s", mode, reason)
    elif wanted in MODES:
        mode = wanted
    else:
        raise UsageError(f"--iptables-backend: {wanted!r} is not one of auto, legacy, nft")
    v4 = await binaries(mode, 4)
    if v4 is None:
        if wanted != "auto":
            raise UsageError(f"iptables-{mode}-restore not found: {INSTALL_HINT}")
        raise UsageError(INSTALL_HINT)
    out = {4: v4}
    if cfg.ipv6 != "off":
        v6 = await binaries(mode, 6)
        if v6 is not None and await ipv6_works(v6):
            out[6] = v6
        elif cfg.ipv6 == "on":
            raise UsageError(
                f"--ipv6=on but ip6tables-{mode} does not work here: install the iptables "
                "package and enable IPv6, or pass --ipv6=off"
            )
        else:
            log.info("IPv6 rules disabled: ip6tables-%s is not usable here", mode)
    return out


async def all_backends() -> list[Backend]:
    """Every installed (mode, family), for cleanup."""
    out = []
    for mode in MODES:
        for family in (4, 6):
            be = await binaries(mode, family)
            if be is not None and (family == 4 or os.path.exists("/proc/net/if_inet6")):
                out.append(be)
    return out
