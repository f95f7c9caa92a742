"""Authentication and authorization of every request, before any view runs.

Credentials: Basic (Flask-HTTPAuth), `Authorization: Bearer <jwt>`, and for browsers on
stream URLs only, `?access_token=` or the HttpOnly cookie from `POST /token/cookie`.
Decision: the `acl` collection with RESTHeart's predicate language (services.acl); the
`admin` role passes everything. No credentials and no `$unauthenticated` rule: 401. Wrong
credentials: 401 even where an anonymous rule would match. Authenticated, not permitted:
403. Because this runs before routing reaches a view, a refused WebSocket handshake is an
HTTP 401/403 and never a 101.

The ACL is read again whenever it changed (one indexed query per request), so a revoked
rule never outlives its deletion, in any worker.
"""

from __future__ import annotations

import hmac
from typing import Any

from flask import Flask, current_app, g, request
from flask_httpauth import HTTPBasicAuth

from services import acl
from services.errors import BadRequest, Forbidden, Unauthorized
from services.tokens import COOKIE_NAME, TokenError, password_fingerprint

from .common import engine, users

REALM = "changefeed"
PUBLIC_ENDPOINTS = {"health.health", "demo.demo", "static"}
SELF_SERVICE_ENDPOINTS = {"tokens.issue_token", "tokens.issue_cookie", "tokens.clear_cookie"}
STREAM_ENDPOINTS = {"streams.stream", "streams.stream_ws"}
ADMIN_ROLE = "admin"

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


class Permissions:
    """The parsed ACL, re-read whenever the acl collection changed (no TTL)."""

    def __init__(self, engine_):
        self.engine = engine_
        self._version: Any = object()
        self._permissions: list[acl.Permission] = []

    def current(self) -> list[acl.Permission]:
        version = self.engine.collection_version("acl")
        if version != self._version:
            docs = self.engine.find("acl", {}, [], None, 0, 0)
            self._permissions = acl.load_permissions(docs)
            self._version = version
        return self._permissions


def raw_path() -> str:
    """The path as the client sent it (percent-encoded), without the query string."""
    environ = request.environ
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or request.path
    return raw.split("?", 1)[0].split("#", 1)[0] or "/"


def _user_from_token(token: str) -> tuple[dict, int]:
    try:
        claims = current_app.extensions["changefeed.tokens"].verify(token)
    except TokenError as exc:
        raise unauthorized(str(exc)) from None
    try:
        stored = engine().get_document("users", claims["sub"])
    except Exception:
        raise unauthorized("the token's user no longer exists") from None
    if not hmac.compare_digest(password_fingerprint(stored), str(claims.get("pwf", ""))):
        raise unauthorized("the token was revoked by a password change")
    return {k: v for k, v in stored.items() if k != "password"}, int(claims["exp"])


def _credentials(is_stream: bool) -> tuple[dict | None, str, int | None]:
    """Return (user or None, how, token expiry); raise 401 for wrong credentials."""
    header = request.headers.get("Authorization", "")
    query_token = request.args.get("access_token")
    if query_token is not None and not is_stream:
        raise BadRequest("access_token in the query string is accepted on stream URLs only; "
                         "send 'Authorization: Bearer <token>'")
    if header:
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            auth = basic_auth.get_auth()
            if auth is None:
                raise unauthorized("malformed Basic credentials")
            user = basic_auth.authenticate(auth, basic_auth.get_auth_password(auth))
            if not user:
                raise unauthorized("wrong username or password")
            return user, "basic", None
        if scheme == "bearer" and value.strip():
            user, exp = _user_from_token(value.strip())
            return user, "bearer", exp
        raise unauthorized("unsupported Authorization scheme; use Basic or Bearer")
    if query_token is not None:
        user, exp = _user_from_token(query_token)
        return user, "query-token", exp
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie and is_stream:
        user, exp = _user_from_token(cookie)
        return user, "cookie", exp
    return None, "anonymous", None


def request_info(user: dict | None) -> acl.RequestInfo:
    return acl.RequestInfo(method=request.method, path=raw_path(),
                           query={k: v for k, v in request.args.lists()}, user=user)


