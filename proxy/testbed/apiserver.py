"""A small Kubernetes API server for tests, with real list/watch semantics.

Serves Services, Pods and Nodes (core/v1) and EndpointSlices (discovery.k8s.io/v1) over plain
HTTP the way the real API server does it, so an informer's recovery paths are exercised
rather than assumed:

- one global, monotonically increasing resourceVersion (as etcd's revision);
- list returns items plus `metadata.resourceVersion`; `resourceVersion` "" / "0" / N on a
  list all return the current state (which is "not older than" any of them);
- `?watch=1&resourceVersion=N` streams newline-delimited JSON events after N (replayed
  from the retained history), then live; "" / "0" first sends the current state as ADDED;
- an N older than the retained history gets an ERROR event with a 410 "Expired" Status,
  as the real server does (HTTP 200, then the error in the stream);
- BOOKMARK events (only with `allowWatchBookmarks=true`) carry the global RV, sent only
  once a stream has caught up, so a client may resume from them without losing events;
- `timeoutSeconds` ends the stream cleanly; `labelSelector` supports `k=v`, `k==v`,
  `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`; `fieldSelector` supports
  `metadata.name` and `metadata.namespace` with `=`, `==`, `!=` (anything else: 400, as
  the real server answers an unsupported field label); a MODIFIED object that stops
  (starts) matching a selector is sent as DELETED (ADDED), as the watch cache does;
- Nodes are cluster-scoped: `/api/v1/nodes`, no namespace (under a namespace: 404);
- `pods/NAME/portforward` over WebSocket with the kubelet's channel framing
  (`v4.channel.k8s.io`; see proxy/testbed/portforward.py), connecting to the Pod's
  `status.podIP` from the server's own network namespace (`dial`);
- optionally, authentication and authorization as a user sees them: `token` (a request
  without `Authorization: Bearer <token>` gets 401) and `forbidden` (resources such as
  "nodes" or "pods/portforward" this user may not use: 403 with kube-apiserver's
  message). The /admin controls are always open.

Test controls (methods, and the same over HTTP under /admin for a server in another
process or network namespace): create/update/apply/delete objects, `compact(keep_last)`,
`drop_watches()`, `stall_watches(s)` / `release_watches()`, `send_bookmarks()`,
`inject_event()` (a raw line to the open streams), `drop_portforwards()` (break every open
tunnel), and counts of list, watch and port-forward requests.

In a test:   with ApiServer().start() as api: api.apply(svc); ... api.url
As a process: python -m proxy.testbed.apiserver --listen 127.0.0.1:8080 --load objs.yaml
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import copy
import http.client
import json
import logging
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from proxy.testbed import portforward as pf
from proxy.testbed import spdy

log = logging.getLogger("proxy.testbed.apiserver")


@dataclass(frozen=True)
class Resource:
    name: str  # plural, as in the URL
    kind: str
    group_version: str  # "v1" or "discovery.k8s.io/v1"
    prefix: str  # URL prefix of the group version
    namespaced: bool = True  # Nodes are not: stored under namespace ""

    @property
    def list_kind(self) -> str:
        return self.kind + "List"


RESOURCES = {
    "services": Resource("services", "Service", "v1", "/api/v1"),
    "pods": Resource("pods", "Pod", "v1", "/api/v1"),
    "nodes": Resource("nodes", "Node", "v1", "/api/v1", namespaced=False),
    "endpointslices": Resource(
        "endpointslices", "EndpointSlice", "discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1"
    ),
}
BY_KIND = {r.kind: r for r in RESOURCES.values()}

_PATH_RE = re.compile(
    r"^(?P<prefix>/api/v1|/apis/discovery\.k8s\.io/v1)"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<res>" + "|".join(RESOURCES) + r")"
    r"(?:/(?P<name>[^/]+))?/?$"
)
# Subresources: only pods/portforward (see proxy/testbed/portforward.py).
_PORTFORWARD_RE = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/portforward$")


def resource_of(kind_or_resource: str) -> Resource:
    """'Service' / 'services' / 'EndpointSlice' / 'endpointslices' → Resource."""
    r = BY_KIND.get(kind_or_resource) or RESOURCES.get(kind_or_resource.lower())
    if r is None:
        raise ValueError(f"unsupported kind or resource {kind_or_resource!r}")
    return r


# -- label selectors -----------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        has = self.key in labels
        v = labels.get(self.key)
        if self.op == "exists":
            return has
        if self.op == "!":
            return not has
        if self.op == "=":
            return has and v in self.values
        if self.op == "in":
            return has and v in self.values
        return not has or v not in self.values  # "!=" and "notin" match absent keys


_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_VAL = r"[-A-Za-z0-9_.]*"
_SET_RE = re.compile(rf"^({_KEY})\s+(in|notin)\s+\(\s*([^)]*)\)$")
_CMP_RE = re.compile(rf"^({_KEY})\s*(==|!=|=)\s*({_VAL})$")
_EXISTS_RE = re.compile(rf"^(!?)\s*({_KEY})$")


def parse_selector(text: str) -> list[Requirement]:
    """A label selector string → requirements (all must match). ValueError when invalid."""
    terms, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    terms.append("".join(cur))
    reqs = []
    for raw in terms:
        t = raw.strip()
        if not t:
            if text.strip():
                raise ValueError(f"empty term in selector {text!r}")
            continue
        if m := _SET_RE.match(t):
            vals = [v.strip() for v in m.group(3).split(",")]
            if any(not re.fullmatch(_VAL, v) for v in vals):
                raise ValueError(f"invalid value in {t!r}")
            reqs.append(Requirement(m.group(1), m.group(2), frozenset(vals)))
        elif m := _CMP_RE.match(t):
            op = "!=" if m.group(2) == "!=" else "="
            reqs.append(Requirement(m.group(1), op, frozenset([m.group(3)])))
        elif m := _EXISTS_RE.match(t):
            reqs.append(Requirement(m.group(2), "!" if m.group(1) else "exists"))
        else:
            raise ValueError(f"unable to parse requirement {t!r}")
    return reqs


# -- field selectors -----------------------------------------------------------------------

FIELDS = ("metadata.name", "metadata.namespace")  # what every resource supports


@dataclass(frozen=True)
class FieldRequirement:
    field: str  # one of FIELDS
    op: str  # "=" or "!="
    value: str

    def matches_object(self, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        have = str(meta.get(self.field.split(".", 1)[1]) or "")
        return (have == self.value) == (self.op == "=")


_FIELD_RE = re.compile(r"^([A-Za-z0-9.]+)\s*(==|!=|=)\s*([^,]*)$")


def parse_field_selector(text: str) -> list[FieldRequirement]:
    """A field selector string → requirements (all must match). ValueError when invalid
    or naming a field this server does not index (the real server's 400)."""
    out = []
    for raw in text.split(",") if text.strip() else []:
        m = _FIELD_RE.match(raw.strip())
        if not m:
            raise ValueError(f"invalid field selector term {raw.strip()!r}")
        if m.group(1) not in FIELDS:
            raise ValueError(f'field label not supported: "{m.group(1)}"')
        op = "!=" if m.group(2) == "!=" else "="
        out.append(FieldRequirement(m.group(1), op, m.group(3).strip()))
    return out


Req = Requirement | FieldRequirement  # a label or a field requirement


def selector_matches(reqs: list[Req], obj: dict[str, Any]) -> bool:
    if not reqs:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if not isinstance(labels, dict):
        labels = {}
    return all(
        r.matches(labels) if isinstance(r, Requirement) else r.matches_object(obj) for r in reqs
    )


# -- state ---------------------------------------------------------------------------------


@dataclass
class _Stored:
    obj: dict[str, Any]
    raw: bytes  # JSON encoding, made once


@dataclass
class _Event:
    rv: int
    resource: str
    type: str  # ADDED / MODIFIED / DELETED
    namespace: str
    new: _Stored | None
    old: _Stored | None = None  # the previous version, for MODIFIED and DELETED


@dataclass(eq=False)  # identity: kept in a set of open watches
class _Watch:
    resource: str
    conn: socket.socket
    bookmarks: bool
    bookmark_gen: int = 0
    dropped: bool = False
    pending: list[bytes] = field(default_factory=list)  # injected lines


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _key(obj: dict[str, Any], namespaced: bool = True) -> tuple[str, str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise ValueError("object has no metadata.name")
    if not namespaced:
        return "", meta["name"]
    ns = meta.get("namespace") or "default"
    if not isinstance(ns, str):
        raise ValueError("metadata.namespace is not a string")
    return ns, meta["name"]


class ApiServer:
    """The server's state and test controls; `start()` serves it over HTTP."""

    def __init__(
        self,
        *,
        history_limit: int = 100_000,
        dial: pf.Dial = pf.default_dial,
        portforward_grace: float = pf.CLOSE_GRACE,
    ) -> None:
        self._cond = threading.Condition()
        self._rv = 1  # last assigned resourceVersion
        self._objects: dict[str, dict[tuple[str, str], _Stored]] = {r: {} for r in RESOURCES}
        self._history: list[_Event] = []  # ascending rv
        self._history_rvs: list[int] = []
        self._min_valid_rv = 1  # a watch from rv < this gets 410 Expired
        self._history_limit = history_limit
        self._watches: set[_Watch] = set()
        self._bookmark_gen = 0
        self._stall_until = 0.0
        self.list_requests: Counter[str] = Counter()
        self.watch_requests: Counter[str] = Counter()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        # pods/portforward: how the server reaches Pods, and the tunnels open now.
        self.dial = dial
        self.portforward_grace = portforward_grace
        self.portforward_requests: Counter[str] = Counter()  # "ns/name" → WebSockets opened
        self._tunnels: dict[socket.socket, str] = {}  # open tunnel → "ns/name" of its Pod
        # Who may do what: None lets anybody in; resources in `forbidden` get 403.
        self.token: str | None = None
        self.forbidden: set[str] = set()
        self.user = "alice@example.com"

    # -- objects ---------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def create(self, obj: dict[str, Any], resource: str | None = None) -> dict[str, Any]:
        return self._write(obj, resource, must_exist=False, must_not_exist=True)

    def update(self, obj: dict[str, Any], resource: str | None = None) -> dict[str, Any]:
        """Replace an existing object (no optimistic-concurrency check: tests force)."""
        return self._write(obj, resource, must_exist=True, must_not_exist=False)

    def apply(self, obj: dict[str, Any], resource: str | None = None) -> dict[str, Any]:
        """Create or replace."""
        return self._write(obj, resource, must_exist=False, must_not_exist=False)

    def delete(self, kind_or_resource: str, namespace: str, name: str) -> dict[str, Any]:
        res = resource_of(kind_or_resource)
        namespace = namespace if res.namespaced else ""
        with self._cond:
            old = self._objects[res.name].pop((namespace, name), None)
            if old is None:
                raise KeyError(f"{res.name} {namespace}/{name} not found")
            self._rv += 1
            gone = copy.deepcopy(old.obj)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            stored = _Stored(gone, json.dumps(gone, separators=(",", ":")).encode())
            self._record(_Event(self._rv, res.name, "DELETED", namespace, stored, old))
            return copy.deepcopy(gone)

    def get(self, kind_or_resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        res = resource_of(kind_or_resource)
        namespace = namespace if res.namespaced else ""
        with self._cond:
            s = self._objects[res.name].get((namespace, name))
            return copy.deepcopy(s.obj) if s else None

    def objects(self, kind_or_resource: str) -> list[dict[str, Any]]:
        res = resource_of(kind_or_resource)
        with self._cond:
            return [copy.deepcopy(s.obj) for s in self._objects[res.name].values()]

    def _write(
        self, obj: dict[str, Any], resource: str | None, *, must_exist: bool, must_not_exist: bool
    ) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise ValueError("object is not a mapping")
        res = resource_of(resource or str(obj.get("kind") or ""))
        obj = copy.deepcopy(obj)
        ns, name = _key(obj, res.namespaced)
        obj.setdefault("kind", res.kind)
        obj.setdefault("apiVersion", res.group_version)
        meta = obj["metadata"]
        if res.namespaced:
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        with self._cond:
            old = self._objects[res.name].get((ns, name))
            if old is None and must_exist:
                raise KeyError(f"{res.name} {ns}/{name} not found")
            if old is not None and must_not_exist:
                raise FileExistsError(f"{res.name} {ns}/{name} already exists")
            self._rv += 1
            if old is None:
                meta["uid"] = meta.get("uid") or str(uuid.uuid4())
                meta["creationTimestamp"] = meta.get("creationTimestamp") or _now()
                meta["generation"] = 1
            else:
                ometa = old.obj["metadata"]
                meta["uid"] = ometa["uid"]
                meta["creationTimestamp"] = ometa["creationTimestamp"]
                meta["generation"] = int(ometa.get("generation") or 1) + 1
            meta["resourceVersion"] = str(self._rv)
            stored = _Stored(obj, json.dumps(obj, separators=(",", ":")).encode())
            self._objects[res.name][(ns, name)] = stored
            typ = "ADDED" if old is None else "MODIFIED"
            self._record(_Event(self._rv, res.name, typ, ns, stored, old))
            return copy.deepcopy(obj)

    def inject_event(self, kind_or_resource: str, line: bytes) -> int:
        """Send a raw line (not JSON, an ERROR event, ...) on every open watch stream of a
        resource, once it has caught up. Not part of the history: a resumed watch does not
        see it again. Returns how many streams got it."""
        res = resource_of(kind_or_resource)
        with self._cond:
            targets = [w for w in self._watches if w.resource == res.name]
            for w in targets:
                w.pending.append(line.rstrip(b"\n") + b"\n")
            self._cond.notify_all()
            return len(targets)

    def _record(self, ev: _Event) -> None:  # lock held
        self._history.append(ev)
        self._history_rvs.append(ev.rv)
        if len(self._history) > self._history_limit:  # trim a tenth at once: amortized O(1)
            self._compact_locked(self._history_limit * 9 // 10)
        self._cond.notify_all()

    # -- faults ----------------------------------------------------------------------------

    def compact(self, keep_last: int = 0) -> int:
        """Forget all but the last `keep_last` events; older RVs then get 410. Returns the
        oldest RV a watch may still start from."""
        with self._cond:
            self._compact_locked(keep_last)
            self._cond.notify_all()
            return self._min_valid_rv

    def _compact_locked(self, keep_last: int) -> None:
        cut = max(0, len(self._history) - keep_last)
        del self._history[:cut]
        del self._history_rvs[:cut]
        self._min_valid_rv = self._history_rvs[0] - 1 if self._history else self._rv

    def drop_watches(self) -> int:
        """Close every open watch stream abruptly (no final chunk), as a crashing server or
        a broken connection would. Returns how many were dropped."""
        with self._cond:
            victims = list(self._watches)
            for w in victims:
                w.dropped = True
            self._cond.notify_all()
        for w in victims:
            _shutdown(w.conn)
        return len(victims)

    def drop_portforwards(self) -> int:
        """Break every open port-forward WebSocket abruptly (no close frame), as a lost
        connection to the API server would. Returns how many were broken."""
        with self._conns_lock:
            victims = list(self._tunnels)
        for conn in victims:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            _shutdown(conn)
        return len(victims)

    def open_portforwards(self, pod: str | None = None) -> int:
        """Port-forward WebSockets (or SPDY sessions) open now, to `pod` ("ns/name") or all."""
        with self._conns_lock:
            return sum(1 for p in self._tunnels.values() if pod is None or p == pod)

    def stall_watches(self, seconds: float) -> None:
        """Hold back events (and bookmarks) from every watch stream for `seconds`."""
        with self._cond:
            self._stall_until = time.monotonic() + seconds
            self._cond.notify_all()

    def release_watches(self) -> None:
        self.stall_watches(0)

    def send_bookmarks(self) -> None:
        """Every watch that asked for bookmarks gets one as soon as it has caught up."""
        with self._cond:
            self._bookmark_gen += 1
            self._cond.notify_all()

    def open_watches(self, kind_or_resource: str | None = None) -> int:
        with self._cond:
            if kind_or_resource is None:
                return len(self._watches)
            res = resource_of(kind_or_resource).name
            return sum(1 for w in self._watches if w.resource == res)

    def list_count(self, kind_or_resource: str) -> int:
        with self._cond:
            return self.list_requests[resource_of(kind_or_resource).name]

    def watch_count(self, kind_or_resource: str) -> int:
        with self._cond:
            return self.watch_requests[resource_of(kind_or_resource).name]

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "resourceVersion": self._rv,
                "minValidResourceVersion": self._min_valid_rv,
                "lists": dict(self.list_requests),
                "watches": dict(self.watch_requests),
                "openWatches": dict(Counter(w.resource for w in self._watches)),
                "objects": {r: len(o) for r, o in self._objects.items()},
                "portforwards": dict(self.portforward_requests),
                "openPortforwards": self.open_portforwards(),
            }

    # -- list / watch (called by the HTTP handler) -----------------------------------------

    def list_body(self, res: Resource, ns: str | None, reqs: list[Req]) -> bytes:
        with self._cond:
            self.list_requests[res.name] += 1
            rv = self._rv
            items = [
                s.raw
                for (ons, _), s in self._objects[res.name].items()
                if (ns is None or ons == ns) and selector_matches(reqs, s.obj)
            ]
        head = json.dumps(
            {
                "kind": res.list_kind,
                "apiVersion": res.group_version,
                "metadata": {"resourceVersion": str(rv)},
            }
        ).encode()
        return head[:-1] + b',"items":[' + b",".join(items) + b"]}"

    def _events_after(self, cursor: int) -> list[_Event]:  # lock held
        i = bisect.bisect_right(self._history_rvs, cursor)
        return self._history[i:]

    def serve_watch(
        self,
        h: _Handler,
        res: Resource,
        ns: str | None,
        reqs: list[Req],
        rv_param: str,
        timeout: float,
        bookmarks: bool,
    ) -> None:
        w = _Watch(res.name, h.connection, bookmarks)
        deadline = time.monotonic() + timeout
        initial: list[bytes] = []
        with self._cond:
            self.watch_requests[res.name] += 1
            w.bookmark_gen = self._bookmark_gen
            expired = False
            if rv_param in ("", "0"):  # "get state and start at most recent"
                cursor = self._rv
                for (ons, _), s in self._objects[res.name].items():
                    if (ns is None or ons == ns) and selector_matches(reqs, s.obj):
                        initial.append(_event_line("ADDED", s.raw))
            else:
                cursor = int(rv_param)
                expired = cursor < self._min_valid_rv
            min_valid = self._min_valid_rv
            self._watches.add(w)
        try:
            h.start_chunked()
            if expired:
                msg = f"too old resource version: {cursor} ({min_valid})"
                h.write_chunk(_event_line("ERROR", _json(_status(410, "Expired", msg))))
                h.end_chunked()
                return
            if initial:
                h.write_chunk(b"".join(initial))
            while True:
                out, end, cursor = self._next_batch(w, res, ns, reqs, cursor, deadline)
                if out:
                    h.write_chunk(b"".join(out))
                if end == "dropped":
                    h.close_connection = True
                    return
                if end:
                    h.end_chunked()
                    return
        except OSError:  # the client went away (or the stream was dropped)
            h.close_connection = True
        finally:
            with self._cond:
                self._watches.discard(w)

    def _next_batch(
        self,
        w: _Watch,
        res: Resource,
        ns: str | None,
        reqs: list[Req],
        cursor: int,
        deadline: float,
    ) -> tuple[list[bytes], str, int]:
        """Wait for something to send on one watch: (lines, end reason or "", new cursor)."""
        with self._cond:
            while True:
                if w.dropped:
                    return [], "dropped", cursor
                now = time.monotonic()
                if now >= deadline:
                    return [], "timeout", cursor
                if now < self._stall_until:
                    self._cond.wait(min(self._stall_until, deadline) - now)
                    continue
                if cursor < self._min_valid_rv:  # compacted while this watch lagged behind
                    msg = f"too old resource version: {cursor} ({self._min_valid_rv})"
                    line = _event_line("ERROR", _json(_status(410, "Expired", msg)))
                    return [line], "expired", cursor
                events = self._events_after(cursor)
                if events:
                    out = [line for ev in events if (line := _filter(ev, res, ns, reqs))]
                    cursor = events[-1].rv
                    if out:
                        return out, "", cursor
                    continue
                if w.pending:
                    out, w.pending = w.pending, []
                    return out, "", cursor
                if w.bookmarks and w.bookmark_gen < self._bookmark_gen:
                    w.bookmark_gen = self._bookmark_gen
                    return [_bookmark_line(res, cursor)], "", cursor
                self._cond.wait(min(deadline - now, 0.2))
                if _peer_closed(w.conn):  # notice a client that went away, as Go's server does
                    return [], "dropped", cursor

    # -- HTTP ------------------------------------------------------------------------------

    def start(
        self, sock: socket.socket | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> ApiServer:
        """Serve on `sock` (bound, e.g. inside a network namespace; listening or not) or
        on host:port (port 0: any free port)."""
        if self._httpd is not None:
            raise RuntimeError("already serving")
        if sock is None:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        # Accepted connections inherit this, so a restart can bind the port again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(128)
        httpd = _Server(sock, self)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
            name="test-apiserver",
        )  # fmt: skip
        self._thread.start()
        return self

    @property
    def address(self) -> tuple[str, int]:
        if self._httpd is None:
            raise RuntimeError("not serving")
        host, port = self._httpd.socket.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving (close the listener, every connection and every watch); the
        state is kept, so `start()` again on the same port is an API server restart."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        self.drop_watches()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            _shutdown(c)
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> ApiServer:
        if self._httpd is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, path: str | Path) -> Path:
        return write_kubeconfig(path, self.url, token=self.token)

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def serve_portforward(self, h: _Handler, ns: str, name: str, query: str) -> None:
        """…/pods/NAME/portforward, upgraded to the kubelet's WebSocket channels
        (`v4.channel.k8s.io`, ports in the query), to SPDY/3.1 (kubectl), or to SPDY
        tunnelled in WebSocket (`SPDY/3.1+portforward.k8s.io`, kubectl ≥ 1.31)."""
        pod = self.get("pods", ns, name)
        if pod is None:
            raise KeyError(f'pods "{name}" not found')
        upgrade = h.headers.get("Upgrade", "").lower()
        if upgrade not in ("websocket", spdy.UPGRADE.lower()):
            h.send_status(400, "BadRequest", "Upgrade request required")
            return
        ip = pf.pod_address(pod)
        if not ip:
            raise ValueError(f"pod {name} does not have a host assigned")
        uid = str((pod.get("metadata") or {}).get("uid", ""))
        podname = f"{name}_{ns}"  # the kubelet names a Pod this way in its messages
        if upgrade == "websocket":
            supported = (*pf.SUPPORTED, spdy.TUNNEL_PROTOCOL)
            proto = pf.choose_protocol(h.headers.get("Sec-WebSocket-Protocol"), supported)
            ports = []
            if proto != spdy.TUNNEL_PROTOCOL:
                ports = pf.ports_param(parse_qs(query, keep_blank_values=True).get("ports", []))
            key = h.headers.get("Sec-WebSocket-Key", "")
            if proto is None or not key:
                offered = h.headers.get("Sec-WebSocket-Protocol")
                h.send_status(
                    403, "Forbidden", f"requested protocol(s) are not supported: {offered}"
                )
                return
            h.send_response(101, "Switching Protocols")
            h.send_header("Upgrade", "websocket")
            h.send_header("Connection", "Upgrade")
            h.send_header("Sec-WebSocket-Accept", pf.accept_key(key))
            if proto:
                h.send_header("Sec-WebSocket-Protocol", proto)
        else:
            versions = [v.strip() for v in h.headers.get_all("X-Stream-Protocol-Version") or []]
            if spdy.PROTOCOL not in ",".join(versions).split(","):
                h.send_status(403, "Forbidden", f"unsupported stream protocols: {versions}")
                return
            proto, ports = spdy.UPGRADE, []
            h.send_response(101, "Switching Protocols")
            h.send_header("Connection", "Upgrade")
            h.send_header("Upgrade", spdy.UPGRADE)
            h.send_header("X-Stream-Protocol-Version", spdy.PROTOCOL)
        h.end_headers()
        h.wfile.flush()
        h.close_connection = True
        conn = h.connection
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._conns_lock:
            self.portforward_requests[f"{ns}/{name}"] += 1
            self._tunnels[conn] = f"{ns}/{name}"
        try:
            if proto == spdy.UPGRADE:
                session = spdy.SpdySession(
                    lambda: h.rfile.read1(1 << 18),
                    conn.sendall,
                    podname,
                    uid,
                    ip,
                    self.dial,
                    grace=self.portforward_grace,
                )
                session.serve()
                return
            ws = pf.ServerWebSocket(conn, h.rfile, proto == pf.V4_BASE64)
            if proto == spdy.TUNNEL_PROTOCOL:

                def read() -> bytes:
                    try:
                        while True:
                            if data := ws.recv_message()[1]:  # empty ones carry nothing
                                return data
                    except pf.WsClosed:
                        return b""

                session = spdy.SpdySession(
                    read, ws.send_message, podname, uid, ip, self.dial,
                    grace=self.portforward_grace,
                )  # fmt: skip
                session.serve()
                ws.close()
                return
            pf.serve(ws, podname, uid, ip, ports, self.dial, grace=self.portforward_grace)
        finally:
            with self._conns_lock:
                self._tunnels.pop(conn, None)


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def _peer_closed(conn: socket.socket) -> bool:
    try:
        readable = select.select([conn], [], [], 0)[0]
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _event_line(typ: str, raw_obj: bytes) -> bytes:
    return b'{"type":"' + typ.encode() + b'","object":' + raw_obj + b"}\n"


def _bookmark_line(res: Resource, rv: int) -> bytes:
    obj = {"kind": res.kind, "apiVersion": res.group_version,
           "metadata": {"resourceVersion": str(rv)}}  # fmt: skip
    return _event_line("BOOKMARK", _json(obj))


def _filter(ev: _Event, res: Resource, ns: str | None, reqs: list[Req]) -> bytes:
    """The line one watch sees for one event ("" when none), applying selector transitions."""
    if ev.resource != res.name:
        return b""
    if ns is not None and ev.namespace != ns:
        return b""
    assert ev.new is not None
    new_ok = selector_matches(reqs, ev.new.obj)
    if ev.type == "ADDED":
        return _event_line("ADDED", ev.new.raw) if new_ok else b""
    if ev.type == "DELETED":
        return _event_line("DELETED", ev.new.raw) if new_ok else b""
    old_ok = ev.old is not None and selector_matches(reqs, ev.old.obj)
    if new_ok:
        return _event_line("MODIFIED" if old_ok else "ADDED", ev.new.raw)
    return _event_line("DELETED", ev.new.raw) if old_ok else b""


_DISCOVERY: dict[str, Any] = {
    "/version": {"major": "1", "minor": "30", "gitVersion": "v1.30.0-test",
                 "gitCommit": "0" * 40, "gitTreeState": "clean",
                 "buildDate": "2024-01-01T00:00:00Z", "goVersion": "go1.22.0",
                 "compiler": "gc", "platform": "linux/amd64"},
    "/api": {"kind": "APIVersions", "versions": ["v1"],
             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
        "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
    }]},
    "/apis/discovery.k8s.io": {"kind": "APIGroup", "apiVersion": "v1",
        "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [{
        "name": "services", "singularName": "service", "namespaced": True, "kind": "Service",
        "verbs": ["create", "delete", "get", "list", "update", "watch"],
        "shortNames": ["svc"]}, {
        "name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
        "verbs": ["create", "delete", "get", "list", "update", "watch"],
        "shortNames": ["po"]}, {
        "name": "pods/portforward", "singularName": "", "namespaced": True,
        "kind": "PodPortForwardOptions", "verbs": ["create", "get"]}, {
        "name": "nodes", "singularName": "node", "namespaced": False, "kind": "Node",
        "verbs": ["create", "delete", "get", "list", "update", "watch"],
        "shortNames": ["no"]}]},
    "/apis/discovery.k8s.io/v1": {"kind": "APIResourceList",
        "groupVersion": "discovery.k8s.io/v1", "resources": [{
            "name": "endpointslices", "singularName": "endpointslice", "namespaced": True,
            "kind": "EndpointSlice",
            "verbs": ["create", "delete", "get", "list", "update", "watch"]}]},
}  # fmt: skip


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, api: ApiServer) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.api = api


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.api.track(self.connection, True)

    def finish(self) -> None:
        self.server.api.track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- responses --

    def send_json(self, code: int, body: Any) -> None:
        data = body if isinstance(body, bytes) else _json(body)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_status(self, code: int, reason: str, message: str) -> None:
        self.send_json(code, _status(code, reason, message))

    def start_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    # -- routing --

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        path = url.path.rstrip("/") or "/"
        try:
            if path.startswith("/admin/"):
                self._admin(method, path, q)
            elif method == "GET" and path in _DISCOVERY:
                self.send_json(200, _DISCOVERY[path])
            elif method == "GET" and path in ("/healthz", "/readyz", "/livez"):
                self.send_json(200, b"ok")
            elif m := _PORTFORWARD_RE.match(path):
                if self._allowed("create", "pods/portforward", m["ns"], m["name"]):
                    self.server.api.serve_portforward(self, m["ns"], m["name"], url.query)
            elif m := _PATH_RE.match(path):
                self._resource(method, m, q)
            else:
                self.send_status(404, "NotFound", f"the server could not find {path}")
        except (ValueError, yaml.YAMLError) as e:
            self.send_status(400, "BadRequest", str(e))
        except KeyError as e:
            self.send_status(404, "NotFound", str(e.args[0] if e.args else e))
        except FileExistsError as e:
            self.send_status(409, "AlreadyExists", str(e))

    def _resource(self, method: str, m: re.Match[str], q: dict[str, str]) -> None:
        res = RESOURCES[m["res"]]
        if m["prefix"] != res.prefix:
            self.send_status(404, "NotFound", f"{res.name} is not served under {m['prefix']}")
            return
        api, ns, name = self.server.api, m["ns"], m["name"]
        if not res.namespaced:
            if ns is not None:
                self.send_status(404, "NotFound", f"{res.name} are not namespaced")
                return
            ns = ""
        verb = {"POST": "create", "PUT": "update", "DELETE": "delete"}.get(method, "get")
        if verb == "get" and name is None:
            verb = "watch" if q.get("watch", "") in ("1", "true") else "list"
        if not self._allowed(verb, res.name, ns, name):
            return
        if method == "GET" and name is None:
            reqs: list[Req] = [*parse_selector(q.get("labelSelector", ""))]
            reqs += parse_field_selector(q.get("fieldSelector", ""))
            if q.get("watch", "") in ("1", "true"):
                timeout = float(q.get("timeoutSeconds") or 1800)
                bookmarks = q.get("allowWatchBookmarks", "") in ("1", "true")
                rv = q.get("resourceVersion", "")
                if rv not in ("", "0") and not rv.isdigit():
                    raise ValueError(f"invalid resourceVersion {rv!r}")
                api.serve_watch(self, res, ns, reqs, rv, timeout, bookmarks)
            else:
                self.send_json(200, api.list_body(res, ns, reqs))
        elif method == "GET":
            obj = api.get(res.name, ns if ns is not None else "default", name)
            if obj is None:
                raise KeyError(f'{res.name} "{name}" not found')
            self.send_json(200, obj)
        elif method in ("POST", "PUT"):
            obj = json.loads(self.read_body() or b"null")
            if not isinstance(obj, dict):
                raise ValueError("body is not an object")
            obj.setdefault("metadata", {})
            if ns and res.namespaced:
                obj["metadata"]["namespace"] = ns
            if method == "POST" and name is None:
                self.send_json(201, api.create(obj, res.name))
            elif method == "PUT" and name is not None:
                obj["metadata"]["name"] = name
                self.send_json(200, api.update(obj, res.name))
            else:
                self.send_status(405, "MethodNotAllowed", f"{method} {self.path}")
        elif method == "DELETE" and name is not None:
            self.send_json(200, api.delete(res.name, ns if ns is not None else "default", name))
        else:
            self.send_status(405, "MethodNotAllowed", f"{method} {self.path}")

    def _allowed(self, verb: str, resource: str, ns: str | None, name: str | None) -> bool:
        """Authentication (401) and authorization (403) as kube-apiserver answers them."""
        api = self.server.api
        if api.token is not None and self.headers.get("Authorization") != f"Bearer {api.token}":
            self.send_status(401, "Unauthorized", "Unauthorized")
            return False
        if resource not in api.forbidden:
            return True
        what = f'{resource.split("/")[0]} "{name}"' if name else resource
        group = RESOURCES[resource.split("/")[0]].group_version.rpartition("/")[0]
        where = f'in the namespace "{ns}"' if ns else "at the cluster scope"
        self.send_status(
            403,
            "Forbidden",
            f'{what} is forbidden: User "{api.user}" cannot {verb} resource "{resource}" '
            f'in API group "{group}" {where}',
        )
        return False

    def _admin(self, method: str, path: str, q: dict[str, str]) -> None:
        api = self.server.api
        parts = path.split("/")[2:]
        if parts == ["stats"] and method == "GET":
            self.send_json(200, api.stats())
        elif parts == ["objects"] and method in ("POST", "PUT"):
            docs = parse_documents(self.read_body().decode())
            self.send_json(200, {"items": [api.apply(d) for d in docs]})
        elif len(parts) == 4 and parts[0] == "objects" and method == "DELETE":
            self.send_json(200, api.delete(parts[1], parts[2], parts[3]))
        elif len(parts) == 3 and parts[0] == "objects" and method == "DELETE":  # a Node
            self.send_json(200, api.delete(parts[1], "", parts[2]))
        elif parts == ["drop-watches"] and method == "POST":
            self.send_json(200, {"dropped": api.drop_watches()})
        elif parts == ["drop-portforwards"] and method == "POST":
            self.send_json(200, {"dropped": api.drop_portforwards()})
        elif parts == ["compact"] and method == "POST":
            keep = int(q.get("keep_last", "0"))
            self.send_json(200, {"minValidResourceVersion": api.compact(keep)})
        elif parts == ["stall"] and method == "POST":
            api.stall_watches(float(q.get("seconds", "3600")))
            self.send_json(200, {})
        elif parts == ["release"] and method == "POST":
            api.release_watches()
            self.send_json(200, {})
        elif parts == ["bookmarks"] and method == "POST":
            api.send_bookmarks()
            self.send_json(200, {})
        elif parts == ["inject"] and method == "POST":
            n = api.inject_event(q.get("resource", "services"), self.read_body())
            self.send_json(200, {"watches": n})
        else:
            self.send_status(404, "NotFound", f"no admin action {method} {path}")


