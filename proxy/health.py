"""Health endpoints with kube-proxy's semantics, /metrics, and the per-Service health
check nodePorts of externalTrafficPolicy: Local Services.

/healthz and /livez (pkg/proxy/healthcheck/proxy_health.go): healthy unless an update
has been queued for longer than `2 x --iptables-sync-period` without a successful sync.
The per-Service servers (service_health.go) answer 200 with the local endpoint count
while this node has ready endpoints for the Service, 503 otherwise, so cloud load
balancers only send traffic to nodes that can serve it locally.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from proxy import metrics
from proxy.config import UsageError
from proxy.model import Model, ServiceKey

log = logging.getLogger("proxy.health")


def _fmt(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class HealthState:
    """Last-updated / oldest-pending-queued bookkeeping (ProxyHealthServer)."""

    def __init__(self, timeout: float, clock=time.time) -> None:
        self.timeout = timeout
        self.clock = clock
        self.last_updated = 0.0
        self.oldest_queued: float | None = None

    def queued_update(self) -> None:
        if self.oldest_queued is None:
            self.oldest_queued = self.clock()

    def updated(self) -> None:
        self.last_updated = self.clock()
        self.oldest_queued = None

    def is_healthy(self) -> tuple[bool, float, float]:
        now = self.clock()
        healthy = self.oldest_queued is None or now - self.oldest_queued <= self.timeout
        return healthy, self.last_updated, now


async def _start_site(app: web.Application, host: str, port: int, what: str) -> web.AppRunner:
    """One listener; a bind failure is the user's to fix (UsageError)."""
    runner, errors = await _start_sites(app, (host,), port, what)
    if errors:
        await runner.cleanup()
        raise UsageError(errors[0])
    return runner


