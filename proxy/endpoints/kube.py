"""The Kubernetes source: Services and EndpointSlices with informer semantics.

One worker thread per watched kind (`WatchedKind`) runs client-go's reflector loop: list
(→ `Store.replace`), then watch from the list's resourceVersion with bookmarks, resuming
from the last RV seen (object or bookmark) when a stream ends or breaks — without
relisting. Only `410 Gone` ("too old resource version") forces a relist, whose `replace`
drops what vanished while we were away. Failures back off exponentially with jitter
(0.5 s → 30 s), on two backoffs as in client-go: one for requests the server did not
answer, one for its error answers and relists, so that the relist after an outage does
not wait out the reconnect backoff. A stream that did useful work resumes at once.

Everything is read as raw JSON (`_preload_content=False`): the client's model objects
cost several times more CPU than parsing itself (see bench/watch_decode.py), and the
store wants the wire's camelCase dicts anyway. Watch lines are one `json.loads` each; a
list is decoded one item at a time (`ListReader`) and each item parsed as it comes, so no
single C call holds the GIL for long and the decoded list never exists whole.

Services labelled `service.kubernetes.io/service-proxy-name` are kept: the parser marks
them (Service.proxy_name), data planes skip them and DNS still answers for them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from proxy import memory, metrics
from proxy.config import Config, UsageError
from proxy.endpoints.parse import object_ref
from proxy.endpoints.store import ENDPOINT_SLICE, NODE, SERVICE, Store

log = logging.getLogger("proxy.kube")

NOT_IN_POD = (
    "not in a pod and no --kubeconfig/--manifests given: pass --kubeconfig PATH or --manifests PATH"
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def load_client_config(cfg: Config) -> k8s.Configuration:
    """Config → client Configuration, or UsageError with one line saying what to do.

    Precedence as kube-proxy: --kubeconfig (its server overridden by --master), else
    --master alone (no credentials), else in-cluster.
    """
    conf = k8s.Configuration()
    if cfg.kubeconfig:
        path = cfg.kubeconfig
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--kubeconfig: cannot read {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--kubeconfig: {path} is not a text file") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError(f"--kubeconfig: {path} is not valid YAML: {_first_line(e)}") from None
        if not isinstance(doc, dict) or not doc.get("clusters"):
            raise UsageError(f"--kubeconfig: {path} is not a kubeconfig (no clusters)")
        try:
            k8s_config.load_kube_config(
                config_file=path, client_configuration=conf, persist_config=False
            )
        except (ConfigException, ValueError, TypeError, KeyError, AttributeError) as e:
            raise UsageError(f"--kubeconfig: {path}: {_first_line(e)}") from None
    elif not cfg.master:
        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise UsageError(NOT_IN_POD)
        try:
            k8s_config.load_incluster_config(client_configuration=conf)
        except ConfigException as e:
            raise UsageError(f"in-cluster config: {_first_line(e)}") from None
    if cfg.master:
        u = urlsplit(cfg.master)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise UsageError(f"--master: {cfg.master!r} is not a URL (e.g. https://10.0.0.1:6443)")
        conf.host = cfg.master.rstrip("/")
    conf.keep_alive = True  # TCP keepalive as client-go: a dead peer ends a quiet watch
    return conf


class Backoff:
    """Capped exponential backoff with jitter (client-go's wait.Backoff shape)."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0, jitter: float = 0.2) -> None:
        self.initial, self.cap, self.jitter = initial, cap, jitter
        self._n = 0

    def next(self) -> float:
        base = min(self.cap, self.initial * (2**self._n))
        self._n = min(self._n + 1, 32)
        return min(self.cap, base * (1 + self.jitter * random.random()))

    def reset(self) -> None:
        self._n = 0


# Failures where the server gave no answer at all.
_NO_ANSWER = (urllib3.exceptions.HTTPError, ConnectionError, OSError, TimeoutError)


class _Expired(Exception):
    """The watch's resourceVersion is gone from the server's history (410)."""


class _Informer:
    """List-and-watch of one resource into the store, in one daemon thread."""

    def __init__(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        store: Store,
        stopping: threading.Event,
        *,
        resource: str,
        conn_backoff: Backoff,
        list_backoff: Backoff,
        watch_timeout: tuple[int, int],
        list_timeout: float,
        label_selector: str = "",
        field_selector: str = "",
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.kind = kind
        self.resource = resource
        self._list_fn = list_fn
        self._store = store
        self._stopping = stopping
        self._conn_backoff = conn_backoff
        self._list_backoff = list_backoff
        self._watch_timeout = watch_timeout
        self._list_timeout = list_timeout
        self._label_selector = label_selector
        self._field_selector = field_selector
        self._sleep = sleep or stopping.wait
        self.rv = ""  # last resourceVersion seen (list, object or bookmark)
        self.events = 0  # events handled by the current watch
        self.streaming = False  # the current watch got its response (so a break is a drop)
        self.synced = threading.Event()
        self._resp: Any = None  # the open response, so stop() can break a blocked read
        self._resp_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"kube-{self.resource}", daemon=True)

    # -- loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        need_list = True
        while not self._stopping.is_set():
            if need_list:
                try:
                    self._list()
                    need_list = False
                    self._conn_backoff.reset()  # the server answers
                except Exception as e:
                    if self._stopping.is_set():
                        return
                    why = f"list failed: {_describe(e)}{_advice(e, self.resource)}"
                    self._restart("error", why, "retrying the list", self._delay_after(e))
                    continue
            started, self.events, self.streaming = time.monotonic(), 0, False
            error: BaseException | None = None
            try:
                self._watch()
                reason, why = "closed", "stream ended"
            except _Expired as e:
                need_list = True
                reason, why = "expired", str(e)
            except (urllib3.exceptions.ProtocolError, ConnectionError) as e:
                # Broken mid-stream (server restart, dropped connection): resume.
                reason = "closed" if self.streaming else "error"
                why = f"stream broken: {_describe(e)}" if self.streaming else _describe(e)
                error = e
            except Exception as e:
                reason, why, error = "error", _describe(e), e
            if self._stopping.is_set():
                return
            # Useful work done → resume now, and a later relist is quick again. Otherwise
            # back off, so a server that closes or fails every stream at once never makes
            # this a busy loop.
            healthy = reason != "error" and (self.events or time.monotonic() - started >= 1.0)
            if healthy:
                self._conn_backoff.reset()
                self._list_backoff.reset()
            if need_list:
                # The server answered (410): relist soon, on the list's own backoff. The
                # connection backoff may sit at its cap after an outage; client-go keeps
                # the two apart (backoffManager / initConnBackoffManager) for this.
                self._conn_backoff.reset()
                delay = self._list_backoff.next()
                step = "relisting"
            else:
                delay = 0.0 if healthy else self._delay_after(error)
                step = f"resuming from resourceVersion {self.rv}"
            self._restart(reason, why, step, delay)

    def _delay_after(self, error: BaseException | None) -> float:
        """The wait before retrying after `error`: the connection backoff when the server
        did not answer (down, unreachable, stream cut or ended at once), else the list's
        backoff (it answered, with an error status, an ERROR event or garbage)."""
        if error is None or isinstance(error, _NO_ANSWER):
            return self._conn_backoff.next()
        return self._list_backoff.next()

    def _restart(self, reason: str, why: str, step: str, delay: float) -> None:
        """Count and log (one line) a restart of the list/watch, then wait `delay`."""
        metrics.WATCH_RESTARTS.labels(resource=self.resource, reason=reason).inc()
        level = logging.INFO if reason != "error" else logging.WARNING
        when = f" in {delay:.2f}s" if delay else ""
        log.log(level, "watch %s: %s; %s%s", self.resource, why, step, when)
        if delay:
            self._sleep(delay)

    # -- list ------------------------------------------------------------------------------

    def _list(self) -> None:
        # The first list may come from the server's cache ("0"); after a 410 ask for a
        # consistent read (""), which cannot be older than what expired.
        rv = "0" if not self.synced.is_set() else ""
        resp = self._call(resource_version=rv, _request_timeout=(10, self._list_timeout))
        try:
            data = resp.data
        finally:
            resp.release_conn()
            self._set_resp(None)
        with memory.gc_paused():
            reader = ListReader(data)
            del data, resp  # the body (tens of MB at 100k endpoints) is not needed any more
            counted = _Counted(reader.items())
            # Decoded, parsed and dropped one object at a time; a bad body raises before
            # the store applies anything.
            self._store.replace(self.kind, counted)
        self.rv = reader.rv
        self.synced.set()
        log.info("listed %d %s at resourceVersion %s", counted.n, self.resource, reader.rv)

    # -- watch -----------------------------------------------------------------------------

    def _watch(self) -> None:
        """One watch request from self.rv, until the stream ends; counts self.events."""
        lo, hi = self._watch_timeout
        timeout = random.randint(lo, hi)  # spread reconnects of many nodes (as client-go)
        try:
            resp = self._call(
                watch=True,
                resource_version=self.rv,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                # No read may stall longer than the server's own timeout (plus slack).
                _request_timeout=(10, timeout + 30),
            )
        except ApiException as e:
            if e.status == 410:
                raise _Expired(f"resourceVersion {self.rv} expired (410)") from None
            raise
        self.streaming, complete = True, False
        try:
            for line in resp:
                if self._stopping.is_set():
                    break
                self.events += self._handle(line)
            else:
                complete = True
        finally:
            self._set_resp(None)
            if not complete:  # left mid-stream: the connection must not be reused
                resp.close()
            resp.release_conn()

    def _handle(self, line: bytes) -> int:
        """One watch line → the store. Never raises for bad input (skips it); returns 1
        when it was an object event."""
        line = line.strip()
        if not line:
            return 0
        try:
            ev = json.loads(line)
            typ, obj = ev["type"], ev["object"]
            if not isinstance(obj, dict):
                raise TypeError("object is not a mapping")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("watch %s: skipping undecodable event (%s): %.80r", self.resource, e, line)
            metrics.SKIPPED_OBJECTS.labels(kind=f"{self.kind}Event").inc()
            return 0
        if typ == "ERROR":
            code, msg = obj.get("code"), obj.get("message") or obj.get("reason") or ""
            if code == 410:
                raise _Expired(f"resourceVersion {self.rv} expired (410: {msg})")
            raise RuntimeError(f"ERROR event {code}: {msg}")
        meta = obj.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if typ == "BOOKMARK":
            log.debug("watch %s: bookmark at resourceVersion %s", self.resource, rv)
        elif typ in ("ADDED", "MODIFIED", "DELETED"):
            log.debug("%s %s %s rv=%s", self.kind, typ, object_ref(obj), rv)
            try:
                if typ == "DELETED":
                    self._store.delete(self.kind, obj)
                else:
                    self._store.upsert(self.kind, obj)
            except Exception:  # a parser bug must not stop the watch of everything else
                log.exception("skipping %s %s: internal error", self.kind, object_ref(obj))
                metrics.SKIPPED_OBJECTS.labels(kind=self.kind).inc()
        else:
            log.warning("watch %s: skipping event of unknown type %.20r", self.resource, typ)
            return 0
        if isinstance(rv, str) and rv:
            self.rv = rv
        return 1

    # -- plumbing --------------------------------------------------------------------------

    def _call(self, **kw: Any) -> Any:
        if self._label_selector:
            kw["label_selector"] = self._label_selector
        if self._field_selector:
            kw["field_selector"] = self._field_selector
        resp = self._list_fn(_preload_content=False, **kw)
        self._set_resp(resp)
        if self._stopping.is_set():
            self.interrupt()
        return resp

    def _set_resp(self, resp: Any) -> None:
        with self._resp_lock:
            self._resp = resp

    def interrupt(self) -> None:
        """Break a read blocked on the open response (from another thread)."""
        with self._resp_lock:
            resp = self._resp
        conn = getattr(resp, "connection", None) if resp is not None else None
        sock = getattr(conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


class ListReader:
    """A list response, its items decoded one at a time as they are asked for.

    The items are handed over as they are decoded (`items()`), never gathered in a list:
    the parser turns each into a record and drops it, so the decoded objects of a big
    list (76 MiB of dicts for 10k EndpointSlices with 100k endpoints) never exist at once,
    and the few that are alive reuse the same heap, which is given back afterwards. One
    `json.loads` of the whole body would also be one C call holding the GIL throughout
    (~0.2 s CPU for 10k EndpointSlices) while the event loop's thread waits for it.

    `items()` raises ValueError when the body is not a list response: after its last
    item at the latest (a truncated body, no resourceVersion), so a consumer that applies
    nothing before the iterator is exhausted (`Store.replace`) applies nothing then.
    `rv` is the list's metadata.resourceVersion once `items()` is exhausted.
    """

    def __init__(self, data: bytes) -> None:
        self._text: str | None = data.decode("utf-8")
        self.rv = ""

    def items(self) -> Iterator[dict[str, Any]]:
        text, self._text = self._text, None  # one pass; the text goes with the generator
        if text is None:
            raise ValueError("list response already read")
        ws, decode = _WS.match, _DECODER.raw_decode
        meta: Any = None
        try:
            i = ws(text, 0).end()  # type: ignore[union-attr]
            if text[i] != "{":
                raise ValueError("list response is not an object")
            i = ws(text, i + 1).end()  # type: ignore[union-attr]
            while text[i] != "}":
                key, i = decode(text, i)
                i = ws(text, i).end()  # type: ignore[union-attr]
                if text[i] != ":":
                    raise ValueError(f"expected ':' at {i}")
                i = ws(text, i + 1).end()  # type: ignore[union-attr]
                if key == "items" and text[i] == "[":
                    i = ws(text, i + 1).end()  # type: ignore[union-attr]
                    while text[i] != "]":
                        item, i = decode(text, i)
                        if isinstance(item, dict):
                            yield item
                        del item  # the consumer holds the only reference now
                        i = ws(text, i).end()  # type: ignore[union-attr]
                        if text[i] == ",":
                            i = ws(text, i + 1).end()  # type: ignore[union-attr]
                        elif text[i] != "]":
                            raise ValueError(f"expected ',' or ']' at {i}")
                    i += 1
                else:
                    value, i = decode(text, i)
                    if key == "metadata":
                        meta = value
                    elif key == "items" and value is not None:
                        raise ValueError("list response has items that are not a list")
                i = ws(text, i).end()  # type: ignore[union-attr]
                if text[i] == ",":
                    i = ws(text, i + 1).end()  # type: ignore[union-attr]
                elif text[i] != "}":
                    raise ValueError(f"expected ',' or '}}' at {i}")
        except IndexError:
            raise ValueError("list response is truncated") from None
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if not isinstance(rv, str) or not rv:
            raise ValueError("list response has no resourceVersion")
        self.rv = rv


def decode_list(data: bytes) -> tuple[list[dict[str, Any]], str]:
    """A list response → (its items that are objects, metadata.resourceVersion);
    ValueError if it is not a list. (Everything at once: for tests and small lists.)"""
    reader = ListReader(data)
    items = list(reader.items())
    return items, reader.rv


class _Counted:
    """An iterator that counts what it hands over (for the list's log line)."""

    def __init__(self, it: Iterator[dict[str, Any]]) -> None:
        self._it = it
        self.n = 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> dict[str, Any]:
        obj = next(self._it)
        self.n += 1
        return obj


def _describe(e: BaseException) -> str:
    if isinstance(e, ApiException):
        text = f"HTTP {e.status} {e.reason or ''}".strip()
        try:  # the API server's Status says who was refused what
            message = str(json.loads(e.body or "{}").get("message") or "").strip()
        except (ValueError, AttributeError):
            message = ""
        if not message or message == e.reason:
            return text
        return f"{text} ({message.splitlines()[0]})"
    if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason is not None:
        return _first_line(e.reason)
    return f"{type(e).__name__}: {_first_line(e)}"


def _advice(e: BaseException, resource: str) -> str:
    """What to do about a failed list, appended to its log line ("" when nothing helps)."""
    if isinstance(e, ApiException) and e.status == 401:
        return " (the API server refused the kubeconfig's credentials: renew them, log in again)"
    if isinstance(e, ApiException) and e.status == 403:
        return (
            f" (grant list and watch on {resource}: manifests/examples/laptop-rbac.yaml for a "
            "person, manifests/base for the DaemonSet's service account)"
        )
    if isinstance(e, _NO_ANSWER):
        return " (is the API server up and reachable from here? check the kubeconfig's server)"
    return ""


@dataclass(frozen=True)
class WatchedKind:
    """One resource the source lists and watches into the store.

    `list_fn(api)` returns the client's list function for it (called with `watch=True` to
    watch); the selectors are sent with every request (e.g. this node's own Node object:
    `field_selector="metadata.name=<node>"`).
    """

    kind: str  # the store's kind name
    resource: str  # the API's plural, for logs and metrics
    list_fn: Callable[[k8s.ApiClient], Callable[..., Any]]
    label_selector: str = ""
    field_selector: str = ""


# The list/watch parameters the informer passes (snake_case, as the generated methods take
# them) → the API's query parameters.
_QUERY = {
    "resource_version": "resourceVersion",
    "watch": "watch",
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "timeout_seconds": "timeoutSeconds",
    "label_selector": "labelSelector",
    "field_selector": "fieldSelector",
}


def lister(path: str) -> Callable[[k8s.ApiClient], Callable[..., Any]]:
    """The generated `list_*_for_all_namespaces` call for one collection (e.g.
    "/api/v1/services"), raw (`_preload_content=False`), made through the ApiClient as the
    generated method makes it (same authentication, Accept and errors) but without its
    API class: loading CoreV1Api's module alone costs the daemon ~19 MB of memory for the
    three list calls used here."""

    def bind(api: k8s.ApiClient) -> Callable[..., Any]:
        def call(
            *, _preload_content: bool = False, _request_timeout: Any = None, **params: Any
        ) -> Any:
            if _preload_content:
                raise ValueError("only raw responses (_preload_content=False)")
            query = [(_QUERY[k], v) for k, v in params.items() if v is not None]
            request = api.param_serialize(
                method="GET",
                resource_path=path,
                query_params=query,
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
            )
            resp = api.call_api(*request, _request_timeout=_request_timeout)
            if not 200 <= resp.status <= 299:  # as the generated method does when raw
                resp.read()
                raise ApiException.from_response(http_resp=resp, body=None, data=None)
            return resp.response

        return call

    return bind


SERVICES = WatchedKind(SERVICE, "services", lister("/api/v1/services"))
ENDPOINT_SLICES = WatchedKind(
    ENDPOINT_SLICE, "endpointslices", lister("/apis/discovery.k8s.io/v1/endpointslices")
)
DEFAULT_KINDS = (SERVICES, ENDPOINT_SLICES)


def this_node(name: str) -> WatchedKind:
    """This node's own Node object (its zone and node IPs), as kube-proxy watches it: a
    field selector on its name, so no other Node is ever sent."""
    return WatchedKind(
        NODE,
        "nodes",
        lister("/api/v1/nodes"),
        field_selector=f"metadata.name={name}",
    )


class KubeSource:
    """Feeds a Store from the API server. Construct (raises UsageError on bad config),
    `start()`, optionally `wait_synced()` (the store's `has_synced` turns true at the
    same moment), `stop()` on shutdown. One-shot: not restartable.

    `kinds` lists what is watched, one informer thread each (DEFAULT_KINDS: Services and
    EndpointSlices); `api_client` is the client they share, for other parts that talk to
    the same API server."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        *,
        kinds: Sequence[WatchedKind] = DEFAULT_KINDS,
        backoff_initial: float = 0.5,
        backoff_cap: float = 30.0,
        watch_timeout: tuple[int, int] = (300, 600),
        list_timeout: float = 120.0,
        label_selectors: dict[str, str] | None = None,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self._cfg = cfg
        self._conf = self.check_config(cfg)
        self._api = k8s.ApiClient(self._conf)
        self._stopping = threading.Event()
        sel = label_selectors or {}
        self._informers = {
            k.kind: _Informer(
                k.kind,
                k.list_fn(self._api),
                store,
                self._stopping,
                resource=k.resource,
                conn_backoff=Backoff(backoff_initial, backoff_cap),
                list_backoff=Backoff(backoff_initial, backoff_cap),
                watch_timeout=watch_timeout,
                list_timeout=list_timeout,
                label_selector=sel.get(k.kind, k.label_selector),
                field_selector=k.field_selector,
                sleep=sleep,
            )
            for k in kinds
        }
        self._started = False

    @property
    def api_client(self) -> k8s.ApiClient:
        return self._api

    @staticmethod
    def check_config(cfg: Config) -> k8s.Configuration:
        """Load the client configuration; UsageError (one line) when it cannot work."""
        return load_client_config(cfg)

    def check(self) -> None:
        """The daemon's pre-start check. The constructor already loaded the configuration
        (raising UsageError), so this only re-reads it: a kubeconfig removed since fails."""
        self.check_config(self._cfg)

    @property
    def host(self) -> str:
        return str(self._conf.host)

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        what = ", ".join(inf.resource for inf in self._informers.values())
        log.info("watching %s at %s", what, self.host)
        for inf in self._informers.values():
            inf.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the watches (blocked reads are broken) and wait for the threads."""
        self._stopping.set()
        for inf in self._informers.values():
            inf.interrupt()
        deadline = time.monotonic() + timeout
        for inf in self._informers.values():
            if inf.thread.is_alive():
                inf.thread.join(max(0.0, deadline - time.monotonic()))
        self._api.close()

    @property
    def has_synced(self) -> bool:
        return all(i.synced.is_set() for i in self._informers.values())

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Block until both initial lists are in the store (or stop/timeout): has_synced."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for inf in self._informers.values():
            while not inf.synced.is_set() and not self._stopping.is_set():
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    return False
                inf.synced.wait(left)
        return self.has_synced

    def resource_version(self, kind: str) -> str:
        """Last resourceVersion seen for `kind` (SERVICE / ENDPOINT_SLICE)."""
        return self._informers[kind].rv
