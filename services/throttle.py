"""Throttling of failed logins per (client address, user name), and of password checks.

After `max_failures` failed attempts within `window` seconds, the next attempts for that
key are refused at once (HTTP 429 with Retry-After) until the oldest failure leaves the
window: no password is checked, so guessing costs the server nothing and gains nothing.
Other addresses and other user names are unaffected. The table is bounded in size; when
it is full, expired keys go first, then the oldest keys.

Checks in progress count too (`checking`): guesses sent in parallel cannot all be checked
before the first failures are recorded. A password check (bcrypt, ~0.3 s of a core) is
also bounded in concurrency, per client address and in all, so that guesses spread over
many user names cannot queue so much work that other users' logins wait for seconds.

The counts live in the worker process: with WORKERS=N an address gets at most N times
`max_failures` attempts per window.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

from .errors import TooManyRequests


class FailureThrottle:
    """Sliding-window failure counts per key."""

    def __init__(
        self,
        max_failures: int,
        window: float,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        max_checks_per_address: int = 4,
        max_checks: int = 32,
    ):
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self.max_checks_per_address = max_checks_per_address
        self.max_checks = max_checks
        self._failures: dict[Hashable, deque[float]] = {}
        self._pending: dict[Hashable, int] = {}  # checks in progress per key
        self._by_address: dict[Hashable, int] = {}  # ... per address (key[0])
        self._checks = 0

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
        failures = len(times) if times is not None else 0
        if failures >= self.max_failures:
            return max(0.0, times[-self.max_failures] + self.window - now)  # type: ignore[index]
        if failures + self._pending.get(key, 0) >= self.max_failures:
            return 1.0  # the checks in progress may use up what is left
        return None

    @contextmanager
    def checking(self, key: tuple) -> Iterator[None]:
        """Around one password check for `key` = (address, user); 429 when it may not run."""
        wait = self.retry_after(key)
        if wait is not None:
            raise TooManyRequests(
                "too many failed logins for this user from this address; "
                f"try again in {max(1, round(wait))} s",
                retry_after=wait,
            )
        with self.busy(key[0]):
            self._pending[key] = self._pending.get(key, 0) + 1
            try:
                yield
            finally:
                _decrement(self._pending, key)

    @contextmanager
    def busy(self, address: Hashable) -> Iterator[None]:
        """Around any bcrypt work done for `address` (a login, hashing a new password); 429
        when that address, or the worker, already has its share in progress."""
        if self._by_address.get(address, 0) >= self.max_checks_per_address:
            raise TooManyRequests(
                "too many password checks in progress from this address; try again shortly", retry_after=1
            )
        if self._checks >= self.max_checks:
            raise TooManyRequests("too many password checks in progress; try again shortly", retry_after=1)
        self._by_address[address] = self._by_address.get(address, 0) + 1
        self._checks += 1
        try:
            yield
        finally:
            self._checks -= 1
            _decrement(self._by_address, address)

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


def _decrement(table: dict, key: Hashable) -> None:
    left = table.get(key, 1) - 1
    if left > 0:
        table[key] = left
    else:
        table.pop(key, None)
