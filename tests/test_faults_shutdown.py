"""SIGTERM ends a busy worker fast and clean (issue 12, item 5), live through gunicorn.conf.py.

Before: one client POSTing in a loop over a kept-alive connection held the worker for
gunicorn's whole graceful_timeout (10 s), and was then cut off mid-request; an idle
kept-alive socket was held until its keep-alive timeout (5 s). Now a draining worker
answers every request with `Connection: close` and closes the connection after it, closes
idle kept-alive sockets at once (FIN, then it reads and drops whatever the client still
sends, so a request racing the close gets a clean end of stream, never a reset), ends
every stream (`event:end` / close 1001), and exits as soon as its connections are gone.

Everything runs on raw sockets in gevent greenlets (the suite is monkey-patched), only to
127.0.0.1, with every loop bounded in count and time.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import signal
import socket
import struct
import time

import gevent
import pytest
import requests
from gevent.pool import Pool

from .conftest import ADMIN, ADMIN_HEADER

pytestmark = pytest.mark.live

SSE_STREAMS = 500
WS_STREAMS = 10
EXIT_BOUND_SECONDS = 5.0  # the target is 2 s; looser so 2 loaded cores do not flake
STREAMS = {"streams": [{"uri": "all", "stages": []}]}


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        pytest.skip(f"needs {needed} open files (ulimit -n)")


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_head(sock: socket.socket, buf: bytes = b"", deadline: float | None = None) -> tuple[bytes, bytes]:
    """The response head (status line and headers) and the bytes after it."""
    deadline = deadline or time.monotonic() + 10
    for _ in range(10_000):
        if b"\r\n\r\n" in buf:
            head, rest = buf.split(b"\r\n\r\n", 1)
            return head, rest
        if time.monotonic() > deadline:
            break
        part = sock.recv(65536)
        if not part:
            raise EOFError(buf)
        buf += part
    raise TimeoutError(buf)


def _headers(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), fields


def _read_to_eof(sock: socket.socket, buf: bytes, deadline: float) -> tuple[bytes, str]:
    """Everything until the server closes: (bytes, 'eof' | 'reset' | 'timeout')."""
    for _ in range(100_000):
        left = deadline - time.monotonic()
        if left <= 0:
            return buf, "timeout"
        sock.settimeout(left)
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            return buf, "reset"
        except TimeoutError:
            return buf, "timeout"
        if not part:
            return buf, "eof"
        buf += part
    return buf, "timeout"


# --------------------------------------------------------------------------- the clients


def _open_sse(port: int, path: str) -> tuple[socket.socket, bytes]:
    sock = _connect(port)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {ADMIN_HEADER}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    head, rest = _read_head(sock)
    status, fields = _headers(head)
    assert status == 200 and fields.get("transfer-encoding") == "chunked", head
    deadline = time.monotonic() + 10
    while b"connected" not in rest and time.monotonic() < deadline:
        part = sock.recv(65536)
        assert part, "the stream ended before it opened"
        rest += part
    assert b"connected" in rest
    return sock, rest


def _sse_outcome(sock: socket.socket, buf: bytes, deadline: float) -> str:
    """'ok' when the stream got `event:end` with reason shutdown and a clean chunked end."""
    data, how = _read_to_eof(sock, buf, deadline)
    sock.close()
    if how != "eof":
        return how
    at = data.find(b"event:end\ndata:")
    if at < 0:
        return "no end event"
    reason = json.loads(data[at + len(b"event:end\ndata:") :].split(b"\n", 1)[0]).get("reason")
    if reason != "shutdown":
        return f"reason {reason}"
    if not data.endswith(b"0\r\n\r\n"):
        return "truncated chunked body"
    return "ok"


def _open_ws(port: int, path: str) -> tuple[socket.socket, bytes]:
    sock = _connect(port)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {ADMIN_HEADER}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head, rest = _read_head(sock)
    assert _headers(head)[0] == 101, head
    return sock, rest


def _ws_close_code(data: bytes) -> int | None:
    """The code of the first close frame among unmasked server frames."""
    i = 0
    for _ in range(100_000):
        if i + 2 > len(data):
            return None
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n = struct.unpack("!H", data[i : i + 2])[0]
            i += 2
        elif n == 127:
            n = struct.unpack("!Q", data[i : i + 8])[0]
            i += 8
        if opcode == 0x8:
            return struct.unpack("!H", data[i : i + 2])[0] if n >= 2 else None
        i += n
    return None


def _ws_outcome(sock: socket.socket, buf: bytes, deadline: float) -> int | str:
    data, how = _read_to_eof(sock, buf, deadline)
    sock.close()
    code = _ws_close_code(data)
    return code if code is not None else how


class KeepAliveWriter:
    """POSTs documents in a loop over one kept-alive HTTP/1.1 connection and records how
    the connection ended: never a reset, and never a response cut off."""

    def __init__(self, port: int, coll: str, max_requests: int = 200_000, max_seconds: float = 30.0):
        self.port, self.coll = port, coll
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.ok = 0  # complete 201 responses
        self.outcome = "running"
        self.last_connection_header = None
        self.greenlet = gevent.spawn(self._run)

    def _request(self, n: int) -> bytes:
        body = json.dumps({"n": n}).encode()
        return (
            f"POST /{self.coll} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {ADMIN_HEADER}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def _run(self) -> None:
        sock = _connect(self.port)
        deadline = time.monotonic() + self.max_seconds
        try:
            for n in range(self.max_requests):
                if time.monotonic() > deadline:
                    self.outcome = "time bound reached"
                    return
                try:
                    sock.sendall(self._request(n))
                except (BrokenPipeError, ConnectionResetError) as exc:
                    self.outcome = f"reset while sending: {exc!r}"
                    return
                try:
                    first = sock.recv(65536)
                except ConnectionResetError as exc:
                    self.outcome = f"reset mid-request: {exc!r}"
                    return
                if not first:
                    self.outcome = "closed between requests"  # a clean close: retry elsewhere
                    return
                try:
                    head, rest = _read_head(sock, first)
                    status, fields = _headers(head)
                    length = int(fields.get("content-length", "0"))
                    for _ in range(10_000):
                        if len(rest) >= length:
                            break
                        part = sock.recv(65536)
                        if not part:
                            raise EOFError(rest)
                        rest += part
                except ConnectionResetError as exc:
                    self.outcome = f"reset mid-response: {exc!r}"
                    return
                except (EOFError, TimeoutError) as exc:
                    self.outcome = f"response cut off: {exc!r}"
                    return
                if status != 201:
                    self.outcome = f"status {status}: {head!r}"
                    return
                self.ok += 1
                self.last_connection_header = fields.get("connection")
                if self.last_connection_header == "close":
                    # the server closes after this response: a clean end of stream
                    _, how = _read_to_eof(sock, rest[length:], time.monotonic() + 5)
                    self.outcome = f"connection: close, then {how}"
                    return
            self.outcome = "count bound reached"
        finally:
            sock.close()


def _open_many(open_one, port: int, path: str, count: int, concurrency: int = 25) -> list:
    pool = Pool(concurrency)
    jobs = [pool.spawn(open_one, port, path) for _ in range(count)]
    pool.join(timeout=120)
    assert all(job.successful() for job in jobs), next(job.exception for job in jobs if not job.successful())
    return [job.value for job in jobs]


def _wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        gevent.sleep(interval)
    return predicate()


# --------------------------------------------------------------------------- the tests


def test_sigterm_with_500_streams_and_a_keepalive_writer_exits_fast_and_clean(live_factory):
    _raise_fd_limit(3 * (SSE_STREAMS + WS_STREAMS) + 200)  # both ends here, the server's too
    server = live_factory()
    base, port = server.url, server.port
    assert requests.put(f"{base}/feed", auth=ADMIN, json=STREAMS, timeout=10).status_code == 201
    assert requests.put(f"{base}/writes", auth=ADMIN, json={}, timeout=10).status_code == 201
    sse = _open_many(_open_sse, port, "/feed/_streams/all", SSE_STREAMS)
    ws = _open_many(_open_ws, port, "/feed/_streams/all", WS_STREAMS)
    assert _wait_for(lambda: server.status()["clients"] == SSE_STREAMS + WS_STREAMS)
    writer = KeepAliveWriter(port, "writes")
    assert _wait_for(lambda: writer.ok >= 20 or writer.greenlet.dead), writer.outcome
    assert writer.outcome == "running"

    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    deadline = t0 + 15
    sse_jobs = [gevent.spawn(_sse_outcome, sock, buf, deadline) for sock, buf in sse]
    ws_jobs = [gevent.spawn(_ws_outcome, sock, buf, deadline) for sock, buf in ws]
    code = server.proc.wait(15)
    elapsed = time.monotonic() - t0
    print(f"\nSIGTERM -> master exit: {elapsed:.2f} s ({SSE_STREAMS} SSE + {WS_STREAMS} WebSocket streams)")
    gevent.joinall(sse_jobs + ws_jobs + [writer.greenlet], timeout=max(1.0, deadline - time.monotonic()))
    print(f"writer: {writer.ok} requests, {writer.outcome}")

    assert code == 0, server.read_log()[-3000:]
    assert elapsed < EXIT_BOUND_SECONDS, f"{elapsed:.2f} s"
    sse_results = [job.value for job in sse_jobs]
    assert sse_results == ["ok"] * SSE_STREAMS, {r: sse_results.count(r) for r in set(sse_results)}
    assert [job.value for job in ws_jobs] == [1001] * WS_STREAMS
    # its last request got a whole response saying Connection: close, then a clean end of
    # stream; or it was between requests and saw a clean close: never a reset
    assert writer.outcome in ("connection: close, then eof", "closed between requests"), writer.outcome
    if writer.outcome == "closed between requests":
        print("the writer was between requests when its connection closed (allowed)")
    else:
        assert writer.last_connection_header == "close"
    # a request that got no answer was not done either, so retrying it is safe: every
    # document in the store is one the writer got a 201 for
    again = live_factory(server.data_dir)
    size = requests.get(f"{again.url}/writes/_size", auth=ADMIN, timeout=10).json()
    assert size == {"_size": writer.ok}, (size, writer.ok)


def _kept_alive(port: int) -> socket.socket:
    """A connection that had one complete request and now waits for the next."""
    sock = _connect(port)
    sock.sendall(b"GET /_health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, rest = _read_head(sock)
    status, fields = _headers(head)
    assert status == 200 and fields.get("connection") != "close"
    length = int(fields["content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    return sock


def test_an_idle_keepalive_connection_is_closed_at_once_and_never_reset(live_factory):
    server = live_factory()
    idle = _kept_alive(server.port)
    late = _kept_alive(server.port)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    data, how = _read_to_eof(idle, b"", t0 + 10)
    closed_after = time.monotonic() - t0
    print(f"\nidle kept-alive socket closed {closed_after:.2f} s after SIGTERM")
    assert (data, how) == (b"", "eof")
    assert closed_after < 1.5  # was the keep-alive timeout (5 s)
    # A client that sends its next request just as the server closes must see a clean end
    # of stream (which it may retry), not a reset: the server reads and drops those bytes.
    # (Or, if the request won the race, a whole response saying Connection: close.)
    late.sendall(b"POST /writes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}")
    gevent.sleep(0.2)
    data, how = _read_to_eof(late, b"", time.monotonic() + 5)
    assert how == "eof", (how, data)
    if data:
        head, body = data.split(b"\r\n\r\n", 1)
        fields = _headers(head)[1]
        assert fields.get("connection") == "close" and len(body) == int(fields["content-length"]), data
    late.close()
    idle.close()
    assert server.proc.wait(10) == 0
    print(f"master exit: {time.monotonic() - t0:.2f} s")
    assert time.monotonic() - t0 < EXIT_BOUND_SECONDS


def test_a_request_arriving_while_draining_is_answered_then_the_connection_closes(live_factory):
    """A request whose head was on its way when the worker started draining is still
    served, with `Connection: close`, and the connection then closes. A stream request gets
    the 200 + `end` an EventSource retries after (any other status would stop it for good),
    a WebSocket handshake a 503."""
    server = live_factory()
    assert requests.put(f"{server.url}/feed", auth=ADMIN, json=STREAMS, timeout=10).status_code == 201
    health, stream, handshake = _connect(server.port), _connect(server.port), _connect(server.port)
    health.sendall(b"GET /_health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    stream_head = f"GET /feed/_streams/all HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {ADMIN_HEADER}\r\n"
    for sock in (stream, handshake):
        sock.sendall(stream_head.encode())
    gevent.sleep(0.3)  # the server has the request lines and waits for the rest of the heads
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    gevent.sleep(0.3)  # draining
    health.sendall(b"\r\n")
    stream.sendall(b"Accept: text/event-stream\r\n\r\n")
    handshake.sendall(
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    responses = []
    for sock, expected in ((health, 200), (stream, 200), (handshake, 503)):
        data, how = _read_to_eof(sock, b"", time.monotonic() + 10)
        sock.close()
        assert how == "eof" and b"\r\n\r\n" in data, (how, data)
        head, body = data.split(b"\r\n\r\n", 1)
        status, fields = _headers(head)
        assert status == expected and fields.get("connection") == "close", head
        responses.append((fields, body))
    closed_after = time.monotonic() - t0
    (_, health_body), (stream_fields, stream_body), _ = responses
    assert json.loads(health_body)
    assert stream_fields["content-type"].startswith("text/event-stream")
    assert stream_body.startswith(b"retry:3000\n") and b"event:end\n" in stream_body
    assert json.loads(stream_body.split(b"data:")[1].split(b"\n")[0])["reason"] == "shutdown"
    assert b"id:" not in stream_body  # the client keeps the Last-Event-ID it had
    assert closed_after < 2.0
    assert server.proc.wait(10) == 0
