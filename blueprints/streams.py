"""Change streams over SSE and WebSocket on one URL: `GET /<coll>/_streams/<uri>`.

Everything that can fail (auth, unknown stream, bad avars, bad Last-Event-ID, bad
handshake) is decided before the 200 or the 101 goes out, so a client never gets an
open, silent stream. The view is registered twice, once with `websocket=True`, because
Werkzeug routes a WebSocket handshake only to such rules: a plain rule answers a
handshake with 404. Once subscribed, blueprints/transports.py writes the stream.
"""

from __future__ import annotations

import base64
import json
import ssl

from flask import Blueprint, Response, current_app, g, request

from services import pipeline as pipelines
from services import sse
from services.errors import BadRequest, Unauthorized, Unavailable
from services.hub import end_message, find_stream
from services.query import shown

from . import security, transports
from .common import engine, flag_arg, hub, json_response

bp = Blueprint("streams", __name__)

_WS_VERSIONS = ("13", "8", "7")
_MAX_TOKEN_CHARS = 1024  # tokens we issue are ~45 characters (MongoDB's a few hundred)


# The environ key of a stream's {"events": n, "bytes": n} sent (worker.Handler.log_request)
STREAM_STATS = "changefeed.stream_stats"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "close"}


@bp.get("/<coll>/_streams")
def list_streams(coll: str):
    """The collection's streams, with links built from PUBLIC_URL, or relative: never from
    the Host header, which the client chooses."""
    props = engine().get_collection(coll)
    base = current_app.config["PUBLIC_URL"]
    out = []
    for stream in props.get("streams") or []:
        if isinstance(stream, dict) and isinstance(stream.get("uri"), str):
            out.append(
                {
                    "uri": stream["uri"],
                    "url": f"{base}/{coll}/_streams/{stream['uri']}",
                    "stages": stream.get("stages", []),
                }
            )
    return json_response(out)


def is_websocket_handshake(environ: dict) -> bool:
    upgrade = environ.get("HTTP_UPGRADE", "").lower()
    connection = environ.get("HTTP_CONNECTION", "").lower()
    return "websocket" in upgrade and "upgrade" in connection


def _resume_token(raw: str | None):
    """Parse a Last-Event-ID / lastEventId value; 400 when it is not a token we issue."""
    if raw is None or not raw.strip():
        return None
    if len(raw) > _MAX_TOKEN_CHARS:
        raise BadRequest(f"Last-Event-ID is not a resume token: {len(raw)} characters is too long")
    try:
        token = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest(
            f'Last-Event-ID is not a resume token (expected {{"_data": "..."}}): {shown(raw)}'
        ) from None
    try:
        engine().position(token)
    except BadRequest as exc:
        raise BadRequest(f"Last-Event-ID is not a valid resume token: {exc.message}") from None
    return token


def _check_ws_handshake(environ: dict) -> None:
    if environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        raise BadRequest("a WebSocket handshake needs HTTP/1.1")
    version = environ.get("HTTP_SEC_WEBSOCKET_VERSION", "")
    if version not in _WS_VERSIONS:
        exc = BadRequest(f"unsupported Sec-WebSocket-Version '{version}'; use 13")
        exc.headers = {"Sec-WebSocket-Version": ", ".join(_WS_VERSIONS)}
        raise exc
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        ok = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        ok = False
    if not ok:
        raise BadRequest("Sec-WebSocket-Key must be 16 bytes in base64")
    if "changefeed.websocket_accept" not in environ:
        raise BadRequest("this server cannot upgrade to WebSocket here (run it with gunicorn.conf.py)")


