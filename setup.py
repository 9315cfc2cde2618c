"""Package list only (the rest is in pyproject.toml): `proxy` and its subpackages, and the
bench/ folder installed under the name `kube_proxy_py_bench`."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["proxy", "proxy.*"]), "kube_proxy_py_bench"],
    package_dir={"kube_proxy_py_bench": "bench"},
)
