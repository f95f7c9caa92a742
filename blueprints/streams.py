"""Change streams over SSE and WebSocket on one URL: `GET /<coll>/_streams/<uri>`.

Everything that can fail (auth, unknown stream, bad avars, bad Last-Event-ID, bad
handshake) is decided before the 200 or the 101 goes out, so a client never gets an
open, silent stream. The view is registered twice, once with `websocket=True`, because
Werkzeug routes a WebSocket handshake only to such rules (stack-probe §1.2, trap 1).
"""

from __future__ import annotations

import base64
import json
import logging
import socket as pysocket
import ssl
import struct
import time

import gevent
from flask import Blueprint, Response, current_app, g, request

from services import sse
from services.errors import BadRequest
from services.query import shown
from services.hub import (
    SSE_CHUNKED,
    SSE_PLAIN,
    WEBSOCKET,
    WS_PING,
    Control,
    Subscription,
    chunk,
    end_control,
    find_stream,
)

from . import security
from .common import engine, hub, json_response
from .ws_reader import Close, MessageTooBig, Ping, WebSocketReadError, read_client_frames

log = logging.getLogger(__name__)
bp = Blueprint("streams", __name__)

_WS_VERSIONS = ("13", "8", "7")
_MAX_TOKEN_CHARS = 1024  # tokens we issue are ~45 characters (MongoDB's a few hundred)
_OPCODE_PING = 0x9


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
            out.append({"uri": stream["uri"], "url": f"{base}/{coll}/_streams/{stream['uri']}",
                        "stages": stream.get("stages", [])})
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
        raise BadRequest(f"Last-Event-ID is not a resume token (expected {{\"_data\": \"...\"}}): {shown(raw)}") from None
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
    if request.method == "HEAD":
        # The headers a GET would get, after the same checks, and nothing subscribed: the
        # server sends no body for HEAD, so a subscription would never be served or ended.
        hub().prepare(coll, uri, request.args.get("avars"), grant)
        return Response(iter(()), status=200, mimetype="text/event-stream", headers=SSE_HEADERS)
    if not websocket and hub().closing:
        # A draining worker still reads requests on kept-alive sockets (and for up to 1 s on
        # new ones). Any non-200 would close an EventSource for good, so it gets `end` and
        # retries after `retry:` with its Last-Event-ID, by then on the next server.
        return _draining_sse_response()
    still_allowed = security.access_checker(current_app._get_current_object())
    owner = ("user", g.user["_id"]) if g.user is not None else ("address", security.client_address())
    sub = hub().subscribe(coll, uri, request.args.get("avars"), token,
                          "websocket" if websocket else "sse", g.user, grant=grant, owner=owner)
    sub.client.access_check = still_allowed
    if g.auth_expires is not None:
        delay = max(0.0, g.auth_expires - time.time())
        sub.expiry = gevent.spawn_later(delay, sub.client.end, "expired", "the token expired")
    if websocket:
        return _serve_websocket(sub, environ)
    return _sse_response(sub, environ)


bp.add_url_rule("/<coll>/_streams/<uri>", "stream", stream, methods=["GET"])
bp.add_url_rule("/<coll>/_streams/<uri>", "stream_ws", stream, methods=["GET"], websocket=True)


