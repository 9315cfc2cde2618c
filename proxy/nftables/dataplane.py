"""nftables mode: the DataPlane that renders the model and applies it per IP family.

A sync renders (in a worker thread) one nft transaction per family and runs it through
libnftables (or `nft -f -`, when the library cannot be loaded). Transactions are atomic:
a failed one changes nothing, the previous state is forgotten and the runner's retry is
a full sync, which recreates the table. After the first successful sync the iptables
mode's (or kube-proxy's) leftovers are removed, so a node switching modes is never
without Service rules. Stale UDP/SCTP conntrack entries are cleared as in the iptables
mode (proxy/iptables/conntrack.py). Localhost NodePorts (127.0.0.1 and ::1), which
kube-proxy's nftables mode does not serve and kernel NAT cannot here, are served by the
userspace engine (proxy/userspace/localhost.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time

from prometheus_client import Counter, Gauge

from proxy import metrics
from proxy.config import Config, PrivilegeError, UsageError
from proxy.endpoints.store import Snapshot
from proxy.iptables import conntrack
from proxy.iptables.backend import has_net_admin
from proxy.model import UNKNOWN_NODE, Model, NodeInfo, ip_family
from proxy.nftables.nft import (
    INSTALL_HINT,
    LibNftables,
    Nft,
    NftCommand,
    NftError,
    first_error,
    open_both,
    open_nft,
)
from proxy.nftables.render import (
    TABLE,
    FullStream,
    NftConfig,
    RenderResult,
    RenderState,
    no_local_endpoints,
    render,
)
from proxy.userspace.localhost import LocalhostNodePorts, LoopbackLifecycle, loopback_addresses

log = logging.getLogger("proxy.nftables")

PRIVILEGE_HINT = (
    "nftables mode needs CAP_NET_ADMIN: run as root or with CAP_NET_ADMIN, "
    "or use --proxy-mode=userspace"
)

# kube-proxy's nftables-mode metric names.
SYNC_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_nftables_sync_failures",
    "Cumulative proxy nftables sync failures",
)
CLEANUP_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
    "Cumulative proxy nftables cleanup failures",
)
ELEMENTS = Gauge(
    "kubeproxy_py_nftables_elements",
    "Map and set elements this proxy holds in its nftables tables",
    ["ip_family"],
)
CHAINS = Gauge(
    "kubeproxy_py_nftables_chains",
    "Chains in this proxy's nftables tables",
    ["ip_family"],
)


def _family_name(family: int) -> str:
    return "ip6" if family == 6 else "ip"


def delete_tables(nft: Nft | LibNftables | NftCommand, families=(4, 6)) -> list[str]:
    """Delete `ip kube-proxy` / `ip6 kube-proxy` (absent ones are fine); errors as text."""
    errors = []
    for fam in families:
        t = f"{_family_name(fam)} {TABLE}"
        # "add" first: deleting a table that is not there is an error.
        res = nft.run(f"add table {t}\ndelete table {t}\n")
        if res.rc != 0:
            errors.append(f"{t}: {first_error(res.err, '')}")
    return errors


def ipv6_available() -> bool:
    return os.path.exists("/proc/net/if_inet6")


class NftablesDataPlane(LoopbackLifecycle):
    """The nftables data plane (`--proxy-mode=nftables`)."""

    name = "nftables"
    forwards = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.nft: Nft | None = None
        self.families: tuple[int, ...] = (4,)
        self.conntrack = conntrack.Conntrack()
        self.local_ips: tuple[str, ...] = ()
        self.node_ips: dict[int, str] = {}
        self.tcp_be_liberal = False
        self.node_zone = ""  # from the model's Node
        self.node: NodeInfo = UNKNOWN_NODE  # the last model's view of this node
        self._state: dict[int, RenderState | None] = {}
        self._model: Model | None = None
        self._took_over = False
        # NodePorts on loopback (the rules never DNAT it): the userspace engine's listeners
        self.loopback: LocalhostNodePorts | None = None
        self.last_render_seconds = 0.0
        self.last_apply_seconds = 0.0
        self.last_restore_seconds = 0.0  # same as last_apply_seconds (bench compatibility)
        self.last_conntrack_seconds = 0.0
        self.syncs = 0

    def served(self, model: Model) -> Model:
        return model  # rules for the Services as they are

    # -- lifecycle -------------------------------------------------------------------------

    def _open(self) -> Nft:
        if not has_net_admin():
            raise PrivilegeError(PRIVILEGE_HINT)
        try:
            return open_both()
        except FileNotFoundError:
            raise UsageError(INSTALL_HINT) from None

    async def start(self) -> None:
        self.nft = self._open()
        v6 = self.cfg.ipv6
        if v6 == "on" and not ipv6_available():
            raise UsageError("--ipv6=on but this kernel has no IPv6; pass --ipv6=off")
        self.families = (4, 6) if v6 != "off" and ipv6_available() else (4,)
        from proxy.iptables.dataplane import _sysctl_on

        self.tcp_be_liberal = _sysctl_on("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
        probe = await asyncio.to_thread(self.nft.probe)
        if probe.rc != 0:
            raise UsageError(f"nft does not work here: {first_error(probe.err, '')}")
        if not self.conntrack.available:
            log.warning(
                "conntrack not found: stale UDP flows will not be cleared after endpoint "
                "changes; install the conntrack package"
            )
        await self._refresh_addresses()
        addrs = loopback_addresses(self.cfg, self.families)  # no loopback NAT in this mode
        if addrs:
            self.loopback = LocalhostNodePorts(self.cfg, addrs)
            await self.loopback.start()
        kind = self.nft.describe()
        fams = ", ".join(f"{_family_name(f)} {TABLE}" for f in self.families)
        log.info("nftables data plane ready (%s): tables %s", kind, fams)

    async def cleanup(self) -> None:
        """Delete both tables. Idempotent."""
        nft = self.nft or self._open()
        errors = await asyncio.to_thread(delete_tables, nft)
        self._state.clear()
        if errors:
            CLEANUP_FAILURES.inc()
            raise RuntimeError("nftables cleanup failed: " + "; ".join(errors))
        log.info("nftables: removed tables ip %s and ip6 %s", TABLE, TABLE)

    # -- sync ------------------------------------------------------------------------------

    def render_config(self, family: int) -> NftConfig:
        from proxy.iptables.dataplane import nodeport_cidrs

        cfg = self.cfg
        # The node IP: its Node object's, else its default route's source (as iptables).
        node_ip = self.node.ip(family) or self.node_ips.get(family, "")
        return NftConfig(
            family=family,
            node_name=cfg.hostname,
            cluster_cidrs=tuple(c for c in cfg.cluster_cidrs if ip_family(c) == family),
            masquerade_all=cfg.masquerade_all,
            masquerade_mark=cfg.masquerade_mark,
            nodeport_addresses=nodeport_cidrs(cfg, family, node_ip),  # `primary` too
            local_ips=tuple(ip for ip in self.local_ips if ip_family(ip) == family),
            node_ip=node_ip,
            conntrack_tcp_be_liberal=self.tcp_be_liberal,
            node_zone=self.node_zone,
        )

    async def _refresh_addresses(self) -> None:
        from proxy.iptables.dataplane import local_addresses

        try:
            self.local_ips, self.node_ips = await asyncio.to_thread(local_addresses)
        except Exception as e:  # keep the previous list
            log.warning("cannot list local addresses: %s", e)

    async def sync(self, snap: Snapshot, full: bool) -> None:
        if self.nft is None:
            await self.start()
        full = full or any(self._state.get(f) is None for f in self.families)
        try:
            await self._sync(snap, full)
        except Exception:
            SYNC_FAILURES.inc()
            self._state.clear()  # unknown now: the retry recreates the tables
            raise

    async def _sync(self, snap: Snapshot, full: bool) -> None:
        assert self.nft is not None
        model = snap.model
        self.node_zone = model.node.zone  # a new zone makes the render full (chain_inputs)
        self.node = model.node  # its IPs: `--nodeport-addresses primary`
        if full or not snap.changed:
            await self._refresh_addresses()
        results: dict[int, RenderResult] = {}
        render_s = apply_s = 0.0
        txns = 0
        for fam in self.families:
            t0 = time.perf_counter()
            if full:
                res, produce = await asyncio.to_thread(self._apply_full, fam, model)
                render_s += produce
                apply_s += time.perf_counter() - t0 - produce
                txns += 1
            else:
                job = functools.partial(
                    render,
                    model,
                    self.render_config(fam),
                    changed=snap.changed,
                    previous=self._state.get(fam),
                )
                res = await asyncio.to_thread(job)
                t1 = time.perf_counter()
                render_s += t1 - t0
                if res.text:
                    out = await asyncio.to_thread(self.nft.run, res.text)
                    if out.rc != 0:
                        raise NftError(
                            f"nft: {_family_name(fam)} {TABLE} transaction failed: "
                            f"{first_error(out.err, res.text)}"
                        )
                    txns += 1
                apply_s += time.perf_counter() - t1
            results[fam] = res
            self._state[fam] = res.state
            ELEMENTS.labels(ip_family=str(fam)).set(res.elements)
            CHAINS.labels(ip_family=str(fam)).set(res.chains)
        self.last_render_seconds = render_s
        self.last_apply_seconds = self.last_restore_seconds = apply_s
        # Ports without local endpoints for a Local policy (the same in every family).
        counts = [no_local_endpoints(r.state) for r in results.values()]
        for i, policy in enumerate(("internal", "external")):
            n = max((c[i] for c in counts), default=0)
            metrics.NO_LOCAL_ENDPOINTS.labels(traffic_policy=policy).set(n)
        self.syncs += 1
        t0 = time.perf_counter()
        if not self._took_over:
            self._took_over = True
            await self._remove_iptables_leftovers()
        takeover = time.perf_counter() - t0
        t0 = time.perf_counter()
        await self._clear_conntrack(model, None if full else snap.changed)
        self.last_conntrack_seconds = time.perf_counter() - t0
        if self.loopback is not None:
            await self.loopback.sync(snap, full)
        (log.info if full else log.debug)(
            "nftables %s sync: render %.3fs, nft %.3fs (%d transactions), %d elements in "
            "%d chains%s, conntrack %.3fs",
            "full" if full else "partial",
            self.last_render_seconds,
            self.last_apply_seconds,
            txns,
            sum(r.elements for r in results.values()),
            sum(r.chains for r in results.values()),
            f", iptables leftovers check {takeover:.3f}s" if takeover > 0.0005 else "",
            self.last_conntrack_seconds,
        )

    def _apply_full(self, family: int, model: Model) -> tuple[RenderResult, float]:
        """Render and apply one family's full ruleset in one transaction, streamed: the
        render produces it in parts straight into nft's input, so its text is never held
        whole. Returns the result and the seconds spent rendering."""
        assert self.nft is not None
        stream = FullStream(model, self.render_config(family), previous=self._state.get(family))
        out = self.nft.run_parts(stream)
        if out.result.rc != 0:
            raise NftError(
                f"nft: {_family_name(family)} {TABLE} full transaction failed: "
                f"{first_error(out.result.err, '')}"
            )
        return stream.result(), out.produce_seconds

    async def _remove_iptables_leftovers(self) -> None:
        """Takeover: the iptables mode's (or kube-proxy's) chains go once ours are in."""
        from proxy.iptables.dataplane import IptablesDataPlane

        try:
            await IptablesDataPlane(self.cfg).cleanup()
        except UsageError:
            pass  # no iptables binaries: nothing of theirs can be there
        except Exception as e:
            log.warning("could not remove iptables-mode leftovers: %s", e)

    async def _clear_conntrack(self, model: Model, changed: frozenset | None) -> None:
        prev, self._model = self._model, model
        await self.conntrack.clear_stale(prev, model, self.cfg.hostname, changed, self.families)


def tables_present(families: tuple[int, ...] = (4, 6)) -> tuple[int, ...]:
    """The families holding our table, from the kernel's list of tables (a netlink dump of
    table names, pyroute2): any nft command, even a `delete table` of an absent table,
    first fetches the whole ruleset (1.7-2.1 s each, 1.3 s of it kernel CPU, with the
    iptables mode's 10k Services). Blocking: call it from a thread."""
    from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETTABLE, NFTSocket, nft_table_msg

    found = []
    for fam in families:
        af = socket.AF_INET6 if fam == 6 else socket.AF_INET
        with NFTSocket(nfgen_family=af) as nl:
            tables = nl.request_get(nft_table_msg(), NFT_MSG_GETTABLE)
            if any(
                t["nfgen_family"] == af and t.get_attr("NFTA_TABLE_NAME") == TABLE for t in tables
            ):
                found.append(fam)
    return tuple(found)


async def remove_tables_on_takeover() -> None:
    """For the other modes' takeover: delete our tables if there are any. Quiet when nft
    is not installed or nothing is there; never raises."""
    try:
        try:
            families = await asyncio.to_thread(tables_present)
        except Exception as e:  # cannot tell: try both deletes (absent ones fail quietly)
            log.debug("cannot list nftables tables: %s", e)
            families = (4, 6)
        if not families:
            return
        # In a child process (`nft -f -`): nft caches the node's ruleset for the command,
        # the other mode's chains included (~80 MB at 10k Services in iptables mode), and
        # that must not become the daemon's own peak memory.
        nft = open_nft("cmd")
        # A delete per table found (the lookup may have failed: then an absent one is
        # ENOENT, after nft's fetch of the whole ruleset).
        removed, errors = [], []
        for fam in families:
            t = f"{_family_name(fam)} {TABLE}"
            res = await asyncio.to_thread(nft.run, f"delete table {t}\n")
            if res.rc == 0:
                removed.append(t)
            elif "No such file or directory" not in res.err:
                errors.append(f"{t}: {first_error(res.err, '')}")
        if errors:
            log.warning("could not remove nftables-mode tables: %s", "; ".join(errors))
        if removed:
            log.info("removed the nftables mode's tables (takeover): %s", ", ".join(removed))
    except Exception as e:
        log.debug("no nftables tables removed: %s", e)