def check_access() -> None:
    """The before-request hook: authenticate, then authorize against the ACL."""
    g.user, g.auth_kind, g.auth_expires, g.permission = None, "anonymous", None, None
    if request.method == "OPTIONS":
        return
    path = acl.normalize_path(raw_path())
    if path is None or path.rstrip("/") != request.path.rstrip("/"):
        raise BadRequest("the request path is not in normal form (encoded '/', '..', '//' or control characters)")
    if request.endpoint in PUBLIC_ENDPOINTS:
        return
    is_stream = request.endpoint in STREAM_ENDPOINTS
    user, kind, expires = _credentials(is_stream)
    g.user, g.auth_kind, g.auth_expires = user, kind, expires
    if request.endpoint in SELF_SERVICE_ENDPOINTS:
        if user is None:
            raise unauthorized("authentication required: send Basic credentials")
        return
    decision = decide(user, request_info(user))
    if not decision.allowed:
        if user is None:
            raise unauthorized("authentication required: send credentials, or ask for an ACL rule "
                               "for $unauthenticated on this URL")
        raise Forbidden(f"user '{user['_id']}' is not permitted to {request.method} {path}")
    g.permission = decision.permission


def decide(user: dict | None, info: acl.RequestInfo) -> acl.Decision:
    if user is None:
        roles = [acl.UNAUTHENTICATED]
    else:  # only an array of strings is roles: list({"admin": 1}) would be ["admin"]
        raw = user.get("roles")
        roles = [r for r in raw if isinstance(r, str)] if isinstance(raw, list) else []
    if ADMIN_ROLE in roles:
        return acl.Decision(True, None)
    return acl.decide(current_app.extensions["changefeed.permissions"].current(), roles, info,
                      admin_role=ADMIN_ROLE)


def access_checker(app: Flask):
    """A callable that tells, later and outside this request, whether access still holds.

    Streams call it when users or the ACL change: a deleted user, a changed password (for
    token sessions), a lost role or a removed rule ends the stream (event:revoked / 1008).
    """
    user = g.user
    kind = g.auth_kind
    info = request_info(user)
    user_id = user["_id"] if user else None
    granted_filter = read_filter()  # what the stream was opened with
    fingerprint = None
    if user_id is not None:
        stored = app.extensions["changefeed.engine"].get_document("users", user_id)
        fingerprint = password_fingerprint(stored)

    def still_allowed(users_read: dict | None = None) -> bool:
        """`users_read` caches user documents across one re-check of many clients."""
        with app.app_context():
            current = None
            if user_id is not None:
                cache = users_read if users_read is not None else {}
                if user_id not in cache:
                    try:
                        cache[user_id] = app.extensions["changefeed.engine"].get_document("users", user_id)
                    except Exception:
                        cache[user_id] = None
                stored = cache[user_id]
                if stored is None:
                    return False
                if password_fingerprint(stored) != fingerprint and kind != "anonymous":
                    return False
                current = {k: v for k, v in stored.items() if k != "password"}
            fresh = acl.RequestInfo(method=info.method, path=info.path, query=info.query, user=current)
            decision = decide(current, fresh)
            if not decision.allowed:
                return False
            # The stream's pipeline holds the readFilter it was opened with: when the rule's
            # filter (or a @user value in it) changed, the old one may show too much.
            try:
                return _filter_of(decision.permission, current) == granted_filter
            except Forbidden:
                return False

    return still_allowed


def read_filter() -> dict | None:
    """The matching permission's readFilter with @user values filled in, or None.

    A variable the caller cannot fill (anonymous, missing property) refuses the request:
    a filter that silently lost a condition would widen what the caller sees.
    """
    return _filter_of(g.get("permission"), g.user)


def _filter_of(permission: acl.Permission | None, user: dict | None) -> dict | None:
    if permission is None:
        return None
    flt = (permission.mongo or {}).get("readFilter")
    if not flt:
        return None
    return _interpolate(flt, user)


def _interpolate(value: Any, user: dict | None) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, user) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, user) for v in value]
    if isinstance(value, str) and value.startswith("@user"):
        if user is None:
            raise Forbidden("this permission's readFilter needs an authenticated user")
        current: Any = user
        for part in value.split(".")[1:]:
            if not isinstance(current, dict) or part not in current:
                raise Forbidden(f"this permission's readFilter needs {value}, which the user does not have")
            current = current[part]
        return current
    return value


def init_app(app: Flask) -> None:
    app.extensions["changefeed.permissions"] = Permissions(app.extensions["changefeed.engine"])
    app.before_request(check_access)
