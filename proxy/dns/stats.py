"""DNS metrics (kubeproxy_dns_*), counted in plain dicts and exported at scrape time.

prometheus_client's Counter.inc() and Histogram.observe() take a lock and cost a few
microseconds each, which is a large share of a cached answer's budget. The hot path
instead bumps dict entries, and one custom collector on the default registry turns them
into metric families when /metrics is scraped. One `STATS` per process: every DnsServer
in the process adds to it (there is one in the daemon).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

# CoreDNS's request duration buckets (seconds), from 0.25 ms.
BUCKETS = (
    0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
    0.512, 1.024, 2.048, 4.096, 8.192,
)  # fmt: skip
SOURCES = ("zone", "cache", "upstream")
_SOURCE_INDEX = {s: i for i, s in enumerate(SOURCES)}


class Stats:
    def __init__(self) -> None:
        self.queries: dict[tuple[str, str], int] = {}  # (qtype, rcode) → count
        self.hist: dict[str, list[int]] = {s: [0] * (len(BUCKETS) + 1) for s in SOURCES}
        self.sums = [0.0] * len(SOURCES)  # seconds, by SOURCES index
        self.cache_hits = 0
        self.cache_misses = 0
        self.upstream_failures: dict[tuple[str, str], int] = {}  # (upstream, reason)
        self.dropped: dict[str, int] = {}  # reason → count
        self.zone_updates = 0
        self.zone_update_seconds = 0.0
        # Gauges read at scrape time from live objects.
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}  # name → (help, read)

    def query(self, mkey: tuple[str, str], source: str, seconds: float) -> None:
        q = self.queries
        q[mkey] = q.get(mkey, 0) + 1
        self.hist[source][bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sums[_SOURCE_INDEX[source]] += seconds

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def upstream_failure(self, upstream: str, reason: str) -> None:
        k = (upstream, reason)
        self.upstream_failures[k] = self.upstream_failures.get(k, 0) + 1


STATS = Stats()


class _Collector(Collector):
    def __init__(self, stats: Stats) -> None:
        self.s = stats

    def collect(self) -> Iterator:
        s = self.s
        q = CounterMetricFamily(
            "kubeproxy_dns_queries",
            "DNS queries answered, by type and rcode",
            labels=["qtype", "rcode"],
        )
        for (qt, rc), v in sorted(s.queries.items()):
            q.add_metric([qt, rc], v)
        yield q
        h = HistogramMetricFamily(
            "kubeproxy_dns_request_duration_seconds",
            "Time from receiving a query to having its answer, by where the answer came from",
            labels=["source"],
        )
        for i, src in enumerate(SOURCES):
            counts = s.hist[src]
            acc, buckets = 0, []
            for bound, c in zip((*BUCKETS, float("inf")), counts, strict=True):
                acc += c
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            h.add_metric([src], buckets, s.sums[i])
        yield h
        yield CounterMetricFamily(
            "kubeproxy_dns_cache_hits",
            "Forwarded names answered from the cache",
            value=s.cache_hits,
        )
        yield CounterMetricFamily(
            "kubeproxy_dns_cache_misses",
            "Forwarded names not in the cache (asked upstream)",
            value=s.cache_misses,
        )
        f = CounterMetricFamily(
            "kubeproxy_dns_upstream_failures",
            "Upstream exchanges that failed, by upstream and reason",
            labels=["upstream", "reason"],
        )
        for (up, why), v in sorted(s.upstream_failures.items()):
            f.add_metric([up, why], v)
        yield f
        d = CounterMetricFamily(
            "kubeproxy_dns_dropped", "Messages dropped or refused, by reason", labels=["reason"]
        )
        for why, v in sorted(s.dropped.items()):
            d.add_metric([why], v)
        yield d
        yield CounterMetricFamily(
            "kubeproxy_dns_zone_updates", "Model snapshots indexed for DNS", value=s.zone_updates
        )
        yield CounterMetricFamily(
            "kubeproxy_dns_zone_update_seconds",
            "Time spent indexing model snapshots for DNS",
            value=s.zone_update_seconds,
        )
        for name, (doc, read) in sorted(s.gauges.items()):
            yield GaugeMetricFamily(name, doc, value=read())


_COLLECTOR = _Collector(STATS)
REGISTRY.register(_COLLECTOR)