async def _start_sites(
    app: web.Application, hosts: tuple[str, ...], port: int, what: str
) -> tuple[web.AppRunner, list[str]]:
    """One runner listening on several addresses; returns the errors of those that failed."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    errors = []
    for host in hosts:
        try:
            # reuse_port: a successor binds the same port during an upgrade (handover.py)
            await web.TCPSite(runner, host, port, reuse_address=True, reuse_port=True).start()
        except OSError as e:
            errors.append(_bind_error(what, host, port, e))
    return runner, errors


def _bind_error(what: str, host: str, port: int, e: OSError) -> str:
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return f"{what} {addr}: address already in use; stop the other process or pick a port"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{what} {addr}: no such local address; use an address of this host or 0.0.0.0"
    if e.errno == errno.EACCES:
        return f"{what} {addr}: permission denied; ports below 1024 need root"
    return f"{what} {addr}: cannot listen: {e.strerror}"


class HealthServer:
    """/healthz and /livez on --healthz-bind-address; /metrics on --metrics-bind-address."""

    def __init__(self, state: HealthState) -> None:
        self.state = state
        self._runners: list[web.AppRunner] = []

    def _body(self, with_eligible: bool) -> tuple[int, str]:
        healthy, last, now = self.state.is_healthy()
        if healthy:
            last = now  # kube-proxy reports currentTime as lastUpdated when healthy
        doc: dict[str, object] = {"lastUpdated": _fmt(last), "currentTime": _fmt(now)}
        if with_eligible:
            doc["nodeEligible"] = True
        return (200 if healthy else 503), json.dumps(doc)

    async def _healthz(self, _req: web.Request) -> web.Response:
        code, body = self._body(True)
        metrics.HEALTHZ_TOTAL.labels(code=str(code)).inc()
        return _json(code, body)

    async def _livez(self, _req: web.Request) -> web.Response:
        code, body = self._body(False)
        metrics.LIVEZ_TOTAL.labels(code=str(code)).inc()
        return _json(code, body)

    async def start(
        self, healthz: tuple[str, int] | None, metrics_addr: tuple[str, int] | None
    ) -> None:
        metrics_handler = make_aiohttp_handler()
        if healthz is not None:
            app = web.Application()
            app.router.add_get("/healthz", self._healthz)
            app.router.add_get("/livez", self._livez)
            if metrics_addr == healthz:
                app.router.add_get("/metrics", metrics_handler)
            self._runners.append(await _start_site(app, *healthz, "--healthz-bind-address"))
        if metrics_addr is not None and metrics_addr != healthz:
            app = web.Application()
            app.router.add_get("/metrics", metrics_handler)
            app.router.add_get("/healthz", self._healthz)  # kube-proxy serves it here too
            self._runners.append(await _start_site(app, *metrics_addr, "--metrics-bind-address"))

    async def stop(self) -> None:
        for r in self._runners:
            await r.cleanup()
        self._runners.clear()


def _json(code: int, body: str, headers: Mapping[str, str] | None = None) -> web.Response:
    h = {"X-Content-Type-Options": "nosniff", **(headers or {})}
    return web.Response(status=code, text=body, content_type="application/json", headers=h)


def local_endpoint_count(model: Model, key: ServiceKey, node_name: str) -> tuple[int, int] | None:
    """(healthCheckNodePort, ready local endpoints) of an ETP=Local Service, else None."""
    svc = model.services.get(key)
    if svc is None or not svc.health_check_node_port or svc.proxy_name:
        return None
    local = {
        a.ip for a in model.endpoints_of(key).addresses if a.ready and a.node_name == node_name
    }
    return svc.health_check_node_port, len(local)


def local_endpoint_counts(model: Model, node_name: str) -> dict[ServiceKey, tuple[int, int]]:
    """Service → (healthCheckNodePort, ready local endpoints) for ETP=Local Services (pure)."""
    out: dict[ServiceKey, tuple[int, int]] = {}
    for key in model.services:
        entry = local_endpoint_count(model, key, node_name)
        if entry is not None:
            out[key] = entry
    return out


class ServiceHealthServers:
    """One HTTP listener per healthCheckNodePort, reconciled after every sync.

    A `Consumer` of the sync runner, fed once the data plane has programmed the model
    (as kube-proxy syncs its health check servers after a successful sync); only the
    Services that changed are looked at."""

    name = "health check nodePorts"
    after_sync = True

    def __init__(self, node_name: str, state: HealthState, addresses: tuple[str, ...]) -> None:
        self.node_name = node_name
        self.state = state
        self.addresses = addresses or ("0.0.0.0",)
        self.counts: dict[ServiceKey, tuple[int, int]] = {}
        self._servers: dict[int, tuple[ServiceKey, web.AppRunner]] = {}

    def _handler(self, key: ServiceKey):
        async def handle(_req: web.Request) -> web.Response:
            _, count = self.counts.get(key, (0, 0))
            healthy = self.state.is_healthy()[0]
            body = json.dumps(
                {
                    "service": {"namespace": key[0], "name": key[1]},
                    "localEndpoints": count,
                    "serviceProxyHealthy": healthy,
                }
            )
            code = 200 if count and healthy else 503
            return _json(code, body, {"X-Load-Balancing-Endpoint-Weight": str(count)})

        return handle

    async def update(self, model: Model, changed: frozenset[ServiceKey] | None) -> None:
        if changed is None:
            self.counts = local_endpoint_counts(model, self.node_name)
        else:
            counts = dict(self.counts)
            for key in changed:
                entry = local_endpoint_count(model, key, self.node_name)
                if entry is None:
                    counts.pop(key, None)
                else:
                    counts[key] = entry
            self.counts = counts
        want = {port: key for key, (port, _) in self.counts.items()}
        for port in [p for p in self._servers if want.get(p) != self._servers[p][0]]:
            key, runner = self._servers.pop(port)
            await runner.cleanup()
            log.info("closed health check nodePort %d for %s/%s", port, *key)
        for port, key in want.items():
            if port in self._servers:
                continue
            app = web.Application()
            app.router.add_get("/{tail:.*}", self._handler(key))
            runner, errors = await _start_sites(app, self.addresses, port, "health check nodePort")
            for err in errors:  # never fatal: one Service's port, logged
                log.warning("Service %s/%s: %s", key[0], key[1], err)
            self._servers[port] = (key, runner)
            if len(errors) < len(self.addresses):
                log.info("serving health check nodePort %d for %s/%s", port, *key)

    async def stop(self) -> None:
        for _, runner in self._servers.values():
            await runner.cleanup()
        self._servers.clear()
