"""The stream hub: watchers, subscribers, positions, resume and delivery order.

Plain Python over the engine port: the hub never touches a socket and never frames HTTP
or WebSocket. Transports (blueprints/transports.py) attach a *sink* to a subscriber and
turn its messages into bytes on the wire.

One watcher serves a stream (collection, uri, definition), whoever asks: the first
subscriber starts it, a greenlet that reads the engine's change stream through the stages
every subscriber runs alike and turns each change into one `Message`. What depends on the
subscriber (its bound variables, `$ifvar` choices, notify_when, its permission's readFilter
and projectResponse) is its *view* (services/views.py): subscribers with the same binding
share one, and the watcher's router sends each event only to the views it can match, which
hand their subscribers the same objects, whatever their transport (each wire form is
encoded once per message, by the first transport that needs it, and cached on it). The watcher
keeps the last `STREAM_REPLAY_BUFFER` messages, and at most `STREAM_REPLAY_BYTES` of them
(`Message.size`), so that a reconnecting client usually resumes from memory; older history
comes from the engine through a private cursor. It stops `STREAM_LINGER_SECONDS` after its
last subscriber leaves.

Delivery guarantees, per subscriber:
- change order: one greenlet produces every subscriber's messages, catch-up comes first;
- no gap and no duplicate on resume: the join happens without a yield between reading the
  watcher's position and registering the subscriber, and live messages that arrive during
  an engine catch-up wait behind it;
- never silent: every error of the engine's stream becomes an in-band `error`, `reset`
  or `end` for the subscribers, or a logged retry; the watcher swallows nothing;
- bounded memory: a subscriber more than `STREAM_CLIENT_QUEUE` messages, or
  `STREAM_CLIENT_QUEUE_BYTES` of them, behind is ended (reason `overflow`); it resumes from
  its last event id and loses nothing. (An empty queue takes one batch of any size in
  bytes: an event bigger than the bound still reaches a client that keeps up.)

How a message reaches a subscriber: `Watcher._dispatch` calls `Subscriber.push` for each;
a subscriber whose transport is idle has its sink attached and the message is handed to
`sink.write_now` at once, in the watcher's greenlet (no switch per subscriber); otherwise
it waits in the subscriber's queue until the transport takes it.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
import gevent.event
import gevent.lock
from bson import json_util

from . import metrics
from . import pipeline as pipelines
from .backoff import Backoff
from .errors import HistoryLost, NotFound, TooManyRequests, Unauthorized, Unavailable
from .hidden import Visibility
from .messages import (
    END_REASONS,
    Batch,
    Message,
    change_message,
    end_message,
    error_message,
    payload,
    reset_message,
    token_text,
)
from .permissions import Grant
from .storage import Change, ChangeStream, Engine, MetaChange
from .views import Router, View

__all__ = [
    "END_REASONS",
    "Batch",
    "Hub",
    "Message",
    "Prepared",
    "Sink",
    "Subscriber",
    "Watcher",
    "end_message",
    "error_message",
    "find_stream",
    "payload",
    "reset_message",
    "token_text",
]

log = logging.getLogger(__name__)

COALESCE_MAX = 500  # changes a watcher dispatches together, at most
# A resume from far back goes out in batches of at most this many events or bytes, and at
# most CATCH_UP_CONCURRENCY subscribers of a worker read and encode a batch at the same time.
CATCH_UP_BATCH_EVENTS = 500
CATCH_UP_BATCH_BYTES = 1 << 20
CATCH_UP_YIELD_BYTES = 256 << 10
CATCH_UP_CONCURRENCY = 4


class Sink(Protocol):
    """What a transport attaches to a subscriber while it is idle.

    `write_now` is called from the watcher's greenlet and must not block or yield: it
    writes what the peer takes at once and keeps the rest itself, calling
    `subscriber.detach()` so that later messages queue until the transport has caught up.
    """

    def write_now(self, batch: Batch) -> None: ...


class Subscriber:
    """One client of a stream: its position, a bounded queue, and the sink of its transport.

    Use it as a context manager (`with hub.subscribe(...) as sub:`): leaving the block, by
    any path, undoes the registration.
    """

    __slots__ = (
        "hub",
        "watcher",
        "transport",
        "limit",
        "limit_bytes",
        "pending_bytes",
        "user",
        "owner",
        "pending",
        "wake",
        "ended",
        "position",
        "skip_through",
        "catch_up_from",
        "catch_up_upto",
        "access_check",
        "sink",
        "on_end",
        "expiry",
        "view",
        "position_time",
        "__weakref__",
    )

    def __init__(
        self,
        hub: Hub,
        watcher: Watcher,
        view: View,
        transport: str,
        user: Any = None,
        owner: Any = None,
        access_check: Callable[[dict], bool] | None = None,
    ):
        self.hub = hub
        self.watcher = watcher
        self.view = view  # what its events go through: its binding of the stream (services/views.py)
        self.transport = transport  # "sse" | "websocket", for status
        self.limit = hub.queue_limit
        self.limit_bytes = hub.queue_bytes
        self.pending_bytes = 0  # the sizes of the messages in `pending`
        self.user = user
        self.owner = owner  # whose limit of open streams this one counts against
        self.access_check = access_check  # does the client still have access? (re-checked)
        self.pending: deque[Message] = deque()
        self.wake = gevent.event.Event()
        self.ended: Message | None = None
        self.position: Any = None  # of the last change handed to this subscriber
        self.skip_through: Any = None  # changes at or before this were already seen
        self.catch_up_from: dict | None = None  # resume token to replay from the engine first
        self.catch_up_upto: Any = None  # ... up to this position, where the live stream began
        self.sink: Sink | None = None  # attached while the transport is idle
        self.on_end: Callable[[str], None] | None = None  # the transport's hook, told the reason
        self.expiry: gevent.Greenlet | None = None  # ends the subscriber when its token expires
        self.position_time = time.time()  # about when `position` happened (metrics)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- what the watcher calls --

    def push(self, batch: Batch) -> None:
        """Hand over a batch its view already evaluated (Watcher._send)."""
        if self.ended is not None:
            return
        if self.skip_through is not None:
            kept = [m for m in batch.items if m.kind != "change" or m.position > self.skip_through]
            if not kept:
                return
            if any(m.kind == "change" for m in kept):
                self.skip_through = None  # changes come in order: every later one is new too
            if len(kept) < len(batch.items):
                batch = Batch(kept)
        if batch.position is not None:
            self.position = batch.position
            self.position_time = batch.made
        sink = self.sink
        if sink is not None:
            sink.write_now(batch)
            return
        size = batch.size  # summed once per batch, for every subscriber that gets it
        if len(self.pending) + len(batch.items) > self.limit or (
            self.pending and self.pending_bytes + size > self.limit_bytes
        ):
            self.end("overflow")
            return
        self.pending.extend(batch.items)
        self.pending_bytes += size
        metrics.CLIENT_QUEUE.observe(len(self.pending))
        self.wake.set()

    def end(self, reason: str, text: str = "") -> None:
        """End this subscriber after what it already has; its transport closes with `reason`."""
        if self.ended is None:
            self.ended = end_message(reason, text)
            metrics.DISCONNECTS.labels(reason if reason in END_REASONS else "other").inc()
            self.wake.set()
            if self.on_end is not None:
                self.on_end(reason)

    # -- what the transport calls --

    def take(self) -> list[Message]:
        """Everything queued, in order (the queue is then empty)."""
        items = list(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        return items

    def attach(self, sink: Sink) -> None:
        """Deliver straight to `sink` from now on. Only while nothing is queued: the caller
        checked `take()` came back empty, without a yield since."""
        self.sink = sink

    def detach(self) -> None:
        """Queue messages again (the sink has a backlog of its own); wakes the transport."""
        self.sink = None
        self.wake.set()

    def catch_up(self) -> Iterator[list[Message]]:
        """Replay from the engine up to where the subscriber joined the live stream.

        Nothing to do unless it resumed from before the watcher's replay buffer. A resume
        point the engine no longer has ends in a `reset`, after which the live messages
        (already queued) follow.
        """
        token, self.catch_up_from = self.catch_up_from, None
        if token is None:
            return
        watcher, hub, upto = self.watcher, self.hub, self.catch_up_upto
        try:
            with hub.engine.watch(watcher.coll, watcher.pipeline, token) as stream:
                hub.catch_up_cursors += 1
                try:
                    yield from self._replay(stream, upto)
                finally:
                    hub.catch_up_cursors -= 1
        except HistoryLost as exc:
            metrics.RESETS.labels(metrics.reset_kind(exc.message)).inc()
            yield [reset_message(exc.message, hub.engine.token(upto))]
        except Exception as exc:
            # The history cannot be read now (the database is away): say so and end; the
            # client reconnects with its last id and loses nothing.
            log.warning("catch-up of %s/%s failed: %s", watcher.coll, watcher.uri, exc)
            yield [error_message(f"the stream's history cannot be read now: {exc}")]
            self.end("error", "could not read the stream's history; reconnect to resume")

    def _replay(self, stream: ChangeStream, upto: Any) -> Iterator[list[Message]]:
        view = self.view
        while stream.position < upto and self.ended is None:
            raw: list[Message] = []
            size = 0
            lost: HistoryLost | None = None
            # Reading and encoding take turns among subscribers (CATCH_UP_CONCURRENCY at a
            # time, one batch each): many resuming from far back cannot each hold a batch's
            # memory at once, nor the loop; sending is not under the lock.
            with self.hub.catch_ups:
                while len(raw) < CATCH_UP_BATCH_EVENTS and size < CATCH_UP_BATCH_BYTES:
                    try:
                        change = stream.try_next(timeout=0)
                    except HistoryLost as exc:
                        lost = exc  # what was read before it goes out first
                        break
                    if change is None or change.position > upto:
                        break
                    message = change_message(change)
                    if message is not None:
                        raw.append(message)
                        size += len(message.data)
                    if stream.position >= upto:
                        break
                    if size >= CATCH_UP_YIELD_BYTES:
                        gevent.sleep(0)  # a large event took a while: let others run
                kept = view.evaluate(Batch(raw)) if raw else None  # one evaluation per batch
            if kept is not None:
                yield kept.items
                gevent.sleep(0)  # a resume from far back must not hold the other subscribers
            if lost is not None:
                raise lost
            if not raw and stream.position < upto:
                change = stream.try_next(timeout=1.0)  # rows not yet in this process's feed
                if change is not None and change.position <= upto:
                    message = change_message(change)
                    kept = view.evaluate(Batch([message])) if message is not None else None
                    if kept is not None:
                        yield kept.items
                        gevent.sleep(0)  # as after every batch: the others run in between

    def close(self) -> None:
        """Undo the registration (idempotent)."""
        self.sink = None
        if self.expiry is not None:
            self.expiry.kill(block=False)
            self.expiry = None
        self.hub.unsubscribe(self)


class Watcher:
    """The change-stream loop of one stream, shared by all its subscribers in this process.

    Its engine stream runs only the stages every subscriber runs alike (`pipeline`, None for
    none); `router` holds the subscribers' views (their bindings) and sends each event to
    the ones it can match.
    """

    def __init__(
        self,
        hub: Hub,
        key: tuple,
        coll: str,
        uri: str,
        definition: str,
        pipeline: pipelines.Pipeline | None,
    ):
        self.hub = hub
        self.key = key
        self.coll = coll
        self.uri = uri
        self.definition = definition
        self.pipeline = pipeline
        self.router = Router()
        self.subscribers: set[Subscriber] = set()
        self.buffer: deque[Message] = deque()
        self.buffer_bytes = 0  # the sizes of the messages in `buffer`
        self.stream = hub.engine.watch(coll, pipeline)
        self.buffer_from = self.stream.position  # the buffer holds every change after this
        self.idle_since = time.monotonic()
        self.stopped = False
        self.events = 0
        self.events_metric = metrics.EVENTS.labels(coll, uri)
        self.greenlet = gevent.spawn(self._run)

    @property
    def position(self) -> Any:
        return self.stream.position

    def _run(self) -> None:
        try:
            self._loop()
        except gevent.GreenletExit:
            raise
        except Exception:
            # A fault of the hub itself (not of the stream, which _recover handles): the
            # subscribers must not be left with heartbeats and nothing else.
            log.exception("watcher %s/%s failed; ending its subscribers", self.coll, self.uri)
            self.end_subscribers("error", "the stream failed; reconnect to resume")
            self.stop()

    def _loop(self) -> None:
        backoff = Backoff(0.1, 10.0)
        while not self.stopped:
            changes, fault = self._read()
            if changes:
                self._dispatch(changes)
                backoff.reset()  # progress: a later fault is retried quickly again
            if fault is not None:
                self._recover(fault, backoff)
                continue
            if changes:
                continue
            if self.stream.ended:  # invalidated: the collection was dropped or renamed
                self.end_subscribers(
                    "removed", self.stream.end_reason or f"collection '{self.coll}' was dropped or renamed"
                )
                self.stop()
                return
            if not self.subscribers and time.monotonic() - self.idle_since >= self.hub.linger:
                self.stop()

    def _read(self) -> tuple[list[Change], Exception | None]:
        """The next change, and whatever else is ready right now (dispatched together), or
        nothing after a second. An error ends the read: the changes before it are returned
        with it, so they are delivered before the error is acted on."""
        changes: list[Change] = []
        try:
            change = self.stream.try_next(timeout=min(1.0, max(self.hub.linger, 0.05)))
            while change is not None:
                changes.append(change)
                if len(changes) >= COALESCE_MAX:
                    break
                change = self.stream.try_next(timeout=0)
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            return changes, exc
        return changes, None

    def _recover(self, fault: Exception, backoff: Backoff) -> None:
        """Act on an error of the change stream; every subscriber is told in-band."""
        if isinstance(fault, HistoryLost):
            self._restart(fault.message)
            return
        log.error("watcher %s/%s failed; re-opening it", self.coll, self.uri, exc_info=fault)
        self._dispatch_message(error_message(str(fault)))
        gevent.sleep(backoff.next())
        lost = self._open(resume=True)
        if lost is not None:
            self._restart(lost)

    def _restart(self, reason: str) -> None:
        """The stream's position left the retained history: go on from now, and say so."""
        self._open(resume=False)
        self.buffer.clear()
        self.buffer_bytes = 0
        self.buffer_from = self.stream.position
        metrics.RESETS.labels(metrics.reset_kind(reason)).inc()
        self._dispatch_message(reset_message(reason, self.hub.engine.token(self.stream.position)))

    def _open(self, resume: bool) -> str | None:
        """Replace the stream: after its last position (resume) or from now, retried with
        backoff until it opens or the watcher stops. Returns why, when the resume point is
        gone (the stream is then left as it was)."""
        backoff = Backoff(0.1, 10.0)
        while not self.stopped:
            old = self.stream
            try:
                token = self.hub.engine.token(old.position) if resume else None
                new = self.hub.engine.watch(self.coll, self.pipeline, token)
            except HistoryLost as exc:
                return exc.message
            except Exception as exc:
                log.warning("re-opening %s/%s failed: %s; retrying", self.coll, self.uri, exc)
                gevent.sleep(backoff.next())
                continue
            old.close()
            self.stream = new
            return None
        return None

    def _dispatch(self, changes: list[Change]) -> None:
        items: list[Message] = []
        replay = self.hub.replay_size and self.hub.replay_bytes
        self.events_metric.inc(len(changes))
        self.events += len(changes)
        for change in changes:
            message = change_message(change)
            if message is None:
                continue
            if message.kind == "change":
                if replay:
                    self._keep(message)
            else:
                log.warning("stream %s/%s: pipeline error: %s", self.coll, self.uri, change.error)
            items.append(message)
        if items:
            self._send(Batch(items))

    def _keep(self, message: Message) -> None:
        """Add a change to the replay buffer, dropping the oldest beyond its bounds (the
        buffer then holds every change after `buffer_from`)."""
        buffer = self.buffer
        buffer.append(message)
        self.buffer_bytes += message.size
        max_events, max_bytes = self.hub.replay_size, self.hub.replay_bytes
        while buffer and (len(buffer) > max_events or self.buffer_bytes > max_bytes):
            dropped = buffer.popleft()
            self.buffer_bytes -= dropped.size
            self.buffer_from = dropped.position

    def _dispatch_message(self, message: Message) -> None:
        self._send(Batch([message]))

    def _send(self, batch: Batch) -> None:
        delivered = 0
        for view, out in list(self.router.route(batch)):
            subs = list(view.subscribers)
            for sub in subs:
                sub.push(out)
            delivered += len(subs) * len(out.items)
        if delivered:
            metrics.DELIVERIES.inc(delivered)
            metrics.observe_lag(m.event for m in batch.items if m.kind == "change")

    def stop(self) -> None:
        """Stop the loop and release the stream (subscribers were told why by the caller)."""
        self.stopped = True
        if self.hub.watchers.get(self.key) is self:
            del self.hub.watchers[self.key]
        self.stream.close()
        if gevent.getcurrent() is not self.greenlet:
            self.greenlet.kill(block=False)

    def end_subscribers(self, reason: str, text: str = "") -> None:
        for sub in list(self.subscribers):
            sub.end(reason, text)