def _watch_for_hangup(environ: dict, sub: Subscription):
    """End the client as soon as its socket closes (stack-probe §2: ~1 ms, not 2×heartbeat)."""
    sock = environ.get("gunicorn.sock")
    if sock is None:
        return None
    raw = getattr(sock, "_sock", sock)
    try:
        watcher = gevent.get_hub().loop.io(sock.fileno(), 1)
    except (OSError, ValueError):
        return None

    def on_readable():
        try:
            data = raw.recv(1, pysocket.MSG_PEEK | pysocket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        watcher.stop()
        if not data:
            sub.client.end("gone")

    watcher.start(on_readable)
    return watcher


def _draining_sse_response() -> Response:
    body = sse.retry(current_app.config["SSE_RETRY_MS"]) + end_control("shutdown").sse
    return Response(body, status=200, mimetype="text/event-stream", headers=SSE_HEADERS)


def _sse_response(sub: Subscription, environ: dict) -> Response:
    config = current_app.config
    heartbeat = config["SSE_HEARTBEAT_SECONDS"]
    opening = sse.retry(config["SSE_RETRY_MS"]) + sse.comment("connected")
    hangup: list = []  # the hang-up watcher, started when the body starts
    sock = environ.get("gunicorn.sock")
    if sock is not None:
        # A peer that accepts no byte for this long is gone; its greenlet must not wait forever.
        sock.settimeout(max(30.0, 2 * heartbeat))

    handler = environ.get("changefeed.handler")
    direct = handler is not None and sock is not None and not _is_tls(sock)

    def cleanup() -> None:
        """Stop watching the socket and unsubscribe; runs once the response is closed,
        whether or not its body ever ran (a libev watcher left on a closed descriptor
        aborts the whole worker)."""
        while hangup:
            hangup.pop().stop()
        sub.close()

    def generate():
        try:
            watcher = _watch_for_hangup(environ, sub)
            if watcher is not None:
                hangup.append(watcher)
            yield opening
            if direct:
                # The headers and the opening are on the wire now: write events straight to
                # the socket from here on (the server only adds the final chunk when we return).
                try:
                    chunked = handler.response_use_chunked
                    mode = SSE_CHUNKED if chunked else SSE_PLAIN
                    hb = sse.comment("hb")
                    sub.write_directly(sock, mode, chunk(hb) if chunked else hb, heartbeat)
                except OSError:
                    pass
                return
            for batch in sub.items(heartbeat):
                if not batch:
                    yield sse.comment("hb")
                    continue
                last = batch[-1]
                if isinstance(last, Control) and last.terminal:
                    if last.cause == "gone":
                        return
                    yield b"".join(item.sse for item in batch)
                    return
                yield b"".join(item.sse for item in batch)
        finally:
            cleanup()

    # A stream's connection is not reused: when the stream ends (redefinition, shutdown)
    # the socket closes too, so a draining worker is not held by idle keep-alive sockets.
    response = Response(generate(), status=200, mimetype="text/event-stream", headers=SSE_HEADERS)
    response.call_on_close(cleanup)
    return response


def _serve_websocket(sub: Subscription, environ: dict) -> Response:
    ping_seconds = current_app.config["WS_PING_SECONDS"]
    ws = environ["changefeed.websocket_accept"]()
    if ws is None:
        sub.close()
        raise BadRequest("WebSocket handshake failed")

    limit = current_app.config["WS_MAX_MESSAGE_BYTES"]

    def read_until_closed():
        # Client messages are ignored (never buffered); pings are answered; a message over
        # WS_MAX_MESSAGE_BYTES ends the connection with 1009, a protocol error with 1002.
        try:
            for frame in read_client_frames(ws.raw_read, limit):
                if isinstance(frame, Ping):
                    ws.send_frame(frame.payload, ws.OPCODE_PONG)
                elif isinstance(frame, Close):
                    sub.client.end("closed")
                    return
        except MessageTooBig:
            sub.client.end("too_big", f"message larger than {limit} bytes")
            return
        except WebSocketReadError as exc:
            sub.client.end("protocol", exc.reason)
            return
        except Exception:
            pass
        sub.client.end("gone")

    reader = gevent.spawn(read_until_closed)
    sock = environ.get("gunicorn.sock")
    try:
        if sock is not None and not _is_tls(sock):
            # gevent-websocket's own writes (pong replies) join the client's ordered stream,
            # so they never land in the middle of a partly sent event frame.
            ws.raw_write = sub.client.write_ordered
            sub.write_directly(sock, WEBSOCKET, WS_PING, ping_seconds)
            ws.closed = True
            return Response(b"")
        for batch in sub.items(ping_seconds):
            if not batch:
                ws.send_frame(b"", _OPCODE_PING)
                continue
            for item in batch:
                if isinstance(item, Control) and item.terminal:
                    if not ws.closed and item.cause != "gone":
                        _close_websocket(ws, item.ws_code, item.reason)
                    return Response(b"")
                ws.send(item.ws)
    except Exception as exc:  # the peer vanished mid-write
        log.debug("websocket ended: %s", exc)
    finally:
        reader.kill(block=False)
        sub.close()
        if not ws.closed:
            _close_websocket(ws, 1000, "")
    return Response(b"")


def _close_websocket(ws, code: int, reason: str) -> None:
    """Send a close frame with a status code (gevent-websocket's close() drops the code)."""
    payload = struct.pack("!H", code) + reason.encode("utf-8")[:120]
    try:
        ws.send_frame(payload, ws.OPCODE_CLOSE)
    except Exception:
        pass
    ws.closed = True


def _is_tls(sock) -> bool:
    """Raw writes would bypass TLS: gunicorn's certfile mode wraps sockets in (gevent) SSLSocket."""
    return isinstance(sock, ssl.SSLSocket) or "SSL" in type(sock).__name__
