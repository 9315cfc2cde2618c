"""Keep the heap's housekeeping away from the event loop, and give freed heap back.

Decoding a 10k-Service list or rendering 320k rules allocates hundreds of MB that are
freed right after; glibc keeps them mapped, so the daemon's RSS would stay at the peak.
malloc_trim(0) returns the free pages (measured: it is what keeps a 10k/100k node under
its memory budget). No-op where glibc is not the allocator.

The cyclic garbage collector is the other cost: a full collection walks every tracked
object while holding the GIL (0.4 s at 1k Services, 1.6 s at 10k measured here), and the
loop's thread waits for the GIL meanwhile (DNS answers, proxied connections). Our records
are acyclic (frozen dataclasses, tuples, JSON dicts): reference counting frees them. So a
big list is decoded and parsed with automatic collection paused (`gc_paused`), `settle`
moves the long-lived heap into the permanent generation (`gc.freeze`), which later
collections do not walk, and big lists are freed a slice at a time (`drop_gradually`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("proxy.memory")

_libc = None
try:
    _name = ctypes.util.find_library("c")
    if _name:
        _libc = ctypes.CDLL(_name)  # CDLL calls release the GIL: the loop runs meanwhile
        _libc.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
    _libc = None

_pause_lock = threading.Lock()
_pauses = 0
_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic cyclic collection while inside (process-wide; nests across threads)."""
    global _pauses, _was_enabled
    with _pause_lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()


def drop_gradually(items: list[Any], step: int = 256) -> None:
    """Empty a big list a slice at a time. Dropping the last reference to 10k decoded
    EndpointSlices frees ~1M objects in one cascade of C deallocations: tens of ms with
    the GIL held, while the loop's thread waits. Between slices it can run."""
    while items:
        del items[-step:]


def settle() -> None:
    """After a big list or a full sync: exclude what is alive now from later collections.

    The young generations are collected first (cheap: they hold only recent objects), so
    little cyclic garbage is frozen with the rest. No full collection: it walks the whole
    heap holding the GIL (1.6 s at 10k Services measured here), the very stall this
    avoids; the records are acyclic, so what is frozen is freed by reference counting."""
    gc.collect(1)
    gc.freeze()


# mallopt(3) parameters (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune() -> None:
    """Set glibc's malloc up for a heap whose big buffers come and go (list bodies, restore
    inputs of ~1 MB each): a fixed mmap threshold, so such a buffer is always its own
    mapping and goes back to the kernel when freed (by default the threshold rises to the
    largest buffer freed so far, up to 32 MB, and later ones stay in the heap), and two
    arenas for the few threads (lists, renders) instead of one per thread. Call once,
    before threads start."""
    if _libc is None:
        return
    try:
        _libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        _libc.mallopt(_M_ARENA_MAX, 2)
    except Exception as e:  # not glibc after all: nothing to tune
        log.debug("mallopt failed: %s", e)


def trim() -> None:
    """Hand free heap pages back to the kernel (malloc_trim releases the GIL)."""
    if _libc is not None:
        try:
            _libc.malloc_trim(0)
        except Exception as e:  # never let housekeeping fail a sync
            log.debug("malloc_trim failed: %s", e)
