"""The gunicorn worker: gevent's pywsgi server with gevent-websocket, the app deciding first.

The stock GeventWebSocketWorker answers every handshake with 101 before the app runs, so
a wrong password gets 101 and a close instead of 401, and it drops gunicorn's access log
(docs/stack-notes.md §1). Here a handshake runs the Flask app like any request; the app calls
`environ["changefeed.websocket_accept"]()` only after auth, the stream lookup and every
other check passed, and that call writes the 101 and returns gevent-websocket's
WebSocket. Until then any error is an ordinary HTTP response.
"""

from __future__ import annotations

import re
import time

import gevent
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler
from werkzeug.exceptions import ClientDisconnected

from services import config as _settings

# `access%5Ftoken` is `access_token` to the app too, so the encoded name is hidden as well.
_SECRET_PARAMS = re.compile(r"(?i)((?:^|[?&;])(?:access|%61ccess)?(?:_|%5f)?(?:token|%74oken)=)[^&;\s'\"]*")
# Anything shaped like a JWT (header.payload.signature, base64url), wherever it appears.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def scrub(text: str) -> str:
    """Hide token values in a request line, query string or error message (logs never show tokens)."""
    return _JWT.sub("***", _SECRET_PARAMS.sub(r"\1***", text))


KEEPALIVE_SECONDS = 5.0
_CONF = _settings.load()
# A client has this long to send its request line and headers. Each read may wait
# KEEPALIVE_SECONDS, so without an overall deadline a client sending one byte every few
# seconds ("slowloris") would hold its connection for as long as it likes.
REQUEST_HEAD_SECONDS = _CONF["REQUEST_HEAD_SECONDS"]
# ... and this long, from the end of the head, to send its body (16 MiB at most, see
# MAX_CONTENT_LENGTH): a body sent a byte at a time would otherwise hold the request.
REQUEST_BODY_SECONDS = _CONF["REQUEST_BODY_SECONDS"]
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110 §5.1)
_DIGITS = re.compile(r"[0-9]+")


class _SlowRequest(BaseException):
    """The request head (or body) did not arrive in time. A BaseException, like the
    gevent.Timeout that raises it, so that pywsgi's handling of client errors, which would
    log a traceback, lets it through to Handler.handle_one_request."""


class _DeadlineInput:
    """`wsgi.input` that must be read before a deadline; a read past it is a 400."""

    def __init__(self, inner, deadline: float):
        self._inner, self._deadline = inner, deadline

    def _timed(self, fn, *args):
        left = self._deadline - time.monotonic()
        if left > 0:
            try:
                with gevent.Timeout(left, _SlowRequest):
                    return fn(*args)
            except _SlowRequest:
                pass
        raise ClientDisconnected(f"the request body did not arrive within {REQUEST_BODY_SECONDS:.0f} s")

    def read(self, *args):
        return self._timed(self._inner.read, *args)

    def readline(self, *args):
        return self._timed(self._inner.readline, *args)

    def readlines(self, *args):
        return self._timed(self._inner.readlines, *args)

    def __iter__(self):
        while True:
            line = self.readline()
            if not line:
                return
            yield line


