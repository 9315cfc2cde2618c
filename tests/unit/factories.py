"""Raw API object builders shared by unit tests (dicts as the API server sends them)."""

from __future__ import annotations

from typing import Any


def service(
    name: str = "web",
    ns: str = "default",
    *,
    ip: str | None = "198.19.0.10",
    ports: list[dict] | None = None,
    **spec: Any,
) -> dict:
    s: dict[str, Any] = {"ports": ports if ports is not None else [{"name": "http", "port": 80}]}
    if ip is not None:
        s["clusterIP"] = ip
    s.update(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": s,
    }


def endpoint(ip: str, *, ready: bool = True, node: str = "node-a", **extra: Any) -> dict:
    cond: dict[str, Any] = {"ready": ready}
    if "serving" in extra:
        cond["serving"] = extra.pop("serving")
    if "terminating" in extra:
        cond["terminating"] = extra.pop("terminating")
    return {"addresses": [ip], "conditions": cond, "nodeName": node, **extra}


def slice_(
    svc: str = "web",
    name: str | None = None,
    ns: str = "default",
    *,
    endpoints: list[dict] | None = None,
    ports: list[dict] | None = None,
    address_type: str = "IPv4",
    annotations: dict | None = None,
) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{svc}-abc",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
            "annotations": annotations or {},
        },
        "addressType": address_type,
        "ports": ports
        if ports is not None
        else [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints if endpoints is not None else [endpoint("198.18.1.10")],
    }
