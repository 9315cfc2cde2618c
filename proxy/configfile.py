"""The --config file: a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) and,
optionally, this proxy's own KubeProxyPyConfiguration as a second YAML document.

Which field goes where is `proxy.config.SETTINGS`; this module only reads. It follows
kube-proxy's defaulting, so a kubeadm cluster's own ConfigMap (every field written out,
"" / 0s / null for "default") loads unchanged. Unknown fields are warned about with their
path; a value of the wrong type is a one-line UsageError naming the field.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml

from proxy.config import (
    KUBE,
    KUBE_IGNORED,
    OWN,
    OWN_API_VERSION,
    SETTINGS,
    UsageError,
    parse_duration,
)

log = logging.getLogger("proxy.config")

KUBE_API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
_MISSING = object()


def _read(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except OSError as e:
        raise UsageError(f"--config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not docs or not all(isinstance(d, dict) for d in docs):
        raise UsageError(f"--config: {path} is not a {KUBE}")
    return docs


def _split(path: str, docs: list[dict[str, Any]]) -> tuple[dict | None, dict | None]:
    kube = own = None
    want = {KUBE: KUBE_API_VERSION, OWN: OWN_API_VERSION}
    for d in docs:
        kind, api = d.get("kind"), d.get("apiVersion")
        if kind not in want:
            raise UsageError(
                f"--config: {path}: a {kind or 'document without kind'} is not a {KUBE}"
            )
        if api != want[kind]:
            raise UsageError(f"--config: {path}: {kind} apiVersion {api!r}; use {want[kind]}")
        if (kube if kind == KUBE else own) is not None:
            raise UsageError(f"--config: {path}: more than one {kind}")
        if kind == KUBE:
            kube = d
        else:
            own = d
    return kube, own


def _lookup(doc: dict[str, Any], path: str, prefix: str) -> Any:
    node: Any = doc
    parts = path.split(".")
    for i, key in enumerate(parts):
        if node is None:
            return _MISSING
        if not isinstance(node, dict):
            where = ".".join(parts[:i])
            raise UsageError(f"{prefix}{where}: expected a mapping, got {type(node).__name__}")
        node = node.get(key, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def _is_zero(value: Any) -> bool:
    """Go's zero value, which kube-proxy's defaulting replaces by the default."""
    if value is None or value is False or value == "" or value == [] or value == {}:
        return True
    if isinstance(value, int) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, str):
        try:
            return parse_duration(value) == 0
        except UsageError:
            return False
    if isinstance(value, dict):
        return all(_is_zero(v) for v in value.values())
    return False


def _walk(node: Any, prefix: str = ""):
    """(path, value) of every leaf; a mapping's leaves, not the mapping itself."""
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, node


def _check_fields(
    doc: dict[str, Any], known: set[str], opaque: tuple[str, ...], where: str
) -> list[str]:
    """Warn about unknown fields; return the ignored (opaque) ones that are set."""
    set_but_ignored = []
    for path, value in _walk(doc):
        if path in ("apiVersion", "kind") or path in known:
            continue
        section = next((o for o in opaque if path == o or path.startswith(o + ".")), None)
        if section is not None:
            if not _is_zero(value) and section not in set_but_ignored:
                set_but_ignored.append(section)
            continue
        log.warning("%sunknown field %s, ignored", where, path)
    return set_but_ignored


def load_file(path: str, *, mode: str | None = None) -> dict[str, Any]:
    """Config field → value for what the file sets. `mode` is the --proxy-mode flag's (it
    decides whether iptables.* or nftables.* applies, as in kube-proxy)."""
    kube, own = _split(path, _read(path))
    prefix = f"--config {path}: "
    if mode is None and kube is not None and isinstance(kube.get("mode"), str):
        mode = kube["mode"]
    nft = mode == "nftables"
    out: dict[str, Any] = {}
    known_kube: set[str] = set()
    known_own: set[str] = set()
    for s in SETTINGS:
        for doc, p, known in ((kube, s.path, known_kube), (own, s.own, known_own)):
            if p is None:
                continue
            if doc is kube and nft and s.nft_path is not None:
                p = s.nft_path
            known.add(p)
            if doc is None:
                continue
            value = _lookup(doc, p, prefix)
            if value is _MISSING or value is None:
                continue
            if doc is kube and s.zero_is_default and _is_zero(value):
                continue
            out[s.field] = s.kind.from_file(value, f"{prefix}{p}")
    if kube is not None:
        # In nftables mode iptables.* is the section that does not apply, and vice versa.
        other = "iptables" if nft else "nftables"
        opaque = (*(o for o in KUBE_IGNORED if o != "nftables"), other)
        known_kube -= {k for k in known_kube if k.startswith(other + ".")}
        if nft:
            known_kube.add("iptables.localhostNodePorts")
        ignored = _check_fields(kube, known_kube, opaque, prefix)
        if ignored:
            log.info("%sset but not used by kube-proxy-py: %s", prefix, ", ".join(ignored))
    if own is not None:
        _check_fields(own, known_own, (), f"{prefix}{OWN} ")
    return out