class Handler(WebSocketHandler, PyWSGIHandler):
    """pywsgi handler that upgrades to WebSocket only when the app says so."""

    def handle(self):
        # pywsgi waits for the next request on a kept-alive socket forever, which holds a
        # stopping worker for its whole graceful_timeout; gunicorn's keepalive is 5 s.
        self.socket.settimeout(KEEPALIVE_SECONDS)
        return super().handle()

    def handle_one_request(self):
        self._head_timer = gevent.Timeout(REQUEST_HEAD_SECONDS, _SlowRequest)
        self._head_timer.start()
        try:
            return super().handle_one_request()
        except _SlowRequest:
            self.close_connection = True
            return None  # too slow to say what it wants: close, without a response
        finally:
            self._head_timer.close()

    def MessageClass(self, *args):
        message = super().MessageClass(*args)
        # the framing headers as sent: pywsgi drops Content-Length when it sees chunked
        self._framing = (message.get_all("content-length") or [], message.get_all("transfer-encoding") or [])
        self._bad_names = [name for name in message.keys() if not _TOKEN.fullmatch(name)]
        if getattr(message, "defects", None):  # e.g. a line that is no "name: value" header
            self._bad_names.append(type(message.defects[0]).__name__)
        return message

    def read_request(self, raw_requestline):
        """Parse the head, then refuse ambiguous framing: a front proxy and this server
        could read the body's length differently (request smuggling)."""
        self._framing, self._bad_names = ([], []), []
        try:
            result = super().read_request(raw_requestline)
        except ValueError:
            if any(not _DIGITS.fullmatch(v.strip()) for v in self._framing[0]):
                raise ValueError("Content-Length must be a whole number of digits") from None
            raise
        finally:
            self._head_timer.cancel()  # the head is in (or refused): the deadline is met
        if self._bad_names:
            # 'Content-Length : 5' is no Content-Length here, but could be one to a proxy
            raise ValueError(f"malformed header ({self._bad_names[0][:40]!r})")
        lengths, encodings = self._framing
        if any(not _DIGITS.fullmatch(v.strip()) for v in lengths):
            raise ValueError("Content-Length must be a whole number of digits")
        if len({v.strip() for v in lengths}) > 1:
            raise ValueError("several different Content-Length headers")
        if encodings and lengths:
            raise ValueError("both Content-Length and Transfer-Encoding")
        if len(encodings) > 1 or (encodings and encodings[0].strip().lower() != "chunked"):
            raise ValueError("unsupported Transfer-Encoding (only one 'chunked' is accepted)")
        return result

    def log_request(self):
        if getattr(self, "requestline", None):
            self.requestline = scrub(self.requestline)
        if self.environ is None:  # the request was refused before an environ existed
            return
        self.environ["QUERY_STRING"] = scrub(self.environ.get("QUERY_STRING", ""))
        self.environ["RAW_URI"] = scrub(self.environ.get("RAW_URI", ""))
        self.environ["PATH_INFO"] = scrub(self.environ.get("PATH_INFO", ""))  # a token pasted into a path
        PyWSGIHandler.log_request(self)

    def log_error(self, msg, *args):
        # pywsgi's messages about invalid requests quote the raw request line (and its query)
        try:
            text = msg % args if args else msg
        except Exception:
            text = f"{msg!r} {args!r}"
        super().log_error(scrub(str(text)))

    def get_environ(self):
        env = super().get_environ()
        env["wsgi.input"] = _DeadlineInput(env["wsgi.input"], time.monotonic() + REQUEST_BODY_SECONDS)
        return env

    def run_application(self):
        upgrade = self.environ.get("HTTP_UPGRADE", "").lower()
        connection = self.environ.get("HTTP_CONNECTION", "").lower()
        if "websocket" not in upgrade or "upgrade" not in connection:
            return pywsgi.WSGIHandler.run_application(self)
        self._upgraded = False
        self.environ["changefeed.websocket_accept"] = self._accept_websocket
        self.result = self.application(self.environ, self._start_response_unless_upgraded)
        if not self._upgraded:
            self.process_result()
            return
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self.result = None
            websocket = getattr(self, "websocket", None)
            if websocket is not None and not websocket.closed:
                websocket.close()
            self.close_connection = True

    def _accept_websocket(self):
        self.upgrade_websocket()
        websocket = getattr(self, "websocket", None)
        if websocket is None:
            return None
        self.write(b"")  # sends the 101 and its headers
        self.socket.settimeout(None)  # a WebSocket may be quiet for long; pings find dead peers
        self._upgraded = True
        return websocket

    def _start_response_unless_upgraded(self, status, headers, exc_info=None):
        if self._upgraded:
            return lambda data: None  # the socket speaks WebSocket now; drop the HTTP body
        return self.start_response(status, headers, exc_info)


class Worker(GeventPyWSGIWorker):
    wsgi_handler = Handler