def _documents(docs: Iterable[Any]) -> list[dict[str, Any]]:
    """YAML documents (objects or `List`s) → objects."""
    out: list[dict[str, Any]] = []
    for d in docs:
        if d is None:
            continue
        if not isinstance(d, dict):
            raise ValueError("a document is not a mapping")
        if str(d.get("kind", "")).endswith("List") and isinstance(d.get("items"), list):
            out.extend(_documents(d["items"]))
        else:
            out.append(d)
    return out


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_documents(text: str) -> list[dict[str, Any]]:
    """JSON or (multi-document) YAML text → objects; JSON fast, as big loads are JSON."""
    if text.lstrip()[:1] in ("{", "["):
        try:
            doc = json.loads(text)
            return _documents(doc if isinstance(doc, list) else [doc])
        except ValueError:
            pass  # YAML flow style that is not JSON
    return _documents(yaml.load_all(text, Loader=_YAML_LOADER))  # a safe loader (C or Python)


def load_file(api: ApiServer, path: str | Path) -> int:
    """Apply every object of a JSON/YAML file (multi-document, Lists allowed); returns count."""
    docs = parse_documents(Path(path).read_text(encoding="utf-8"))
    for d in docs:
        api.apply(d)
    return len(docs)


def write_kubeconfig(
    path: str | Path, url: str, namespace: str = "default", token: str | None = None
) -> Path:
    """A kubeconfig pointing at `url` (plain HTTP), with a bearer token if given."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": url}}],
        "users": [{"name": "test", "user": {"token": token} if token else {}}],
        "contexts": [
            {"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}
        ],
        "current-context": "test",
    }
    p = Path(path)
    p.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return p


def wait_for(
    pred: Callable[[], Any], what: str, timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll `pred` until it is true; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class AdminClient:
    """Drives an ApiServer in another process through /admin. With `netns`, connects from
    inside that network namespace (root; via proxy.testbed.netns), for a server that
    listens on an address only reachable there."""

    def __init__(self, url: str, timeout: float = 10.0, netns: str = "") -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.netns = netns
        u = urlsplit(self.url)
        self._host, self._port = u.hostname or "127.0.0.1", u.port or 80

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        if self.netns:
            from proxy.testbed.netns import socket_in

            fam = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            sock = socket_in(self.netns, fam)
            sock.settimeout(self.timeout)
            try:
                sock.connect((self._host, self._port))
            except OSError:
                sock.close()
                raise
            conn.sock = sock
        return conn

    def _call(self, method: str, path: str, body: bytes | None = None) -> Any:
        conn = self._connect()
        try:
            headers = {"Content-Type": "application/yaml"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        if r.status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {r.status}: {data[:200]!r}")
        return json.loads(data or b"null")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the server answers (a process that is still starting up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.stats()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def write_kubeconfig(self, path: str | Path) -> Path:
        return write_kubeconfig(path, self.url)

    def apply(self, *objs: dict[str, Any]) -> list[dict[str, Any]]:
        body = yaml.safe_dump_all(list(objs)).encode()
        return self._call("POST", "/admin/objects", body)["items"]

    def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """Delete an object; a cluster-scoped one (a Node) with namespace ""."""
        where = f"{namespace}/{name}" if namespace else name
        return self._call("DELETE", f"/admin/objects/{kind}/{where}")

    def drop_watches(self) -> int:
        return self._call("POST", "/admin/drop-watches")["dropped"]

    def drop_portforwards(self) -> int:
        return self._call("POST", "/admin/drop-portforwards")["dropped"]

    def compact(self, keep_last: int = 0) -> int:
        return self._call("POST", f"/admin/compact?keep_last={keep_last}")[
            "minValidResourceVersion"
        ]

    def stall_watches(self, seconds: float) -> None:
        self._call("POST", f"/admin/stall?seconds={seconds}")

    def release_watches(self) -> None:
        self._call("POST", "/admin/release")

    def send_bookmarks(self) -> None:
        self._call("POST", "/admin/bookmarks")

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/admin/stats")

    def inject(self, resource: str, line: bytes) -> int:
        return self._call("POST", f"/admin/inject?resource={resource}", line)["watches"]

    put = apply  # create or replace


class ApiServerClient(AdminClient):
    """AdminClient for a server listening on HOST:PORT inside network namespace `netns`."""

    def __init__(self, netns: str, hostport: str, timeout: float = 10.0) -> None:
        host, _, port = hostport.rpartition(":")
        host = host.strip("[]")
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        super().__init__(url, timeout, netns)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m proxy.testbed.apiserver", description=__doc__.split("\n")[0]
    )
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    p.add_argument("--load", action="append", default=[], help="YAML file of objects")
    p.add_argument("--kubeconfig", help="write a kubeconfig for this server there")
    p.add_argument("--history", type=int, default=100_000, help="events kept for watch resume")
    p.add_argument("-v", action="store_true", help="log every request")
    p.add_argument("--token", help="require this bearer token (401 without it)")
    p.add_argument(
        "--forbid", action="append", default=[], help="a resource the user may not use (403)"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.v else logging.INFO, format="%(message)s")
    host, _, port = a.listen.rpartition(":")
    api = ApiServer(history_limit=a.history)
    api.token = a.token
    api.forbidden.update(a.forbid)
    for f in a.load:
        log.info("loaded %d objects from %s", load_file(api, f), f)
    api.start(host=host.strip("[]") or "127.0.0.1", port=int(port))
    if a.kubeconfig:
        api.kubeconfig(a.kubeconfig)
    print(f"serving on {api.url}", flush=True)  # tests wait for this line
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
