"""What the daemon expects of a source of truth (the Kubernetes watch, the manifests reader)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kubernetes.client import ApiClient


class Source(Protocol):
    """Feeds a `Store` from worker threads: `replace` per kind for the initial lists, then
    `upsert`/`delete` as objects change. Constructing one loads its configuration and
    raises `proxy.config.UsageError` (one line) when the user must fix something."""

    @property
    def api_client(self) -> ApiClient | None:
        """The API server client this source watches through, for parts that talk to the
        same API server (e.g. port-forwarding); None when there is no API server."""
        ...

    def check(self) -> None:
        """Re-check the configuration just before start (UsageError): the daemon calls it
        once every listener is bound and before the data plane touches the node."""
        ...

    def start(self) -> None:
        """Start feeding the store; returns at once."""
        ...

    def stop(self) -> None:
        """Stop feeding; may block a few seconds (the daemon calls it in a thread)."""
        ...
