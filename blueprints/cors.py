"""CORS for browser clients on other origins (`CORS_ORIGINS`), and WebSocket origin checks.

Only listed origins get CORS headers, and only they get credentials (cookies, Basic);
`*` allows any origin without credentials. Preflights pass without authentication (as
in RESTHeart) and name the headers an EventSource or fetch client needs, Last-Event-ID
included. A WebSocket handshake from a browser page on an origin that is neither this
server's nor listed is refused with 403, since browsers do not apply CORS to WebSockets.
"""

from __future__ import annotations

from flask import Flask, Response, current_app, request

from services.errors import Forbidden

ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID, If-Match, If-None-Match, No-Auth-Challenge"
EXPOSE_HEADERS = "ETag, Location"
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


def _allowed_origin(origin: str) -> str | None:
    origins = current_app.config["CORS_ORIGINS"]
    if origin.rstrip("/") in origins:
        return origin
    if "*" in origins:
        return "*"
    return None


def _same_origin(origin: str) -> bool:
    host = request.host
    return origin.rstrip("/") in (f"http://{host}", f"https://{host}")


def preflight():
    if request.method != "OPTIONS":
        return None
    response = Response(status=204)
    origin = request.headers.get("Origin")
    allowed = _allowed_origin(origin) if origin else None
    if allowed:
        _decorate(response, allowed)
        response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
    response.headers["Allow"] = ALLOW_METHODS
    return response


def check_websocket_origin():
    if "websocket" not in request.headers.get("Upgrade", "").lower():
        return None
    origin = request.headers.get("Origin")
    if origin and not _same_origin(origin) and not _allowed_origin(origin):
        raise Forbidden(
            f"WebSocket connections from origin '{origin}' are not allowed; list it in CORS_ORIGINS"
        )
    return None


def _decorate(response: Response, allowed: str) -> None:
    response.headers["Access-Control-Allow-Origin"] = allowed
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    if allowed != "*":
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.vary.add("Origin")


def add_headers(response: Response) -> Response:
    origin = request.headers.get("Origin")
    if origin and "Access-Control-Allow-Origin" not in response.headers:
        allowed = _allowed_origin(origin)
        if allowed:
            _decorate(response, allowed)
    return response


def init_app(app: Flask) -> None:
    """Register before security: preflights and origin checks come first."""
    app.before_request(preflight)
    app.before_request(check_websocket_origin)
    app.after_request(add_headers)
