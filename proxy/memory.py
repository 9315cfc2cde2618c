"""Give freed heap back to the OS after large transient allocations.

Decoding a 10k-Service list or rendering 320k rules allocates hundreds of MB that are
freed right after; glibc keeps them mapped, so the daemon's RSS would stay at the peak.
malloc_trim(0) returns the free pages (measured: it is what keeps a 10k/100k node under
its memory budget). No-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger("proxy.memory")

_libc = None
try:
    _name = ctypes.util.find_library("c")
    if _name:
        _libc = ctypes.CDLL(_name)
        _libc.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
    _libc = None


def trim() -> None:
    """Collect garbage cycles, freeze what survives, then hand free heap pages back to
    the kernel.

    Freezing moves every live object (the imports, the model, the render state) out of
    the collector's view, so the full collections Python runs on its own later scan
    only what was allocated since: a full collection of a daemon holding 10k Services
    took 1.6 s here (0.4 s at 1k), every other thread and the event loop (DNS answers,
    proxied connections) stalled meanwhile. Unfreezing first lets this collection find
    what died since the last freeze."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if _libc is not None:
        try:
            _libc.malloc_trim(0)
        except Exception as e:  # never let housekeeping fail a sync
            log.debug("malloc_trim failed: %s", e)
