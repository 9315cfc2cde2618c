"""Prometheus metrics, named as kube-proxy names them so dashboards and alerts carry over.

Data planes and DNS add their own under the same `kubeproxy_` prefix, in their modules,
registered on the same default registry (which also carries process_* metrics).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# kube-proxy's buckets: exponential from 1ms, factor 2, 15 buckets.
_SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# kube-proxy's network programming buckets (seconds).
_NPL_BUCKETS = (
    0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
    25, 30, 35, 40, 45, 50, 55, 60, 75, 90, 105, 120, 135, 150, 165, 180, 195, 210, 225,
    240, 255, 270, 285, 300,
)  # fmt: skip

SYNC_PROXY_RULES_DURATION = Histogram(
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds",
    buckets=_SYNC_BUCKETS,
)
SYNC_FULL_PROXY_RULES_DURATION = Histogram(
    "kubeproxy_sync_full_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for full resyncs",
    buckets=_SYNC_BUCKETS,
)
SYNC_PARTIAL_PROXY_RULES_DURATION = Histogram(
    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for partial resyncs",
    buckets=_SYNC_BUCKETS,
)
SYNC_PROXY_RULES_LAST_TIMESTAMP = Gauge(
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "The last time proxy rules were successfully synced",
)
SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP = Gauge(
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "The last time a sync of proxy rules was queued",
)
NETWORK_PROGRAMMING_DURATION = Histogram(
    "kubeproxy_network_programming_duration_seconds",
    "In Cluster Network Programming Latency in seconds",
    buckets=_NPL_BUCKETS,
)
ENDPOINT_CHANGES_PENDING = Gauge(
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
    "Pending proxy rules Endpoint changes",
)
ENDPOINT_CHANGES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_endpoint_changes",
    "Cumulative proxy rules Endpoint changes",
)
SERVICE_CHANGES_PENDING = Gauge(
    "kubeproxy_sync_proxy_rules_service_changes_pending",
    "Pending proxy rules Service changes",
)
SERVICE_CHANGES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_service_changes",
    "Cumulative proxy rules Service changes",
)
IPTABLES_RULES_TOTAL = Gauge(
    "kubeproxy_sync_proxy_rules_iptables_total",
    "Total number of iptables rules owned by kube-proxy",
    ["table"],
)
IPTABLES_RULES_LAST = Gauge(
    "kubeproxy_sync_proxy_rules_iptables_last",
    "Number of iptables rules written by kube-proxy in last sync",
    ["table"],
)
IPTABLES_RESTORE_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_iptables_restore_failures",
    "Cumulative proxy iptables restore failures",
)
IPTABLES_PARTIAL_RESTORE_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
    "Cumulative proxy iptables partial restore failures",
)
NO_LOCAL_ENDPOINTS = Gauge(
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
    "Number of services with a Local traffic policy and no endpoints",
    ["traffic_policy"],
)
HEALTHZ_TOTAL = Counter(
    "kubeproxy_proxy_healthz",
    "Cumulative proxy healthz HTTP status",
    ["code"],
)
LIVEZ_TOTAL = Counter(
    "kubeproxy_proxy_livez",
    "Cumulative proxy livez HTTP status",
    ["code"],
)
# This proxy's own additions.
SKIPPED_OBJECTS = Counter(
    "kubeproxy_py_skipped_objects",
    "Objects or parts of objects skipped because they cannot be programmed",
    ["kind"],
)
WATCH_RESTARTS = Counter(
    "kubeproxy_py_watch_restarts",
    "Watch restarts by resource and reason (error, expired, closed)",
    ["resource", "reason"],
)
SERVICES = Gauge("kubeproxy_py_services", "Services in the watch cache")
ENDPOINTS = Gauge("kubeproxy_py_endpoints", "Endpoints (address, port) in the watch cache")
