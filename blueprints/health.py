"""`/_health` and `/_ready` (public probes) and `/_status` (watchers and clients).

`/_health` (liveness): the worker answers; 200 even when the database is away or writes fail
for a full disk (a restart would not help), with that cause under `storage`. `/_ready`
(readiness): 503 with the reason while the engine does not answer, the security
collections are not set up yet, or the last write found the disk full, so that a load
balancer sends the traffic elsewhere until it is back (for a full disk: the next successful
write, or more free space).
"""

from __future__ import annotations

import gc
import os

import greenlet
from flask import Blueprint, current_app, g
from gevent import pywsgi

from services import memory
from services.errors import Forbidden

from .common import engine, flag_arg, hub, json_response
from .security import is_admin

bp = Blueprint("health", __name__)


def health():
    """Liveness: the worker answers (nothing is asked of the engine: a database that is
    away is /_ready's to report, and restarting the worker would not bring it back). A
    full disk shows under `storage`."""
    body = {"status": "ok", "engine": engine().name}
    problem = engine().storage_problem()
    if problem is not None:
        body["storage"] = problem
    return json_response(body)


def ready():
    """Readiness: the engine answers, the security collections are set up, and writes do
    not fail for a full disk; else 503 with the reason, so that a load balancer sends the
    traffic elsewhere."""
    name = engine().name
    try:
        engine().current_token()
    except Exception as exc:  # the engine's own message says what is wrong
        return json_response({"status": "unavailable", "engine": name, "error": str(exc)}, 503)
    if not current_app.extensions.get("changefeed.state", {}).get("set_up", True):
        error = "the users and acl collections are not set up yet"
        return json_response({"status": "unavailable", "engine": name, "error": error}, 503)
    problem = engine().storage_problem()
    if problem is not None:
        return json_response({"status": "unavailable", "engine": name, "error": problem}, 503)
    return json_response({"status": "ok", "engine": name})


bp.add_url_rule("/_health", "health", health, methods=["GET"])
bp.add_url_rule("/_ready", "ready", ready, methods=["GET"])


@bp.get("/_status")
def status():
    body = {"pid": os.getpid(), "engine": engine().name, **hub().status()}
    detail, sweep = flag_arg("detail", "1", "0"), flag_arg("sweep", "1", "0")
    if (detail or sweep) and not is_admin(g.user):
        # both walk every object (a sweep pauses the worker): not for any role ACL lets in
        raise Forbidden("detail=1 and sweep=1 are for admins")
    if detail:  # walks every object: for benchmarks, not probes
        objects = gc.get_objects()
        body["greenlets"] = sum(1 for o in objects if isinstance(o, greenlet.greenlet))
        # connection handlers in memory, live or left in reference cycles (closed ones should
        # be freed at once: services/memory.py)
        body["handlers"] = sum(1 for o in objects if isinstance(o, pywsgi.WSGIHandler))
        del objects
        body["open_fds"] = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    if sweep:  # a full collection and a heap trim, now (services/memory.py)
        body["collected"] = memory.sweep()
    return json_response(body)
