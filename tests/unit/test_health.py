"""kube-proxy's /healthz semantics and the ETP=Local health check nodePort answers."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp

from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Store
from proxy.health import HealthServer, HealthState, ServiceHealthServers, local_endpoint_counts
from tests.unit.factories import endpoint, service, slice_


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_health_state_semantics() -> None:
    clock = Clock()
    h = HealthState(timeout=60, clock=clock)
    assert h.is_healthy()[0]  # nothing pending
    h.queued_update()
    clock.t += 30
    assert h.is_healthy()[0]  # pending, but recent
    clock.t += 31
    assert not h.is_healthy()[0]  # pending for longer than the timeout
    h.updated()
    assert h.is_healthy()[0]
    assert h.last_updated == clock.t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthz_http_codes_and_body() -> None:
    clock = Clock()
    state = HealthState(timeout=60, clock=clock)
    port = _free_port()

    async def scenario() -> list[tuple[int, dict]]:
        server = HealthServer(state)
        await server.start(("127.0.0.1", port), ("127.0.0.1", port))
        out = []
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/livez"):
                async with http.get(f"http://127.0.0.1:{port}{path}") as r:
                    out.append((r.status, json.loads(await r.text())))
            state.queued_update()
            clock.t += 61
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                out.append((r.status, json.loads(await r.text())))
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                out.append((r.status, {"text": await r.text()}))
        await server.stop()
        return out

    (c1, b1), (c2, b2), (c3, _b3), (c4, m) = asyncio.run(scenario())
    assert c1 == 200 and b1["nodeEligible"] is True and "lastUpdated" in b1
    assert c2 == 200 and "nodeEligible" not in b2
    assert c3 == 503
    assert c4 == 200 and "kubeproxy_proxy_healthz_total" in m["text"]


def test_local_endpoint_counts() -> None:
    store = Store()
    store.replace(
        SERVICE,
        [
            service(
                "lb", type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32100
            ),
            service("plain"),
        ],
    )
    store.replace(
        ENDPOINT_SLICE,
        [
            slice_(
                "lb",
                endpoints=[
                    endpoint("198.18.1.1", node="a"),
                    endpoint("198.18.1.2", node="a"),
                    endpoint("198.18.2.1", node="b"),
                    endpoint("198.18.1.3", node="a", ready=False),
                ],
            )
        ],
    )
    model = store.snapshot().model
    assert local_endpoint_counts(model, "a") == {("default", "lb"): (32100, 2)}
    assert local_endpoint_counts(model, "c") == {("default", "lb"): (32100, 0)}


def test_service_health_server_answers_with_local_count() -> None:
    port = _free_port()
    store = Store()
    store.replace(
        SERVICE,
        [
            service(
                "lb", type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=port
            )
        ],
    )
    store.replace(ENDPOINT_SLICE, [slice_("lb", endpoints=[endpoint("198.18.1.1", node="a")])])
    model = store.snapshot().model
    store.replace(ENDPOINT_SLICE, [])
    empty = store.snapshot().model

    async def scenario():
        srv = ServiceHealthServers("a", HealthState(60), ("127.0.0.1",))
        out = []
        async with aiohttp.ClientSession() as http:
            # The first model whole, then only what changed (as the sync runner feeds it).
            for m, changed in ((model, None), (empty, frozenset({("default", "lb")}))):
                await srv.update(m, changed)
                async with http.get(f"http://127.0.0.1:{port}/") as r:
                    out.append(
                        (
                            r.status,
                            json.loads(await r.text()),
                            r.headers["X-Load-Balancing-Endpoint-Weight"],
                        )
                    )
        await srv.stop()
        return out

    (c1, b1, w1), (c2, b2, w2) = asyncio.run(scenario())
    assert (c1, b1["localEndpoints"], w1) == (200, 1, "1")
    assert b1["service"] == {"namespace": "default", "name": "lb"}
    assert (c2, b2["localEndpoints"], w2) == (503, 0, "0")
