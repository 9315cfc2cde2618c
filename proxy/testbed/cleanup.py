"""Ownership records and leftover removal for testbed namespaces.

Every testbed records its prefix and owner (pid + process start time) under
/run/kpt-testbed before it creates anything, so `cleanup_stale` can tell a crashed run's
leftovers from a testbed that another test run on this machine is still using.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import signal
import time
from pathlib import Path

from . import netns

log = logging.getLogger("proxy.testbed")

REGISTRY = Path("/run/kpt-testbed")
FAMILY = "kpt"  # every testbed namespace starts with this; cleanup touches nothing else
UNRECORDED_MIN_AGE = 600.0  # seconds before an unowned kpt* namespace counts as stale


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime


def claim(prefix: str) -> bool:
    """Record this process as owner of PREFIX; False if a live owner already holds it."""
    REGISTRY.mkdir(parents=True, exist_ok=True)
    path = REGISTRY / prefix
    record = json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if owner_alive(prefix):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return True
    return False


def release(prefix: str) -> None:
    (REGISTRY / prefix).unlink(missing_ok=True)


def owner_alive(prefix: str) -> bool:
    try:
        rec = json.loads((REGISTRY / prefix).read_text())
    except (OSError, ValueError):
        return False
    return _start_time(int(rec["pid"])) == rec.get("start")


def owner_prefix(name: str) -> str | None:
    """The recorded prefix that namespace NAME belongs to (longest match), if any."""
    try:
        prefixes = os.listdir(REGISTRY)
    except FileNotFoundError:
        return None
    best = [p for p in prefixes if name.startswith(p + "-")]
    return max(best, key=len) if best else None


def kill_pids(pids: list[int], timeout: float = 3.0) -> None:
    """SIGTERM the given pids, then SIGKILL whatever is still there after TIMEOUT."""
    live = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            live.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        live = [p for p in live if _alive(p)]
        time.sleep(0.05)
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    # Our own exited children stay as zombies until reaped; reap them if they are ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def remove_namespace(name: str) -> None:
    """Kill processes living in NAME (they would keep it alive), then delete it."""
    procs = netns.pids(name)
    if procs:
        log.info("testbed: killing pids %s left in netns %s", procs, name)
        kill_pids(procs)
    netns.delete(name)


def cleanup_stale(prefix_glob: str = "kpt*", *, force: bool = False) -> list[str]:
    """Remove namespaces matching PREFIX_GLOB left behind by crashed testbed runs.

    Only names starting with "kpt" are considered. A namespace whose owning testbed
    process is still alive is left alone (another run may be using it) unless FORCE;
    one with no owner record counts as stale once it is UNRECORDED_MIN_AGE old.
    Returns the names removed.
    """
    removed = []
    now = time.time()
    for name in netns.list_names():
        if not name.startswith(FAMILY) or not fnmatch.fnmatchcase(name, prefix_glob):
            continue
        if not force:
            owner = owner_prefix(name)
            if owner is not None:
                if owner_alive(owner):
                    continue
            else:
                try:
                    age = now - os.stat(os.path.join(netns.NETNS_DIR, name)).st_mtime
                except FileNotFoundError:
                    continue
                if age < UNRECORDED_MIN_AGE:
                    continue
        log.warning("testbed: removing stale netns %s", name)
        remove_namespace(name)
        removed.append(name)
    # Drop records of dead owners whose namespaces are all gone.
    try:
        records = os.listdir(REGISTRY)
    except FileNotFoundError:
        records = []
    names = netns.list_names()
    for prefix in records:
        if not prefix.startswith(FAMILY) or not fnmatch.fnmatchcase(prefix, prefix_glob):
            continue
        if (force or not owner_alive(prefix)) and not any(
            n.startswith(prefix + "-") for n in names
        ):
            release(prefix)
    return removed
