"""Capped exponential backoff with jitter: the one retry pace of every loop that retries.

The watcher re-opening a failed change stream, the MongoDB stream re-opening after a
resumable error and the start-up bootstrap waiting for the database all use it, so a
fault is retried at the same, bounded pace everywhere.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from `base` up to `cap`; each is drawn from half to all of its step.

    The jitter keeps many workers (or many streams) that failed together from retrying in
    lockstep.
    """

    def __init__(self, base: float = 0.1, cap: float = 30.0):
        self.base, self.cap, self.n = base, cap, 0

    def next(self) -> float:
        step = min(self.cap, self.base * (2**self.n))
        self.n += 1
        return random.uniform(step / 2, step)

    def reset(self) -> None:
        self.n = 0
