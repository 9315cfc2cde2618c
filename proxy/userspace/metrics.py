"""Userspace-proxy metrics (kubeproxy_userspace_*) on the default prometheus registry.

The forwarding paths bump plain integer attributes (a Python attribute add per event or
chunk, no lock); a collector turns them into metric families at scrape time. Counters of
a Service go away with the Service, as kube-proxy's per-Service series do.
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "kubeproxy_userspace_"


class Stats:
    """Counters of one Service port (both traffic scopes together)."""

    __slots__ = (
        "accepted",
        "active",
        "bytes_to_client",
        "bytes_to_endpoint",
        "connect_failures",
        "label",
        "protocol",
        "rejected",
        "retries",
        "udp_dropped",
        "udp_sessions",
        "udp_sessions_total",
    )

    def __init__(self, label: str, protocol: str) -> None:
        self.label = label
        self.protocol = protocol
        self.active = 0  # TCP connections open now
        self.accepted = 0  # TCP connections accepted
        self.bytes_to_endpoint = 0
        self.bytes_to_client = 0
        self.connect_failures = 0  # connect attempts refused/timed out/unreachable
        self.retries = 0  # attempts on another endpoint after a failure
        self.rejected: dict[str, int] = {}  # reason → connections closed without endpoint
        self.udp_sessions = 0
        self.udp_sessions_total = 0
        self.udp_dropped = 0

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class Globals:
    __slots__ = (
        "accept_pauses",
        "address_failures",
        "addresses",
        "listen_failures",
        "listeners",
        "tunnels",
        "warm_tunnels",
    )

    def __init__(self) -> None:
        self.listeners = {"TCP": 0, "UDP": 0}
        self.listen_failures = 0
        self.addresses = 0
        self.address_failures = 0
        self.accept_pauses = 0
        # port-forward (Forwarder.stats): connections on warm / cold tunnels, failed opens
        self.tunnels: dict[str, int] = {}
        self.warm_tunnels = 0


STATS: dict[tuple[str, str], Stats] = {}
GLOBAL = Globals()


def stats_for(label: str, protocol: str) -> Stats:
    key = (label, protocol)
    st = STATS.get(key)
    if st is None:
        st = STATS[key] = Stats(label, protocol)
    return st


def drop_stats(label: str, protocol: str) -> None:
    STATS.pop((label, protocol), None)


class _Collector:
    def describe(self):
        return []

    def collect(self):
        L = ["service", "protocol"]
        active = GaugeMetricFamily(P + "active_connections", "TCP connections open now", labels=L)
        accepted = CounterMetricFamily(P + "connections", "TCP connections accepted", labels=L)
        bytes_ = CounterMetricFamily(P + "bytes", "Bytes forwarded", labels=[*L, "direction"])
        failures = CounterMetricFamily(
            P + "connect_failures",
            "Connects to an endpoint that were refused, reset, unreachable or timed out",
            labels=L,
        )
        retries = CounterMetricFamily(
            P + "connect_retries", "Connects retried on another endpoint", labels=L
        )
        rejected = CounterMetricFamily(
            P + "rejected_connections",
            "Connections closed without reaching an endpoint",
            labels=[*L, "reason"],
        )
        udp = GaugeMetricFamily(P + "udp_sessions", "UDP sessions open now", labels=L)
        udp_total = CounterMetricFamily(
            P + "udp_sessions_created", "UDP sessions created", labels=L
        )
        udp_drop = CounterMetricFamily(
            P + "udp_dropped_datagrams", "UDP datagrams dropped (no endpoint, no socket)", labels=L
        )
        for st in list(STATS.values()):
            lv = [st.label, st.protocol]
            if st.protocol == "TCP":
                active.add_metric(lv, st.active)
                accepted.add_metric(lv, st.accepted)
                failures.add_metric(lv, st.connect_failures)
                retries.add_metric(lv, st.retries)
                for reason, n in list(st.rejected.items()):
                    rejected.add_metric([*lv, reason], n)
            else:
                udp.add_metric(lv, st.udp_sessions)
                udp_total.add_metric(lv, st.udp_sessions_total)
                udp_drop.add_metric(lv, st.udp_dropped)
            bytes_.add_metric([*lv, "to_endpoint"], st.bytes_to_endpoint)
            bytes_.add_metric([*lv, "to_client"], st.bytes_to_client)
        g = GLOBAL
        listeners = GaugeMetricFamily(P + "listeners", "Listening sockets", labels=["protocol"])
        for proto, n in g.listeners.items():
            listeners.add_metric([proto], n)
        yield from (active, accepted, bytes_, failures, retries, rejected, udp, udp_total, udp_drop)
        yield listeners
        yield CounterMetricFamily(
            P + "listen_failures", "Listeners that could not be opened", value=g.listen_failures
        )
        yield GaugeMetricFamily(P + "addresses", "Service addresses owned", value=g.addresses)
        yield CounterMetricFamily(
            P + "address_failures",
            "Service addresses that could not be added",
            value=g.address_failures,
        )
        tunnels = CounterMetricFamily(
            P + "portforward_tunnels",
            "Connections carried through the API server's port-forward, by tunnel: warm "
            "(opened ahead), cold (opened for it); failed: tunnels that could not be opened",
            labels=["tunnel"],
        )
        for how in ("warm", "cold", "failed"):
            tunnels.add_metric([how], g.tunnels.get(how, 0))
        yield tunnels
        yield GaugeMetricFamily(
            P + "portforward_warm_tunnels", "Tunnels open and ready for use", value=g.warm_tunnels
        )
        yield CounterMetricFamily(
            P + "accept_pauses",
            "Times accepting paused because file descriptors ran out",
            value=g.accept_pauses,
        )


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(_Collector())
        _registered = True


register()
