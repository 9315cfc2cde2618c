"""Stale conntrack entries for UDP and SCTP Services, as kube-proxy clears them.

Connectionless flows keep their conntrack entry (and so their DNAT decision) for as long
as packets keep coming, so after a change the kernel would keep sending a client's
datagrams to an endpoint that is gone, or keep a Service that just got endpoints
black-holed. kube-proxy's deleteStaleServiceConntrackEntries /
deleteStaleEndpointConntrackEntries clear:

- a Service port that went from no usable endpoint to some ("newly active"): every entry
  to its frontends (ClusterIPs, external IPs, LB IPs, NodePort);
- an endpoint that stopped serving a Service port: entries to the port's frontends whose
  reply comes from that endpoint (`--orig-dst SVC --reply-src EP`);
- a frontend that went away (Service deleted, IP or port changed): entries to it.

The first sync after start has no previous model to compare with; `reconcile` instead
reads the table (`conntrack -L`) and removes entries for a Service frontend whose reply
source is not a serving endpoint, like newer kube-proxy does every sync.

`stale_flushes`, `parse_list` and `reconcile` are pure; `Conntrack` runs the commands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from proxy.iptables.backend import run, which
from proxy.model import Endpoint, Model, PortSpec, Service, ServiceKey, ip_family
from proxy.selection import usable_endpoints

log = logging.getLogger("proxy.iptables.conntrack")

CLEARED_PROTOCOLS = ("UDP", "SCTP")


@dataclass(frozen=True, order=True, slots=True)
class Flush:
    """One `conntrack -D` filter. Empty fields match anything."""

    family: int
    protocol: str  # "udp" | "sctp"
    orig_dst: str = ""  # Service IP
    orig_port_dst: int = 0  # Service port or NodePort
    reply_src: str = ""  # endpoint IP (where DNAT sent the flow)
    reply_port_src: int = 0  # endpoint port

    def argv(self) -> list[str]:
        a = ["-D", "-f", "ipv6" if self.family == 6 else "ipv4", "-p", self.protocol]
        if self.orig_dst:
            a += ["--orig-dst", self.orig_dst]
        if self.orig_port_dst:
            a += ["--orig-port-dst", str(self.orig_port_dst)]
        if self.reply_src:
            a += ["--reply-src", self.reply_src]
        if self.reply_port_src:
            a += ["--reply-port-src", str(self.reply_port_src)]
        return a


def _proxied(svc: Service | None) -> Service | None:
    """The Service if this proxy programs it (not headless/ExternalName/other proxy)."""
    if svc is None or svc.proxy_name or svc.type == "ExternalName" or svc.headless:
        return None
    return svc


def _frontends(svc: Service, port: PortSpec) -> set[tuple[str, int]]:
    ips = (*svc.cluster_ips, *svc.external_ips, *svc.load_balancer_ips)
    return {(ip, port.port) for ip in ips}


def _ports(svc: Service | None) -> dict[tuple[str, str], PortSpec]:
    if svc is None:
        return {}
    return {(p.name, p.protocol): p for p in svc.ports if p.protocol in CLEARED_PROTOCOLS}


def _serving(eps: Iterable[Endpoint]) -> set[tuple[str, int]]:
    """Endpoints that may hold flows: ready or still serving while terminating."""
    return {(e.ip, e.port) for e in eps if e.ready or e.serving}


def _usable(svc: Service, eps: tuple[Endpoint, ...], node_name: str) -> bool:
    """True when some endpoint gets traffic (cluster-wide, terminating fallback; topology
    never empties the set, so the zone does not matter)."""
    return bool(usable_endpoints(eps, node_name, local_only=False))


def _service_flushes(key: ServiceKey, old: Model | None, new: Model, node_name: str) -> set[Flush]:
    out: set[Flush] = set()
    old_svc = _proxied(old.services.get(key)) if old is not None else None
    new_svc = _proxied(new.services.get(key))
    old_ports, new_ports = _ports(old_svc), _ports(new_svc)
    for pk in old_ports.keys() | new_ports.keys():
        proto = pk[1].lower()
        op, np_ = old_ports.get(pk), new_ports.get(pk)
        old_eps = old.endpoints_for(old_svc, op) if old_svc and op and old else ()
        new_eps = new.endpoints_for(new_svc, np_) if new_svc and np_ else ()
        old_front = _frontends(old_svc, op) if old_svc and op else set()
        new_front = _frontends(new_svc, np_) if new_svc and np_ else set()
        old_np = op.node_port if op else 0
        new_np = np_.node_port if np_ else 0
        old_serving, new_serving = _serving(old_eps), _serving(new_eps)
        was_active = bool(old_svc and _usable(old_svc, old_eps, node_name))
        is_active = bool(new_svc and _usable(new_svc, new_eps, node_name))

        # Frontends that went away: flows DNATed through them must not live on.
        if old_serving:
            for ip, port in old_front - new_front:
                out.add(Flush(ip_family(ip), proto, ip, port))
            if old_np and old_np != new_np:
                for ep_ip, ep_port in old_serving:
                    out.add(Flush(ip_family(ep_ip), proto, "", old_np, ep_ip, ep_port))

        # Newly active: entries made while there was no endpoint cached a dead end.
        if is_active and not was_active:
            for ip, port in new_front:
                out.add(Flush(ip_family(ip), proto, ip, port))
            if new_np:
                for fam in sorted({ip_family(ip) for ip, _ in new_serving}):
                    out.add(Flush(fam, proto, "", new_np))

        # Endpoints that stopped serving: flows still DNATed to them.
        for ep_ip, ep_port in old_serving - new_serving:
            fam = ip_family(ep_ip)
            for ip, port in new_front:
                if ip_family(ip) == fam:
                    out.add(Flush(fam, proto, ip, port, ep_ip, ep_port))
            if new_np:
                out.add(Flush(fam, proto, "", new_np, ep_ip, ep_port))
    return out


def stale_flushes(
    old: Model | None,
    new: Model,
    node_name: str = "",
    changed: Iterable[ServiceKey] | None = None,
) -> list[Flush]:
    """What to delete after moving from `old` to `new` (sorted, no duplicates). Pure.

    `changed` limits the comparison to those Services (a partial sync); None compares
    every Service of both models.
    """
    if changed is None:
        keys: Iterable[ServiceKey] = set(new.services) | (set(old.services) if old else set())
    else:
        keys = changed
    out: set[Flush] = set()
    for key in keys:
        if (
            old is not None
            and old.services.get(key) is new.services.get(key)
            and old.endpoints_of(key) is new.endpoints_of(key)
        ):
            continue  # shared records: unchanged
        out |= _service_flushes(key, old, new, node_name)
    return sorted(out)


# -- first sync: reconcile against the kernel's table ---------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One conntrack entry (original and reply tuples)."""

    protocol: str
    family: int
    orig_dst: str
    orig_port_dst: int
    reply_src: str
    reply_port_src: int


