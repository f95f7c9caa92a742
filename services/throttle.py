"""Throttling of failed logins per (client address, user name).

After `max_failures` failed attempts within `window` seconds, the next attempts for that
key are refused at once (HTTP 429 with Retry-After) until the oldest failure leaves the
window: no password is checked, so guessing costs the server nothing and gains nothing.
Other addresses and other user names are unaffected. The table is bounded in size; when
it is full, expired keys go first, then the oldest keys.

The counts live in the worker process: with WORKERS=N an address gets at most N times
`max_failures` attempts per window.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable


class FailureThrottle:
    """Sliding-window failure counts per key."""

    def __init__(self, max_failures: int, window: float, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._failures: dict[Hashable, deque[float]] = {}

    def _recent(self, key: Hashable, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, key: Hashable) -> float | None:
        """Seconds until `key` may try again, or None if it may try now."""
        now = self.clock()
        times = self._recent(key, now)
        if times is None or len(times) < self.max_failures:
            return None
        return max(0.0, times[-self.max_failures] + self.window - now)

    def failed(self, key: Hashable) -> None:
        now = self.clock()
        times = self._recent(key, now)
        if times is None:
            if len(self._failures) >= self.max_keys:
                self._make_room(now)
            times = self._failures[key] = deque(maxlen=self.max_failures)
        times.append(now)

    def succeeded(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    def _make_room(self, now: float) -> None:
        for key in list(self._failures):
            self._recent(key, now)
        while len(self._failures) >= self.max_keys:
            del self._failures[next(iter(self._failures))]
