"""The gunicorn worker: gevent's pywsgi server with gevent-websocket, the app deciding first.

The stock GeventWebSocketWorker answers every handshake with 101 before the app runs, so
a wrong password gets 101 and a close instead of 401, and it drops gunicorn's access log
(docs/stack-notes.md §1). Here a handshake runs the Flask app like any request; the app calls
`environ["changefeed.websocket_accept"]()` only after auth, the stream lookup and every
other check passed, and that call writes the 101 and returns gevent-websocket's
WebSocket. Until then any error is an ordinary HTTP response.

Shutdown (SIGTERM) is quick and clean: the worker stops accepting at once, then drains (see
`Drain`): every response says `Connection: close` and its connection closes after it,
kept-alive connections waiting for a next request are closed at once, streams are ended by
gunicorn.conf.py's hook, and the worker exits as soon as its last connection is gone
rather than on a once-a-second poll.
"""

from __future__ import annotations

import functools
import os
import re
import socket as _pysocket
import time

import gevent
from gevent import pywsgi
from gevent.event import Event
from gevent.pool import Pool
from geventwebsocket.handler import WebSocketHandler
from gunicorn.http.wsgi import base_environ
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import VERSION, GeventPyWSGIWorker, PyWSGIHandler
from werkzeug.exceptions import ClientDisconnected

from services import config as _settings
from services.logs import ACCESS_FIELDS

# `access%5Ftoken` is `access_token` to the app too, so the encoded name is hidden as well.
_SECRET_PARAMS = re.compile(r"(?i)((?:^|[?&;])(?:access|%61ccess)?(?:_|%5f)?(?:token|%74oken)=)[^&;\s'\"]*")
# Anything shaped like a JWT (header.payload.signature, base64url), wherever it appears.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def scrub(text: str) -> str:
    """Hide token values in a request line, query string or error message (logs never show tokens)."""
    low = text.lower()
    if "oken" not in low and "eyj" not in low:  # neither pattern can match: most lines
        return text
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
# A draining worker half-closes a kept-alive connection (FIN), then reads and drops whatever
# the client still sends, for at most this long, before it closes the socket: a request
# that crossed the FIN on the wire gets a clean end of stream, which a client may retry on
# a new connection. Closing with unread bytes would send it a reset instead.
DRAIN_LINGER_SECONDS = 1.0
# How often the worker looks at `alive` (set False by gunicorn's SIGTERM handler): gunicorn
# looks once a second, which made every shutdown up to a second slower.
ALIVE_POLL_SECONDS = 0.05
# The access-log atoms log_request fills itself (gunicorn's own, for any other format).
_QUICK_ATOMS = frozenset("hlmUqHsBbfaTDMLp")
_ATOM = re.compile(r"%\(([^)]*)\)")


