"""Node-local cluster DNS answered from the daemon's own watch cache.

The daemon uses only `DnsServer`:

    dns = DnsServer(cfg)        # reads upstreams / search domains; binds nothing yet
    await dns.start()           # binds cfg.dns_bind (UDP and TCP) or raises UsageError
    dns.update(model)           # after every store snapshot, on the event loop
    await dns.stop()

Layout: answer.py (pure answerer: Zone + answer()), wire.py (hand-parsed fast path and
reply templates), server.py (packet handler, UDP and TCP servers), upstream.py
(forwarding and its cache), stats.py (kubeproxy_dns_* metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time

from proxy.config import Config, UsageError
from proxy.handover import reuseport, steer_to_newest, steer_to_oldest
from proxy.model import Model

from . import upstream as _upstream
from .answer import Zone, model_changes
from .server import Handler, TcpServer, UdpServer
from .stats import STATS
from .upstream import Forwarder, parse_upstreams, read_resolv_conf, upstream_name, without_self

log = logging.getLogger("proxy.dns")

__all__ = ["DnsServer"]

UDP_RCVBUF = 4 << 20  # absorb bursts while the loop is busy (capped by net.core.rmem_max)


def _bind_error(flag: str, e: OSError) -> UsageError:
    if e.errno == errno.EADDRINUSE:
        why = (
            "address already in use; another DNS server (systemd-resolved, dnsmasq, a "
            "hostNetwork CoreDNS?) listens there: stop it or pick another address"
        )
    elif e.errno == errno.EADDRNOTAVAIL:
        why = "cannot assign requested address; it is not an address of this node"
    elif e.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE"
    else:
        why = e.strerror or str(e)
    return UsageError(f"--dns-bind-address {flag}: {why}")


class DnsServer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        servers, search = read_resolv_conf(_upstream.RESOLV_CONF)
        ups = parse_upstreams(cfg.dns_upstream) if cfg.dns_upstream else servers
        self.upstreams = without_self(ups, cfg.dns_bind)
        self.search = search
        self._serial = int(time.time())
        bind_host = cfg.dns_bind[0] if cfg.dns_bind else "0.0.0.0"
        self._ns_ips = () if ipaddress.ip_address(bind_host).is_unspecified else (bind_host,)
        self._forwarder = Forwarder(self.upstreams)
        self._model: Model | None = None
        self._handler = Handler(self._zone(None), self._forwarder)
        self._udp: UdpServer | None = None
        self._tcp = TcpServer(self._handler)
        self._tcp_server: asyncio.base_events.Server | None = None
        self.address: tuple[str, int] | None = None  # what was bound (port 0 resolved)
        STATS.gauges["kubeproxy_dns_cache_entries"] = (
            "Forwarded answers in the cache",
            lambda: len(self._forwarder.cache),
        )
        STATS.gauges["kubeproxy_dns_tcp_connections"] = (
            "Open DNS-over-TCP client connections",
            lambda: len(self._tcp.conns),
        )
        STATS.gauges["kubeproxy_dns_fast_entries"] = (
            "Precomputed answers for the current model",
            lambda: len(self._handler.fast),
        )

    def _zone(self, model: Model | None) -> Zone:
        return Zone(
            model,
            self.cfg.cluster_domain,
            self.cfg.dns_ttl,
            serial=self._serial,
            search_suffixes=self.search,
            ns_ips=self._ns_ips,
        )

    def update(self, model: Model) -> None:
        """Answer from `model` from now on (O(Services) identity diff, no rebuild)."""
        t0 = time.perf_counter()
        changed = None if self._model is None else model_changes(self._model, model)
        self._handler.set_zone(self._zone(model), changed)
        self._model = model
        dt = time.perf_counter() - t0
        STATS.zone_updates += 1
        STATS.zone_update_seconds += dt
        if dt > 0.05:
            log.info("DNS: indexing %d Services took %.0f ms", len(model.services), dt * 1e3)

    async def start(self) -> None:
        if self.cfg.dns_bind is None:
            raise UsageError("--dns-bind-address: not set; give HOST:PORT, e.g. 10.0.0.5:53")
        host, port = self.cfg.dns_bind
        flag = upstream_name(self.cfg.dns_bind)
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        for attempt in range(10):  # port 0: UDP picks one, TCP must get the same
            udp = socket.socket(fam, socket.SOCK_DGRAM)
            tcp = socket.socket(fam, socket.SOCK_STREAM)
            try:
                try:
                    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
                    reuseport(udp)  # shared with a successor on upgrades (handover.py)
                    udp.bind((host, port))
                    bound = udp.getsockname()[1]
                    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    reuseport(tcp)
                    tcp.bind((host, bound))
                    tcp.listen(128)
                    steer_to_oldest(udp)
                    steer_to_oldest(tcp)
                except OSError as e:
                    if port == 0 and e.errno == errno.EADDRINUSE and attempt < 9:
                        continue
                    raise _bind_error(flag, e) from None
                tcp.setblocking(False)
                self._tcp_server = await asyncio.start_server(self._tcp.client, sock=tcp)
                self._udp = UdpServer(self._handler, udp)
                self._udp.start()
                udp = tcp = None  # type: ignore[assignment]
                self.address = (host, bound)
                break
            finally:
                for s in (udp, tcp):
                    if s is not None:
                        s.close()
        log.info(
            "DNS: serving %s on %s (UDP+TCP), upstreams %s",
            self.cfg.cluster_domain,
            upstream_name(self.address) if self.address else flag,
            ", ".join(upstream_name(u) for u in self.upstreams) or "none (SERVFAIL)",
        )

    def hand_over(self) -> None:
        """A successor serves this address now: UDP is steered to its socket (ours stays
        open, so queued queries are still answered); the TCP listener closes (its queue
        migrates to the successor's); open TCP connections finish."""
        if self._udp is not None:
            steer_to_newest(self._udp.sock)
        if self._tcp_server is not None:
            self._tcp_server.close()

    def steer_to_self(self) -> None:
        """The predecessor is gone: this instance is the oldest again."""
        if self._udp is not None:
            steer_to_oldest(self._udp.sock)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp_server is not None:
            self._tcp_server.close()
            await self._tcp.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tcp_server.wait_closed(), 2)
            self._tcp_server = None
        await self._forwarder.close()
