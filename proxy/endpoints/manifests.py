"""The manifests source: Services and EndpointSlices from YAML files, re-read on change.

`--manifests PATH` is a file or a directory (*.yaml, *.yml, *.json, not recursive into
hidden entries). Files hold one or more YAML documents, or `kind: List` with `items`.
Other kinds are ignored. A file that stops parsing keeps its last good objects (an edit
in progress never drops Services), with one log line naming the file and the error.
Changes are found by polling (mtime, size) every `interval` seconds: no inotify
dependency, and editors that replace files atomically are handled the same way.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import yaml

from proxy.config import UsageError
from proxy.endpoints.store import ENDPOINT_SLICE, NODE, SERVICE, Store

log = logging.getLogger("proxy.manifests")

_SUFFIXES = (".yaml", ".yml", ".json")
# A Node (the one named like this node) stands in for the watched Node object: its zone
# label and addresses (topology, `--nodeport-addresses primary`) on the laptop/demo path.
_KINDS = {"Service": SERVICE, "EndpointSlice": ENDPOINT_SLICE, "Node": NODE}

try:  # libyaml's C loader is ~10x faster; fall back to the pure one
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader


def _raise(e: OSError) -> None:
    raise e


def _files(root: Path) -> list[Path]:
    """The manifest files under root (raises OSError when a directory cannot be read:
    os.walk would otherwise hide it, and an unreadable directory would look empty)."""
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith(_SUFFIXES) and not f.startswith("."):
                out.append(Path(dirpath) / f)
    return out


def _signature(files: list[Path]) -> tuple:
    sig = []
    for f in files:
        try:
            st = f.stat()
            sig.append((str(f), st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append((str(f), 0, -1))
    return tuple(sig)


def load_objects(path: Path) -> list[dict]:
    """All objects in one file (raises yaml.YAMLError / OSError)."""
    with open(path, encoding="utf-8") as f:
        docs = list(yaml.load_all(f, Loader=_Loader))
    out: list[dict] = []
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "List" or (doc.get("kind", "").endswith("List") and "items" in doc):
            out.extend(i for i in doc.get("items") or [] if isinstance(i, dict))
        else:
            out.append(doc)
    return out


class ManifestsSource:
    def __init__(self, path: str, store: Store, interval: float = 1.0) -> None:
        self.root = Path(path)
        self.store = store
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sig: tuple | None = None
        self._good: dict[str, list[dict]] = {}  # file → its last good objects

    @property
    def api_client(self) -> None:
        return None  # no API server behind this source

    def check(self) -> None:
        if not self.root.exists():
            raise UsageError(f"--manifests: {self.root} does not exist")

    def start(self) -> None:
        self.reload()
        self._thread = threading.Thread(target=self._run, name="manifests", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.reload()
            except Exception:  # never let the watcher die
                log.exception("manifests: reload of %s failed", self.root)

    def reload(self) -> bool:
        """Re-read when anything changed; returns True when it re-read."""
        if not self.root.exists():
            # Deleted or being swapped: empty the directory to remove Services, not this.
            if self._sig != ("missing",):
                log.warning("manifests: %s is gone; keeping the previous objects", self.root)
                self._sig = ("missing",)
            return False
        try:
            files = _files(self.root)
        except OSError as e:  # EMFILE, EACCES…: keep every object we have
            log.warning(
                "manifests: cannot list %s (%s); keeping the previous objects", self.root, e
            )
            return False
        sig = _signature(files)
        if sig == self._sig:
            return False
        first = self._sig is None
        unchanged = set(sig) & set(self._sig or ())  # (path, mtime, size) seen last time
        self._sig = sig
        good: dict[str, list[dict]] = {}
        for f, entry in zip(files, sig, strict=True):
            if entry in unchanged and str(f) in self._good:
                good[str(f)] = self._good[str(f)]  # only changed files are parsed again
                continue
            try:
                good[str(f)] = load_objects(f)
            except (OSError, UnicodeDecodeError) as e:
                log.warning("manifests: cannot read %s: %s; keeping its previous objects", f, e)
                good[str(f)] = self._good.get(str(f), [])
            except yaml.YAMLError as e:
                where = getattr(e, "problem_mark", None)
                at = f" at line {where.line + 1}" if where is not None else ""
                why = getattr(e, "problem", None) or str(e).splitlines()[0]
                log.warning(
                    "manifests: %s is not valid YAML%s (%s); keeping its previous objects",
                    f,
                    at,
                    why,
                )
                good[str(f)] = self._good.get(str(f), [])
        self._good = good
        by_kind: dict[str, list[dict]] = {SERVICE: [], ENDPOINT_SLICE: [], NODE: []}
        for objs in good.values():
            for obj in objs:
                kind = _KINDS.get(obj.get("kind", ""))
                if kind is not None:
                    meta = obj.setdefault("metadata", {}) if isinstance(obj, dict) else {}
                    if isinstance(meta, dict) and kind != NODE:  # Nodes have no namespace
                        meta.setdefault("namespace", "default")
                    by_kind[kind].append(obj)
        self.store.replace(SERVICE, by_kind[SERVICE])
        self.store.replace(ENDPOINT_SLICE, by_kind[ENDPOINT_SLICE])
        self.store.replace(NODE, by_kind[NODE])
        n_svc, n_sl = len(by_kind[SERVICE]), len(by_kind[ENDPOINT_SLICE])
        log.info(
            "manifests: %s %s: %d Services, %d EndpointSlices from %d files",
            "loaded" if first else "reloaded",
            self.root,
            n_svc,
            n_sl,
            len(files),
        )
        return True