def _printable(text: str) -> str:
    """`text` with every control character escaped (\\n, \\x1b), for a one-line text log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@functools.lru_cache(maxsize=4)
def _quick_format(fmt: str) -> bool:
    return set(_ATOM.findall(fmt)) <= _QUICK_ATOMS


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110 §5.1)
_DIGITS = re.compile(r"[0-9]+")


class _SlowRequest(BaseException):
    """The request head (or body) did not arrive in time. A BaseException, like the
    gevent.Timeout that raises it, so that pywsgi's handling of client errors, which would
    log a traceback, lets it through to Handler.handle_one_request."""


class _Drained(BaseException):
    """Thrown into a handler waiting for its next request when the worker starts draining.
    A BaseException, like _SlowRequest, so that nothing between the read and
    Handler.read_requestline takes it for an error of its own."""


class Drain:
    """One worker's shutdown state, shared with its handlers (`server.changefeed_drain`).

    `start` (when the worker stops accepting) sets `draining`, which makes every response
    `Connection: close` and every connection close after its current request; it wakes the
    handlers in `idle` (waiting for a next request that has not begun to arrive), which then
    close their connections; and it sets `started`, which gunicorn.conf.py's hook waits on
    to end the open streams.
    """

    def __init__(self) -> None:
        self.draining = False
        self.idle: set[Handler] = set()
        self.started = Event()

    def start(self) -> None:
        self.draining = True
        self.started.set()
        loop = gevent.get_hub().loop
        # All the FINs go out now, without a yield in between. A request that has begun to
        # arrive is left to be read and answered (with Connection: close).
        for handler in list(self.idle):
            if handler.half_close_if_idle():
                loop.run_callback(self._wake, handler)

    def _wake(self, handler: Handler) -> None:
        # Run by the hub, as gevent's own kill and cancel_wait are: the handler is not
        # running, so if it is still in `idle` it is blocked in its read, and the exception
        # lands there (if bytes came first, the handler drops them itself).
        if handler in self.idle:
            self.idle.discard(handler)
            handler.reader.throw(_Drained())


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

    def _drain(self) -> Drain | None:
        return getattr(self.server, "changefeed_drain", None)

    def read_requestline(self):
        """The next request line; "" (close the connection) once the worker drains."""
        drain = self._drain()
        if drain is None:
            return super().read_requestline()
        if drain.draining:
            self._close_gently()
            return ""
        self.reader, self._half_closed = gevent.getcurrent(), False
        drain.idle.add(self)
        try:
            line = super().read_requestline()
        except _Drained:
            line = ""
        finally:
            drain.idle.discard(self)
        if self._half_closed:  # no answer can be sent any more: drop what came
            self._close_gently()
            return ""
        return line

    def half_close_if_idle(self) -> bool:
        """Send the FIN now unless bytes of a next request (or the client's close) are here."""
        raw = getattr(self.socket, "_sock", self.socket)
        if raw is None:
            return False
        try:
            raw.recv(1, _pysocket.MSG_PEEK | _pysocket.MSG_DONTWAIT)
            return False
        except BlockingIOError:
            pass
        except OSError:
            return False
        try:
            raw.shutdown(_pysocket.SHUT_WR)
        except OSError:
            pass
        self._half_closed = True
        return True

    def _close_gently(self) -> None:
        """Half-close, then read and drop until the client closes or DRAIN_LINGER_SECONDS
        pass; `handle` then closes the socket with nothing unread."""
        sock = self.socket
        if sock is None:
            return
        try:
            sock.shutdown(_pysocket.SHUT_WR)
        except OSError:
            pass  # sent already (half_close_if_idle), or the client is gone
        try:
            with gevent.Timeout(DRAIN_LINGER_SECONDS, False):
                for _ in range(100_000):
                    if not sock.recv(65536):
                        break
        except OSError:
            pass

    def start_response(self, status, headers, exc_info=None):
        drain = self._drain()
        if drain is not None and drain.draining and not status.startswith("101"):
            # the client learns that this connection ends with this response
            headers = [(k, v) for k, v in headers if k.lower() != "connection"]
            headers.append(("Connection", "close"))
        return super().start_response(status, headers, exc_info)

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
        log = self.server.log
        fmt = getattr(getattr(log, "cfg", None), "access_log_format", None)
        if not isinstance(fmt, str) or not _quick_format(fmt):
            PyWSGIHandler.log_request(self)
            return
        if not log.access_log_enabled:
            return
        # The line gunicorn's access() would write, without its dictionaries of every request
        # header, response header and environ entry: that made each line cost ~0.3 ms, and
        # 10,000 clients closing at once spent seconds writing the access log.
        env = self.environ
        status = self.status.decode() if isinstance(self.status, bytes) else (self.status or "-")
        seconds = max(0.0, (self.time_finish or 0) - (self.time_start or 0))
        sent = getattr(self, "response_length", None)
        atoms = {
            "h": env.get("REMOTE_ADDR", "-"),
            "l": "-",
            "m": env.get("REQUEST_METHOD"),
            "U": env.get("PATH_INFO"),
            "q": env.get("QUERY_STRING"),
            "H": env.get("SERVER_PROTOCOL"),
            "s": str(status).split(None, 1)[0],
            "B": sent,
            "b": str(sent) if sent is not None else "-",
            "f": env.get("HTTP_REFERER", "-"),
            "a": env.get("HTTP_USER_AGENT", "-"),
            "T": int(seconds),
            "D": int(seconds * 1_000_000),
            "M": int(seconds * 1000),
            "L": f"{seconds:.6f}",
            "p": f"<{os.getpid()}>",
        }
        stream = env.get("changefeed.stream_stats")  # blueprints/streams.py: what a stream sent
        try:
            if _CONF["LOG_FORMAT"] == "json":
                fields = {
                    "remote": atoms["h"],
                    "method": atoms["m"],
                    "path": atoms["U"],
                    "protocol": atoms["H"],
                    "status": atoms["s"],
                    "bytes": sent,
                    "seconds": round(seconds, 6),
                    "user_agent": atoms["a"],
                }
                if stream is not None:
                    fields["events"], fields["stream_bytes"] = stream["events"], stream["bytes"]
                log.access_log.info("", extra={ACCESS_FIELDS: fields})
            else:
                # one line per request, whatever the client sent: control characters (a
                # newline decoded from %0a in a path would start a forged line) are escaped,
                # and '"' as gunicorn's SafeAtoms does
                shown = {k: _printable(v) if isinstance(v, str) else v for k, v in atoms.items()}
                line = fmt % log.atoms_wrapper_class(shown)
                if stream is not None:
                    line += f" events={stream['events']} bytes={stream['bytes']}"
                log.access_log.info("%s", line)
        except Exception:
            log.exception("access log line failed")

    def log_error(self, msg, *args):
        # pywsgi's messages about invalid requests quote the raw request line (and its query)
        try:
            text = msg % args if args else msg
        except Exception:
            text = f"{msg!r} {args!r}"
        text = scrub(str(text))
        log = getattr(self.server, "log", None)
        if _CONF["LOG_FORMAT"] == "json" and log is not None:
            log.warning("%s: %s", self.client_address, text)  # a JSON line, like every other
            return
        super().log_error(text)

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
        try:
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
        finally:
            self._break_websocket_cycles()

    def _break_websocket_cycles(self) -> None:
        """Free the connection's objects by reference counting, not the cyclic GC.

        The accept hook in the environ (a bound method of this handler) and gevent-websocket's
        WebSocket (which holds the handler, its stream and the environ, while the handler and
        the environ hold it) make reference cycles. gunicorn.conf.py tunes the GC so that the
        oldest generation is rarely collected: left as cycles, every WebSocket connection
        kept its handler, socket and buffers (about 10 KB) after it closed.
        """
        self.environ.pop("changefeed.websocket_accept", None)
        websocket = getattr(self, "websocket", None)
        if websocket is not None:
            self.environ["wsgi.websocket"] = None
            self.websocket = None
            websocket.handler = websocket.stream = websocket.environ = None
            websocket.raw_read = websocket.raw_write = None

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


# Connections accepted per turn of the event loop. Each new connection's request runs to its
# first wait (about a millisecond: auth, the stream lookup, the response head) before the
# loop turns again; gevent's default of 100 made every turn 100 ms long while thousands of
# clients (re)connected, and an established client's events waited several turns
# (bench/robustness.py, storm).
ACCEPT_PER_TURN = 8


class Worker(GeventPyWSGIWorker):
    """gunicorn's gevent pywsgi worker with a quick, clean shutdown.

    gunicorn's GeventWorker.run notices SIGTERM on a once-a-second poll, stops accepting,
    then checks every second whether its connections are gone, for up to graceful_timeout;
    meanwhile a kept-alive connection is served as usual, so a client sending requests on
    one held the worker until the timeout killed it mid-request. This run is the same, but
    drains (`Drain`) and returns the moment the last connection is gone.
    """

    wsgi_handler = Handler

    def load_wsgi(self):
        # post_worker_init (gunicorn.conf.py) runs after this and waits on drain.started
        self.drain = Drain()
        super().load_wsgi()

    def run(self):
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for listener in self.sockets:
            listener.setblocking(1)
            environ = base_environ(self.cfg)
            environ.update({"wsgi.multithread": True, "SERVER_SOFTWARE": VERSION})
            server = self.server_class(
                listener,
                application=self.wsgi,
                spawn=Pool(self.worker_connections),
                log=self.log,
                handler_class=self.wsgi_handler,
                environ=environ,
                **ssl_args,
            )
            server.changefeed_drain = self.drain
            server.max_accept = ACCEPT_PER_TURN
            server.start()
            servers.append(server)

        notified = 0.0
        while self.alive:
            if time.monotonic() - notified >= 1.0:
                self.notify()
                notified = time.monotonic()
            gevent.sleep(ALIVE_POLL_SECONDS)

        try:
            for server in servers:
                server.close()  # stop accepting; the master closed its listeners already
            self.drain.start()
            deadline = time.monotonic() + self.cfg.graceful_timeout
            for server in servers:
                while not server.pool.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                    if time.monotonic() >= deadline:
                        self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
                        for each in servers:
                            each.stop(timeout=1)
                        return
                    self.notify()
        except Exception:
            self.log.exception("error while draining the worker")
