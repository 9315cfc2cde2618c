"""--proxy-mode=userspace: the DataPlane that serves Services from this process.

sync(): model → desired listeners (pure, memoized per Service) → balancers updated for
changed Services → Service addresses made local (node mode) → listeners opened, closed or
retargeted → addresses no longer used released. Problems with one listener or address
(port in use, address refused) are logged once and retried on later syncs; they never
fail the sync, so everything else keeps being served.

Node mode (root): Service IPs are owned on kube-proxy-py0 (see addresses.py); NodePorts
listen on the node addresses --nodeport-addresses allows. Laptop mode (not root, or
userspace_laptop="on"): Services listen on 127.x.y.z addresses (see laptop.py), nothing
in the kernel is changed, and `served` is that rewritten model (the runner gives it to
`sync` and to DNS, so names resolve to the addresses actually served).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from proxy.config import Config, UsageError
from proxy.endpoints.store import Snapshot
from proxy.handover import steer_to_newest, steer_to_oldest
from proxy.model import Model, PortSpec, Service, usable_endpoints
from proxy.userspace import metrics as umetrics
from proxy.userspace.addresses import AddressOwner, pick_node_addresses
from proxy.userspace.backend import Backend
from proxy.userspace.balancer import Balancer, ep_key
from proxy.userspace.laptop import LAPTOP_NODE_IP, LaptopRewriter
from proxy.userspace.listeners import (
    ListenerKey,
    Plan,
    Target,
    diff_listeners,
    fmt_key,
    listen_error,
    open_listener,
)
from proxy.userspace.tcp import ENGINES, TcpEngine, TcpListener
from proxy.userspace.udp import UdpListener

log = logging.getLogger("proxy.userspace")


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE → hard (each proxied connection needs two descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
                want = int(f.read())
        except (OSError, ValueError):
            want = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, want, e)
    return soft, hard


def laptop_mode(cfg: Config) -> bool:
    if cfg.userspace_laptop == "on":
        return True
    if cfg.userspace_laptop == "off":
        return False
    return os.geteuid() != 0


def _pick_engine(choice: str) -> str:
    if choice not in ENGINES:
        raise UsageError(f"userspace TCP engine {choice!r}: use one of {', '.join(ENGINES)}")
    return choice


def _port_spec(svc: Service, t: Target) -> PortSpec | None:
    for p in svc.ports:
        if p.name == t.port_name and p.protocol == t.protocol:
            return p
    return None


class UserspaceDataPlane:
    name = "userspace"
    forwards = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.laptop = laptop_mode(cfg)
        self.rewriter = LaptopRewriter(offset=cfg.userspace_port_offset) if self.laptop else None
        self.plan = Plan(any_family=self.laptop)
        self.backends: dict[Target, Backend] = {}
        self.listeners: dict[ListenerKey, TcpListener | UdpListener] = {}
        self.targets: dict[ListenerKey, Target] = {}  # what is open now
        self.addrs: AddressOwner | None = None
        self.tcp: TcpEngine | None = None
        self.node_ips: tuple[str, ...] = (LAPTOP_NODE_IP,) if self.laptop else ()
        self.foreign_ips: set[str] = set()  # local addresses that are not ours
        self._executor: ThreadPoolExecutor | None = None
        self._sweeper: asyncio.Task | None = None
        self._logged: dict[Any, str] = {}  # what is currently broken → reason (log once)
        self._empty: set[Target] = set()  # backends with no usable endpoint (logged)
        self._synced_once = False
        self.handed_over = False  # listeners given to a successor (hand_over)

    def served(self, model: Model) -> Model:
        """The model as served: in laptop mode, on loopback addresses and shifted ports."""
        return self.rewriter.rewrite(model) if self.rewriter is not None else model

    # -- lifecycle ---------------------------------------------------------------------------

    async def _netlink(self, fn: Callable, *args: Any) -> Any:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="userspace-netlink")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        soft, _ = raise_nofile_limit()
        loop = asyncio.get_running_loop()
        engine = _pick_engine(self.cfg.userspace_engine)
        self.tcp = TcpEngine(loop, engine=engine)
        if self.laptop:
            rw = self.rewriter
            assert rw is not None
            why = "not running as root" if os.geteuid() != 0 else "userspace_laptop=on"
            log.info(
                "laptop mode (%s): Services on 127.x.y.z loopback addresses, NodePorts on "
                "%s, ports below %d served at port+%d; no addresses or rules are changed",
                why,
                LAPTOP_NODE_IP,
                rw.port_start,
                rw.offset,
            )
        else:
            self.addrs = AddressOwner(self.cfg.userspace_address_mode)
            try:
                kind = await self._netlink(self.addrs.start)
            except Exception as e:
                raise UsageError(
                    f"userspace mode cannot own Service addresses ({e}); run as root with "
                    "CAP_NET_ADMIN, or as a normal user for laptop mode"
                ) from None
            log.info("node mode: Service addresses owned via %s", kind)
        log.info("userspace TCP engine %s, open files limit %d", self.tcp.engine, soft)
        self._sweeper = loop.create_task(self._sweep_loop(), name="userspace-sweeper")

    async def hand_over(self) -> None:
        """Stop accepting: UDP listeners are steered to a successor's sockets (ours stay
        open, so queued datagrams and replies of open sessions are still handled); TCP
        listeners close, and tcp_migrate_req moves their accept queues to the successor's.
        Established connections go on. No sync runs after this (the daemon stops them)."""
        self.handed_over = True
        for key, lst in list(self.listeners.items()):
            if isinstance(lst, UdpListener):
                steer_to_newest(lst.sock)
            else:
                lst.close()
                del self.listeners[key]
                self.targets.pop(key, None)
        self._update_gauges()

    def predecessor_gone(self) -> None:
        """The previous instance exited: our UDP listeners are the oldest in their groups."""
        for lst in self.listeners.values():
            if isinstance(lst, UdpListener):
                steer_to_oldest(lst.sock)

    def open_connections(self) -> int:
        return sum(len(b.conns) for b in self.backends.values())

    async def drain(self, timeout: float) -> None:
        """Wait for proxied TCP connections to finish, up to `timeout` seconds."""
        n = self.open_connections()
        if not n:
            return
        log.info("draining %d proxied connections (up to %.0fs)", n, timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.open_connections() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if n := self.open_connections():
            log.info("grace period over: closing %d proxied connections", n)
        else:
            log.info("every proxied connection finished")

    async def stop(self) -> None:
        """Close listeners and connections; Service addresses stay (like rules do)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for lst in self.listeners.values():
            lst.close()
        self.listeners.clear()
        self.targets.clear()
        for b in self.backends.values():
            for c in list(b.conns):
                c.close()
        if self.tcp is not None:
            self.tcp.close()
        self._update_gauges()
        await self._close_netlink()

    async def _close_netlink(self) -> None:
        if self.addrs is not None:
            with contextlib.suppress(Exception):
                await self._netlink(self.addrs.close)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def cleanup(self) -> None:
        """--cleanup: release every Service address this proxy made (node mode)."""
        if self.laptop:
            log.info("userspace cleanup: laptop mode changes nothing in the kernel")
            return
        owner = AddressOwner()
        try:
            released = await self._netlink(owner.cleanup)
        except PermissionError as e:
            raise UsageError(f"userspace cleanup needs root (CAP_NET_ADMIN): {e}") from None
        finally:
            with contextlib.suppress(Exception):
                await self._netlink(owner.close)
            await self._close_netlink()
        log.info("userspace cleanup: released %d Service addresses", len(released))

    # -- sync --------------------------------------------------------------------------------

    async def sync(self, snap: Snapshot, full: bool) -> None:
        t0 = time.perf_counter()
        model = snap.model  # already served(): laptop addresses in laptop mode
        if self.addrs is not None and (full or not self._synced_once or not snap.changed):
            # Full and periodic syncs re-read the kernel: node addresses change, and someone
            # may have removed one of ours.
            ours, local = await self._netlink(self.addrs.survey)
            self.foreign_ips = set(local)
            self.node_ips = pick_node_addresses(local, self.cfg.nodeport_addresses)
            self.addrs.owned = set(ours)
        desired, problems = self.plan.desired(model.services, self.node_ips)
        for key, msg in problems:
            self._once(("problem", key, msg), msg, "%s/%s: %s", key[0], key[1], msg)

        wanted = self._sync_backends(model, desired, snap.changed, full or not self._synced_once)

        bad_ips: set[str] = set()
        release: set[str] = set()
        if self.addrs is not None:
            want = {ip for ip, _, _ in desired} - self.foreign_ips
            add = sorted(want - self.addrs.owned)
            release = self.addrs.owned - want
            errors = await self._netlink(self.addrs.apply, add, ()) if add else {}
            bad_ips = set(errors)
            for ip, why in errors.items():
                if ("addr", ip) not in self._logged:
                    umetrics.GLOBAL.address_failures += 1
                owner = next((t.label for k, t in desired.items() if k[0] == ip), "?")
                self._once(
                    ("addr", ip), why, "%s: cannot add Service address %s: %s", owner, ip, why
                )
            for ip in add:
                if ip not in bad_ips:
                    self._recovered(("addr", ip), "Service address %s added", ip)

        opened, closed = self._sync_listeners(desired, bad_ips)

        if release:
            errors = await self._netlink(self.addrs.apply, (), sorted(release))
            for ip, why in errors.items():
                log.warning("cannot release Service address %s: %s", ip, why)
        for t in [t for t in self.backends if t not in wanted]:
            self._drop_backend(t)  # after their listeners closed
        ips = {k[0] for k in desired}
        for k in [k for k in self._logged if k[0] == "addr" and k[1] not in ips]:
            del self._logged[k]
        self._synced_once = True
        self._update_gauges()
        if opened or closed or release or full:
            log.info(
                "userspace %s sync: %d listeners (+%d -%d), %d backends, %d addresses%s in %.1fms",
                "full" if full else "partial",
                len(self.listeners),
                opened,
                closed,
                len(self.backends),
                len(self.addrs.owned) if self.addrs else 0,
                f" (released {len(release)})" if release else "",
                (time.perf_counter() - t0) * 1e3,
            )

    def _sync_backends(
        self, model: Model, desired: dict[ListenerKey, Target], changed: frozenset, full: bool
    ) -> set[Target]:
        """Create or update the backends `desired` needs; returns the set of them."""
        wanted = set(desired.values())
        host = self.cfg.hostname
        for t in wanted:
            b = self.backends.get(t)
            if b is not None and not full and t.service not in changed:
                continue
            svc = model.services[t.service]
            port = _port_spec(svc, t)
            eps = model.endpoints_for(svc, port) if port is not None else ()
            local = svc.external_traffic_local if t.external else svc.internal_traffic_local
            usable = usable_endpoints(svc, eps, host, local_only=local)
            if t.family:
                usable = tuple(e for e in usable if e.family == t.family)
            if b is None:
                bal = Balancer(usable, affinity_timeout=float(svc.session_affinity_timeout))
                b = self.backends[t] = Backend(t, bal, umetrics.stats_for(t.label, t.protocol))
            elif b.balancer.update(usable, float(svc.session_affinity_timeout)) and b.udp:
                keep = {ep_key(e) for e in usable}
                for u in b.udp:
                    u.purge(keep)
            if not usable and t not in self._empty:
                self._empty.add(t)
                log.info(
                    "%s/%s has no usable endpoints; connections to it are refused",
                    t.label,
                    t.protocol,
                )
            elif usable and t in self._empty:
                self._empty.discard(t)
                log.info("%s/%s has %d endpoints again", t.label, t.protocol, len(usable))
        return wanted

    def _drop_backend(self, t: Target) -> None:
        b = self.backends.pop(t)
        self._empty.discard(t)
        for c in list(b.conns):  # the Service is gone: cut, do not drain
            c.close(reset=True)
        if not any(o.label == t.label and o.protocol == t.protocol for o in self.backends):
            umetrics.drop_stats(t.label, t.protocol)

    def _sync_listeners(
        self, desired: dict[ListenerKey, Target], bad_ips: set[str]
    ) -> tuple[int, int]:
        diff = diff_listeners(self.targets, desired)
        closed = 0
        for key in diff.remove:
            lst = self.listeners.pop(key, None)
            t = self.targets.pop(key)
            if lst is not None:
                lst.close()
                closed += 1
                log.debug("%s: closed %s", t.label, fmt_key(key))
        for key, t in diff.retarget.items():
            lst = self.listeners[key]
            b = self.backends[t]
            if isinstance(lst, UdpListener):
                lst.retarget(b)
            else:
                lst.backend = b
            self.targets[key] = t
        opened = 0
        freebind = self.addrs is not None and self.addrs.kind == "local-route"
        for key, t in diff.add.items():
            if key[0] in bad_ips:
                continue
            try:
                sock = open_listener(key, freebind=freebind and key[0] not in self.foreign_ips)
            except OSError as e:
                why = listen_error(e)
                if ("listen", key) not in self._logged:
                    umetrics.GLOBAL.listen_failures += 1
                self._once(
                    ("listen", key),
                    why,
                    "%s: cannot listen on %s: %s; retrying on every sync",
                    t.label,
                    fmt_key(key),
                    why,
                )
                continue
            b = self.backends[t]
            if key[2] == "TCP":
                assert self.tcp is not None
                lst: TcpListener | UdpListener = self.tcp.listen(key, sock, b)
            else:
                lst = UdpListener(
                    asyncio.get_running_loop(),
                    key,
                    sock,
                    b,
                    max_sessions=self.cfg.userspace_udp_max_sessions,
                    fds=self.tcp,
                )
            self.listeners[key] = lst
            self.targets[key] = t
            opened += 1
            self._recovered(("listen", key), "%s: listening on %s", t.label, fmt_key(key))
            log.debug("%s: listening on %s", t.label, fmt_key(key))
        for k in [k for k in self._logged if k[0] == "listen" and k[1] not in desired]:
            del self._logged[k]
        return opened, closed

    # -- housekeeping --------------------------------------------------------------------------

    def _once(self, key: Any, reason: str, fmt: str, *args: Any) -> None:
        """Log a problem when it starts or its reason changes, not on every sync."""
        if self._logged.get(key) != reason:
            self._logged[key] = reason
            log.warning(fmt, *args)

    def _recovered(self, key: Any, fmt: str, *args: Any) -> None:
        if self._logged.pop(key, None) is not None:
            log.info(fmt, *args)

    def _update_gauges(self) -> None:
        g = umetrics.GLOBAL
        g.listeners = {
            "TCP": sum(1 for k in self.listeners if k[2] == "TCP"),
            "UDP": sum(1 for k in self.listeners if k[2] == "UDP"),
        }
        g.addresses = len(self.addrs.owned) if self.addrs is not None else 0

    def sweep(self, now: float) -> None:
        """Idle TCP connections and UDP sessions out, expired affinity entries out."""
        if self.tcp is not None:
            self.tcp.update_budget()
        tcp_idle = self.cfg.userspace_tcp_idle_timeout
        udp_idle = self.cfg.udp_idle_timeout
        for b in list(self.backends.values()):
            if tcp_idle > 0 and b.conns:
                for c in [c for c in b.conns if c.up is not None and now - c.last > tcp_idle]:
                    log.debug("%s: closing connection idle for %.0fs", b.label, now - c.last)
                    c.close()
            for u in b.udp:
                u.expire(now, udp_idle)
            if b.balancer.affinity_timeout:
                b.balancer.expire(now)

    async def _sweep_loop(self) -> None:
        timeouts = [
            t for t in (self.cfg.userspace_tcp_idle_timeout, self.cfg.udp_idle_timeout) if t
        ]
        tick = max(0.05, min([1.0, *(t / 4 for t in timeouts)]))
        while True:
            await asyncio.sleep(tick)
            try:
                self.sweep(time.monotonic())
            except Exception:
                log.exception("userspace sweep failed")
