"""Delivery to sockets: the hub's messages as bytes on the wire, one sink per subscriber.

There are three wire forms: SSE over a chunked HTTP/1.1 response, SSE over an HTTP/1.0
response (plain bytes until the connection closes), and WebSocket text frames. Each
message is encoded once per form (cached on the message, and on a batch for its joined
bytes), however many subscribers get it.

`SocketSink` is the one sink. While its subscriber has nothing queued it is *attached*
(`Subscriber.attach`): the watcher's greenlet calls `write_now`, which sends the batch's
bytes with one non-blocking `send` on the OS socket, without a greenlet switch per
subscriber. That direct write is what lets one worker deliver an event to 10,000 clients
quickly. When the peer takes only part of it, the rest stays in the sink's `tail`, the
sink detaches, and `serve` (the request's greenlet) sends the tail and then the queued
messages with gevent's cooperative `sendall` before attaching again. Writes to a socket
therefore never interleave: the watcher writes only while attached, `serve` only while
detached, and neither yields between checking and writing.

TLS is not served: a raw `send` would bypass it, and gunicorn.conf.py refuses to start
with a certificate (terminate TLS in a proxy in front).
"""

from __future__ import annotations

import socket as pysocket
import struct
from collections import deque
from typing import Any

import gevent

from services import sse
from services.hub import Batch, Message, Subscriber

from .ws_reader import (
    OPCODE_CLOSE,
    OPCODE_PING,
    OPCODE_PONG,
    Close,
    MessageTooBig,
    Ping,
    WebSocketReadError,
    read_client_frames,
)

SSE_PLAIN, SSE_CHUNKED, WEBSOCKET = "sse", "sse-chunked", "ws"  # wire forms (keys of Message.wire)
OVERFLOW_GRACE_SECONDS = 10.0  # an overflowed client's last chance to take its end frame

# The WebSocket close code of each end reason (RFC 6455 §7.4; 4404 is ours: stream gone).
CLOSE_CODES = {
    "shutdown": 1001,
    "removed": 4404,
    "overflow": 1008,
    "revoked": 1008,
    "expired": 1008,
    "error": 1011,
    "gone": 1000,
    "closed": 1000,
    "too_big": 1009,
    "protocol": 1002,
    "invalid_data": 1007,
}
# The SSE event name of each end reason: `end` when the client should reconnect (or stop,
# for a removed stream), the reason itself when the client must act on it first.
_SSE_END_EVENTS = {"removed": "end", "shutdown": "end", "overflow": "end", "gone": "end"}


def chunk(data: bytes) -> bytes:
    """HTTP/1.1 chunked framing, the bytes the server's own chunked writer would send."""
    return b"%X\r\n%s\r\n" % (len(data), data)


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One unmasked, final WebSocket frame (RFC 6455 §5.2), as a server sends it."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 126)) + struct.pack("!H", n)
    else:
        header = bytes((0x80 | opcode, 127)) + struct.pack("!Q", n)
    return header + payload


def ws_close_frame(code: int, reason: str) -> bytes:
    return ws_frame(struct.pack("!H", code) + reason.encode("utf-8")[:120], OPCODE_CLOSE)


WS_PING = ws_frame(b"", OPCODE_PING)


def _sse(message: Message) -> bytes:
    if message.kind == "end":
        return sse.event(message.data, event=_SSE_END_EVENTS.get(message.reason, message.reason))
    return sse.event(message.data, event=message.kind, id=message.id)


def _websocket(message: Message) -> bytes:
    """A text frame of the message's JSON with its resume token first, as `_id` (where
    MongoDB's own change event keeps it): a WebSocket client reconnects with the last `_id`
    it got as `?lastEventId=`, the SSE client's `id:`."""
    if message.kind == "end":
        return ws_close_frame(CLOSE_CODES.get(message.reason, 1011), message.text)
    data = message.data
    if message.id is not None and data.startswith("{"):
        data = '{"_id":' + message.id + ("}" if data == "{}" else "," + data[1:])
    return ws_frame(data.encode())


def encode(message: Message, form: str) -> bytes:
    """The message in one wire form, encoded on first use and cached on the message."""
    data = message.wire.get(form)
    if data is None:
        if form == SSE_CHUNKED:  # the plain form is not kept for it: one copy per form in use
            plain = message.wire.get(SSE_PLAIN)
            data = chunk(plain if plain is not None else _sse(message))
        elif form == SSE_PLAIN:
            data = _sse(message)
        else:
            data = _websocket(message)
        message.wire[form] = data
    return data


