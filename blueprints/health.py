"""`/_health` (public: is the engine reachable) and `/_status` (watchers and clients)."""

from __future__ import annotations

import gc
import os

import greenlet
from flask import Blueprint, request

from .common import engine, hub, json_response

bp = Blueprint("health", __name__)


@bp.get("/_health")
def health():
    try:
        engine().current_token()
    except Exception as exc:  # the engine's own message says what is wrong
        return json_response({"status": "unavailable", "engine": engine().name, "error": str(exc)}, 503)
    return json_response({"status": "ok", "engine": engine().name})


@bp.get("/_status")
def status():
    body = {"pid": os.getpid(), "engine": engine().name, **hub().status()}
    if request.args.get("detail") == "1":  # walks every object: for benchmarks, not probes
        body["greenlets"] = sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet))
        body["open_fds"] = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    return json_response(body)
