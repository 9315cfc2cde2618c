"""kube-proxy-py: a Kubernetes Service data plane with node-local cluster DNS."""

__version__ = "0.1.0"
