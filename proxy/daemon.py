"""The daemon: wires a source, the store, one data plane, DNS and health on one loop.

Structured concurrency: every long-lived task belongs to one TaskGroup; SIGTERM/SIGINT
end it in order (stop accepting, stop watching) and leave the node's rules in place, as
kube-proxy does, so a restart or upgrade does not interrupt Service traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import signal
from typing import TYPE_CHECKING, Any

from proxy.config import Config, PrivilegeError, UsageError, describe
from proxy.dataplane import DataPlane, NoDataPlane
from proxy.endpoints.store import Snapshot, Store
from proxy.health import HealthServer, HealthState, ServiceHealthServers
from proxy.sync import SyncRunner

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger("proxy")


def make_dataplane(cfg: Config, api_client: ApiClient | None = None) -> DataPlane:
    if cfg.proxy_mode == "iptables":
        from proxy.iptables.dataplane import IptablesDataPlane

        return IptablesDataPlane(cfg)
    if cfg.proxy_mode == "userspace":
        from proxy.userspace.dataplane import UserspaceDataPlane

        return UserspaceDataPlane(cfg, api_client)
    return NoDataPlane()


def make_source(cfg: Config, store: Store) -> Any:
    if cfg.manifests:
        from proxy.endpoints.manifests import ManifestsSource

        return ManifestsSource(cfg.manifests, store)
    from proxy.endpoints.kube import KubeSource

    return KubeSource(cfg, store)


def nodeport_hosts(cfg: Config) -> tuple[str, ...]:
    """Addresses the health check nodePorts listen on (all, or those in the CIDRs)."""
    if not cfg.nodeport_addresses:
        return ("0.0.0.0",)
    nets = [ipaddress.ip_network(c) for c in cfg.nodeport_addresses]
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ips = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()]
    except Exception as e:  # netlink unavailable: fall back to all addresses
        log.warning("cannot list local addresses (%s); health check nodePorts on 0.0.0.0", e)
        return ("0.0.0.0",)
    out = tuple(ip for ip in ips if ip and any(ipaddress.ip_address(ip) in n for n in nets))
    return out or ("127.0.0.1",)


async def cleanup(cfg: Config) -> int:
    """--cleanup: remove what any mode of this proxy made; exit 0."""
    ok = True
    for mode in ("iptables", "userspace"):
        try:
            dp = make_dataplane(dataclasses.replace(cfg, proxy_mode=mode))
            await dp.cleanup()
        except PrivilegeError:
            raise  # "cleanup done" without the rights to look would be a lie
        except UsageError as e:
            # e.g. no iptables binary: there can be nothing of ours to remove there
            log.info("cleanup of %s mode skipped: %s", mode, e)
        except Exception as e:
            ok = False
            log.error("cleanup of %s mode failed: %s", mode, e)
    log.info("cleanup %s", "done" if ok else "incomplete")
    return 0 if ok else 1


async def run(cfg: Config) -> int:
    if cfg.cleanup:
        return await cleanup(cfg)
    log.info("starting kube-proxy-py: %s", describe(cfg))
    store = Store()
    # Every user error (unreadable kubeconfig, port in use, …) must surface before the
    # data plane touches the node: a daemon that exits on a typo leaves no rules behind.
    source = make_source(cfg, store)
    if hasattr(source, "check"):
        source.check()
    dataplane = make_dataplane(cfg, source.api_client)

    health = HealthState(timeout=2 * cfg.sync_period)
    health_server = HealthServer(health)
    await health_server.start(cfg.healthz_bind, cfg.metrics_bind)

    listeners = []
    dns = None
    if cfg.dns_bind is not None:
        from proxy.dns import DnsServer

        dns = DnsServer(cfg)
        model_for_dns = getattr(dataplane, "model_for_dns", None)
        if model_for_dns is not None:  # laptop mode: DNS points at the loopback addresses
            listeners.append(lambda m: dns.update(model_for_dns(m)))
        else:
            listeners.append(dns.update)
        await dns.start()

    await dataplane.start()  # missing binaries / no privileges: still nothing programmed

    # In a worker thread: pyroute2's synchronous API cannot run inside this running loop.
    hosts = await asyncio.to_thread(nodeport_hosts, cfg)
    svc_health = ServiceHealthServers(cfg.hostname, health, hosts)

    async def after_sync(snap: Snapshot) -> None:
        if cfg.proxy_mode != "none":
            await svc_health.update(snap.model)

    runner = SyncRunner(
        store,
        dataplane,
        period=cfg.sync_period,
        min_period=cfg.min_sync_period,
        health=health,
        listeners=listeners,
        after_sync=after_sync,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    source.start()
    log.info("kube-proxy-py running in %s mode, node %s", dataplane.name, cfg.hostname)
    try:
        async with asyncio.TaskGroup() as tg:
            sync_task = tg.create_task(runner.run(), name="sync")
            stop_task = tg.create_task(stop.wait(), name="signals")
            await asyncio.wait({sync_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            sync_task.cancel()
            stop_task.cancel()
    finally:
        log.info("shutting down; %s state is left in place", dataplane.name)
        await asyncio.to_thread(source.stop)  # may wait for an in-flight list request
        with contextlib.suppress(Exception):
            await svc_health.stop()
        if dns is not None:
            with contextlib.suppress(Exception):
                await dns.stop()
        await dataplane.stop()
        await health_server.stop()
    return 0
