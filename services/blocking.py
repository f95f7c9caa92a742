"""Run a blocking call without freezing the gevent hub.

Under a monkey-patched gevent worker, C calls that wait or burn CPU without releasing
control (sqlite3 lock waits, bcrypt) run in gevent's threadpool, so other greenlets (every
open stream of the worker) keep running. Unpatched (plain scripts, some tests), they run
directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from gevent import monkey

T = TypeVar("T")


def patched() -> bool:
    return monkey.is_module_patched("socket")


def run(fn: Callable[..., T], *args: Any) -> T:
    """Call `fn(*args)` in the threadpool when gevent has patched this process."""
    if patched():
        return gevent.get_hub().threadpool.apply(fn, args)
    return fn(*args)