def stream(coll: str, uri: str):
    environ = request.environ
    websocket = is_websocket_handshake(environ)
    wants_sse = "text/event-stream" in request.headers.get("Accept", "")
    if websocket and request.method != "GET":
        raise BadRequest("a WebSocket handshake must be a GET request")
    if not websocket and not wants_sse:
        find_stream(engine().get_collection(coll), uri)  # 404 for an unknown stream first
        raise BadRequest(
            "Change Stream requires WebSocket or SSE: send either 'Upgrade: websocket' "
            "or 'Accept: text/event-stream'"
        )
    if websocket:
        _check_ws_handshake(environ)
        token = _resume_token(request.args.get("lastEventId"))
    else:
        token = _resume_token(request.headers.get("Last-Event-ID") or request.args.get("lastEventId"))
    grant = security.grant(coll)
    query_vars = pipelines.query_variables(request.args.items(multi=True))
    server_vars = pipelines.server_variables(g.user, grant.read_filter)
    before = flag_arg("fullDocumentBeforeChange")  # the client wants the pre-image in its events
    if request.method == "HEAD":
        # The headers a GET would get, after the same checks, and nothing subscribed: the
        # server sends no body for HEAD, so a subscription would never be served or ended.
        _prepare(coll, uri, grant, query_vars, server_vars, before)
        return Response(iter(()), status=200, mimetype="text/event-stream", headers=SSE_HEADERS)
    if not websocket and hub().closing:
        # A draining worker still reads requests on kept-alive sockets (and for up to 1 s on
        # new ones). Any non-200 would close an EventSource for good, so it gets `end` and
        # retries after `retry:` with its Last-Event-ID, by then on the next server.
        return _draining_sse_response()
    # One read of the definition and one binding serve the access check and the subscription.
    # A stream bound to the account (@user) ends with `revoked` when the account changes, so
    # that the client reconnects under the new binding.
    prepared = _prepare(coll, uri, grant, query_vars, server_vars, before)
    still_allowed = security.access_checker(
        current_app._get_current_object(), account_bound=prepared.account_bound
    )
    owner = ("user", g.user["_id"]) if g.user is not None else ("address", security.client_address())
    sub = hub().subscribe(
        coll,
        uri,
        request.args.get("avars"),
        token,
        "websocket" if websocket else "sse",
        g.user,
        grant=grant,
        owner=owner,
        access_check=still_allowed,
        expires_at=g.auth_expires,
        prepared=prepared,
    )
    sock = environ.get("gunicorn.sock")
    if sock is None or _is_tls(sock):
        sub.close()  # (a raw write would bypass TLS; gunicorn.conf.py refuses certificates)
        raise Unavailable(
            "streams are written to the socket by changefeed's worker: run the server "
            "with gunicorn -c gunicorn.conf.py (make run)"
        )
    stats = environ[STREAM_STATS] = {"events": 0, "bytes": 0}  # for the access line (worker.py)
    if websocket:
        with sub:
            ws = environ["changefeed.websocket_accept"]()
            if ws is None:
                raise BadRequest("WebSocket handshake failed")
            config = current_app.config
            transports.serve_websocket(
                sub, ws, sock, config["WS_MAX_MESSAGE_BYTES"], config["WS_PING_SECONDS"], stats
            )
        return Response(b"")
    try:
        config = current_app.config
        opening = sse.retry(config["SSE_RETRY_MS"]) + sse.comment("connected")
        # pywsgi frames a response without Content-Length as chunked unless the request is HTTP/1.0
        chunked = environ.get("SERVER_PROTOCOL") != "HTTP/1.0"
        body = transports.sse_body(sub, sock, chunked, opening, config["SSE_HEARTBEAT_SECONDS"], stats)
        # A stream's connection is not reused: when the stream ends (redefinition, shutdown)
        # the socket closes too, so a draining worker is not held by idle keep-alive sockets.
        response = Response(body, status=200, mimetype="text/event-stream", headers=SSE_HEADERS)
        response.call_on_close(sub.close)  # also when the body never runs
    except BaseException:
        sub.close()
        raise
    return response


def _prepare(coll: str, uri: str, grant, query_vars: dict, server_vars: dict, before: bool):
    """hub().prepare, with the challenge headers on its 401 (a stream scoped to @user)."""
    try:
        return hub().prepare(coll, uri, request.args.get("avars"), grant, query_vars, server_vars, before)
    except Unauthorized as exc:
        raise security.unauthorized(exc.message) from None


bp.add_url_rule("/<coll>/_streams/<uri>", "stream", stream, methods=["GET"])
bp.add_url_rule("/<coll>/_streams/<uri>", "stream_ws", stream, methods=["GET"], websocket=True)


def _draining_sse_response() -> Response:
    body = sse.retry(current_app.config["SSE_RETRY_MS"]) + transports.encode(
        end_message("shutdown"), transports.SSE_PLAIN
    )
    return Response(body, status=200, mimetype="text/event-stream", headers=SSE_HEADERS)


def _is_tls(sock) -> bool:
    """gunicorn's certfile mode wraps sockets in gevent's SSLSocket (not a subclass of the
    standard library's): both are TLS."""
    return isinstance(sock, ssl.SSLSocket) or "SSL" in type(sock).__name__
