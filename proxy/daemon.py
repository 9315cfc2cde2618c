"""The daemon: wires a source, the store, one data plane, DNS and health on one loop.

    Source ─(threads)─> Store ─> SyncRunner ─> DataPlane.sync
                                          └──> consumers: DNS (at once), health check
                                               nodePorts (once programmed)

Every seam is typed (proxy/endpoints/source.py, proxy/dataplane.py): the daemon only
decides which parts exist.

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
from typing import TYPE_CHECKING

from proxy.config import Config, PrivilegeError, UsageError, describe
from proxy.dataplane import Consumer, DataPlane, NoDataPlane
from proxy.endpoints.source import Source
from proxy.endpoints.store import Store
from proxy.health import HealthServer, HealthState, ServiceHealthServers
from proxy.model import Model, ServiceKey
from proxy.sync import SyncRunner

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from proxy.dns import DnsServer

log = logging.getLogger("proxy")


def make_dataplane(cfg: Config, api_client: ApiClient | None = None) -> DataPlane:
    if cfg.proxy_mode == "iptables":
        from proxy.iptables.dataplane import IptablesDataPlane

        return IptablesDataPlane(cfg)
    if cfg.proxy_mode == "nftables":
        from proxy.nftables.dataplane import NftablesDataPlane

        return NftablesDataPlane(cfg)
    if cfg.proxy_mode == "userspace":
        from proxy.userspace.dataplane import UserspaceDataPlane

        return UserspaceDataPlane(cfg, api_client)
    return NoDataPlane()


def make_source(cfg: Config, store: Store) -> Source:
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


class DnsConsumer:
    """Cluster DNS follows the served model as soon as it is known (see Consumer)."""

    name = "DNS"
    after_sync = False

    def __init__(self, dns: DnsServer) -> None:
        self.dns = dns

    async def update(self, model: Model, changed: frozenset[ServiceKey] | None) -> None:
        self.dns.update(model)


async def cleanup(cfg: Config) -> int:
    """--cleanup: remove what any mode of this proxy made; exit 0."""
    ok = True
    for mode in ("iptables", "nftables", "userspace"):
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
    source.check()
    dataplane = make_dataplane(cfg, source.api_client)

    health = HealthState(timeout=2 * cfg.sync_period)
    health_server = HealthServer(health)
    await health_server.start(cfg.healthz_bind, cfg.metrics_bind)

    consumers: list[Consumer] = []
    dns = None
    if cfg.dns_bind is not None:
        from proxy.dns import DnsServer

        dns = DnsServer(cfg)
        await dns.start()
        consumers.append(DnsConsumer(dns))

    await dataplane.start()  # missing binaries / no privileges: still nothing programmed

    svc_health = None
    if dataplane.forwards:  # nothing to check where nothing forwards (--proxy-mode=none)
        # In a worker thread: pyroute2's synchronous API cannot run inside this running loop.
        hosts = await asyncio.to_thread(nodeport_hosts, cfg)
        svc_health = ServiceHealthServers(cfg.hostname, health, hosts)
        consumers.append(svc_health)

    runner = SyncRunner(
        store,
        dataplane,
        period=cfg.sync_period,
        min_period=cfg.min_sync_period,
        health=health,
        consumers=consumers,
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
        if svc_health is not None:
            with contextlib.suppress(Exception):
                await svc_health.stop()
        if dns is not None:
            with contextlib.suppress(Exception):
                await dns.stop()
        await dataplane.stop()
        await health_server.stop()
    return 0
