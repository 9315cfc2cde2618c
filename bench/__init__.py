"""kube-proxy-py-bench: control-plane, data-plane and DNS suites side by side with references.

Installed as the package `kube_proxy_py_bench` (from this `bench/` folder) with the console
script `kube-proxy-py-bench`; see cli.py.
"""
