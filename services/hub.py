"""The stream hub: one watcher per stream key per process, fan-out, replay and resume.

A stream key is (collection, stream uri, resolved pipeline). The first client of a key
starts its watcher: a greenlet that reads the engine's change stream, encodes each event
once (SSE frame bytes and WebSocket text) and hands the same objects to every client of
the key, whatever its transport or user. The watcher keeps the last
`STREAM_REPLAY_BUFFER` events so that a reconnecting client usually resumes from memory;
older history comes from the engine through a private cursor. It stops
`STREAM_LINGER_SECONDS` after its last client leaves.

Delivery guarantees, per client:
- change order: one greenlet produces every client's events, catch-up comes before live;
- no gap and no duplicate on resume: the join happens without a yield between reading the
  watcher's position and registering the client, and live events that arrive during an
  engine catch-up wait behind it;
- bounded memory: a client more than `STREAM_CLIENT_QUEUE` events behind is ended
  (reason `overflow`); it resumes from its last event id and loses nothing.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import gevent.lock
from bson import json_util

from . import pipeline as pipelines
from . import extjson, sse
from .errors import BadRequest, HistoryLost, NotFound, TooManyRequests, Unavailable
from .permissions import Grant
from .storage import Change, Engine, MetaChange

log = logging.getLogger(__name__)

RELAXED = json_util.RELAXED_JSON_OPTIONS
# Event fields that are the driver's or the server's, not the user's (issue 3, item 2).
_COALESCE_MAX = 500  # events a watcher sends to a client in one write, at most
OVERFLOW_GRACE_SECONDS = 10.0  # an overflowed client's last chance to take its end frame
# A resume from far back goes out in batches of at most this many events or bytes, and at
# most CATCH_UP_CONCURRENCY clients of a worker read and encode a batch at the same time.
CATCH_UP_BATCH_EVENTS = 500
CATCH_UP_BATCH_BYTES = 1 << 20
CATCH_UP_YIELD_BYTES = 256 << 10
CATCH_UP_CONCURRENCY = 4
_INTERNAL_FIELDS = ("_id", "ns", "clusterTime", "txnNumber", "lsid", "collectionUUID")


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


# How a client is written to directly: plain SSE (HTTP/1.0), chunked SSE, WebSocket frames.
SSE_PLAIN, SSE_CHUNKED, WEBSOCKET = 0, 1, 2
WS_PING = ws_frame(b"", 0x9)


@dataclass(frozen=True)
class Delivery:
    """One event, encoded once for every client of a watcher."""

    position: Any
    sse: bytes
    ws: str
    sse_chunk: bytes = b""  # `sse` in chunked framing, for clients written to directly
    ws_bytes: bytes = b""  # `ws` as a WebSocket text frame

    def frame(self, mode: int) -> bytes:
        return (self.sse, self.sse_chunk, self.ws_bytes)[mode]


@dataclass(frozen=True)
class Control:
    """An in-band message about the stream itself (reset, error, end)."""

    kind: str  # "reset" | "error" | "end"
    sse: bytes
    ws: str | None
    terminal: bool = False
    ws_code: int = 1000
    reason: str = ""
    cause: str = ""  # for "end": the END_REASONS key

    def frame(self, mode: int) -> bytes:
        if mode == WEBSOCKET:
            if self.terminal:
                return ws_frame(struct.pack("!H", self.ws_code) + self.reason.encode()[:120], 0x8)
            return ws_frame((self.ws or "").encode())
        return chunk(self.sse) if mode == SSE_CHUNKED else self.sse


@dataclass(frozen=True)
class _Remainder:
    """The unsent tail of a frame a direct write could only partly send; it goes out first."""

    data: bytes | memoryview

    def frame(self, mode: int) -> bytes | memoryview:
        return self.data


# Why the hub ended a client, with the WebSocket close code that says so (issue 3, item 3).
END_REASONS = {
    "shutdown": (1001, "server shutting down"),
    "removed": (4404, "stream removed or redefined"),
    "overflow": (1008, "client fell behind; reconnect with lastEventId to resume"),
    "revoked": (1008, "access withdrawn"),
    "expired": (1008, "token expired"),
    "error": (1011, "internal error"),
    "gone": (1000, "client went away"),
    "closed": (1000, ""),  # the client sent a close frame: this is the reply
    "too_big": (1009, "message too big"),
    "protocol": (1002, "protocol error"),
}


def payload(event: dict) -> dict:
    """The event as clients see it: the user's fields, without token, ns or clusterTime."""
    return {k: v for k, v in event.items() if k not in _INTERNAL_FIELDS}


