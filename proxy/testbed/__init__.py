"""Virtual-node testbed: nodes, pods and outside hosts in network namespaces.

Used by the end-to-end tests, the benchmarks and the README demo. See proxy/testbed/README.md.

    with Testbed() as tb:
        node = tb.add_node("node-a", underlay_ip="198.18.200.1", pod_cidr="198.18.1.0/24")
        pod = tb.add_pod(node, "web", "198.18.1.10")
        start_backend(pod, 8080, proto="http")
        assert client_request(node, pod.ip, 8080, "http") == "web"
"""

from .cleanup import cleanup_stale
from .cluster import Cluster, two_node_cluster
from .hosts import Host, Node
from .netns import CommandError
from .proxyproc import ProxyExited, ProxyProcess
from .testbed import Testbed, close_all
from .traffic import BadReply, client_request, http_request, start_backend

__all__ = [
    "BadReply",
    "Cluster",
    "CommandError",
    "Host",
    "Node",
    "ProxyExited",
    "ProxyProcess",
    "Testbed",
    "cleanup_stale",
    "client_request",
    "close_all",
    "http_request",
    "start_backend",
    "two_node_cluster",
]
