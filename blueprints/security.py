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

Failed Basic logins are throttled per (client address, user name) (services.throttle):
past AUTH_MAX_FAILURES within AUTH_FAILURE_WINDOW_SECONDS the next attempts get 429 and
no password is checked. The client address is the peer's, or the last X-Forwarded-For hop
when the peer is one of TRUSTED_PROXIES (a proxy appends the address it saw last, so
only that entry is the proxy's word; earlier ones are the client's).
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
from typing import Any

from flask import Flask, current_app, g, request
from flask_httpauth import HTTPBasicAuth

from services import acl, metrics
from services.errors import BadRequest, ChangefeedError, Forbidden, TooManyRequests, Unauthorized
from services.permissions import Grant, interpolate
from services.throttle import FailureThrottle
from services.tokens import COOKIE_NAME, TokenError, password_fingerprint

from .common import engine, parsed_body, users
from .paths import CANONICAL_PATH, RAW_PATH

REALM = "changefeed"
PUBLIC_ENDPOINTS = {
    "health.health",
    "health.ready",
    "console.console",
    "console.asset",
    "console.favicon",
    "console.demo",
    "openapi.spec",
}
SELF_SERVICE_ENDPOINTS = {"tokens.issue_token", "tokens.issue_cookie", "tokens.clear_cookie"}
STREAM_ENDPOINTS = {"streams.stream", "streams.stream_ws"}
ADMIN_ROLE = "admin"

basic_auth = HTTPBasicAuth(realm=REALM)


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


NOT_NORMAL = "the request path is not in normal form (encoded '/', '..', '//' or control characters)"


def canonical_path() -> str | None:
    """The request's canonical path (blueprints.paths), or None when it has none."""
    return request.environ.get(CANONICAL_PATH)


def client_address() -> str:
    """The peer's address, or the last X-Forwarded-For hop when the peer is a trusted proxy."""
    peer = request.environ.get("REMOTE_ADDR") or ""
    trusted = current_app.config["TRUSTED_PROXIES"]
    if trusted and request.headers.get("X-Forwarded-For"):
        try:
            peer_ip = ipaddress.ip_address(peer)
        except ValueError:
            return peer
        if any(peer_ip in net for net in trusted):
            last = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
            try:
                return str(ipaddress.ip_address(last))
            except ValueError:
                return peer
    return peer


def _user_from_token(token: str) -> tuple[dict, int]:
    try:
        claims = current_app.extensions["changefeed.tokens"].verify(token)
    except TokenError as exc:  # a 401 as it is; with the challenge every 401 here carries
        metrics.AUTH_FAILURES.labels("bearer").inc()
        exc.headers = _challenge_headers()
        raise
    try:
        stored = engine().get_document("users", claims["sub"])
    except Exception:
        metrics.AUTH_FAILURES.labels("bearer").inc()
        raise unauthorized("the token's user no longer exists") from None
    if not hmac.compare_digest(password_fingerprint(stored), str(claims.get("pwf", ""))):
        metrics.AUTH_FAILURES.labels("bearer").inc()
        raise unauthorized("the token was revoked by a password change")
    return {k: v for k, v in stored.items() if k != "password"}, int(claims["exp"])


def _basic(auth: Any) -> dict:
    """Check Basic credentials, throttled per (client address, user name)."""
    throttle: FailureThrottle = current_app.extensions["changefeed.login_throttle"]
    key = (client_address(), auth.username)
    wait = throttle.retry_after(key)
    if wait is not None:
        raise TooManyRequests(
            f"too many failed logins for user '{auth.username[:100]}' from this address; "
            f"try again in {max(1, round(wait))} s",
            retry_after=wait,
        )
    user = users().verify(auth.username, auth.password, gate=lambda: throttle.checking(key))
    if not user:
        throttle.failed(key)
        metrics.AUTH_FAILURES.labels("basic").inc()
        raise unauthorized("wrong username or password")
    throttle.succeeded(key)
    return user


def bcrypt_gate():
    """For hashing a new password: bounded like login checks, per client address."""
    throttle: FailureThrottle = current_app.extensions["changefeed.login_throttle"]
    address = client_address()
    return lambda: throttle.busy(address)


def _credentials(is_stream: bool) -> tuple[dict | None, str, int | None]:
    """Return (user or None, how, token expiry); raise 401 for wrong credentials."""
    header = request.headers.get("Authorization", "")
    query_token = request.args.get("access_token")
    if query_token is not None and not is_stream:
        raise BadRequest(
            "access_token in the query string is accepted on stream URLs only; "
            "send 'Authorization: Bearer <token>'"
        )
    if header:
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            auth = basic_auth.get_auth()
            if auth is None or not auth.username:
                raise unauthorized("malformed Basic credentials")
            return _basic(auth), "basic", None
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
    return acl.RequestInfo(
        method=request.method,
        path=canonical_path() or request.environ.get(RAW_PATH, "/"),
        query={k: v for k, v in request.args.lists()},
        user=user,
        body=acl.LazyBody(_json_body),
    )