def parse_list(text: str) -> list[Entry]:
    """`conntrack -L -o extended` (or plain) output → entries. Pure; skips odd lines."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        fam = 6 if parts[0] == "ipv6" else 4
        if parts[0] in ("ipv4", "ipv6"):
            parts = parts[2:]
        if not parts or parts[0] not in ("udp", "sctp", "tcp"):
            continue
        kv: dict[str, list[str]] = {}
        for p in parts:
            if "=" in p:
                k, _, v = p.partition("=")
                kv.setdefault(k, []).append(v)
        try:
            dst, dport = kv["dst"][0], int(kv["dport"][0])
            rsrc, rsport = kv["src"][1], int(kv["sport"][1])
        except (KeyError, IndexError, ValueError):
            continue
        out.append(Entry(parts[0], 6 if ":" in dst else fam, dst, dport, rsrc, rsport))
    return out


def reconcile(entries: Iterable[Entry], model: Model) -> list[Flush]:
    """Entries for a Service frontend whose reply source is not a serving endpoint. Pure.

    Services without endpoints are left alone (nothing better to send them to); a
    NodePort entry counts only when it was DNATed (reply source differs from the
    original destination), so unrelated flows to the same port number survive.
    """
    by_ip: dict[tuple[str, str, int], set[str]] = {}
    by_np: dict[tuple[str, int], set[str]] = {}
    for svc in model.services.values():
        svc2 = _proxied(svc)
        if svc2 is None:
            continue
        for port in _ports(svc2).values():
            ips = {ip for ip, _ in _serving(model.endpoints_for(svc2, port))}
            if not ips:
                continue
            proto = port.protocol.lower()
            for ip, p in _frontends(svc2, port):
                by_ip[(proto, ip, p)] = ips
            if port.node_port:
                by_np[(proto, port.node_port)] = ips
    out: set[Flush] = set()
    for e in entries:
        to_ip = by_ip.get((e.protocol, e.orig_dst, e.orig_port_dst))
        if to_ip is not None and e.reply_src not in to_ip:
            out.add(Flush(e.family, e.protocol, e.orig_dst, e.orig_port_dst, e.reply_src))
        to_np = by_np.get((e.protocol, e.orig_port_dst))
        if to_np is not None and e.reply_src != e.orig_dst and e.reply_src not in to_np:
            out.add(Flush(e.family, e.protocol, "", e.orig_port_dst, e.reply_src))
    return sorted(out)


# -- running conntrack ----------------------------------------------------------------------


class Conntrack:
    """Runs `conntrack -D` for each Flush; a missing binary is logged once, not fatal."""

    def __init__(self, parallel: int = 4) -> None:
        self.binary = which("conntrack")
        self._sem = asyncio.Semaphore(parallel)
        self.deleted = 0
        self.errors = 0

    @property
    def available(self) -> bool:
        return self.binary is not None

    async def _one(self, f: Flush) -> None:
        assert self.binary is not None
        async with self._sem:
            res = await run([self.binary, *f.argv()], timeout=30)
        text = (res.err + res.out).strip()
        if res.rc == 0 or "0 flow entries" in text:  # exit 1 when nothing matched
            n = _count(text)
            self.deleted += n
            if n:
                log.info("conntrack: deleted %d %s entries (%s)", n, f.protocol, _desc(f))
            return
        self.errors += 1
        log.warning("conntrack %s failed: %s", " ".join(f.argv()), text.splitlines()[-1:])

    async def flush(self, flushes: Iterable[Flush]) -> None:
        todo = list(flushes)
        if not todo:
            return
        if self.binary is None:
            log.warning(
                "conntrack not found: %d stale UDP/SCTP flow filters not cleared; "
                "install the conntrack package",
                len(todo),
            )
            return
        await asyncio.gather(*(self._one(f) for f in todo))

    async def list(self, family: int) -> list[Entry]:
        if self.binary is None:
            return []
        out: list[Entry] = []
        for proto in ("udp", "sctp"):
            fam = "ipv6" if family == 6 else "ipv4"
            res = await run([self.binary, "-L", "-f", fam, "-p", proto], timeout=60)
            if res.rc == 0:
                out += parse_list(res.out)
        return out

    async def clear_stale(
        self,
        prev: Model | None,
        model: Model,
        node_name: str,
        changed: frozenset[ServiceKey] | None,
        families: Collection[int],
    ) -> None:
        """Delete the flows `model` made stale since `prev` (after a start, the ones the
        table holds for it), for the programmed families; failures are logged, never
        fail the sync."""
        try:
            if prev is None:
                entries: list[Entry] = []
                for fam in families:
                    entries += await self.list(fam)
                flushes = reconcile(entries, model)
            else:  # O(changed Services) but may be large after a relist: off the loop
                flushes = await asyncio.to_thread(stale_flushes, prev, model, node_name, changed)
            await self.flush(f for f in flushes if f.family in families)
        except Exception:
            log.exception("conntrack cleanup failed")


def _count(text: str) -> int:
    for tok in text.split(":")[-1].split():
        if tok.isdigit():
            return int(tok)
    return 0


def _desc(f: Flush) -> str:
    parts = []
    if f.orig_dst or f.orig_port_dst:
        parts.append(f"to {f.orig_dst or '*'}:{f.orig_port_dst or '*'}")
    if f.reply_src:
        parts.append(f"from endpoint {f.reply_src}:{f.reply_port_src or '*'}")
    return " ".join(parts)