def encode_all(items: list[Message], form: str) -> bytes:
    return b"".join([encode(m, form) for m in items])


def encode_batch(batch: Batch, form: str) -> bytes:
    """A batch's messages joined in one wire form, cached on the batch (every subscriber of
    a watcher gets the same batch)."""
    data = batch.wire.get(form)
    if data is None:
        items = batch.items
        data = encode(items[0], form) if len(items) == 1 else encode_all(items, form)
        batch.wire[form] = data
    return data


class SocketSink:
    """Writes one subscriber's messages to its socket, in one wire form."""

    __slots__ = (
        "sub",
        "sock",
        "raw",
        "form",
        "tail",
        "heartbeat",
        "interval",
        "_grace",
        "stats",
        "events",
        "sent",
    )

    def __init__(
        self,
        sub: Subscriber,
        sock: Any,
        form: str,
        heartbeat: bytes,
        interval: float,
        stats: dict | None = None,
    ):
        self.sub = sub
        self.sock = sock  # gevent's socket: cooperative sendall
        self.raw = getattr(sock, "_sock", sock)  # the OS-level socket (non-blocking)
        self.form = form
        self.tail: deque[bytes | memoryview] = deque()  # bytes a direct write could not send yet
        self.heartbeat = heartbeat  # sent after `interval` seconds without a message
        self.interval = interval
        self._grace: gevent.Greenlet | None = None
        # events and bytes handed to the socket, copied to `stats` (the access line's) at the end
        self.stats = stats
        self.events = 0
        self.sent = 0
        sub.on_end = self._on_end

    # -- the hub's side: never blocks, never yields --

    def write_now(self, batch: Batch) -> None:
        # The hot path of a fan-out: one dict lookup and one send per subscriber.
        data = batch.wire.get(self.form) or encode_batch(batch, self.form)
        self.events += len(batch.items)
        self.sent += len(data)
        self._send_now(data)

    def send_control(self, frame: bytes) -> None:
        """A frame of the transport's own (a pong) in the same ordered stream: never in the
        middle of another frame. Counted against the queue bound like messages: a client
        that sends pings and never reads the pongs is ended, not buffered for."""
        if self.sub.sink is self:
            self._send_now(frame)
        elif self.sub.ended is None:
            if len(self.tail) >= self.sub.limit:
                self.sub.end("overflow")
                return
            self.tail.append(frame)
            self.sub.wake.set()

    def _send_now(self, data: bytes) -> None:
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.sub.detach()
            self.sub.end("gone")
            return
        if sent < len(data):
            # a view, not a copy: the bytes are shared by every subscriber of the watcher
            self.tail.append(memoryview(data)[sent:])
            self.sub.detach()

    def _on_end(self, reason: str) -> None:
        """An ended client may not be reading at all (it fell behind, or it stopped reading
        a quiet stream before being revoked or drained): `serve` can be stuck in a write
        that never completes. After OVERFLOW_GRACE_SECONDS its socket is shut down, which
        ends that write, so the connection and its greenlet go away. `serve` cancels this
        when it finishes in time."""
        if self._grace is None:
            self._grace = gevent.spawn_later(OVERFLOW_GRACE_SECONDS, _shut_down, self.raw)

    # -- the transport's side: the request's greenlet --

    def serve(self) -> None:
        """Send catch-up, then queued and live messages, until the subscriber ends; then its
        end (unless the peer is gone). The response's headers are already on the wire."""
        sub, sock, form = self.sub, self.sock, self.form
        try:
            for replayed in sub.catch_up():
                data = encode_all(replayed, form)
                self.events += len(replayed)
                self.sent += len(data)
                sock.sendall(data)
            while True:
                if self.tail:
                    data = b"".join(self.tail)
                    self.tail.clear()
                    sock.sendall(data)
                    continue
                items = sub.take()
                if items:
                    data = encode_all(items, form)
                    self.events += len(items)
                    self.sent += len(data)
                    sock.sendall(data)
                    continue
                ended = sub.ended
                if ended is not None:
                    sub.sink = None
                    if ended.reason != "gone":
                        sock.sendall(encode(ended, form))
                    return
                sub.attach(self)  # no yield since take() came back empty
                sub.wake.clear()
                if not sub.wake.wait(self.interval) and sub.sink is self and sub.ended is None:
                    self._send_now(self.heartbeat)
        finally:
            sub.sink = None
            sub.on_end = None
            if self._grace is not None:
                self._grace.kill(block=False)
            if self.stats is not None:
                self.stats["events"], self.stats["bytes"] = self.events, self.sent


