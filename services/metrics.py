"""Prometheus metrics, aggregated across gunicorn's workers (prometheus_client's multiprocess mode).

gunicorn.conf.py gives the master a fresh directory in PROMETHEUS_MULTIPROC_DIR before any
worker starts (each worker writes its samples there), marks a worker that exits as dead
(its live gauges drop out) and removes the directory when the server stops. Without it
(in-process tests, scripts) the metrics live in this process's default registry.

Labels are bounded: a stream's collection and uri (at most STREAM_MAX_WATCHERS of them per
worker), transports, end and reset reasons from fixed sets, HTTP method, route template
and status. Never a client, a user or a document.

What is measured where:
- hub (services/hub.py): events read, deliveries, delivery lag (an event's wallTime to the
  moment its batch was handed to the idle clients' sockets: once per event, not per client,
  so that 10,000 clients do not cost 10,000 observations), queue depth at each enqueue of a
  client that is behind, disconnects by reason, resumes by source, resets by reason;
- `refresh` (every REFRESH_SECONDS in each worker): clients per stream and transport,
  watchers, cursors, the history window and the oldest position a connected client holds;
- app (blueprints/metrics.py): HTTP requests and their latency, failed authentications.
"""

from __future__ import annotations

import calendar
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

# The text format every Prometheus server reads (prometheus_client's newest says 1.0.0)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

REFRESH_SECONDS = 5.0  # and at once in the worker that answers a scrape
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DEPTH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

STREAM_CLIENTS = Gauge(
    "changefeed_stream_clients",
    "Clients connected to a stream, by transport",
    ["collection", "stream", "transport"],
    multiprocess_mode="livesum",
)
WATCHERS = Gauge(
    "changefeed_watchers", "Streams being watched (one per stream per worker)", multiprocess_mode="livesum"
)
CURSORS = Gauge(
    "changefeed_cursors",
    "Engine change streams open: one per watcher, one per resume reading the history",
    multiprocess_mode="livesum",
)
EVENTS = Counter("changefeed_events", "Change events a stream's watcher read", ["collection", "stream"])
DELIVERIES = Counter("changefeed_deliveries", "Events handed to clients (one per client per event)")
DELIVERY_LAG = Histogram(
    "changefeed_delivery_lag_seconds",
    "From an event's wallTime to the moment it was written to its stream's idle clients",
    buckets=_LAG_BUCKETS,
)
CLIENT_QUEUE = Histogram(
    "changefeed_client_queue_events",
    "Events queued for a client that is behind, at each enqueue",
    buckets=_DEPTH_BUCKETS,
)
DISCONNECTS = Counter("changefeed_disconnects", "Streams ended, by reason", ["reason"])
RESUMES = Counter(
    "changefeed_resumes", "Resumes with a last event id, by where the missed events came from", ["source"]
)
RESETS = Counter("changefeed_resets", "Resets sent (a resume point the store could not serve)", ["reason"])
HTTP_REQUESTS = Counter("changefeed_http_requests", "HTTP requests answered", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "changefeed_http_request_duration_seconds",
    "Time to answer a request (for a stream: to its response head)",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
AUTH_FAILURES = Counter("changefeed_auth_failures", "Failed authentications", ["method"])
HISTORY_WINDOW = Gauge(
    "changefeed_history_window_seconds",
    "Age of the oldest event a client can still resume from (the embedded change log, or the oplog)",
    multiprocess_mode="max",
)
OLDEST_CLIENT_POSITION = Gauge(
    "changefeed_oldest_client_position_age_seconds",
    "Age of the oldest position a connected client holds (its last event, or when it joined)",
    multiprocess_mode="max",
)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
RESUME_SOURCES = ("live", "buffer", "engine")

# A reset's reason, from its text (services.storage engines and services.hub say them).
_RESET_KINDS = (
    (re.compile(r"another data store|another cluster|another deployment"), "foreign"),
    (re.compile(r"ahead of"), "ahead"),
    (re.compile(r"older than|retained|no longer|pruned|history|cannot resume"), "history_lost"),
)


RESET_KINDS = (*(kind for _, kind in _RESET_KINDS), "other")


def _show_every_label_set() -> None:
    """Families with a fixed set of labels show all of them from the start (at 0), so that a
    dashboard or an alert finds them before the first occurrence."""
    from .messages import END_REASONS

    for reason in (*END_REASONS, "other"):
        DISCONNECTS.labels(reason)
    for source in RESUME_SOURCES:
        RESUMES.labels(source)
    for kind in RESET_KINDS:
        RESETS.labels(kind)
    for method in ("basic", "bearer"):
        AUTH_FAILURES.labels(method)


_show_every_label_set()


def reset_kind(text: str) -> str:
    for pattern, kind in _RESET_KINDS:
        if pattern.search(text):
            return kind
    return "other"


def observe_lag(events: Iterable[dict | None], now: float | None = None) -> None:
    """One lag observation per event that has a wallTime (a datetime, naive UTC)."""
    now = time.time() if now is None else now
    for event in events:
        wall = event.get("wallTime") if event is not None else None
        if wall is not None and hasattr(wall, "timestamp"):
            stamp = wall.timestamp() if wall.tzinfo is not None else _naive_utc_timestamp(wall)
            DELIVERY_LAG.observe(max(0.0, now - stamp))


def _naive_utc_timestamp(value: Any) -> float:
    return calendar.timegm(value.timetuple()) + value.microsecond / 1e6


class StreamGauges:
    """Clients per (collection, stream, transport) as this worker last set them; label sets
    that went away are set to 0 (a multiprocess gauge keeps its last value otherwise)."""

    def __init__(self) -> None:
        self._shown: set[tuple[str, str, str]] = set()

    def set(self, counts: dict[tuple[str, str, str], int]) -> None:
        for labels in self._shown - counts.keys():
            STREAM_CLIENTS.labels(*labels).set(0)
        for labels, n in counts.items():
            STREAM_CLIENTS.labels(*labels).set(n)
        self._shown = set(counts)


def exposition() -> tuple[bytes, str]:
    """The metrics text of every worker (multiprocess mode), or of this process."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE


def refresh_forever(read: Callable[[], None]) -> None:
    """Call `read` (which sets the gauges) every REFRESH_SECONDS, in a greenlet."""
    import logging

    import gevent

    log = logging.getLogger(__name__)

    def loop() -> None:
        while True:
            try:
                read()
            except Exception:
                log.exception("metrics refresh failed")
            gevent.sleep(REFRESH_SECONDS)

    gevent.spawn(loop)
