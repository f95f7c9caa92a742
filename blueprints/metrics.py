"""`GET /metrics` (Prometheus text format, every worker's samples) and the HTTP request metrics.

Protected like every URL: admin by default; an ACL rule can open it to a scraper's role,
e.g. `{"predicate": "path(/metrics)", "roles": ["scraper"]}`.
"""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, g, request

from services import metrics

from .common import hub

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape():
    hub().refresh_metrics()  # this worker's gauges now; the others refresh every second
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


def init_app(app: Flask) -> None:
    """Count every request by method, route template and status, and time it (a stream: to
    its response head)."""

    @app.before_request
    def start_timer() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def count(response: Response) -> Response:
        started = g.get("metrics_started")
        method = request.method if request.method in metrics.METHODS else "other"
        rule = request.url_rule
        route = rule.rule if rule is not None else "unmatched"
        metrics.HTTP_REQUESTS.labels(method, route, str(response.status_code)).inc()
        if started is not None:
            metrics.HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - started)
        return response