class HangUps:
    """Subscribers whose peers hung up, ended a few at a time.

    Ending a subscriber wakes its greenlet, which then tears the connection down (about a
    tenth of a millisecond, the access log line included). gevent runs woken greenlets in
    the order they were woken: when 10,000 clients closed at once, every teardown ran before
    anything else, and the worker stalled for seconds (bench/robustness.py, storm). Here
    at most BATCH are woken per turn of the event loop, which polls the sockets in between,
    so an established client's event waits for one batch, not for all of them.
    """

    BATCH = 32

    def __init__(self) -> None:
        self.queue: deque[Subscriber] = deque()
        self.greenlet: gevent.Greenlet | None = None

    def add(self, sub: Subscriber) -> None:
        self.queue.append(sub)
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            queue = self.queue
            while queue:
                for _ in range(min(self.BATCH, len(queue))):
                    queue.popleft().end("gone")
                gevent.sleep(0.001)  # a timer, not sleep(0): the loop polls I/O before it fires
        finally:
            self.greenlet = None


hang_ups = HangUps()


def _shut_down(sock: Any) -> None:
    try:
        sock.shutdown(pysocket.SHUT_RDWR)
    except OSError:
        pass  # already closed: the transport finished in time


def watch_for_hangup(sock: Any, sub: Subscriber) -> Any:
    """End the subscriber as soon as its socket closes (about a millisecond after the FIN,
    not a heartbeat interval later, when a write would fail). Returns the libev watcher,
    which the caller must stop before the socket closes (a watcher left on a closed
    descriptor aborts the worker)."""
    raw = getattr(sock, "_sock", sock)
    try:
        watcher = gevent.get_hub().loop.io(sock.fileno(), 1)
    except (OSError, ValueError):
        return None

    def on_readable() -> None:
        try:
            data = raw.recv(1, pysocket.MSG_PEEK | pysocket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        watcher.stop()
        if not data:
            hang_ups.add(sub)

    watcher.start(on_readable)
    return watcher


def sse_body(
    sub: Subscriber, sock: Any, chunked: bool, opening: bytes, interval: float, stats: dict | None = None
) -> Any:
    """The body of an SSE response: `opening` through the server (which sends the headers
    with it), then everything else straight to the socket. Unsubscribes when it ends."""
    form = SSE_CHUNKED if chunked else SSE_PLAIN
    heartbeat = sse.comment("hb")
    sink = SocketSink(sub, sock, form, chunk(heartbeat) if chunked else heartbeat, interval, stats)
    # A peer that accepts no byte for this long is gone; its greenlet must not wait forever.
    sock.settimeout(max(30.0, 2 * interval))

    def generate() -> Any:
        with sub:
            hangup = watch_for_hangup(sock, sub)  # started here: stopped in this finally
            try:
                yield opening
                sink.serve()
            except OSError:
                pass  # the peer went away mid-write
            finally:
                if hangup is not None:
                    hangup.stop()
        # returning lets the server send the final chunk

    return generate()


def serve_websocket(
    sub: Subscriber, ws: Any, sock: Any, max_message: int, ping_seconds: float, stats: dict | None = None
) -> None:
    """Serve an upgraded WebSocket until the subscriber ends; the 101 is on the wire.

    Client messages are ignored (never buffered); pings are answered with pongs in the
    outgoing order; a message over `max_message` bytes ends the connection with 1009, a
    protocol error with 1002, a close frame with the reply to it.
    """
    sink = SocketSink(sub, sock, WEBSOCKET, WS_PING, ping_seconds, stats)

    def read_until_closed() -> None:
        try:
            for frame in read_client_frames(ws.raw_read, max_message):
                if isinstance(frame, Ping):
                    sink.send_control(ws_frame(frame.payload, OPCODE_PONG))
                elif isinstance(frame, Close):
                    sub.end("closed")
        except MessageTooBig:
            sub.end("too_big", f"message larger than {max_message} bytes")
        except WebSocketReadError as exc:
            sub.end("invalid_data" if exc.code == 1007 else "protocol", exc.reason)
        except OSError:
            pass  # the peer is gone, as at the end of its data
        except BaseException:
            sub.end("gone")  # killed, or a fault: the subscriber must not wait on
            raise
        if sub.ended is None:
            hang_ups.add(sub)  # at the end of its data, as an SSE client's hang-up

    reader = gevent.spawn(read_until_closed)
    try:
        sink.serve()
    except OSError:
        pass  # the peer went away mid-write
    finally:
        reader.kill(block=False)
        ws.closed = True  # every frame, the close included, was ours: gevent-websocket sends none