def _json_body() -> Any:
    """The JSON body for the ACL's body predicates; None when there is none or it is not
    valid (the view then refuses it with a 400 naming the fault)."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return None
    try:
        value = parsed_body()
    except ChangefeedError:
        return None
    return value if isinstance(value, (dict, list)) else None


def is_admin(user: dict | None) -> bool:
    return user is not None and ADMIN_ROLE in _roles(user)


def _roles(user: dict) -> list[str]:
    raw = user.get("roles")  # only an array of strings is roles: list({"admin": 1}) would be ["admin"]
    return [r for r in raw if isinstance(r, str)] if isinstance(raw, list) else []


def check_access() -> None:
    """The before-request hook: authenticate, then authorize against the ACL."""
    g.user, g.auth_kind, g.auth_expires, g.permission = None, "anonymous", None, None
    if request.method == "OPTIONS":
        return
    path = canonical_path()
    if path is None:
        raise BadRequest(NOT_NORMAL)
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
            raise unauthorized(
                "authentication required: send credentials, or ask for an ACL rule "
                "for $unauthenticated on this URL"
            )
        raise Forbidden(f"user '{user['_id']}' is not permitted to {request.method} {path}")
    g.permission = decision.permission


def decide(user: dict | None, info: acl.RequestInfo) -> acl.Decision:
    roles = [acl.UNAUTHENTICATED] if user is None else _roles(user)
    if ADMIN_ROLE in roles:
        return acl.Decision(True, None)
    return acl.decide(
        current_app.extensions["changefeed.permissions"].current(), roles, info, admin_role=ADMIN_ROLE
    )


def grant(coll: str | None) -> Grant:
    """What the request's permission lets it do on `coll` (admin: everything)."""
    permission = g.get("permission")
    return Grant.of(
        permission.mongo if permission is not None else None, g.user, coll, admin=is_admin(g.user)
    )


def access_checker(app: Flask, account_bound: bool = False):
    """A callable that tells, later and outside this request, whether access still holds.

    Streams call it when users or the ACL change: a deleted user, a changed password (for
    token sessions), a lost role or a removed rule ends the stream (event:revoked / 1008),
    and so does a permission whose readFilter or projectResponse now says something else
    (the stream was opened with the old ones). With `account_bound` (the stream's stages
    read `@user`), any change to the account ends it too, so that the client reconnects
    under the new binding.
    """
    user = g.user
    kind = g.auth_kind
    info = request_info(user)
    user_id = user["_id"] if user else None
    opened = _stream_terms(g.get("permission"), user)
    fingerprint = None
    account = None
    if user_id is not None:
        stored = app.extensions["changefeed.engine"].get_document("users", user_id)
        fingerprint = password_fingerprint(stored)
        account = {k: v for k, v in stored.items() if k not in ("password", "_etag")}

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
                if account_bound and {k: v for k, v in current.items() if k != "_etag"} != account:
                    return False
            fresh = acl.RequestInfo(method=info.method, path=info.path, query=info.query, user=current)
            decision = decide(current, fresh)
            if not decision.allowed:
                return False
            try:
                return _stream_terms(decision.permission, current) == opened
            except Forbidden:
                return False

    return still_allowed


_SOME_INSTANT = datetime.datetime(1970, 1, 1)


def _stream_terms(permission: acl.Permission | None, user: dict | None) -> tuple:
    """What shapes a stream's events: the permission's readFilter (with the user's values)
    and projectResponse. Computed without a Grant, so a re-check of many clients stays
    cheap; "@now" is one fixed instant here, since time passing changes no access."""
    mongo = (permission.mongo or {}) if permission is not None else {}
    read_filter = mongo.get("readFilter") or None
    if read_filter is not None:
        read_filter = interpolate(read_filter, user, _SOME_INSTANT, "readFilter")
    return read_filter, mongo.get("projectResponse") or None


def init_app(app: Flask) -> None:
    app.extensions["changefeed.permissions"] = Permissions(app.extensions["changefeed.engine"])
    app.extensions["changefeed.login_throttle"] = FailureThrottle(
        app.config["AUTH_MAX_FAILURES"],
        app.config["AUTH_FAILURE_WINDOW_SECONDS"],
        max_checks_per_address=app.config["AUTH_MAX_CHECKS_PER_ADDRESS"],
        max_checks=app.config["AUTH_MAX_CHECKS"],
    )
    app.before_request(check_access)
