"""Run a blocking call without freezing the gevent hub.

Under a monkey-patched gevent worker, C calls that wait or burn CPU without releasing
control run in threads, so other greenlets (every open stream of the worker) keep
running: sqlite3 reads in gevent's threadpool (`run`), sqlite3 writes in a one-thread pool
of their own (`run_write`: a write waiting for another process's lock never takes a thread
that reads need, and SQLite has one writer at a time anyway), bcrypt in a pool of its own
with one thread (`run_cpu`). bcrypt releases the GIL and costs ~0.3 s of a core per
check; in its own single thread, a burst of password guesses can neither take both cores
nor queue ahead of the database calls every request makes. Unpatched (plain scripts, some
tests), calls run directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from gevent import monkey

T = TypeVar("T")


def patched() -> bool:
    return monkey.is_module_patched("socket")


_pools: dict[str, Any] = {}  # one-thread pools by purpose, made on first use


def _run_alone(purpose: str, fn: Callable[..., T], args: tuple) -> T:
    """`fn(*args)` in the one-thread pool for `purpose` when patched, else directly."""
    if not patched():
        return fn(*args)
    pool = _pools.get(purpose)
    if pool is None:
        from gevent.threadpool import ThreadPool

        pool = _pools[purpose] = ThreadPool(1)
    return pool.apply(fn, args)


def run_cpu(fn: Callable[..., T], *args: Any) -> T:
    """Call a CPU-bound `fn(*args)` (bcrypt) in its own one-thread pool when patched."""
    return _run_alone("cpu", fn, args)


def run_write(fn: Callable[..., T], *args: Any) -> T:
    """Call a database write `fn(*args)` in the one-thread write pool when patched."""
    return _run_alone("write", fn, args)


def run(fn: Callable[..., T], *args: Any) -> T:
    """Call `fn(*args)` in the threadpool when gevent has patched this process."""
    if patched():
        return gevent.get_hub().threadpool.apply(fn, args)
    return fn(*args)
