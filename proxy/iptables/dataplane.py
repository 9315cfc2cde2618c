"""iptables mode: the DataPlane that renders the model and applies it per IP family.

A sync is: (full and periodic syncs) refresh the node's addresses; (full syncs only)
make sure the jumps from the built-in chains exist; render in a worker thread (pure CPU
work, kept off the event loop); `iptables-restore --noflush` per family; metrics; then
clear stale UDP/SCTP conntrack entries. A partial sync renders only the changed
Services' chains on top of the previous RenderState. Any failure raises and forgets the
previous state, so the runner's retry is a full sync; rules already in the kernel are
never flushed because something failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import time
from collections.abc import AsyncGenerator, Sequence

from proxy import metrics
from proxy.config import Config, UsageError
from proxy.endpoints.store import Snapshot
from proxy.iptables import conntrack
from proxy.iptables.applier import Applier, RestoreError
from proxy.iptables.backend import (
    INSTALL_HINT,
    Backend,
    all_backends,
    check_privileges,
    select,
    supports_random_fully,
)
from proxy.iptables.nfacct import NfAcct, collector, match_supported
from proxy.iptables.render import (
    BASE_JUMPS,
    KUBELET_JUMPS,
    NFACCT_COUNTERS,
    RenderConfig,
    RenderResult,
    RenderState,
    render,
    saved_chains,
    state_from_chains,
)
from proxy.model import UNKNOWN_NODE, Model, NodeInfo, ip_family
from proxy.nodesetup import setup_route_localnet
from proxy.userspace.localhost import LocalhostNodePorts, LoopbackLifecycle, loopback_addresses

# Chains per iptables-nft-restore transaction on big writes: a transaction's cost is
# quadratic in its chains on iptables 1.8.9 (one chunk of 4000 chains 0.65 s CPU, of 2000
# 0.17 s, of 500 0.02-0.05 s), while each restore also pays a fixed start and a cache
# fetch growing with the table. 10k Services x 10 endpoints (32k chains), restores' CPU:
# 4000 → 21 s, 2000 → 12.5 s, 1000 → 8.4-9 s, 700 → 7.8 s, 500 → 7.8-8.1 s, 250 → 9.2 s
# (bench/README.md, session 4); see render(chunk_chains=).
NFT_CHUNK_CHAINS = 500
# Stale chains one restore may set aside because a rule outside this proxy jumps to them.
MAX_HELD_PER_RESTORE = 16

log = logging.getLogger("proxy.iptables")


def local_addresses() -> tuple[tuple[str, ...], dict[int, str]]:
    """This network namespace's addresses (pyroute2/netlink), and per family the node's
    primary one: the source of the default route, else the first global address."""
    from pyroute2 import IPRoute

    ips: list[str] = []
    primary: dict[int, str] = {}
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            raw = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not raw:
                continue
            ip = ipaddress.ip_address(raw.split("%")[0])
            if str(ip) not in ips:
                ips.append(str(ip))
            if not (ip.is_loopback or ip.is_link_local):
                primary.setdefault(ip.version, str(ip))
        for fam, probe in ((4, "192.0.2.1"), (6, "2001:db8::1")):
            try:  # a route lookup only: nothing is sent
                routes = ipr.route("get", dst=probe)
            except Exception:
                continue
            src = routes[0].get_attr("RTA_PREFSRC") if routes else None
            if src:
                primary[fam] = str(ipaddress.ip_address(src))
    return tuple(ips), primary


def _sysctl_on(path: str) -> bool:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() not in ("", "0")
    except OSError:
        return False


def nodeport_cidrs(cfg: Config, family: int, node_ip: str) -> tuple[str, ...]:
    """--nodeport-addresses of a family (both kernel modes); `primary` is the node IP
    (all addresses when there is none, as kube-proxy)."""
    if cfg.nodeport_primary:
        if not node_ip or ipaddress.ip_address(node_ip).is_loopback:
            return ()
        return (f"{node_ip}/{32 if family == 4 else 128}",)
    return tuple(c for c in cfg.nodeport_addresses if ip_family(c) == family)


class IptablesDataPlane(LoopbackLifecycle):
    """The iptables data plane (`--proxy-mode=iptables`)."""

    name = "iptables"
    forwards = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.backends: dict[int, Backend] = {}
        self.appliers: dict[int, Applier] = {}
        self.conntrack = conntrack.Conntrack()
        self.local_ips: tuple[str, ...] = ()
        self.node_ips: dict[int, str] = {}
        self.random_fully = True
        self.tcp_be_liberal = False
        self.nfacct = NfAcct()
        self.nfacct_counters: frozenset[str] = frozenset()  # counters rules may use
        self._nfacct_refused = False  # a restore failed on the nfacct match
        self._nfacct_checked = False  # the first check logs its outcome, whatever it is
        self.node: NodeInfo = UNKNOWN_NODE  # the last model's view of this node
        # NodePorts on ::1, which NAT cannot serve (no route_localnet for IPv6)
        self.loopback: LocalhostNodePorts | None = None
        # Per family: what the kernel holds after the last successful restore; None
        # (or missing) means unknown, so the next sync must be full.
        self._state: dict[int, RenderState | None] = {}
        self._model: Model | None = None  # the last model fully applied
        # Per family: stale chains a rule outside this proxy still jumps to, so -X fails.
        # They are flushed and kept (see _restore), and deleted once nothing jumps to them.
        self._held: dict[int, set[tuple[str, str]]] = {}
        self.last_render_seconds = 0.0
        self.last_restore_seconds = 0.0
        self.last_conntrack_seconds = 0.0
        self.syncs = 0
        self._base_checked: set[int] = set()  # families whose jumps start() ensured

    def served(self, model: Model) -> Model:
        return model  # rules for the Services as they are

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(sorted(self.appliers))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        check_privileges()
        # NAT of NodePorts on 127.0.0.0/8 needs route_localnet (kube-proxy's proxier too).
        await asyncio.to_thread(setup_route_localnet, self.cfg)
        self.backends = await select(self.cfg)
        self.appliers = {fam: Applier(be) for fam, be in self.backends.items()}
        self.random_fully = await supports_random_fully(self.backends[4])
        # Like kube-proxy: with a liberal TCP conntrack no INVALID-drop rule is needed.
        self.tcp_be_liberal = _sysctl_on("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
        if not self.conntrack.available:
            log.warning(
                "conntrack not found: stale UDP flows will not be cleared after endpoint "
                "changes; install the conntrack package"
            )
        await self._refresh_addresses()
        await self._ensure_nfacct()

        async def base(ap: Applier) -> None:
            await ap.ensure_hint()
            added = await ap.ensure_jumps(BASE_JUMPS + KUBELET_JUMPS)
            if added:
                log.info("%s: added %d jumps from built-in chains", ap.backend, len(added))

        await asyncio.gather(*(base(ap) for ap in self.appliers.values()))  # families apart
        # The first full sync follows at once: it need not check them again.
        self._base_checked = set(self.appliers)
        # IPv4's 127.0.0.1 is NAT-served (route_localnet); ::1 by the userspace engine.
        addrs = loopback_addresses(self.cfg, self.families, nat=(4,))
        if addrs:
            self.loopback = LocalhostNodePorts(self.cfg, addrs)
            await self.loopback.start()
        log.info(
            "iptables data plane ready: %s",
            ", ".join(str(b) for b in self.backends.values()),
        )

    async def cleanup(self) -> None:
        """Remove kube-proxy's chains and jumps from nat/filter/mangle, IPv4 and IPv6,
        in both the legacy and the nft backend. Idempotent."""
        check_privileges()
        backends = await all_backends()
        if not backends:
            raise UsageError(INSTALL_HINT)
        seen: set[str] = set()
        ok = True
        for be in backends:
            if be.restore in seen:  # plain binaries doubling as one of the modes
                continue
            seen.add(be.restore)
            ok = await Applier(be).cleanup() and ok
        self._state.clear()
        if not ok:
            raise RuntimeError("iptables cleanup incomplete (see the errors above)")

    # -- sync ------------------------------------------------------------------------------

    def node_ip(self, family: int) -> str:
        """The node IP of a family: its Node object's, else its default route's source."""
        return self.node.ip(family) or self.node_ips.get(family, "")

    def nodeport_cidrs(self, family: int) -> tuple[str, ...]:
        return nodeport_cidrs(self.cfg, family, self.node_ip(family))

    def render_config(self, family: int) -> RenderConfig:
        cfg = self.cfg
        return RenderConfig(
            family=family,
            node_name=cfg.hostname,
            cluster_cidrs=tuple(c for c in cfg.cluster_cidrs if ip_family(c) == family),
            masquerade_all=cfg.masquerade_all,
            masquerade_mark=cfg.masquerade_mark,
            nodeport_addresses=self.nodeport_cidrs(family),
            local_ips=tuple(ip for ip in self.local_ips if ip_family(ip) == family),
            node_ip=self.node_ip(family),
            random_fully=self.random_fully,
            localhost_nodeports=cfg.localhost_nodeports,
            conntrack_tcp_be_liberal=self.tcp_be_liberal,
            node_zone=self.node.zone,
            nfacct_counters=self.nfacct_counters,
        )

    async def _ensure_nfacct(self) -> None:
        """Create kube-proxy's nfacct counters (full syncs; like kube-proxy, again after a
        failure) and use them only where iptables takes the nfacct match."""
        if not self.appliers or self._nfacct_refused:
            return
        loop = asyncio.get_running_loop()
        ok: set[str] = set()
        why = ""
        if await match_supported(self.backends[min(self.backends)]):
            for name in NFACCT_COUNTERS:
                try:
                    await loop.run_in_executor(None, self.nfacct.ensure, name)
                    ok.add(name)
                except OSError as e:
                    why = f"cannot create nfacct counter {name}: {e.strerror or e}"
        else:
            why = "iptables does not take the nfacct match (no xt_nfacct?)"
        if frozenset(ok) != self.nfacct_counters or not self._nfacct_checked:
            self._nfacct_checked = True
            if ok:
                log.info("nfacct counters in use: %s", ", ".join(sorted(ok)))
            else:
                log.warning("%s: rules without packet counters, nfacct metrics off", why)
        self.nfacct_counters = frozenset(ok)
        collector(self.nfacct, ok)

    async def _refresh_addresses(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.local_ips, self.node_ips = await loop.run_in_executor(None, local_addresses)
        except Exception as e:  # keep the previous list; NodePorts on new IPs wait
            log.warning("cannot list local addresses: %s", e)

    async def sync(self, snap: Snapshot, full: bool) -> None:
        if not self.appliers:
            await self.start()
        families = self.families
        full = full or any(self._state.get(f) is None for f in families)
        try:
            await self._sync(snap, full, families)
        except Exception as e:
            metrics.IPTABLES_RESTORE_FAILURES.inc()
            if not full:
                metrics.IPTABLES_PARTIAL_RESTORE_FAILURES.inc()
            if self.nfacct_counters and "nfacct" in str(e):
                # The probe passed but the kernel refused the match: never again.
                log.warning("iptables refused the nfacct match: rules without packet counters")
                self.nfacct_counters = frozenset()
                self._nfacct_refused = True
                collector(self.nfacct, ())
            # The kernel may now hold part of the input: forget what we think it holds.
            # (No log line here: the runner logs the error, which names the failing rule.)
            self._state.clear()
            raise

    async def _sync(self, snap: Snapshot, full: bool, families: tuple[int, ...]) -> None:
        loop = asyncio.get_running_loop()
        model = snap.model
        self.node = model.node  # zone and node IPs: a change makes the render full
        if full or not snap.changed:  # full and periodic syncs: node addresses may change
            await self._refresh_addresses()
        if full and not self._base_checked:  # start() has just done it for the first one
            await self._ensure_nfacct()
        results: dict[int, RenderResult] = {}
        render_s = 0.0
        for fam in families:
            rcfg = self.render_config(fam)
            previous: RenderState | None
            if full:
                previous = await self._full_previous(fam)
            else:
                previous = self._state.get(fam)
            chunk = NFT_CHUNK_CHAINS if self.backends[fam].mode == "nft" else 0
            job = functools.partial(
                _timed_render, model, rcfg, None if full else snap.changed, previous, chunk
            )
            results[fam], dt = await loop.run_in_executor(None, job)
            render_s += dt
        self.last_render_seconds = render_s

        restore_s = 0.0
        for fam in families:
            ap = self.appliers[fam]
            if full and fam in self._base_checked:
                self._base_checked.discard(fam)  # start() just made sure of them
            elif full:
                await ap.ensure_hint()
                added = await ap.ensure_jumps(BASE_JUMPS + KUBELET_JUMPS)
                if added:  # someone flushed them (a firewall reload?): say so once
                    log.warning(
                        "%s: %d jumps from built-in chains were missing and were re-added: %s",
                        ap.backend,
                        len(added),
                        ", ".join(added),
                    )
            # nft: big writes in Service-sized chunks, each loaded while the next is written
            async with contextlib.aclosing(_written_ahead(results[fam].pre)) as parts:
                async for part, waited in parts:
                    render_s += waited  # the writing not hidden behind a restore
                    restore_s += await ap.restore(part)
                    del part  # at most two chunks in memory
            restore_s += await self._restore(fam, results[fam].text)
            self._state[fam] = results[fam].state
            if self._held.get(fam) and (full or not snap.changed):  # full and periodic
                await self._delete_held(fam, results[fam].state)
        self.last_render_seconds = render_s
        self.last_restore_seconds = restore_s
        self._set_rule_metrics(results)
        # Ports without local endpoints for a Local policy (the same in every family).
        for i, policy in enumerate(("internal", "external")):
            n = max((r.no_local_endpoints[i] for r in results.values()), default=0)
            metrics.NO_LOCAL_ENDPOINTS.labels(traffic_policy=policy).set(n)
        self.syncs += 1
        if self.syncs == 1:  # takeover from the nftables mode: its tables go once ours are in
            from proxy.nftables.dataplane import remove_tables_on_takeover

            await remove_tables_on_takeover()
        log.debug(
            "iptables %s sync: render %.3fs, restore %.3fs",
            "full" if full else "partial",
            render_s,
            restore_s,
        )
        await self._clear_conntrack(model, None if full else snap.changed)
        if self.loopback is not None:
            await self.loopback.sync(snap, full)

    async def _restore(self, family: int, text: str) -> float:
        """Restore `text`; a stale chain that a rule outside this proxy still jumps to
        (so its -X fails) does not fail the sync: it is flushed and kept, and the same
        input runs again without that -X. Otherwise one foreign rule would block every
        later change on the node (each retry failing the same way); an empty chain only
        returns, so the foreign rule no longer reaches any endpoint."""
        ap = self.appliers[family]
        for _ in range(MAX_HELD_PER_RESTORE):
            try:
                return await ap.restore(text)
            except RestoreError as e:
                fail = e.failure
                if fail is None or not fail.referenced_by or not fail.rule.startswith("-X "):
                    raise
                lines = text.split("\n")
                if not 0 < fail.line <= len(lines) or lines[fail.line - 1].strip() != fail.rule:
                    raise
                metrics.IPTABLES_RESTORE_FAILURES.inc()
                self._held.setdefault(family, set()).add((fail.table, fail.chain))
                log.warning(
                    "%s; a rule outside this proxy holds the chain: it is flushed and kept, "
                    "and deleted once nothing jumps to it",
                    e,
                )
                text = "\n".join(lines[: fail.line - 1] + lines[fail.line :])
        return await ap.restore(text)

    async def _delete_held(self, family: int, state: RenderState) -> None:
        """Try again to delete the stale chains set aside by _restore (periodic and full
        syncs), unless the model wants them again."""
        ap, held = self.appliers[family], self._held[family]
        for table, chain in sorted(held):
            if (table, chain) in state.chains:
                held.discard((table, chain))
                continue
            try:
                await ap.restore(f"*{table}\n:{chain} - [0:0]\n-X {chain}\nCOMMIT\n")
            except RestoreError as e:
                log.debug("%s: chain %s/%s still held: %s", ap.backend, table, chain, e)
                continue
            held.discard((table, chain))
            log.info(
                "%s: deleted chain %s/%s: nothing jumps to it any more", ap.backend, table, chain
            )

    async def _full_previous(self, family: int) -> RenderState:
        """`previous` for a full render, so chains no longer wanted are deleted.

        While the state is known it is exact (this process wrote every chain). When it is
        not (first sync, or after a failure left the kernel holding part of an input),
        the kernel is asked: every chain of ours in the nat table, leftovers of an earlier
        run or of kube-proxy included.
        """
        known = self._state.get(family)
        if known is not None:
            return known
        text = await self.appliers[family].save("nat")
        return state_from_chains(saved_chains(text))

    def _set_rule_metrics(self, results: dict[int, RenderResult]) -> None:
        total: dict[str, int] = {}
        last: dict[str, int] = {}
        for res in results.values():
            for table, n in res.rules.items():
                total[table] = total.get(table, 0) + n
            for table, n in res.rules_written.items():
                last[table] = last.get(table, 0) + n
        for table, n in total.items():
            metrics.IPTABLES_RULES_TOTAL.labels(table=table).set(n)
        for table, n in last.items():
            metrics.IPTABLES_RULES_LAST.labels(table=table).set(n)

    async def _clear_conntrack(self, model: Model, changed: frozenset | None) -> None:
        t0 = time.perf_counter()
        prev, self._model = self._model, model
        await self.conntrack.clear_stale(prev, model, self.cfg.hostname, changed, self.appliers)
        self.last_conntrack_seconds = time.perf_counter() - t0


def _timed_render(
    model: Model,
    rcfg: RenderConfig,
    changed: frozenset | None,
    previous: RenderState | None,
    chunk_chains: int = 0,
) -> tuple[RenderResult, float]:
    t0 = time.perf_counter()
    res = render(model, rcfg, changed=changed, previous=previous, chunk_chains=chunk_chains)
    return res, time.perf_counter() - t0


async def _written_ahead(pre: Sequence[str]) -> AsyncGenerator[tuple[str, float], None]:
    """Each chunk of a render's `pre` with the seconds waited for it. A chunk's text is
    written when read (ms each), off the loop; the next one is written while the caller
    loads this one with iptables-restore (two cores)."""
    if not pre:
        return
    loop = asyncio.get_running_loop()
    ahead = loop.run_in_executor(None, pre.__getitem__, 0)
    try:
        for i in range(1, len(pre) + 1):
            t0 = time.perf_counter()
            part = await ahead
            waited = time.perf_counter() - t0
            if i < len(pre):
                ahead = loop.run_in_executor(None, pre.__getitem__, i)
            yield part, waited
            del part
    finally:
        ahead.cancel()  # the caller stopped (a restore failed): no chunk needed (no-op if done)
