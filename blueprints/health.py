"""`/_health` (public: is the engine reachable) and `/_status` (watchers and clients)."""

from __future__ import annotations

import os

from flask import Blueprint

from .common import engine, hub, json_response

bp = Blueprint("health", __name__)


@bp.get("/_health")
def health():
    try:
        engine().current_token()
        ok = True
    except Exception as exc:  # the engine's own message says what is wrong
        return json_response({"status": "unavailable", "engine": engine().name, "error": str(exc)}, 503)
    return json_response({"status": "ok" if ok else "unavailable", "engine": engine().name})


@bp.get("/_status")
def status():
    return json_response({"pid": os.getpid(), "engine": engine().name, **hub().status()})
