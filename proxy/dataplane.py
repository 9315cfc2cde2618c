"""The seams between the sync runner and what it drives: one data plane, many consumers.

    source ──> Store ──snapshot──> SyncRunner ──served model──> DataPlane.sync
                                        └──────served model──> Consumer.update (DNS, health…)

The data plane says which model it serves (`served`: the model itself, except laptop mode,
whose Services live on loopback addresses and shifted ports); the runner computes it once
per snapshot and hands that one model to the data plane and to every consumer, so DNS and
the health check nodePorts always describe what is actually served.
"""

from __future__ import annotations

from typing import Protocol

from proxy.endpoints.store import Snapshot
from proxy.model import Model, ServiceKey


class DataPlane(Protocol):
    name: str
    # Whether it carries Service traffic: the health check nodePorts of Local Services are
    # served only then (with --proxy-mode=none nothing here forwards, so none may say "yes").
    forwards: bool

    def served(self, model: Model) -> Model:
        """The model as this data plane serves it. Pure and cheap on an unchanged model
        (memoized): the runner calls it once per snapshot."""
        ...

    async def start(self) -> None:
        """Check prerequisites (binaries, privileges) and prepare; raise
        `proxy.config.UsageError` for what the user must fix (one clear line)."""
        ...

    async def sync(self, snap: Snapshot, full: bool) -> None:
        """Make the node match `snap.model`, which is already `served(...)`. `full=False`
        may touch only `snap.changed` (a partial sync); `full=True` rewrites everything and
        removes stale state. Raise on failure: the runner retries with backoff and makes
        the next sync full. Must never remove working state because of a transient
        failure."""
        ...

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
        ...

    async def cleanup(self) -> None:
        """Remove every rule, chain, address this proxy ever made (`--cleanup`)."""
        ...


class Consumer(Protocol):
    """A part that follows the served model (kpng's sinks): DNS, health check nodePorts…

    The runner feeds every consumer, in list order, after each snapshot that changed
    something. `after_sync` says when:
    - False: as soon as the snapshot is taken, before the data plane syncs. DNS is such a
      consumer: it must not wait for a long restore (35 s at 10k Services on nft) nor go
      stale while restores fail; its answers need no rules (headless Services).
    - True: only once the data plane has programmed the model, as kube-proxy updates its
      health check servers after a successful sync (no load balancer traffic to a node
      before its rules exist).
    A consumer that raises is logged and fed again next time; it never fails a sync.
    """

    name: str
    after_sync: bool

    async def update(self, model: Model, changed: frozenset[ServiceKey] | None) -> None:
        """Follow `model`. `changed`: the Services that may differ from the model of the
        previous call (None: the first call, or anything may have changed)."""
        ...


class NoDataPlane:
    """--proxy-mode=none: watch and DNS only."""

    name = "none"
    forwards = False

    def served(self, model: Model) -> Model:
        return model

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
