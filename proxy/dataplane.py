"""What the daemon expects of a data plane (iptables, userspace, none)."""

from __future__ import annotations

from typing import Protocol

from proxy.endpoints.store import Snapshot


class DataPlane(Protocol):
    name: str

    async def start(self) -> None:
        """Check prerequisites (binaries, privileges) and prepare; raise
        `proxy.config.UsageError` for what the user must fix (one clear line)."""

    async def sync(self, snap: Snapshot, full: bool) -> None:
        """Make the node match `snap.model`. `full=False` may touch only `snap.changed`
        (a partial sync); `full=True` rewrites everything and removes stale state.
        Raise on failure: the runner retries with backoff and makes the next sync full.
        Must never remove working state because of a transient failure."""

    async def hand_over(self) -> None:
        """Stop taking new work on the listening sockets: a successor holds the same ones
        (SO_REUSEPORT, proxy/handover.py), or the daemon is stopping. Established
        connections go on."""

    async def drain(self, timeout: float) -> None:
        """Let established connections finish, for up to `timeout` seconds (SIGTERM)."""

    def predecessor_gone(self) -> None:
        """The instance we took over from exited: our sockets are the oldest in their
        reuseport groups again (steer to them)."""

    async def stop(self) -> None:
        """Orderly shutdown (SIGTERM). Leaves kernel rules in place, like kube-proxy."""

    async def cleanup(self) -> None:
        """Remove every rule, chain, address this proxy ever made (`--cleanup`)."""


class NoDataPlane:
    """--proxy-mode=none: watch and DNS only."""

    name = "none"

    async def start(self) -> None:
        return None

    async def sync(self, snap: Snapshot, full: bool) -> None:
        return None

    async def hand_over(self) -> None:
        return None

    async def drain(self, timeout: float) -> None:
        return None

    def predecessor_gone(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def cleanup(self) -> None:
        return None
