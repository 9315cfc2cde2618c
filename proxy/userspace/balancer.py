"""Choosing an endpoint for one Service port: pure, time injected, no sockets.

Round robin over the endpoints the model says are usable (ready, or serving+terminating
when none is ready: `selection.usable_endpoints` decides that before `update`), ClientIP
session affinity with kube-proxy's timeout semantics, and passive health: an endpoint
whose connects fail is skipped for a backoff that doubles while it keeps failing, and is
tried again (one probe) when the backoff ends. When every endpoint is backed off the one
whose backoff ends first is still tried: a possibly-dead endpoint beats a certain failure.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from proxy.model import Endpoint

EpKey = tuple[str, int]  # (ip, port): an endpoint's identity across snapshots


def ep_key(ep: Endpoint) -> EpKey:
    return (ep.ip, ep.port)


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """Passive health: skip an endpoint for `base * 2**(failures - threshold)` seconds
    (capped at `cap`) once it has failed `threshold` times in a row."""

    threshold: int = 1
    base: float = 1.0
    cap: float = 30.0

    def backoff(self, failures: int) -> float:
        if failures < self.threshold:
            return 0.0
        return min(self.cap, self.base * 2 ** (failures - self.threshold))


class _Health:
    __slots__ = ("failures", "until")

    def __init__(self) -> None:
        self.failures = 0
        self.until = 0.0


class Balancer:
    """Endpoint choice for one Service port and traffic scope (internal or external)."""

    __slots__ = (
        "_affinity",
        "_health",
        "_index",
        "_keys",
        "_next",
        "affinity_max",
        "affinity_timeout",
        "endpoints",
        "policy",
    )

    def __init__(
        self,
        endpoints: Sequence[Endpoint] = (),
        *,
        affinity_timeout: float = 0.0,
        policy: HealthPolicy | None = None,
        affinity_max: int = 65536,
    ) -> None:
        self.affinity_timeout = affinity_timeout  # seconds; 0: no session affinity
        self.affinity_max = affinity_max  # bound on the affinity table (LRU beyond it)
        self.policy = policy or HealthPolicy()
        self.endpoints: tuple[Endpoint, ...] = ()
        self._keys: tuple[EpKey, ...] = ()
        self._index: dict[EpKey, int] = {}
        self._next = 0
        self._health: dict[EpKey, _Health] = {}
        # client IP → (endpoint key, expiry); dict order is least recently used first.
        self._affinity: dict[str, tuple[EpKey, float]] = {}
        self.update(endpoints)

    # -- configuration -----------------------------------------------------------------

    def update(self, endpoints: Sequence[Endpoint], affinity_timeout: float | None = None) -> bool:
        """Replace the endpoint set; True when it changed. Removed endpoints are never
        picked again (their established connections are the caller's business)."""
        if affinity_timeout is not None and affinity_timeout != self.affinity_timeout:
            self.affinity_timeout = affinity_timeout
            if not affinity_timeout:
                self._affinity.clear()
        eps = tuple(endpoints)
        if eps == self.endpoints:
            return False
        self.endpoints = eps
        self._keys = tuple(ep_key(e) for e in eps)
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._next = self._next % len(eps) if eps else 0
        for k in [k for k in self._health if k not in self._index]:
            del self._health[k]
        for c in [c for c, (k, _) in self._affinity.items() if k not in self._index]:
            del self._affinity[c]
        return True

    # -- choosing ------------------------------------------------------------------------

    def pick(self, client_ip: str, now: float, exclude: Collection[EpKey] = ()) -> Endpoint | None:
        """The endpoint for a new connection/session from `client_ip`, or None when there
        is none left to try (`exclude`: endpoints already tried for this connection)."""
        n = len(self.endpoints)
        if not n:
            return None
        if self.affinity_timeout:
            hit = self._affinity.pop(client_ip, None)
            if hit is not None:
                key, expiry = hit
                i = self._index.get(key)
                if (
                    expiry > now
                    and i is not None
                    and key not in exclude
                    and not self._backed_off(key, now)
                ):
                    self._remember(client_ip, key, now)
                    return self.endpoints[i]
        chosen = self._round_robin(now, exclude)
        if chosen is not None and self.affinity_timeout:
            self._remember(client_ip, self._keys[chosen], now)
        return None if chosen is None else self.endpoints[chosen]

    def _round_robin(self, now: float, exclude: Collection[EpKey]) -> int | None:
        n = len(self._keys)
        start = self._next
        fallback, fallback_until = None, 0.0
        for step in range(n):
            i = (start + step) % n
            key = self._keys[i]
            if key in exclude:
                continue
            h = self._health.get(key)
            if h is not None and h.until > now:
                if fallback is None or h.until < fallback_until:
                    fallback, fallback_until = i, h.until
                continue
            self._next = (i + 1) % n
            return i
        return fallback

    def _backed_off(self, key: EpKey, now: float) -> bool:
        h = self._health.get(key)
        return h is not None and h.until > now

    def _remember(self, client_ip: str, key: EpKey, now: float) -> None:
        self._affinity[client_ip] = (key, now + self.affinity_timeout)
        if len(self._affinity) > self.affinity_max:
            self.expire(now)
            while len(self._affinity) > self.affinity_max:
                del self._affinity[next(iter(self._affinity))]

    # -- feedback ------------------------------------------------------------------------

    def failed(self, ep: Endpoint, now: float) -> float:
        """A connect to `ep` was refused, reset or timed out; returns its backoff (s)."""
        key = ep_key(ep)
        if key not in self._index:
            return 0.0
        h = self._health.get(key)
        if h is None:
            h = self._health[key] = _Health()
        h.failures += 1
        wait = self.policy.backoff(h.failures)
        h.until = now + wait
        return wait

    def succeeded(self, ep: Endpoint) -> bool:
        """A connect to `ep` worked: it is healthy again. True if it had been failing."""
        return bool(self._health) and self._health.pop(ep_key(ep), None) is not None

    def failures(self, ep: Endpoint) -> int:
        """Consecutive failures of `ep` so far."""
        h = self._health.get(ep_key(ep))
        return h.failures if h is not None else 0

    # -- housekeeping and introspection ----------------------------------------------------

    def expire(self, now: float) -> int:
        """Drop expired affinity entries; returns how many were dropped."""
        dead = [c for c, (_, exp) in self._affinity.items() if exp <= now]
        for c in dead:
            del self._affinity[c]
        return len(dead)

    def backed_off(self, now: float) -> list[Endpoint]:
        return [self.endpoints[self._index[k]] for k, h in self._health.items() if h.until > now]

    def affinity_of(self, client_ip: str, now: float) -> EpKey | None:
        hit = self._affinity.get(client_ip)
        return hit[0] if hit is not None and hit[1] > now else None

    @property
    def affinity_size(self) -> int:
        return len(self._affinity)