def token_text(token: dict) -> str:
    """The token as compact JSON, the SSE `id:` and what Last-Event-ID sends back."""
    data = token.get("_data")
    if len(token) == 1 and isinstance(data, str) and data.isalnum():
        return '{"_data":"' + data + '"}'
    return json.dumps(token, separators=(",", ":"))


def encode(change: Change, visibility: Any = None) -> Delivery | Control:
    """Encode one change once: SSE frame bytes and WebSocket text.

    `visibility` (services.hidden.Visibility, from the permission's projectResponse) hides
    fields of the event's documents and update description.
    """
    tid = token_text(change.token)
    if change.error is not None:
        data = json.dumps({"error": change.error, "id": change.token})
        return Control("error", sse.event(data, event="error", id=tid), data)
    event = change.event if visibility is None else visibility.project_event(change.event)
    data = extjson.dumps(payload(event))
    frame = sse.event(data, event="change", id=tid)
    return Delivery(change.position, frame, data, chunk(frame), ws_frame(data.encode()))


def end_control(reason: str, message: str = "") -> Control:
    code, text = END_REASONS.get(reason, (1011, reason))
    event_name = {"removed": "end", "shutdown": "end", "overflow": "end", "gone": "end"}.get(reason, reason)
    data = json.dumps({"reason": reason, "message": message or text})
    return Control("end", sse.event(data, event=event_name), data, terminal=True, ws_code=code,
                   reason=message or text, cause=reason)


class Client:
    """One subscriber (SSE or WebSocket): a bounded queue of deliveries, woken on push."""

    __slots__ = ("watcher", "transport", "limit", "user", "pending", "wake", "ended", "skip_through",
                 "catch_up_from", "catch_up_upto", "access_check", "raw", "mode", "direct", "owner",
                 "__weakref__")

    def __init__(self, watcher: Watcher, transport: str, limit: int, user: Any = None, owner: Any = None):
        self.watcher = watcher
        self.owner = owner  # whose limit of open streams this client counts against
        self.transport = transport
        self.limit = limit
        self.user = user
        self.pending: deque = deque()
        self.wake = gevent.event.Event()
        self.ended: Control | None = None
        self.skip_through: Any = None  # positions at or before this were already seen
        self.catch_up_from: Any = None  # resume token to replay from the engine first
        self.catch_up_upto: Any = None  # ... up to this position, where the live stream began
        self.access_check: Any = None  # callable: does the client still have access?

        # Direct writes (fanout-probe, design B): while `direct` is set and nothing is
        # pending, push() sends the pre-framed bytes straight to the socket, without a
        # greenlet switch. A write that would block leaves its tail in `pending`, clears
        # `direct` and wakes the transport, which drains cooperatively, then sets it again.
        self.raw: Any = None  # the OS-level socket (non-blocking)
        self.mode = SSE_CHUNKED
        self.direct = False

    def push(self, item: Delivery | Control) -> None:
        if self.ended is not None:
            return
        if isinstance(item, Delivery) and self.skip_through is not None:
            if item.position <= self.skip_through:
                return
            self.skip_through = None  # events come in order: every later one is new too
        if self.direct:
            self._send_now(item.frame(self.mode))
            return
        if len(self.pending) >= self.limit:
            self.end("overflow")
            return
        self.pending.append(item)
        self.wake.set()

    def push_many(self, items: list, joined: dict) -> None:
        """Push several items; a direct client gets them in one write (`joined` caches it)."""
        if self.ended is not None:
            return
        if self.direct and self.skip_through is None:
            data = joined.get(self.mode)
            if data is None:
                data = joined[self.mode] = b"".join(item.frame(self.mode) for item in items)
            self._send_now(data)
            return
        for item in items:
            self.push(item)

    def write_ordered(self, data: bytes) -> None:
        """Bytes from elsewhere (gevent-websocket's pongs) join the same ordered stream;
        they count against the queue bound like events (a client that sends pings and never
        reads the pongs is ended, not buffered for)."""
        if self.direct:
            self._send_now(data)
        elif self.ended is None:
            if len(self.pending) >= self.limit:
                self.end("overflow")
                return
            self.pending.append(_Remainder(data))
            self.wake.set()

    def _send_now(self, data: bytes) -> None:
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.direct = False
            self.end("gone")
            return
        if sent < len(data):
            self.direct = False
            # a view, not a copy: the frame bytes are shared by every client of the watcher
            self.pending.append(_Remainder(memoryview(data)[sent:]))
            self.wake.set()

    def end(self, reason: str, message: str = "") -> None:
        """End this client after what it already has; the transport closes with `reason`.

        A client that fell behind (`overflow`) may not be reading at all: its transport can
        be stuck in a write that never completes. After OVERFLOW_GRACE_SECONDS its socket is
        shut down, which ends that write, so the connection and its greenlet go away.
        """
        if self.ended is None:
            self.ended = end_control(reason, message)
            self.wake.set()
            if reason == "overflow" and self.raw is not None:
                gevent.spawn_later(OVERFLOW_GRACE_SECONDS, _shut_down, self.raw)