@dataclass(frozen=True)
class Prepared:
    """A stream opened for one caller, before anything is registered (Hub.prepare).

    `key` names its watcher (collection, uri, definition as text: a redefinition is another
    stream) and `pipeline` the stages that watcher runs for everyone; `view_key`, `own`,
    `visibility` and `notify` are the caller's binding (services/views.py): its readFilter
    and bound stages, projectResponse and notify_when. `account_bound`: its stages read the
    caller's account (@user).
    """

    key: tuple
    definition: str
    pipeline: pipelines.Pipeline | None
    view_key: str
    own: pipelines.Pipeline | None = None
    visibility: Visibility | None = None
    notify: pipelines.NotifyFilter | None = None
    read_filter: dict | None = None
    before: bool = False
    account_bound: bool = False

    def make_view(self) -> View:
        return View(self.view_key, self.own, self.visibility, self.notify, self.read_filter, self.before)


class Hub:
    """All watchers and subscribers of this worker process."""

    def __init__(self, engine: Engine, config: dict):
        self.engine = engine
        self.queue_limit = config["STREAM_CLIENT_QUEUE"]
        self.queue_bytes = config.get("STREAM_CLIENT_QUEUE_BYTES", 16 << 20)
        self.replay_size = config["STREAM_REPLAY_BUFFER"]
        self.replay_bytes = config.get("STREAM_REPLAY_BYTES", 8 << 20)
        self.linger = config["STREAM_LINGER_SECONDS"]
        self.max_per_user = config["STREAM_MAX_PER_USER"]
        self.max_per_address = config["STREAM_MAX_PER_ADDRESS"]
        self.max_watchers = config["STREAM_MAX_WATCHERS"]
        self.max_bindings = config.get("STREAM_MAX_BINDINGS", 20_000)
        self.watchers: dict[tuple, Watcher] = {}
        self.open_by_owner: dict[Any, int] = {}
        self.catch_ups = gevent.lock.BoundedSemaphore(CATCH_UP_CONCURRENCY)
        self.catch_up_cursors = 0  # engine streams open for resumes from far back
        self.closing = False
        self._recheck_pending = False
        self.stream_gauges = metrics.StreamGauges()
        engine.on_meta_change(self._on_meta_change)

    # -- opening --

    def prepare(
        self,
        coll: str,
        uri: str,
        avars_raw: str | None,
        grant: Grant | None = None,
        query_vars: dict | None = None,
        server_vars: dict | None = None,
        before: bool = False,
    ) -> Prepared:
        """Find the stream definition and bind its variables; 404/400/403 before any response.

        `grant` is the caller's permission (None: nothing restricted): its readFilter and
        projectResponse decide which events it gets and what they show (services.views.View).
        `query_vars` (pipeline.query_variables) are bound too; `avars` wins over them.
        `server_vars` (pipeline.server_variables: `@user`, `@mongoPermissions`) come from the
        account only; a stream that needs `@user` answers 401 to a caller without one.
        `before`: the client asked for the pre-image (`fullDocumentBeforeChange`) in its events.
        """
        definition = find_stream(self.engine.get_collection(coll), uri)
        stored = list(definition.get("stages", []))
        scoping = [*stored, definition.get("notify_when")]  # where @user variables may be
        uses_account, needs_account = pipelines.account_variables(scoping)
        if "@user" not in (server_vars or {}) and needs_account:
            raise Unauthorized("this stream is scoped to the logged-in user: authenticate to open it")
        avars = {**(query_vars or {}), **pipelines.parse_avars(avars_raw), **(server_vars or {})}
        # The leading stages every subscriber runs alike go to the engine, once per stream;
        # the readFilter and the rest are this caller's, run in the process (views.View).
        shared = pipelines.shared_stage_count(stored)
        if grant is not None:
            grant.check_stream_stages(stored, avars)  # 403 for a stage that reads a hidden field
        read_filter = grant.read_filter if grant is not None else None
        # Under a readFilter the shared stages run again, after it: the engine's pass is a
        # superset (their pre-image branch may have passed an event for a pre-image the
        # caller may not see, which services.views.scoped then removes).
        own = pipelines.compile_pipeline(stored if read_filter else stored[shared:], avars)  # 400: unbound
        notify = pipelines.notify_filter(definition, avars)
        visibility = grant.visibility if grant is not None else None
        text = json.dumps(definition, sort_keys=True)
        shown = repr(visibility) if visibility is not None else None
        view_key = json_util.dumps(
            [read_filter, own.stages, shown, notify.key if notify else None, before],
            json_options=json_util.CANONICAL_JSON_OPTIONS,
        )
        return Prepared(
            (coll, uri, text),
            text,
            pipelines.compile_pipeline(stored[:shared], {}) if shared else None,
            view_key,
            own=own if own.stages else None,
            visibility=visibility,
            notify=notify,
            read_filter=read_filter,
            before=before,
            account_bound="@user" in (server_vars or {}) and uses_account,
        )

    def subscribe(
        self,
        coll: str,
        uri: str,
        avars_raw: str | None,
        resume: dict | None,
        transport: str,
        user: Any = None,
        grant: Grant | None = None,
        owner: Any = None,
        access_check: Callable[[dict], bool] | None = None,
        expires_at: float | None = None,
        query_vars: dict | None = None,
        server_vars: dict | None = None,
        prepared: Prepared | None = None,
    ) -> Subscriber:
        """Register a subscriber on its stream and binding, resuming after `resume` when given.

        Everything that can refuse (503, 429, 404, 400, 403) happens before the
        registration. `owner` is ("user", id) or ("address", ip): whose limit of open
        streams this one counts against (STREAM_MAX_PER_USER / STREAM_MAX_PER_ADDRESS, per
        worker). `expires_at` (a time.time() value) ends it with `expired`.
        """
        self._refuse_if_full(owner)
        if prepared is None:  # may yield
            prepared = self.prepare(coll, uri, avars_raw, grant, query_vars, server_vars)
        key = prepared.key
        resume_pos = self.engine.position(resume) if resume is not None else None
        # a token the store could not resume from (another store's, one from the future, or
        # a pruned one) must not be skipped through as "already seen": it gets a reset
        problem = self.engine.resume_problem(resume) if resume is not None else None  # may yield
        # ... and goes on from the store's latest change, not from wherever this worker's
        # watcher has read to: changes committed before the request are not sent after it
        reset_at = self.engine.latest_position() if problem is not None else None  # may yield
        watcher = self.watchers.get(key)
        if watcher is None or watcher.stopped:
            if len(self.watchers) >= self.max_watchers:
                raise TooManyRequests(
                    f"this server already serves {self.max_watchers} distinct streams "
                    "(STREAM_MAX_WATCHERS); try again later"
                )
        self._refuse_new_binding(watcher, prepared.view_key)
        if watcher is None or watcher.stopped:
            new = Watcher(self, key, coll, uri, prepared.definition, prepared.pipeline)  # may yield
            watcher = self.watchers.get(key)
            if watcher is None or watcher.stopped:
                watcher = self.watchers[key] = new
            else:  # another subscriber opened the stream meanwhile: one watcher per stream
                new.stop()
        # Checked again after the yields above; from here to the registration nothing may
        # yield, so no event slips between the join and the registration.
        self._refuse_if_full(owner)
        view = watcher.router.view(prepared.view_key, prepared.make_view)
        sub = Subscriber(self, watcher, view, transport, user, owner, access_check)
        live_from = watcher.position
        if problem is not None:
            metrics.RESETS.labels(metrics.reset_kind(problem)).inc()
            if reset_at is not None and reset_at > live_from:
                sub.skip_through = reset_at  # before the reset's position: not this client's
            else:
                reset_at = live_from
            sub.pending.append(reset_message(problem, self.engine.token(reset_at)))
        elif resume is not None:
            if resume_pos >= live_from:
                metrics.RESUMES.labels("live").inc()
                sub.skip_through = resume_pos
            elif self.replay_size and self.replay_bytes and resume_pos >= watcher.buffer_from:
                metrics.RESUMES.labels("buffer").inc()
                missed = [m for m in watcher.buffer if m.position > resume_pos]
                kept = view.evaluate(Batch(missed)) if missed else None
                if kept is not None:
                    sub.pending.extend(kept.items)
                    sub.pending_bytes += kept.size
                # changes the watcher has read but not yet dispatched come live: skip those seen
                sub.skip_through = resume_pos
            else:
                metrics.RESUMES.labels("engine").inc()
                sub.catch_up_from = resume
                sub.catch_up_upto = live_from
                sub.skip_through = live_from
        watcher.subscribers.add(sub)
        view.subscribers.add(sub)
        if owner is not None:
            self.open_by_owner[owner] = self.open_by_owner.get(owner, 0) + 1
        if expires_at is not None:
            sub.expiry = gevent.spawn_later(
                max(0.0, expires_at - time.time()), sub.end, "expired", "the token expired"
            )
        return sub

    def _refuse_new_binding(self, watcher: Watcher | None, view_key: str) -> None:
        """429 for a binding this worker does not serve yet when it serves STREAM_MAX_BINDINGS
        (each costs an evaluation per event it can match; a shared binding costs nothing)."""
        if watcher is not None and not watcher.stopped and view_key in watcher.router.views:
            return
        if sum(len(w.router.views) for w in self.watchers.values()) >= self.max_bindings:
            raise TooManyRequests(
                f"this server already serves {self.max_bindings} distinct stream bindings "
                "(STREAM_MAX_BINDINGS); try again later"
            )

    def _refuse_if_full(self, owner: Any) -> None:
        if self.closing:
            raise Unavailable("server is shutting down; reconnect shortly")
        if owner is not None:
            limit = self.max_per_user if owner[0] == "user" else self.max_per_address
            if self.open_by_owner.get(owner, 0) >= limit:
                who = f"user '{owner[1]}'" if owner[0] == "user" else "this address"
                setting = "STREAM_MAX_PER_USER" if owner[0] == "user" else "STREAM_MAX_PER_ADDRESS"
                raise TooManyRequests(
                    f"{who} already has {limit} open streams on this server ({setting}); close one first"
                )

    def unsubscribe(self, sub: Subscriber) -> None:
        watcher = sub.watcher
        if sub not in watcher.subscribers:
            return  # already done (a transport may close twice)
        watcher.subscribers.discard(sub)
        sub.view.subscribers.discard(sub)
        if not sub.view.subscribers:
            watcher.router.remove(sub.view)
        if sub.owner is not None:
            left = self.open_by_owner.get(sub.owner, 1) - 1
            if left > 0:
                self.open_by_owner[sub.owner] = left
            else:
                self.open_by_owner.pop(sub.owner, None)
        if not watcher.subscribers:
            watcher.idle_since = time.monotonic()
            if self.linger <= 0:
                watcher.stop()

    # -- access --

    def access_changes_from(self, engine: Engine) -> None:
        """Re-check every subscriber's access when users or the ACL change, in any process."""
        engine.on_document_change(self._on_security_change)

    def _on_security_change(self, coll: str, key: Any) -> None:
        if coll not in ("users", "acl") or self._recheck_pending:
            return
        self._recheck_pending = True
        gevent.spawn(self._recheck_access)

    def _recheck_access(self) -> None:
        self._recheck_pending = False
        users_read: dict = {}  # one read per user, however many of its subscribers are open
        for watcher in list(self.watchers.values()):
            for sub in list(watcher.subscribers):
                check = sub.access_check
                if check is None or sub.ended is not None:
                    continue
                try:
                    allowed = check(users_read)
                except Exception:
                    log.exception("access re-check failed; ending the subscriber")
                    allowed = False
                if not allowed:
                    sub.end("revoked", "access to this stream was withdrawn")

    # -- lifecycle --

    def _on_meta_change(self, change: MetaChange) -> None:
        affected = [w for w in self.watchers.values() if w.coll == change.coll]
        if not affected:
            return
        if change.kind == "drop":
            for watcher in affected:
                watcher.end_subscribers("removed", f"collection '{change.coll}' was dropped")
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
                current: str | None = json.dumps(find_stream(props, watcher.uri), sort_keys=True)
            except NotFound:
                current = None
            if current != watcher.definition:
                watcher.end_subscribers(
                    "removed", f"stream '{watcher.uri}' of '{coll}' was removed or redefined"
                )
                watcher.stop()

    def close_all(self, reason: str = "shutdown") -> None:
        """End every subscriber (SIGTERM drain): SSE responses end cleanly, WebSockets get 1001."""
        self.closing = True
        for watcher in list(self.watchers.values()):
            watcher.end_subscribers(reason)

    def refresh_metrics(self) -> None:
        """Set this worker's gauges (services/metrics.py): clients per stream and transport,
        watchers, cursors, the history window and the oldest position a client holds."""
        counts: dict[tuple[str, str, str], int] = {}
        oldest = None
        for watcher in self.watchers.values():
            for sub in watcher.subscribers:
                key = (watcher.coll, watcher.uri, sub.transport)
                counts[key] = counts.get(key, 0) + 1
                if oldest is None or sub.position_time < oldest:
                    oldest = sub.position_time
        self.stream_gauges.set(counts)
        metrics.WATCHERS.set(len(self.watchers))
        metrics.CURSORS.set(len(self.watchers) + self.catch_up_cursors)
        metrics.OLDEST_CLIENT_POSITION.set(time.time() - oldest if oldest is not None else 0)
        window = self.engine.history_window()
        metrics.HISTORY_WINDOW.set(window if window is not None else 0)

    def status(self) -> dict:
        streams = []
        for watcher in self.watchers.values():
            kinds = [s.transport for s in watcher.subscribers]
            streams.append(
                {
                    "collection": watcher.coll,
                    "uri": watcher.uri,
                    "clients": len(kinds),
                    "sse": kinds.count("sse"),
                    "websocket": kinds.count("websocket"),
                    "events": watcher.events,
                    "bindings": len(watcher.router.views),
                }
            )
        return {
            "watchers": len(self.watchers),
            # engine change streams held open for clients: one per watcher, and one per
            # resume from before a watcher's replay buffer while it reads the history
            "cursors": len(self.watchers) + self.catch_up_cursors,
            "clients": sum(s["clients"] for s in streams),
            "streams": streams,
        }


def find_stream(props: dict, uri: str) -> dict:
    """The stream definition named `uri` in collection properties, or 404."""
    for stream in props.get("streams") or []:
        if isinstance(stream, dict) and stream.get("uri") == uri:
            return stream
    raise NotFound("Change Stream does not exist")
