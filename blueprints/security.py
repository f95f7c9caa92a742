"""Authentication for every request: Basic auth (Flask-HTTPAuth) against the users collection.

Runs before any view, so a refused WebSocket handshake is a 401 and never a 101. The
authenticated user is left in `g.user` (None for an anonymous caller on a public URL).
"""

from __future__ import annotations

from flask import Flask, g, request
from flask_httpauth import HTTPBasicAuth

from services.errors import Unauthorized

from .common import users

REALM = "changefeed"
PUBLIC_ENDPOINTS = {"health.health", "static"}

basic_auth = HTTPBasicAuth(realm=REALM)


@basic_auth.verify_password
def _verify(username: str, password: str):
    return users().verify(username, password)


def _challenge_headers() -> dict:
    if "No-Auth-Challenge" in request.headers or "noauthchallenge" in request.args:
        return {}
    return {"WWW-Authenticate": f'Basic realm="{REALM}"'}


def unauthorized(message: str) -> Unauthorized:
    exc = Unauthorized(message)
    exc.headers = _challenge_headers()
    return exc


def authenticate() -> None:
    """Resolve the caller to a user, or raise 401."""
    g.user = None
    if request.method == "OPTIONS" or request.endpoint in PUBLIC_ENDPOINTS:
        return
    header = request.headers.get("Authorization", "")
    if header:
        if not header.lower().startswith("basic "):
            raise unauthorized("unsupported Authorization scheme; use Basic")
        auth = basic_auth.get_auth()
        if auth is None:
            raise unauthorized("malformed Basic credentials")
        user = basic_auth.authenticate(auth, basic_auth.get_auth_password(auth))
        if not user:
            raise unauthorized("wrong username or password")
        g.user = user
        return
    raise unauthorized("authentication required: send Basic credentials")


def init_app(app: Flask) -> None:
    app.before_request(authenticate)