def _shut_down(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: the transport finished in time


class Watcher:
    """The change-stream loop of one stream key, shared by all its clients in this process."""

    def __init__(self, hub: Hub, key: tuple, coll: str, uri: str, definition: str, pipeline: Any,
                 visibility: Any = None):
        self.hub = hub
        self.key = key
        self.coll = coll
        self.uri = uri
        self.definition = definition
        self.pipeline = pipeline
        self.visibility = visibility
        self.clients: set[Client] = set()
        self.buffer: deque[Delivery | Control] = deque(maxlen=max(hub.replay_size, 1))
        self.stream = hub.engine.watch(coll, pipeline)
        self.buffer_from = self.stream.position  # the buffer holds every event after this
        self.idle_since = time.monotonic()
        self.stopped = False
        self.events = 0
        self.greenlet = gevent.spawn(self._run)

    @property
    def position(self) -> Any:
        return self.stream.position

    def _run(self) -> None:
        backoff = 0.1
        while not self.stopped:
            try:
                change = self.stream.try_next(timeout=min(1.0, max(self.hub.linger, 0.05)))
                backoff = 0.1
            except HistoryLost as exc:
                self._broadcast_reset(str(exc))
                continue
            except gevent.GreenletExit:
                raise
            except Exception as exc:
                log.exception("watcher %s/%s failed; reopening", self.coll, self.uri)
                self._broadcast(Control("error", sse.event(json.dumps({"error": str(exc)}), event="error"),
                                        json.dumps({"error": str(exc)})))
                gevent.sleep(backoff + random.random() * backoff)
                backoff = min(backoff * 2, 10.0)
                self._reopen()
                continue
            if change is None:
                if getattr(self.stream, "ended", False):  # invalidated: collection dropped or renamed
                    self.end_clients("removed", getattr(self.stream, "end_reason", "")
                                     or f"collection '{self.coll}' was dropped or renamed")
                    self.stop()
                    return
                if not self.clients and time.monotonic() - self.idle_since >= self.hub.linger:
                    self.stop()
                continue
            # Coalesce: whatever else is ready right now goes out in the same write per client.
            changes = [change]
            try:
                while len(changes) < _COALESCE_MAX:
                    more = self.stream.try_next(timeout=0)
                    if more is None:
                        break
                    changes.append(more)
            except Exception:  # raised again, and handled, by the next try_next above
                pass
            items = []
            for change in changes:
                self.events += 1
                item = encode(change, self.visibility)
                if isinstance(item, Delivery) and self.hub.replay_size:
                    if len(self.buffer) == self.buffer.maxlen:
                        oldest = self.buffer[0]
                        if isinstance(oldest, Delivery):
                            self.buffer_from = oldest.position
                    self.buffer.append(item)
                elif isinstance(item, Control):
                    log.warning("stream %s/%s: pipeline error: %s", self.coll, self.uri, change.error)
                items.append(item)
            self._broadcast_many(items)

    def _reopen(self) -> None:
        try:
            old = self.stream
            self.stream = self.hub.engine.watch(self.coll, self.pipeline, self.hub.engine_token(old.position))
        except HistoryLost as exc:
            self._broadcast_reset(str(exc))
        except Exception:
            log.exception("reopening %s/%s failed", self.coll, self.uri)

    def _broadcast_reset(self, reason: str) -> None:
        """History is gone under us: start again from now and tell every client in-band."""
        self.stream = self.hub.engine.watch(self.coll, self.pipeline)
        self.buffer.clear()
        self.buffer_from = self.stream.position
        self._broadcast(reset_control(reason, self.hub.engine.current_token()))

    def _broadcast(self, item: Delivery | Control) -> None:
        for client in list(self.clients):
            client.push(item)

    def _broadcast_many(self, items: list) -> None:
        if len(items) == 1:
            self._broadcast(items[0])
            return
        joined: dict[int, bytes] = {}
        for client in list(self.clients):
            client.push_many(items, joined)

    def stop(self) -> None:
        """Stop the loop and end the remaining clients (they were told why by the caller)."""
        self.stopped = True
        if self.hub.watchers.get(self.key) is self:
            del self.hub.watchers[self.key]
        self.stream.close()
        if gevent.getcurrent() is not self.greenlet:
            self.greenlet.kill(block=False)

    def end_clients(self, reason: str, message: str = "") -> None:
        for client in list(self.clients):
            client.end(reason, message)


def reset_control(reason: str, token: dict) -> Control:
    """`event:reset`: the resume point is gone; the stream goes on from `token` (now)."""
    data = json.dumps({"reason": reason, "resumeFrom": token})
    return Control("reset", sse.event(data, event="reset", id=token_text(token)), data)


class Subscription:
    """What a transport consumes: catch-up first, then live deliveries, then the end."""

    __slots__ = ("hub", "client", "expiry")

    def __init__(self, hub: Hub, client: Client):
        self.hub = hub
        self.client = client
        self.expiry: gevent.Greenlet | None = None  # ends the client when its token expires

    def items(self, heartbeat: float) -> Iterator[list[Delivery | Control]]:
        """Yield batches of items; an empty batch after `heartbeat` seconds of silence.

        The last batch holds the terminal Control when the hub ends the client.
        """
        client = self.client
        if client.catch_up_from is not None:
            yield from self._catch_up()
        while True:
            if client.pending:
                batch = list(client.pending)
                client.pending.clear()
                yield batch
                continue
            if client.ended is not None:
                yield [client.ended]
                return
            client.wake.clear()
            if not client.pending and client.ended is None:
                if not client.wake.wait(heartbeat):
                    yield []

    def write_directly(self, sock: Any, mode: int, heartbeat: bytes, interval: float) -> None:
        """Serve the client by writing to its socket, once the response headers went out.

        Catch-up and queued items go out through the cooperative `sock.sendall`; once the
        queue is empty the client switches to direct writes from the watcher (push). Returns
        when the client ends, after its end frame (unless the peer is gone).
        """
        client = self.client
        client.raw = getattr(sock, "_sock", sock)
        client.mode = mode
        if client.catch_up_from is not None:
            for batch in self._catch_up():
                sock.sendall(b"".join(item.frame(mode) for item in batch))
        while True:
            if client.pending:
                items = list(client.pending)
                client.pending.clear()
                sock.sendall(b"".join(item.frame(mode) for item in items))
                continue
            if client.ended is not None:
                client.direct = False
                if client.ended.cause != "gone":
                    sock.sendall(client.ended.frame(mode))
                return
            client.direct = True  # no yield between the empty check above and this line
            client.wake.clear()
            if not client.wake.wait(interval) and client.direct and client.ended is None:
                client._send_now(heartbeat)

    def _catch_up(self) -> Iterator[list[Delivery | Control]]:
        """Replay from the engine up to where the client joined the live stream."""
        client, watcher = self.client, self.client.watcher
        token, client.catch_up_from = client.catch_up_from, None
        upto = client.catch_up_upto
        try:
            stream = self.hub.engine.watch(watcher.coll, watcher.pipeline, token)
        except HistoryLost as exc:
            # Live events after `upto` are already queued; start the client's ids there.
            yield [reset_control(str(exc), self.hub.engine_token(upto))]
            return
        try:
            while stream.position < upto and client.ended is None:
                batch: list[Delivery | Control] = []
                size = 0
                # Reading and encoding take turns among clients (CATCH_UP_CONCURRENCY at a
                # time, one batch each): many clients resuming from far back cannot each hold
                # a batch's memory at once, nor the loop; sending is not under the lock.
                with self.hub.catch_ups:
                    while len(batch) < CATCH_UP_BATCH_EVENTS and size < CATCH_UP_BATCH_BYTES:
                        change = stream.try_next(timeout=0)
                        if change is None or change.position > upto:
                            break
                        item = encode(change, watcher.visibility)
                        batch.append(item)
                        size += len(item.sse)
                        if stream.position >= upto:
                            break
                        if size >= CATCH_UP_YIELD_BYTES:
                            gevent.sleep(0)  # a large event took a while: let others run
                if batch:
                    yield batch
                    gevent.sleep(0)  # a resume from far back must not hold the other clients
                elif stream.position < upto:
                    change = stream.try_next(timeout=1.0)  # rows not yet in this process's feed
                    if change is not None and change.position <= upto:
                        yield [encode(change, watcher.visibility)]
        except HistoryLost as exc:
            yield [reset_control(str(exc), self.hub.engine_token(upto))]
        finally:
            stream.close()

    def close(self) -> None:
        self.client.direct = False
        if self.expiry is not None:
            self.expiry.kill(block=False)
        self.hub.unsubscribe(self.client)


class Hub:
    """All watchers and clients of this worker process."""

    def __init__(self, engine: Engine, config: dict):
        self.engine = engine
        self.queue_limit = config["STREAM_CLIENT_QUEUE"]
        self.replay_size = config["STREAM_REPLAY_BUFFER"]
        self.linger = config["STREAM_LINGER_SECONDS"]
        self.max_per_user = config["STREAM_MAX_PER_USER"]
        self.max_per_address = config["STREAM_MAX_PER_ADDRESS"]
        self.max_watchers = config["STREAM_MAX_WATCHERS"]
        self.watchers: dict[tuple, Watcher] = {}
        self.open_by_owner: dict[Any, int] = {}
        self.catch_ups = gevent.lock.BoundedSemaphore(CATCH_UP_CONCURRENCY)
        self.closing = False
        engine.on_meta_change(self._on_meta_change)

    # -- opening --

    def prepare(self, coll: str, uri: str, avars_raw: str | None,
                grant: Grant | None = None) -> tuple[tuple, str, Any]:
        """Find the stream definition and bind its variables; 404/400/403 before any response.

        `grant` is the caller's permission (services.permissions; None: nothing restricted).
        Its readFilter is applied to `fullDocument` before the stream's own stages, as it is
        to GETs; its projectResponse hides fields of every event, and a stream whose own
        stages read one of those fields is refused (403), or its events would be an oracle.
        """
        read_filter = grant.read_filter if grant is not None else None
        visibility = grant.visibility if grant is not None else None
        stage_visibility = grant.stage_visibility if grant is not None else None
        props = self.engine.get_collection(coll)
        definition = find_stream(props, uri)
        stages = list(definition.get("stages", []))
        try:
            avars = pipelines.parse_avars(avars_raw)
            if stage_visibility is not None:
                stage_visibility.check_stages(pipelines.bind_variables(stages, avars))
            if read_filter:
                stages.insert(0, {"$match": read_filter_on_events(read_filter)})
            compiled = pipelines.compile_pipeline(stages, avars)
        except (pipelines.AvarsError, pipelines.VariableError, pipelines.PipelineError) as exc:
            raise BadRequest(str(exc)) from None
        if coll == "users":
            compiled = _WithoutPasswords(compiled)
        resolved = json_util.dumps(compiled.stages if hasattr(compiled, "stages") else definition,
                                   json_options=json_util.CANONICAL_JSON_OPTIONS, sort_keys=False)
        key = (coll, uri, resolved, repr(visibility) if visibility is not None else None)
        return key, json.dumps(definition, sort_keys=True), compiled

    def subscribe(self, coll: str, uri: str, avars_raw: str | None, resume: dict | None,
                  transport: str, user: Any = None, grant: Grant | None = None,
                  owner: Any = None) -> Subscription:
        """Register a client on its stream key, resuming after `resume` when given.

        `owner` is ("user", id) or ("address", ip): whose limit of open streams this one
        counts against (STREAM_MAX_PER_USER / STREAM_MAX_PER_ADDRESS, per worker).
        """
        if self.closing:
            raise Unavailable("server is shutting down; reconnect shortly")
        if owner is not None:
            limit = self.max_per_user if owner[0] == "user" else self.max_per_address
            if self.open_by_owner.get(owner, 0) >= limit:
                who = f"user '{owner[1]}'" if owner[0] == "user" else "this address"
                setting = "STREAM_MAX_PER_USER" if owner[0] == "user" else "STREAM_MAX_PER_ADDRESS"
                raise TooManyRequests(f"{who} already has {limit} open streams on this server ({setting}); "
                                      "close one first")
        key, definition, compiled = self.prepare(coll, uri, avars_raw, grant)
        resume_pos = self.engine.position(resume) if resume is not None else None
        # From here to the registration nothing may yield, so no event slips between.
        watcher = self.watchers.get(key)
        if watcher is None or watcher.stopped:
            if len(self.watchers) >= self.max_watchers:
                raise TooManyRequests(f"this server already serves {self.max_watchers} distinct streams "
                                      "(STREAM_MAX_WATCHERS); try again later")
            watcher = Watcher(self, key, coll, uri, definition, compiled,
                              grant.visibility if grant is not None else None)
            self.watchers[key] = watcher
        client = Client(watcher, transport, self.queue_limit, user, owner)
        live_from = watcher.position
        if resume is not None:
            if resume_pos >= live_from:
                client.skip_through = resume_pos
            elif watcher.buffer_from is not None and resume_pos >= watcher.buffer_from and self.replay_size:
                for item in watcher.buffer:
                    if item.position > resume_pos:
                        client.pending.append(item)
            else:
                client.catch_up_from = resume
                client.catch_up_upto = live_from
                client.skip_through = live_from
        watcher.clients.add(client)
        if owner is not None:
            self.open_by_owner[owner] = self.open_by_owner.get(owner, 0) + 1
        return Subscription(self, client)

    def engine_token(self, position: Any) -> dict:
        token = getattr(self.engine, "token", None)
        return token(position) if token else position

    def unsubscribe(self, client: Client) -> None:
        watcher = client.watcher
        if client not in watcher.clients:
            return  # already done (a transport may close twice)
        watcher.clients.discard(client)
        if client.owner is not None:
            left = self.open_by_owner.get(client.owner, 1) - 1
            if left > 0:
                self.open_by_owner[client.owner] = left
            else:
                self.open_by_owner.pop(client.owner, None)
        if not watcher.clients:
            watcher.idle_since = time.monotonic()
            if self.linger <= 0:
                watcher.stop()

    # -- access --

    def access_changes_from(self, engine: Engine) -> None:
        """Re-check every client's access when users or the ACL change, in any process."""
        engine.on_document_change(self._on_security_change)
        self._recheck_pending = False

    def _on_security_change(self, coll: str, key: Any) -> None:
        if coll not in ("users", "acl") or self._recheck_pending:
            return
        self._recheck_pending = True
        gevent.spawn(self._recheck_access)

    def _recheck_access(self) -> None:
        self._recheck_pending = False
        users_read: dict = {}  # one read per user, however many of its clients are open
        for watcher in list(self.watchers.values()):
            for client in list(watcher.clients):
                check = client.access_check
                if check is None or client.ended is not None:
                    continue
                try:
                    allowed = check(users_read)
                except Exception:
                    log.exception("access re-check failed; ending the client")
                    allowed = False
                if not allowed:
                    client.end("revoked", "access to this stream was withdrawn")

    # -- lifecycle --

    def _on_meta_change(self, change: MetaChange) -> None:
        affected = [w for w in self.watchers.values() if w.coll == change.coll]
        if not affected:
            return
        if change.kind == "drop":
            for watcher in affected:
                watcher.end_clients("removed", f"collection '{change.coll}' was dropped")
                watcher.stop()
            return
        gevent.spawn(self._recheck_definitions, change.coll, affected)

    def _recheck_definitions(self, coll: str, watchers: list[Watcher]) -> None:
        try:
            props = self.engine.get_collection(coll)
        except NotFound:
            props = {}
        for watcher in watchers:
            try:
                current = json.dumps(find_stream(props, watcher.uri), sort_keys=True)
            except NotFound:
                current = None
            if current != watcher.definition:
                watcher.end_clients("removed", f"stream '{watcher.uri}' of '{coll}' was removed or redefined")
                watcher.stop()

    def close_all(self, reason: str = "shutdown") -> None:
        """End every client (SIGTERM drain): SSE responses end cleanly, WebSockets get 1001."""
        self.closing = True
        for watcher in list(self.watchers.values()):
            watcher.end_clients(reason)

    def status(self) -> dict:
        streams = []
        for watcher in self.watchers.values():
            kinds = [c.transport for c in watcher.clients]
            streams.append({
                "collection": watcher.coll, "uri": watcher.uri, "clients": len(kinds),
                "sse": kinds.count("sse"), "websocket": kinds.count("websocket"), "events": watcher.events,
            })
        return {
            "watchers": len(self.watchers),
            "clients": sum(s["clients"] for s in streams),
            "streams": streams,
        }


class _WithoutPasswords:
    """Wraps a users stream's pipeline: password hashes never reach any stage or client."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.stages = getattr(inner, "stages", [])

    def apply(self, event: dict) -> dict | None:
        event = dict(event)
        if isinstance(event.get("fullDocument"), dict):
            event["fullDocument"] = {k: v for k, v in event["fullDocument"].items() if k != "password"}
        desc = event.get("updateDescription")
        if isinstance(desc, dict):
            desc = dict(desc)
            desc["updatedFields"] = {k: v for k, v in (desc.get("updatedFields") or {}).items()
                                     if k != "password" and not k.startswith("password.")}
            desc["removedFields"] = [f for f in desc.get("removedFields") or [] if f != "password"]
            event["updateDescription"] = desc
        return self.inner.apply(event) if self.inner is not None else event


def read_filter_on_events(read_filter: dict) -> dict:
    """Rewrite a document filter to match change events' `fullDocument` (deletes never match)."""
    out: dict = {}
    for key, value in read_filter.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(value, list):
                raise BadRequest(f"readFilter: {key} needs an array")
            out[key] = [read_filter_on_events(v) for v in value]
        elif key.startswith("$"):
            raise BadRequest(f"readFilter: {key} cannot be applied to a stream")
        else:
            out[f"fullDocument.{key}"] = value
    return out


def find_stream(props: dict, uri: str) -> dict:
    """The stream definition named `uri` in collection properties, or 404."""
    for stream in props.get("streams") or []:
        if isinstance(stream, dict) and stream.get("uri") == uri:
            return stream
    raise NotFound("Change Stream does not exist")
