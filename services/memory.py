"""A worker's memory: the GC tuned for many connections, and memory given back to the OS.

Three measured problems (bench/robustness.py, docs/stack-notes.md section 2):

- 10,000 connections hold ~600,000 GC-tracked objects, and the default thresholds ran a
  full collection often enough to pause the worker 150-450 ms. `tune_gc` raises them and
  freezes what start-up made, so full collections practically never run on their own.
- With full collections that rare, garbage in reference cycles stays. The connection
  objects no longer form cycles (worker.Handler._break_websocket_cycles), and `sweep`
  collects what other cycles leave, but only while the worker serves few streams, where a
  full collection costs a few milliseconds, not hundreds.
- glibc keeps freed memory for reuse: one 15 MB document (its request body, its decoded
  and encoded forms) left ~130 MB of RSS behind after it was freed. `tune_allocator` has
  large blocks mapped and unmapped on their own, and `sweep` trims the heap.

Everything here is best effort: without glibc (or ctypes) only the GC part applies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

import gevent

log = logging.getLogger(__name__)

GC_THRESHOLDS = (100_000, 50, 1000)
SWEEP_EVERY_SECONDS = 10.0
SWEEP_MAX_CLIENTS = 1000  # above this many open streams a full collection would pause them
MMAP_THRESHOLD = 256 << 10  # blocks at least this large get their own mapping, freed at once

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only)
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


def tune_allocator() -> bool:
    """Fixed thresholds: glibc otherwise raises its mmap threshold to the largest block
    freed, after which a 15 MB document's copies live in the heap and are never returned."""
    if _LIBC is None:
        return False
    ok = _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return _LIBC.mallopt(_M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD) == 1 and ok


def sweep() -> int:
    """A full collection, then the heap's free pages back to the OS; what was collected."""
    found = gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    return found


def keep_tidy(open_streams: Callable[[], int]) -> gevent.Greenlet:
    """Sweep every SWEEP_EVERY_SECONDS while at most SWEEP_MAX_CLIENTS streams are open
    and something was allocated since the last sweep."""

    def loop() -> None:
        last = None
        while True:
            gevent.sleep(SWEEP_EVERY_SECONDS)
            try:
                counts = gc.get_count()
                if counts == last or open_streams() > SWEEP_MAX_CLIENTS:
                    continue
                found = sweep()
                last = gc.get_count()
                if found:
                    log.debug("memory sweep collected %d objects", found)
            except Exception:
                log.exception("memory sweep failed")

    return gevent.spawn(loop)
