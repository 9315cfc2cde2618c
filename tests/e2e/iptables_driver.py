"""Drives one IptablesDataPlane inside a network namespace, for the kernel tests.

Run as `ip netns exec NS python -m tests.e2e.iptables_driver`: the whole process (and
every iptables/conntrack command it starts) lives in NS, so nothing can reach the host's
rules. One JSON command per stdin line, one JSON reply per stdout line; logs go to stderr.

Commands: start {cfg}, sync {model, changed, full}, inject {line[, chunk]}, chunks {chains},
metrics, cleanup {cfg}, detect. Models are sent as plain JSON (see `build_model`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
from types import MappingProxyType
from typing import Any

from prometheus_client import REGISTRY

from proxy.config import Config
from proxy.endpoints.store import Snapshot
from proxy.iptables import backend
from proxy.iptables import dataplane as dp_mod
from proxy.iptables.dataplane import IptablesDataPlane
from proxy.model import Endpoint, PortSpec, Service, ServiceEndpoints, make_model

_real_render = dp_mod._timed_render


def build_model(spec: dict[str, Any]):
    """{"services": [{ns, name, ips, ports: [[name, proto, port, nodePort]]}],
    "endpoints": {"ns/name": [[portname, proto, ip, port, ready]]}} → Model."""
    services = {}
    for s in spec.get("services", []):
        ports = tuple(PortSpec(p[0], p[1], p[2], p[3] if len(p) > 3 else 0) for p in s["ports"])
        svc = Service(
            s["ns"],
            s["name"],
            type=s.get("type", "NodePort" if any(p.node_port for p in ports) else "ClusterIP"),
            cluster_ips=tuple(s["ips"]),
            ports=ports,
        )
        services[svc.key] = svc
    endpoints = {}
    for key, rows in spec.get("endpoints", {}).items():
        ns, name = key.split("/")
        by_port: dict[tuple[str, str], list[Endpoint]] = {}
        for pname, proto, ip, port, ready in rows:
            by_port.setdefault((pname, proto), []).append(
                Endpoint(ip, port, ready=ready, serving=ready, node_name="node")
            )
        endpoints[(ns, name)] = ServiceEndpoints(
            ports=MappingProxyType({k: tuple(v) for k, v in by_port.items()})
        )
    return make_model(services, endpoints)


class Driver:
    def __init__(self) -> None:
        self.dp: IptablesDataPlane | None = None
        self.inject: str | None = None
        self.inject_chunk: int | None = None  # inject into that chunk (`pre`), not `text`
        self.texts: dict[int, str] = {}
        dp_mod._timed_render = self._render  # capture (and optionally corrupt) renders

    def _render(self, model, rcfg, changed, previous, chunk_chains=0):
        res, dt = _real_render(model, rcfg, changed, previous, chunk_chains)
        if self.inject is not None and rcfg.family == 4 and self.inject_chunk is not None:
            pre = list(res.pre)
            head, sep, tail = pre[self.inject_chunk].rpartition("COMMIT")
            pre[self.inject_chunk] = f"{head}{self.inject}\n{sep}{tail}"
            res = dataclasses.replace(res, pre=pre)
            self.inject = self.inject_chunk = None
        elif self.inject is not None and rcfg.family == 4:
            head, sep, tail = res.text.rpartition("COMMIT")  # the nat table's COMMIT
            res = dataclasses.replace(res, text=f"{head}{self.inject}\n{sep}{tail}")
            self.inject = None
        self.texts[rcfg.family] = res.text
        return res, dt

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "start":
            self.dp = IptablesDataPlane(Config(**cmd.get("cfg", {})))
            await self.dp.start()
            return {"backends": {str(f): str(b) for f, b in self.dp.backends.items()}}
        if op == "sync":
            assert self.dp is not None
            model = build_model(cmd["model"])
            changed = cmd.get("changed")
            keys = frozenset(tuple(k.split("/")) for k in changed) if changed else frozenset()
            self.texts = {}
            await self.dp.sync(Snapshot(model, keys), bool(cmd.get("full")))
            return {
                "texts": {str(k): v for k, v in self.texts.items()},
                "render_s": self.dp.last_render_seconds,
                "restore_s": self.dp.last_restore_seconds,
            }
        if op == "inject":
            self.inject, self.inject_chunk = cmd["line"], cmd.get("chunk")
            return {}
        if op == "chunks":  # chains per restore on nft (the daemon's is for 10k Services)
            dp_mod.NFT_CHUNK_CHAINS = cmd["chains"]
            return {}
        if op == "metrics":
            names = (
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
            )
            out = {n: REGISTRY.get_sample_value(n) or 0.0 for n in names}
            for table in ("nat", "filter"):
                out[f"total_{table}"] = REGISTRY.get_sample_value(
                    "kubeproxy_sync_proxy_rules_iptables_total", {"table": table}
                )
            return out
        if op == "cleanup":
            await IptablesDataPlane(Config(**cmd.get("cfg", {}))).cleanup()
            return {}
        if op == "detect":
            mode, reason = await backend.detect_mode()
            return {"mode": mode, "reason": reason}
        raise ValueError(f"unknown op {op!r}")


async def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    driver = Driver()
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        try:
            reply = {"ok": True, **await driver.handle(json.loads(line))}
        except Exception as e:
            logging.getLogger("driver").exception("command failed")
            reply = {
                "ok": False,
                "type": type(e).__name__,
                "error": str(e),
                "texts": {str(k): v for k, v in driver.texts.items()},
            }
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
