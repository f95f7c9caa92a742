"""`/_console`: the stream console, a public page of plain HTML, CSS and JavaScript.

The files are `static/console/` (index.html, console.css, console.js, favicon.svg). The page
holds no data: it logs in with `POST /token` (or `/token/cookie`), lists collections and
streams, shows a stream's events live over SSE or WebSocket and edits stream definitions
(validated with `PUT`/`PATCH /<coll>?dryRun=true`); what it shows, the API's auth decides.

Every response of the console carries a strict Content-Security-Policy: scripts and styles
from these files only (no inline script, no eval), connections to this origin only
(CSP Level 3 `'self'` covers `ws:`/`wss:` of the same host; tests/test_console.py checks
that Chromium opens the WebSocket under it), no frames, no plugins, and no Referer (stream
URLs may carry `?access_token=`). `/_demo?src=...`, the earlier page, redirects here with its
query string: `?src=<stream url>` connects to that URL as it is, with no login.
"""

from __future__ import annotations

import os

from flask import Blueprint, Response, abort, redirect, request, send_from_directory

bp = Blueprint("console", __name__)

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static", "console")
FILES = {"console.js", "console.css", "favicon.svg"}

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidated (ETag / Last-Modified): a new version shows at once
}


def _send(name: str, mimetype: str | None = None) -> Response:
    response = send_from_directory(ASSETS, name, mimetype=mimetype, max_age=0)
    response.headers.update(HEADERS)
    return response


@bp.get("/_console")
def console():
    return _send("index.html", "text/html")


@bp.get("/_console/<name>")
def asset(name: str):
    if name not in FILES:
        abort(404)
    return _send(name)


@bp.get("/favicon.ico")
def favicon():
    return _send("favicon.svg", "image/svg+xml")


@bp.get("/_demo")
def demo():
    """The earlier demo page's URL, kept: the console with the same query (`?src=`)."""
    query = request.query_string.decode("latin-1")
    return redirect("/_console" + ("?" + query if query else ""), code=302)
