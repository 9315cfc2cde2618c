"""nfacct counters (the kernel's nfnetlink_acct), as kube-proxy keeps them.

kube-proxy counts two kinds of packets with `-m nfacct --nfacct-name NAME` rules and exports
them as metrics: INVALID packets dropped in KUBE-FORWARD
(`kubeproxy_iptables_ct_state_invalid_dropped_packets_total`) and NodePort packets accepted
on 127.0.0.0/8 (`kubeproxy_iptables_localhost_nodeports_accepted_packets_total`). Counters
live in the network namespace; they are created through netlink (pyroute2) and read at
scrape time.

A rule naming a counter the kernel cannot match would fail the whole iptables-restore, so
the data plane only writes nfacct rules when both halves work: the counter exists
(nfnetlink_acct) and iptables accepts the `nfacct` match (xt_nfacct). Where either is
missing, the rules are written without `-m nfacct` and the metrics are absent, with one
log line saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from proxy.iptables.backend import Backend, run

log = logging.getLogger("proxy.iptables")

# nfnetlink_acct messages and attributes (linux/netfilter/nfnetlink_acct.h)
NFNL_MSG_ACCT_NEW = 0
NFNL_MSG_ACCT_GET = 1

# Counter name → (metric name, help), as kube-proxy's metrics package names them.
METRICS = {
    "ct_state_invalid_dropped_pkts": (
        "kubeproxy_iptables_ct_state_invalid_dropped_packets",
        "packets dropped by iptables to work around conntrack problems",
    ),
    "localhost_nps_accepted_pkts": (
        "kubeproxy_iptables_localhost_nodeports_accepted_packets",
        "Number of packets accepted on nodeports of loopback interface",
    ),
}


def _message_class() -> type:
    from pyroute2.netlink.nfnetlink import nfgen_msg

    class nfacct_msg(nfgen_msg):
        nla_map = (
            ("NFACCT_UNSPEC", "none"),
            ("NFACCT_NAME", "asciiz"),
            ("NFACCT_PKTS", "be64"),
            ("NFACCT_BYTES", "be64"),
            ("NFACCT_USE", "be32"),
            ("NFACCT_FLAGS", "be32"),
            ("NFACCT_QUOTA", "be64"),
            ("NFACCT_FILTER", "hex"),
            ("NFACCT_PAD", "hex"),
        )

    return nfacct_msg


class NfAcct:
    """nfacct counters of this network namespace.

    One worker thread owns one netlink socket (opened on first use, kept open), so a
    scrape costs one dump on an open socket, not a socket and an event loop. The methods
    block: call them from a thread, or `await asyncio.to_thread(...)`."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="nfacct")
        self._msg: type | None = None
        self._sock: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _socket(self) -> Any:  # on the worker thread
        from pyroute2.netlink import NETLINK_NETFILTER
        from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_ACCT
        from pyroute2.netlink.nlsocket import NetlinkSocket

        if self._sock is None:
            self._msg = _message_class()
            # Its own selector loop: pyroute2's synchronous socket drives one, and
            # uvloop's cannot open netlink endpoints.
            self._loop = asyncio.SelectorEventLoop()
            sock = NetlinkSocket(family=NETLINK_NETFILTER, use_event_loop=self._loop)
            sock.bind()
            sub = NFNL_SUBSYS_ACCT << 8  # replies (a dump's too) come as ACCT_NEW
            sock.register_policy(
                {sub | NFNL_MSG_ACCT_NEW: self._msg, sub | NFNL_MSG_ACCT_GET: self._msg}
            )
            self._sock = sock
        return self._sock

    def _request(self, msg_type: int, flags: int, name: str = "") -> list:  # worker thread
        from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_ACCT

        sock = self._socket()
        assert self._msg is not None
        msg = self._msg()
        if name:
            msg["attrs"] = [("NFACCT_NAME", name)]
        try:
            kind = (NFNL_SUBSYS_ACCT << 8) | msg_type
            return list(sock.nlm_request(msg, msg_type=kind, msg_flags=flags))
        except OSError:
            self._close()  # a broken socket: a fresh one next time
            raise

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self._sock.close()
            self._sock = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._pool.submit(fn, *args).result(timeout=self.timeout)

    def ensure(self, name: str) -> None:
        """Create counter `name` unless it exists; OSError when nfacct is unavailable."""
        from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
        from pyroute2.netlink.exceptions import NetlinkError

        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        try:
            self._run(self._request, NFNL_MSG_ACCT_NEW, flags, name)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise OSError(e.code, f"nfacct counter {name}: {e}") from None

    def packets(self) -> dict[str, int]:
        """Every counter's packet count (one netlink dump)."""
        from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST

        out: dict[str, int] = {}
        for m in self._run(self._request, NFNL_MSG_ACCT_GET, NLM_F_REQUEST | NLM_F_DUMP):
            name = m.get_attr("NFACCT_NAME")
            if isinstance(name, str):
                out[name] = int(m.get_attr("NFACCT_PKTS") or 0)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._close)
        self._pool.shutdown(wait=False)


class NfAcctCollector(Collector):
    """The counters as kube-proxy's metrics, read when /metrics is scraped.

    The scrape may run on the event loop, where pyroute2's synchronous socket cannot
    (it drives its own loop): the dump runs on NfAcct's thread, on its open socket."""

    def __init__(self, nfacct: NfAcct) -> None:
        self.nfacct = nfacct
        self.names: frozenset[str] = frozenset()  # counters the rules count into

    def collect(self) -> Iterator[CounterMetricFamily]:
        if not self.names:
            return
        try:
            counts = self.nfacct.packets()
        except Exception as e:  # a scrape must not fail because a counter could not be read
            log.debug("cannot read nfacct counters: %s", e)
            return
        for name in sorted(self.names):
            metric, help_ = METRICS[name]
            fam = CounterMetricFamily(metric, help_)
            fam.add_metric([], float(counts.get(name, 0)))
            yield fam


_collector: NfAcctCollector | None = None


def collector(nfacct: NfAcct, names: Iterable[str]) -> NfAcctCollector:
    """The process's collector (registered once), now exporting `names`."""
    global _collector
    if _collector is None:
        _collector = NfAcctCollector(nfacct)
        REGISTRY.register(_collector)
    _collector.nfacct = nfacct
    _collector.names = frozenset(names)
    return _collector


_UNSUPPORTED = ("not supported", "couldn't load", "no such file", "unknown option")


async def match_supported(backend: Backend) -> bool:
    """Whether iptables (userspace extension and kernel match) takes `-m nfacct`.

    A `-C` (check) of a rule that is not there answers "Bad rule" (exit 1) when the match
    itself is fine; a missing extension or kernel module is reported as such. Nothing is
    changed in the kernel."""
    res = await run(
        [
            backend.iptables,
            "-w",
            "5",
            "-t",
            "filter",
            "-C",
            "INPUT",
            "-m",
            "nfacct",
            "--nfacct-name",
            "ct_state_invalid_dropped_pkts",
            "-j",
            "ACCEPT",
        ],
        timeout=10,
    )
    text = (res.out + res.err).lower()
    return res.rc in (0, 1) and not any(s in text for s in _UNSUPPORTED)
