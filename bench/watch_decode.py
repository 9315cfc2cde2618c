"""Decoding cost of API lists and watch events: client model objects vs raw JSON.

Why the Kubernetes source reads raw JSON (`_preload_content=False` + `json.loads`): the
official client turns every object into model instances, which costs much more CPU (and
memory) than parsing JSON, and the store wants the wire's dicts anyway. Not a test: it
measures, side by side in one run (ratios, as these machines are noisy), and writes
bench/results/watch_decode.json.

  python -m kube_proxy_py_bench.watch_decode             # 10k Services, 100k endpoints
  python -m kube_proxy_py_bench.watch_decode --services 1000 --endpoints 10000 --repeat 5

Measured, each the median of --repeat runs:
  * list decode in process: a ServiceList / EndpointSliceList body → objects;
  * watch decode in process: one event line per object → events (the client's
    `Watch.unmarshal_event` vs one `json.loads` per line);
  * list through HTTP from proxy/testbed/apiserver with the client (models vs raw), end to end;
  * for scale: the store's own parse of the raw list (Store.replace);
  * peak Python heap while decoding the slice list (tracemalloc), models vs raw.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Store
from proxy.testbed.apiserver import ApiServer

RESULTS = Path(__file__).resolve().parent / "results"
PER_SLICE = 100  # the EndpointSlice controller's default maximum
MANAGED_BY = "endpointslice-controller.k8s.io"
TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"


def services(n: int) -> list[dict[str, Any]]:
    """n realistic Services, as the API server returns them (minus managedFields)."""
    out = []
    for i in range(n):
        ip = f"198.19.{i // 256 % 256}.{i % 256}"
        out.append({
            "kind": "Service", "apiVersion": "v1",
            "metadata": {
                "name": f"svc-{i}", "namespace": f"ns-{i % 50}",
                "uid": f"00000000-0000-4000-8000-{i:012d}",
                "resourceVersion": str(1000 + i), "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app": f"app-{i}", "team": "bench"},
                "annotations": {"note": "generated"},
            },
            "spec": {
                "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "ports": [
                    {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                    {"name": "metrics", "protocol": "TCP", "port": 9090, "targetPort": "metrics"},
                ],
                "selector": {"app": f"app-{i}"}, "sessionAffinity": "None",
                "internalTrafficPolicy": "Cluster",
            },
            "status": {"loadBalancer": {}},
        })  # fmt: skip
    return out


def slices(endpoints: int) -> list[dict[str, Any]]:
    """`endpoints` endpoints in slices of PER_SLICE, as the controller writes them."""
    out = []
    for s in range(max(1, endpoints // PER_SLICE)):
        eps = []
        for j in range(PER_SLICE):
            k = s * PER_SLICE + j
            eps.append({
                "addresses": [f"198.18.{k // 256 % 256}.{k % 256}"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": f"node-{k % 20}", "zone": f"zone-{k % 3}",
                "targetRef": {"kind": "Pod", "namespace": f"ns-{s % 50}", "name": f"pod-{k}",
                              "uid": f"00000000-0000-4000-9000-{k:012d}"},
            })  # fmt: skip
        out.append({
            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {
                "name": f"svc-{s}-abcde", "namespace": f"ns-{s % 50}",
                "uid": f"00000000-0000-4000-a000-{s:012d}", "resourceVersion": str(50000 + s),
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"kubernetes.io/service-name": f"svc-{s}",
                           "endpointslice.kubernetes.io/managed-by": MANAGED_BY},
                "annotations": {TRIGGER: "2026-01-01T00:00:00Z"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": eps,
        })  # fmt: skip
    return out


def list_body(kind: str, api_version: str, items: list[dict[str, Any]]) -> bytes:
    return json.dumps({
        "kind": kind + "List", "apiVersion": api_version,
        "metadata": {"resourceVersion": "99999"}, "items": items,
    }).encode()  # fmt: skip


def event_lines(items: list[dict[str, Any]]) -> list[str]:
    return [json.dumps({"type": "MODIFIED", "object": o}) for o in items]


def timed(fn: Callable[[], Any], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def compare(model: Callable[[], Any], raw: Callable[[], Any], repeat: int) -> dict[str, float]:
    """Median times of the two ways, interleaved so both see the same machine noise."""
    m, r = [], []
    for _ in range(repeat):
        m.append(timed(model, 1))
        r.append(timed(raw, 1))
    ms, rs = statistics.median(m), statistics.median(r)
    return {"model_s": round(ms, 4), "raw_s": round(rs, 4), "ratio": round(ms / rs, 1)}


def peak_heap_mb(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        keep = fn()  # noqa: F841 (held until the peak is read)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def run(n_svc: int, n_eps: int, repeat: int) -> dict[str, Any]:
    api_client = k8s.ApiClient()
    w = k8s_watch.Watch()
    svcs, sls = services(n_svc), slices(n_eps)
    svc_body = list_body("Service", "v1", svcs)
    sl_body = list_body("EndpointSlice", "discovery.k8s.io/v1", sls)
    svc_text, sl_text = svc_body.decode(), sl_body.decode()
    svc_lines, sl_lines = event_lines(svcs), event_lines(sls)

    def model_list(text: str, typ: str) -> Callable[[], Any]:
        return lambda: api_client.deserialize(text, typ, "application/json")

    def model_events(lines: list[str], typ: str) -> Callable[[], Any]:
        return lambda: [w.unmarshal_event(line, typ) for line in lines]

    def raw_events(lines: list[str]) -> Callable[[], Any]:
        return lambda: [json.loads(line) for line in lines]

    r: dict[str, Any] = {
        "services": n_svc,
        "endpoints": len(sls) * PER_SLICE,
        "endpoint_slices": len(sls),
        "bytes": {"service_list": len(svc_body), "slice_list": len(sl_body)},
        "repeat": repeat,
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],  # a noisy machine?
    }
    print(f"decoding {n_svc} Services ({len(svc_body) / 2**20:.1f} MiB) and "
          f"{len(sls)} slices ({len(sl_body) / 2**20:.1f} MiB) ...", flush=True)  # fmt: skip
    r["list_decode"] = {
        "services": compare(
            model_list(svc_text, "V1ServiceList"),
            lambda: json.loads(svc_body),
            repeat,
        ),
        "endpoint_slices": compare(
            model_list(sl_text, "V1EndpointSliceList"),
            lambda: json.loads(sl_body),
            repeat,
        ),
    }
    r["watch_decode"] = {
        "services": compare(
            model_events(svc_lines, "V1Service"),
            raw_events(svc_lines),
            repeat,
        ),
        "endpoint_slices": compare(
            model_events(sl_lines, "V1EndpointSlice"),
            raw_events(sl_lines),
            repeat,
        ),
    }
    r["store_replace_s"] = {
        "services": round(timed(lambda: Store().replace(SERVICE, svcs), repeat), 4),
        "endpoint_slices": round(timed(lambda: Store().replace(ENDPOINT_SLICE, sls), repeat), 4),
    }
    r["peak_heap_mib_slice_list"] = {
        "model": round(peak_heap_mb(model_list(sl_text, "V1EndpointSliceList")), 1),
        "raw": round(peak_heap_mb(lambda: json.loads(sl_body)), 1),
    }
    r["http_list"] = http_lists(svcs, sls, repeat)
    r["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return r


def http_lists(svcs: list[dict], sls: list[dict], repeat: int) -> dict[str, Any]:
    """The same lists fetched from proxy/testbed/apiserver over loopback, end to end."""
    api = ApiServer()
    for o in svcs + sls:
        api.apply(o)
    api.start()
    try:
        conf = k8s.Configuration(host=api.url)
        with k8s.ApiClient(conf) as c:
            core, disc = k8s.CoreV1Api(c), k8s.DiscoveryV1Api(c)

            def raw(fn: Callable[..., Any]) -> Callable[[], Any]:
                def go() -> Any:
                    resp = fn(_preload_content=False)
                    try:
                        return json.loads(resp.data)
                    finally:
                        resp.release_conn()

                return go

            return {
                "services": compare(
                    core.list_service_for_all_namespaces,
                    raw(core.list_service_for_all_namespaces),
                    repeat,
                ),
                "endpoint_slices": compare(
                    disc.list_endpoint_slice_for_all_namespaces,
                    raw(disc.list_endpoint_slice_for_all_namespaces),
                    repeat,
                ),
            }
    finally:
        api.stop()


def report(r: dict[str, Any]) -> str:
    rows = [f"{r['services']} Services, {r['endpoints']} endpoints in {r['endpoint_slices']} "
            f"slices (median of {r['repeat']})",
            f"{'':36}{'models':>10}{'raw JSON':>10}{'ratio':>8}"]  # fmt: skip
    for section, title in (("list_decode", "list decode"), ("watch_decode", "watch decode"),
                           ("http_list", "list over HTTP")):  # fmt: skip
        for what, p in r[section].items():
            label = f"{title}, {what}"
            rows.append(f"{label:36}{p['model_s']:>9.3f}s{p['raw_s']:>9.3f}s{p['ratio']:>7.1f}x")
    s = r["store_replace_s"]
    rows.append(f"store.replace of the raw lists: Services {s['services']:.3f}s, "
                f"slices {s['endpoint_slices']:.3f}s")  # fmt: skip
    h = r["peak_heap_mib_slice_list"]
    rows.append(f"peak heap decoding the slice list: models {h['model']} MiB, raw {h['raw']} MiB")
    rows.append(f"load average at start/end: {r['loadavg_at_start']} / {r['loadavg_at_end']}")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "watch_decode.json")
    a = ap.parse_args()
    r = run(a.services, a.endpoints, a.repeat)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2) + "\n")
    print(report(r))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
