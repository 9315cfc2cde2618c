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
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from proxy import memory, nodesetup
from proxy.config import Config, PrivilegeError, UsageError, describe
from proxy.dataplane import LARGE_MODEL, Consumer, DataPlane, NoDataPlane
from proxy.endpoints.source import Source
from proxy.endpoints.store import Store
from proxy.handover import Handover, channel_key, enable_tcp_migration
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
    from proxy.endpoints.kube import DEFAULT_KINDS, KubeSource, this_node

    if cfg.proxy_mode == "userspace":
        from proxy.userspace.dataplane import laptop_mode

        if laptop_mode(cfg):  # a laptop is no Node: its user needs no right to read Nodes
            return KubeSource(cfg, store)
    # Services, EndpointSlices and this node's own Node (zone, node IPs).
    return KubeSource(cfg, store, kinds=(*DEFAULT_KINDS, this_node(cfg.hostname)))


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
        if len(model.services) >= LARGE_MODEL:
            await self.dns.follow(model)  # indexing in a worker thread
        else:
            self.dns.update(model)


class HandoverConsumer:
    """After the first sync this instance can serve: take over from a predecessor (a
    rolling update; proxy/handover.py), then accept a successor's requests."""

    name = "handover"
    after_sync = True

    def __init__(self, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._start: Callable[[], Coroutine[Any, Any, None]] | None = start
        self.task: asyncio.Task[None] | None = None

    async def update(self, model: Model, changed: frozenset[ServiceKey] | None) -> None:
        if self._start is not None:
            self.task = asyncio.get_running_loop().create_task(self._start(), name="handover")
            self._start = None


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
    from proxy.dns.nodelocal import NodeLocalDns

    try:
        await NodeLocalDns.cleanup()
    except Exception as e:
        ok = False
        log.error("cleanup of node-local DNS failed: %s", e)
    log.info("cleanup %s", "done" if ok else "incomplete")
    return 0 if ok else 1


async def run(cfg: Config) -> int:
    if cfg.cleanup:
        return await cleanup(cfg)
    if cfg.init_only:  # privileged set-up for a container that will not have the rights
        return await asyncio.to_thread(nodesetup.init_only, cfg)
    log.info("starting kube-proxy-py: %s", describe(cfg))
    memory.tune()  # before the watch and worker threads exist
    # The loop's thread gets the GIL back within 1 ms (Python's default: 5 ms) when a
    # watch thread is parsing a big list: answers and new connections wait less.
    sys.setswitchinterval(0.001)
    store = Store(node_name=cfg.hostname)
    # Every user error (unreadable kubeconfig, port in use, …) must surface before the
    # data plane touches the node: a daemon that exits on a typo leaves no rules behind.
    source = make_source(cfg, store)
    source.check()
    dataplane = make_dataplane(cfg, source.api_client)
    # A previous instance on this node (a rolling update) hands its sockets over once we
    # are synced; see proxy/handover.py.
    handover = Handover(
        channel_key(cfg.healthz_bind, cfg.metrics_bind, cfg.dns_bind)
        if cfg.userspace_laptop != "on"
        else None
    )
    await handover.connect()
    if os.geteuid() == 0 and dataplane.forwards and cfg.userspace_laptop != "on":
        await asyncio.to_thread(enable_tcp_migration)

    health = HealthState(timeout=2 * cfg.sync_period)
    health_server = HealthServer(health)
    await health_server.start(cfg.healthz_bind, cfg.metrics_bind)

    consumers: list[Consumer] = []
    dns = None
    if cfg.dns_bind is not None:
        from proxy.dns import DnsServer

        dns = DnsServer(cfg)
        if cfg.dns_node_local:  # the address must be the node's before DNS binds it
            from proxy.dns.nodelocal import NodeLocalDns

            await NodeLocalDns(cfg).start()
        await dns.start()
        consumers.append(DnsConsumer(dns))

    # The initial lists (and their parse) overlap the data plane's preparation below:
    # listing touches nothing on the node, and the runner syncs once both are done.
    source.start()
    stopped = False

    async def stop_source() -> None:  # once, on whichever exit path comes first
        nonlocal stopped
        if not stopped:
            stopped = True
            await asyncio.to_thread(source.stop)

    try:
        return await _serve(
            cfg, store, stop_source, dataplane, health, health_server, consumers, dns, handover
        )
    finally:
        await stop_source()


async def _serve(
    cfg: Config,
    store: Store,
    stop_source: Callable[[], Awaitable[None]],
    dataplane: DataPlane,
    health: HealthState,
    health_server: HealthServer,
    consumers: list[Consumer],
    dns: DnsServer | None,
    handover: Handover,
) -> int:
    if nodesetup.sets_up_node(cfg):  # kube-proxy's conntrack settings, before any rule
        await asyncio.to_thread(nodesetup.setup_conntrack, cfg)
    await dataplane.start()  # missing binaries / no privileges: still nothing programmed

    svc_health = None
    if dataplane.forwards:  # nothing to check where nothing forwards (--proxy-mode=none)
        # In a worker thread: pyroute2's synchronous API cannot run inside this running loop.
        hosts = await asyncio.to_thread(nodeport_hosts, cfg)
        svc_health = ServiceHealthServers(cfg.hostname, health, hosts)
        consumers.append(svc_health)

    runner_task: asyncio.Task | None = None

    async def give_up() -> None:
        """A successor is synced: it takes the listening sockets; we stop syncing."""
        await health_server.stop()
        if svc_health is not None:
            await svc_health.stop()
        if dns is not None:
            dns.hand_over()
        await dataplane.hand_over()
        if runner_task is not None:
            runner_task.cancel()

    def alone() -> None:
        if dns is not None:
            dns.steer_to_self()
        dataplane.predecessor_gone()

    taking_over = HandoverConsumer(lambda: handover.ready(give_up, alone))
    consumers.append(taking_over)

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

    log.info("kube-proxy-py running in %s mode, node %s", dataplane.name, cfg.hostname)
    try:
        async with asyncio.TaskGroup() as tg:
            sync_task = runner_task = tg.create_task(runner.run(), name="sync")
            stop_task = tg.create_task(stop.wait(), name="signals")
            await asyncio.wait({sync_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if handover.handed_over.is_set():  # serve what is open until SIGTERM
                await stop_source()
                log.info("handed over to the new instance; waiting for SIGTERM")
                await stop_task
            sync_task.cancel()
            stop_task.cancel()
    finally:
        log.info("shutting down; %s state is left in place", dataplane.name)
        # One grace period for both: waiting for a successor, then draining (it must fit
        # in the pod's terminationGracePeriodSeconds).
        deadline = loop.time() + cfg.shutdown_grace_period
        await handover.wait_for_successor(cfg.shutdown_grace_period)
        await stop_source()  # may wait for an in-flight list request
        if svc_health is not None:
            with contextlib.suppress(Exception):
                await svc_health.stop()
        with contextlib.suppress(Exception):
            await dataplane.hand_over()  # stop accepting; established connections go on
            await dataplane.drain(max(0.0, deadline - loop.time()))
        if dns is not None:
            with contextlib.suppress(Exception):
                await dns.stop()
        await dataplane.stop()
        await health_server.stop()
        await handover.close()
        if taking_over.task is not None:
            taking_over.task.cancel()
    return 0
