"""`/_health` and `/_ready` (public probes) and `/_status` (watchers and clients).

`/_health` (liveness): the engine is reachable; 200 even when writes fail for a full disk
(a restart would not help), with the cause under `storage`. `/_ready` (readiness): 503 as
well while the last write found the disk full, so that a load balancer sends the traffic
elsewhere until space is back (the next successful write, or more free space, clears it).
"""

from __future__ import annotations

import gc
import os

import greenlet
from flask import Blueprint, g, request
from gevent import pywsgi

from services import memory
from services.errors import Forbidden

from .common import engine, hub, json_response
from .security import is_admin

bp = Blueprint("health", __name__)


def health():
    # One view (endpoint "health.health") for both rules: both are public (security.py).
    ready = request.url_rule is not None and request.url_rule.rule == "/_ready"
    try:
        engine().current_token()
    except Exception as exc:  # the engine's own message says what is wrong
        return json_response({"status": "unavailable", "engine": engine().name, "error": str(exc)}, 503)
    body = {"status": "ok", "engine": engine().name}
    problem = engine().storage_problem()
    if problem is not None:
        if ready:
            return json_response({"status": "unavailable", "engine": engine().name, "error": problem}, 503)
        body["storage"] = problem
    return json_response(body)


bp.add_url_rule("/_health", "health", health, methods=["GET"])
bp.add_url_rule("/_ready", "health", health, methods=["GET"])


@bp.get("/_status")
def status():
    body = {"pid": os.getpid(), "engine": engine().name, **hub().status()}
    if (request.args.get("detail") == "1" or request.args.get("sweep") == "1") and not is_admin(g.user):
        # both walk every object (a sweep pauses the worker): not for any role ACL lets in
        raise Forbidden("detail=1 and sweep=1 are for admins")
    if request.args.get("detail") == "1":  # walks every object: for benchmarks, not probes
        objects = gc.get_objects()
        body["greenlets"] = sum(1 for o in objects if isinstance(o, greenlet.greenlet))
        # connection handlers in memory, live or left in reference cycles (closed ones should
        # be freed at once: services/memory.py)
        body["handlers"] = sum(1 for o in objects if isinstance(o, pywsgi.WSGIHandler))
        del objects
        body["open_fds"] = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    if request.args.get("sweep") == "1":  # a full collection and a heap trim, now (services/memory.py)
        body["collected"] = memory.sweep()
    return json_response(body)
