"""The hub in-process: a fake engine, fake sinks, no gunicorn and no sockets.

The fake engine is a list of changes with integer positions; its streams can be told to
raise at any point of the watcher's loop (the first read, a read while coalescing, a
re-open), and to lose their history. The sinks record what the hub hands them, or stop
taking it as a socket with a full buffer does.
"""

from __future__ import annotations

import time

import gevent
import gevent.event
import pytest

from services.errors import BadRequest, HistoryLost, NotFound, TooManyRequests
from services.hub import END_REASONS, Batch, Hub
from services.storage import Change, ChangeStream, MetaChange

CONFIG = {
    "STREAM_CLIENT_QUEUE": 50,
    "STREAM_REPLAY_BUFFER": 5,
    "STREAM_LINGER_SECONDS": 0.3,
    "STREAM_MAX_PER_USER": 100,
    "STREAM_MAX_PER_ADDRESS": 100,
    "STREAM_MAX_WATCHERS": 100,
}
STREAMS = {
    "streams": [
        {"uri": "all", "stages": []},
        {"uri": "big", "stages": [{"_$match": {"fullDocument::n": {"_$gt": 2}}}]},
    ]
}


class FakeStream(ChangeStream):
    def __init__(self, engine: FakeEngine, coll: str, pipeline, start: int):
        self.engine, self.coll, self.pipeline, self._pos = engine, coll, pipeline, start
        self.closed = False

    @property
    def position(self) -> int:
        return self._pos

    def close(self) -> None:
        self.closed = True

    def try_next(self, timeout: float) -> Change | None:
        engine = self.engine
        engine.reads += 1
        fault = engine.faults.pop(engine.reads, None)
        if fault is not None:
            if isinstance(fault, HistoryLost):
                self.ended, self.end_reason = True, fault.message
            raise fault
        if engine.end_streams:
            self.ended, self.end_reason = True, "collection 'c' was dropped or renamed"
            return None
        deadline = time.monotonic() + timeout
        while True:
            for pos, coll, event in engine.log:
                if pos > self._pos and coll == self.coll:
                    self._pos = pos
                    out = self.pipeline.apply(dict(event)) if self.pipeline is not None else event
                    if out is None:
                        continue
                    return Change(pos, engine.token(pos), out)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            engine.written.wait(left)


class FakeEngine:
    """What the hub uses of an engine, over a list of (position, collection, event)."""

    name = "fake"

    def __init__(self):
        self.log: list[tuple[int, str, dict]] = []
        self.props = {"c": dict(STREAMS)}
        self.faults: dict[int, Exception] = {}  # read number -> what that try_next raises
        self.watch_faults: list[Exception] = []  # what the next watch() calls raise
        self.pruned = 0  # positions at or before this are no longer retained
        self.end_streams = False
        self.reads = 0
        self.watches: list[int | None] = []  # the resume position of each watch() call
        self.written = gevent.event.Event()
        self.meta_listeners = []

    def insert(self, *values: int, coll: str = "c", pad: int = 0) -> None:
        """Insert documents {"n": value}, each with a string field of `pad` characters."""
        for n in values:
            pos = len(self.log) + 1
            self.log.append(
                (
                    pos,
                    coll,
                    {
                        "_id": self.token(pos),
                        "operationType": "insert",
                        "fullDocument": {"n": n, **({"pad": "x" * pad} if pad else {})},
                        "documentKey": {"_id": pos},
                    },
                )
            )
        written, self.written = self.written, gevent.event.Event()
        written.set()

    def token(self, position: int) -> dict:
        return {"_data": f"{position:032X}"}

    def position(self, token: dict) -> int:
        return int(token["_data"], 16)

    def latest_position(self) -> int:
        return len(self.log)

    def resume_problem(self, token: dict) -> str | None:
        position = self.position(token)
        if position > len(self.log):
            return "the resume token is ahead of every change this store has made"
        if position < self.pruned:
            return "the resume token is older than the retained change history"
        return None

    def watch(self, coll, pipeline, resume_after=None):
        start = self.position(resume_after) if resume_after is not None else len(self.log)
        self.watches.append(start if resume_after is not None else None)
        if self.watch_faults:
            raise self.watch_faults.pop(0)
        if resume_after is not None and start < self.pruned:
            raise HistoryLost("the resume token is older than the retained change history")
        return FakeStream(self, coll, pipeline, start)

    def get_collection(self, coll):
        if coll not in self.props:
            raise NotFound(f"Collection '{coll}' does not exist")
        return self.props[coll]

    def on_meta_change(self, listener):
        self.meta_listeners.append(listener)

    def on_document_change(self, listener):
        pass


class RecordingSink:
    """An always idle transport: attached at once, it records every batch handed to it."""

    def __init__(self, sub):
        self.sub = sub
        self.batches: list[Batch] = []
        sub.attach(self)

    def write_now(self, batch: Batch) -> None:
        self.batches.append(batch)

    @property
    def messages(self):
        return [m for b in self.batches for m in b.items]


class FullSink(RecordingSink):
    """Takes `room` batches, then is full, as a socket whose peer stopped reading."""

    def __init__(self, sub, room: int):
        super().__init__(sub)
        self.room = room

    def write_now(self, batch: Batch) -> None:
        if self.room > 0:
            self.room -= 1
            self.batches.append(batch)
        if self.room == 0:
            self.sub.detach()


def numbers(messages) -> list:
    import json

    return [json.loads(m.data)["fullDocument"]["n"] if m.kind == "change" else m.kind for m in messages]


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.005)


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def hub(engine):
    hub = Hub(engine, CONFIG)
    yield hub
    hub.close_all()
    for watcher in list(hub.watchers.values()):
        watcher.stop()


def subscribe(hub, resume=None, uri="all", sink=RecordingSink, **kw):
    sub = hub.subscribe("c", uri, None, resume, "sse", **kw)
    return sub, (sink(sub) if sink is not None else None)


# ----------------------------------------------------------------------------- order and sharing


def test_every_subscriber_gets_every_change_in_order_as_the_same_objects(hub, engine):
    subs = [subscribe(hub) for _ in range(3)]
    for burst in range(5):
        engine.insert(*range(burst * 10, burst * 10 + 10))
        gevent.sleep(0.01)
    wait_for(lambda: all(len(s.messages) == 50 for _, s in subs))
    assert numbers(subs[0][1].messages) == list(range(50))
    # one message object per change, shared: each wire form is encoded once for everyone
    assert all(a is b for _, s in subs[1:] for a, b in zip(subs[0][1].messages, s.messages, strict=True))
    assert len(hub.watchers) == 1


def test_changes_ready_together_go_out_as_one_batch(hub, engine):
    _, sink = subscribe(hub)
    engine.insert(1, 2, 3, 4)  # all in the log before the watcher reads again
    wait_for(lambda: len(sink.messages) == 4)
    assert len(sink.batches) == 1 and numbers(sink.batches[0].items) == [1, 2, 3, 4]


def test_a_filtered_stream_gets_only_its_changes(hub, engine):
    _, sink = subscribe(hub, uri="big")
    engine.insert(1, 5, 2, 7)
    wait_for(lambda: len(sink.messages) == 2)
    assert numbers(sink.messages) == [5, 7]


# ----------------------------------------------------------------------------- resume joins


def test_resume_at_the_live_position_repeats_nothing(hub, engine):
    first, sink = subscribe(hub)
    engine.insert(1, 2)
    wait_for(lambda: len(sink.messages) == 2)
    _, again = subscribe(hub, resume=engine.token(2))
    engine.insert(3)
    wait_for(lambda: len(again.messages) == 1)
    assert numbers(again.messages) == [3]


def test_resume_from_the_replay_buffer_gets_exactly_what_followed(hub, engine):
    _, sink = subscribe(hub)
    engine.insert(1, 2, 3, 4)
    wait_for(lambda: len(sink.messages) == 4)
    sub = hub.subscribe("c", "all", None, engine.token(2), "sse")
    assert numbers(sub.take()) == [3, 4]  # from memory, queued before any live change
    assert engine.watches == [None]  # no cursor opened for it
    RecordingSink(sub)
    engine.insert(5)
    gevent.sleep(0.05)
    assert sub.take() == []


def test_resume_from_before_the_buffer_catches_up_from_the_engine_then_goes_live(hub, engine):
    _, sink = subscribe(hub)
    engine.insert(*range(1, 13))  # the buffer keeps 5
    wait_for(lambda: len(sink.messages) == 12)
    sub = hub.subscribe("c", "all", None, engine.token(3), "sse")
    engine.insert(13, 14)  # live, while the subscriber has not caught up yet
    gevent.sleep(0.05)
    replayed = [m for batch in sub.catch_up() for m in batch]
    assert engine.watches[-1] == 3  # a private cursor from the resume point
    assert numbers(replayed) == list(range(4, 13))
    assert numbers(sub.take()) == [13, 14]  # no gap, no duplicate at the join


def test_a_resume_point_the_engine_lost_becomes_a_reset_then_live(hub, engine):
    _, sink = subscribe(hub)
    engine.insert(*range(1, 13))
    wait_for(lambda: len(sink.messages) == 12)
    engine.pruned = 10
    sub = hub.subscribe("c", "all", None, engine.token(2), "sse")
    engine.insert(13)
    gevent.sleep(0.05)
    assert [m for batch in sub.catch_up() for m in batch] == []  # told at the join, not from history
    got = sub.take()
    assert [m.kind for m in got] == ["reset", "change"] and "retained" in got[0].data
    assert got[0].id == f'{{"_data":"{12:032X}"}}'  # ids go on from where it joined
    assert numbers(got[1:]) == [13]


def test_a_reset_goes_on_from_the_stores_latest_change_not_the_watchers(hub, engine):
    """Changes committed before the request that the watcher has not read yet come before
    the reset's position: the client, told to start over from there, does not get them."""
    _, sink = subscribe(hub)
    engine.insert(1, 2)
    wait_for(lambda: len(sink.messages) == 2)
    engine.insert(3, 4)  # committed; the watcher has not read them (no yield since)
    watcher = next(iter(hub.watchers.values()))
    assert watcher.position == 2
    sub = hub.subscribe("c", "all", None, engine.token(500), "sse")
    got = sub.take()
    assert [m.kind for m in got] == ["reset"] and got[0].id == f'{{"_data":"{4:032X}"}}'
    later = RecordingSink(sub)
    engine.insert(5)
    wait_for(lambda: len(sink.messages) == 5)
    gevent.sleep(0.05)
    assert numbers(later.messages) == [5]  # not 3 and 4


@pytest.mark.parametrize("position", [500, 13])
def test_a_resume_token_from_the_future_gets_a_reset_never_silence(hub, engine, position):
    """A token ahead of the store (a wiped or restored data directory): skipping through it
    as "already seen" would withhold every event until the store caught up."""
    _, sink = subscribe(hub)
    engine.insert(*range(1, 13))
    wait_for(lambda: len(sink.messages) == 12)
    sub = hub.subscribe("c", "all", None, engine.token(position), "sse")
    engine.insert(13, 14)
    gevent.sleep(0.05)
    got = sub.take()
    assert [m.kind for m in got] == ["reset", "change", "change"] and "ahead" in got[0].data
    assert numbers(got[1:]) == [13, 14]


# ----------------------------------------------------------------------------- bounds and sinks


def test_a_subscriber_that_falls_behind_is_ended_with_overflow(hub, engine):
    sub, _ = subscribe(hub, sink=None)
    engine.insert(*range(60))  # the queue holds 50
    wait_for(lambda: sub.ended is not None)
    assert sub.ended.reason == "overflow" and sub.ended.text == END_REASONS["overflow"]
    assert sub.take() == []  # the batch that did not fit was not queued in part
    engine.insert(99)
    gevent.sleep(0.05)
    assert sub.take() == []  # nothing after the end


def test_a_subscriber_more_bytes_behind_than_its_queue_bound_is_ended_with_overflow(engine):
    """STREAM_CLIENT_QUEUE_BYTES bounds a queue however few events it holds; an event larger
    than the bound still reaches a client whose queue is empty (it could never resume past
    it otherwise)."""
    hub = Hub(engine, {**CONFIG, "STREAM_CLIENT_QUEUE_BYTES": 100_000})
    try:
        sub, _ = subscribe(hub, sink=None)
        engine.insert(1, pad=150_000)  # bigger than the bound, into an empty queue: taken
        wait_for(lambda: sub.pending)
        assert sub.ended is None and numbers(sub.take()) == [1] and sub.pending_bytes == 0
        for n in range(2, 6):  # 4 x 20 KB, far fewer than the 50 events the queue may hold
            engine.insert(n, pad=20_000)
            gevent.sleep(0.02)
        wait_for(lambda: sub.ended is not None)
        assert sub.ended.reason == "overflow"
        assert numbers(sub.take()) == [2, 3]  # what fit in 100 KB (each counts twice its JSON)
    finally:
        hub.close_all()
        for watcher in list(hub.watchers.values()):
            watcher.stop()


def test_the_replay_buffer_keeps_at_most_its_bytes_and_a_resume_before_it_loses_nothing(engine):
    hub = Hub(engine, {**CONFIG, "STREAM_REPLAY_BUFFER": 1000, "STREAM_REPLAY_BYTES": 200_000})
    try:
        _, sink = subscribe(hub)
        engine.insert(*range(1, 11), pad=30_000)  # 10 x ~60 KB counted: 3 fit in 200 KB
        wait_for(lambda: len(sink.messages) == 10)
        watcher = next(iter(hub.watchers.values()))
        assert [m.position for m in watcher.buffer] == [8, 9, 10]
        assert watcher.buffer_bytes == sum(m.size for m in watcher.buffer) <= 200_000
        assert watcher.buffer_from == 7
        in_memory = hub.subscribe("c", "all", None, engine.token(7), "sse")
        assert numbers(in_memory.take()) == [8, 9, 10] and engine.watches == [None]
        older = hub.subscribe("c", "all", None, engine.token(2), "sse")
        assert numbers([m for batch in older.catch_up() for m in batch]) == list(range(3, 11))
        engine.insert(11, pad=300_000)  # larger than the whole buffer: not kept at all
        wait_for(lambda: len(sink.messages) == 11)
        assert list(watcher.buffer) == [] and watcher.buffer_bytes == 0 and watcher.buffer_from == 11
    finally:
        hub.close_all()
        for watcher in list(hub.watchers.values()):
            watcher.stop()


def test_a_sink_that_blocks_gets_the_rest_queued_in_order(hub, engine):
    sub, sink = subscribe(hub, sink=lambda s: FullSink(s, 1))
    engine.insert(1)
    wait_for(lambda: len(sink.messages) == 1)
    assert sub.sink is None  # full: detached, so the watcher no longer writes to it
    for n in (2, 3, 4):
        engine.insert(n)
        gevent.sleep(0.01)
    wait_for(lambda: len(sub.pending) == 3)
    assert numbers(sub.take()) == [2, 3, 4]
    sink.room = 5
    sub.attach(sink)  # the transport caught up: direct again
    engine.insert(5)
    wait_for(lambda: len(sink.messages) == 2)
    assert numbers(sink.messages) == [1, 5] and not sub.pending


def test_a_subscriber_that_never_takes_does_not_hold_the_others(hub, engine):
    stuck, _ = subscribe(hub, sink=None)
    _, fine = subscribe(hub)
    engine.insert(*range(70))
    wait_for(lambda: len(fine.messages) == 70)
    assert stuck.ended is not None and stuck.ended.reason == "overflow"


# ----------------------------------------------------------------------------- end reasons


@pytest.mark.parametrize("reason", sorted(END_REASONS))
def test_every_end_reason_reaches_the_subscriber(hub, reason):
    sub, _ = subscribe(hub)
    told = []
    sub.on_end = told.append
    sub.end(reason)
    sub.end("error")  # the first reason stands
    assert sub.ended.kind == "end" and sub.ended.reason == reason and told == [reason]
    assert sub.ended.text == (END_REASONS[reason] or "")
    assert sub.wake.is_set()


def test_shutdown_ends_everyone_and_refuses_new_subscribers(hub):
    subs = [subscribe(hub)[0] for _ in range(3)]
    hub.close_all()
    assert {s.ended.reason for s in subs} == {"shutdown"}
    with pytest.raises(Exception, match="shutting down"):
        subscribe(hub)


def test_a_dropped_collection_ends_its_subscribers(hub, engine):
    sub, _ = subscribe(hub)
    for listener in engine.meta_listeners:
        listener(MetaChange("drop", "c"))
    assert sub.ended.reason == "removed" and "dropped" in sub.ended.text
    assert hub.watchers == {}


def test_a_redefined_stream_ends_its_subscribers_and_others_stay(hub, engine):
    sub, _ = subscribe(hub)
    big, _ = subscribe(hub, uri="big")
    engine.props["c"] = {
        "streams": [{"uri": "all", "stages": [{"_$match": {"x": 1}}]}, STREAMS["streams"][1]]
    }
    for listener in engine.meta_listeners:
        listener(MetaChange("props", "c"))
    wait_for(lambda: sub.ended is not None)
    assert sub.ended.reason == "removed" and big.ended is None


def test_a_stream_the_engine_ends_ends_its_subscribers(hub, engine):
    sub, _ = subscribe(hub)
    engine.end_streams = True
    wait_for(lambda: sub.ended is not None)
    assert sub.ended.reason == "removed" and "dropped or renamed" in sub.ended.text


def test_withdrawn_access_and_an_expired_token_end_the_subscriber(hub, engine):
    allowed = {"yes": True}
    revoked, _ = subscribe(hub, access_check=lambda cache: allowed["yes"])
    expiring, _ = subscribe(hub, expires_at=time.time() + 0.05)
    allowed["yes"] = False
    hub._on_security_change("acl", "r1")
    wait_for(lambda: revoked.ended is not None and expiring.ended is not None)
    assert revoked.ended.reason == "revoked" and expiring.ended.reason == "expired"


def test_an_access_check_that_raises_ends_the_subscriber(hub):
    def broken(cache):
        raise RuntimeError("boom")

    sub, _ = subscribe(hub, access_check=broken)
    hub._on_security_change("users", "u")
    wait_for(lambda: sub.ended is not None)
    assert sub.ended.reason == "revoked"


# ----------------------------------------------------------------------------- registration


def test_leaving_the_with_block_by_any_path_undoes_the_registration(hub):
    with pytest.raises(RuntimeError):
        with hub.subscribe("c", "all", None, None, "sse", owner=("user", "u")) as sub:
            assert sub in next(iter(hub.watchers.values())).subscribers
            raise RuntimeError("the transport failed")
    assert hub.open_by_owner == {} and hub.status()["clients"] == 0
    sub.close()  # a second close is harmless


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda h: h.subscribe("c", "nope", None, None, "sse"), NotFound),
        (lambda h: h.subscribe("c", "all", "{not json", None, "sse"), BadRequest),
        (lambda h: h.subscribe("nope", "all", None, None, "sse"), NotFound),
    ],
)
def test_a_refused_subscription_registers_nothing(hub, call, error):
    with pytest.raises(error):
        call(hub)
    assert hub.status() == {"watchers": 0, "cursors": 0, "clients": 0, "streams": []}


def test_limits_refuse_before_registering(hub):
    hub.max_per_user = 2
    subs = [subscribe(hub, owner=("user", "u"))[0] for _ in range(2)]
    with pytest.raises(TooManyRequests, match="STREAM_MAX_PER_USER"):
        subscribe(hub, owner=("user", "u"))
    assert hub.open_by_owner == {("user", "u"): 2}
    for sub in subs:
        sub.close()
    assert hub.open_by_owner == {}


# ----------------------------------------------------------------------------- linger


def test_a_watcher_lingers_after_its_last_subscriber_then_stops(hub, engine):
    sub, _ = subscribe(hub)
    watcher = next(iter(hub.watchers.values()))
    sub.close()
    again, _ = subscribe(hub)  # within the linger: the same watcher, no new cursor
    assert next(iter(hub.watchers.values())) is watcher and len(engine.watches) == 1
    again.close()
    wait_for(lambda: hub.watchers == {}, timeout=5)
    assert watcher.stopped and watcher.stream.closed


def test_without_linger_the_watcher_stops_with_its_last_subscriber(engine):
    hub = Hub(engine, {**CONFIG, "STREAM_LINGER_SECONDS": 0})
    sub, _ = subscribe(hub)
    watcher = next(iter(hub.watchers.values()))
    sub.close()
    assert hub.watchers == {} and watcher.stopped and watcher.stream.closed


# ----------------------------------------------------------------------------- an engine that raises


def settle() -> None:
    """Let the watcher go back to waiting inside its next read (which counts as begun)."""
    gevent.sleep(0.02)


def test_an_error_on_a_first_read_is_told_in_band_and_the_stream_goes_on(hub, engine):
    _, sink = subscribe(hub)
    engine.insert(1)
    wait_for(lambda: len(sink.messages) == 1)
    settle()
    engine.faults[engine.reads + 1] = RuntimeError("cursor broke")  # the read after this quiet one
    wait_for(lambda: "error" in numbers(sink.messages))
    engine.insert(2, 3)
    wait_for(lambda: numbers(sink.messages)[-1:] == [3])
    assert numbers(sink.messages) == [1, "error", 2, 3]
    assert "cursor broke" in sink.messages[1].data
    assert engine.watches[-1] == 1  # re-opened after its last change: nothing lost or repeated


def test_an_error_while_coalescing_comes_after_the_changes_read_before_it(hub, engine):
    _, sink = subscribe(hub)
    engine.insert(1)
    wait_for(lambda: len(sink.messages) == 1)
    settle()
    engine.faults[engine.reads + 2] = RuntimeError("cursor broke")  # the third read of the burst
    engine.insert(2, 3, 4)
    wait_for(lambda: numbers(sink.messages)[-1:] == [4])
    assert numbers(sink.messages) == [1, 2, 3, "error", 4]
    assert engine.watches[-1] == 3


@pytest.mark.parametrize("coalescing", [False, True])
def test_history_lost_in_the_loop_becomes_a_reset_then_the_live_stream(hub, engine, coalescing):
    _, sink = subscribe(hub)
    engine.insert(1)
    wait_for(lambda: len(sink.messages) == 1)
    settle()
    engine.faults[engine.reads + (2 if coalescing else 1)] = HistoryLost("the stream fell behind")
    if coalescing:
        engine.insert(2, 3, 4)
    wait_for(lambda: "reset" in numbers(sink.messages))
    engine.insert(9)
    wait_for(lambda: numbers(sink.messages)[-1:] == [9])
    got = numbers(sink.messages)
    assert got == ([1, 2, 3, "reset", 9] if coalescing else [1, "reset", 9])  # never silence
    reset = [m for m in sink.messages if m.kind == "reset"][0]
    assert "fell behind" in reset.data and engine.watches[-1] is None  # started again from now
    assert reset.id == '{"_data":"%032X"}' % (4 if coalescing else 1)


def test_a_reopen_that_fails_is_retried_then_goes_on(hub, engine):
    _, sink = subscribe(hub)
    settle()
    engine.watch_faults = [RuntimeError("still down"), RuntimeError("still down")]
    engine.faults[engine.reads + 1] = RuntimeError("network")
    wait_for(lambda: len(engine.watches) == 4, timeout=10)
    engine.insert(1)
    wait_for(lambda: numbers(sink.messages)[-1:] == [1], timeout=10)
    assert numbers(sink.messages) == ["error", 1]
    assert engine.watches == [None, 0, 0, 0]  # three tries, each from the last position


def test_a_reopen_whose_position_is_gone_becomes_a_reset(hub, engine):
    _, sink = subscribe(hub)
    settle()
    engine.watch_faults = [HistoryLost("the resume token is older than the retained change history")]
    engine.faults[engine.reads + 1] = RuntimeError("network")
    wait_for(lambda: "reset" in numbers(sink.messages), timeout=10)
    engine.insert(1)
    wait_for(lambda: numbers(sink.messages)[-1:] == [1], timeout=10)
    assert numbers(sink.messages) == ["error", "reset", 1]


def test_the_watcher_survives_every_fault_it_is_given(hub, engine):
    """Faults at many points in a row: every change still arrives, once, in order."""
    _, sink = subscribe(hub)
    for i in range(engine.reads + 1, engine.reads + 60, 3):
        engine.faults[i] = RuntimeError(f"fault {i}")
    for n in range(20):
        engine.insert(n)
        gevent.sleep(0.02)
    wait_for(lambda: [x for x in numbers(sink.messages) if x != "error"] == list(range(20)), timeout=30)


# ----------------------------------------------------------------------------- the embedded engine


def test_embedded_history_lost_in_a_coalesced_batch_ends_in_reset_then_live(data_dir, monkeypatch):
    """The real embedded engine's stream loses its position between two reads of one batch.

    The watcher has read one change of a burst; before its next (coalescing) read, so many
    changes are written and pruned that its position is neither in the process's feed nor
    in the table any more. The subscriber gets the change, then `reset`, then live changes.
    """
    from services.storage import embedded
    from services.storage.embedded import EmbeddedEngine

    monkeypatch.setattr(embedded, "_FEED_ROWS", 4)  # the feed keeps 4 rows (5 before trimming)
    engine = EmbeddedEngine(data_dir, max_events=3)
    engine.put_collection("c", dict(STREAMS))
    engine.start()
    hub = Hub(engine, CONFIG)
    try:
        sub, sink = subscribe(hub)
        stream = next(iter(hub.watchers.values())).stream
        real_try_next = stream.try_next
        reads = []

        def try_next(timeout):
            change = real_try_next(timeout)
            if change is not None and not reads:
                reads.append(change)  # in the middle of the batch: history moves on without us
                engine.insert_documents("c", [{"n": 100 + i} for i in range(20)])
                engine.tail_once()
                engine.prune()
            return change

        monkeypatch.setattr(stream, "try_next", try_next)
        engine.insert_documents("c", [{"n": 1}, {"n": 2}])
        wait_for(lambda: "reset" in numbers(sink.messages))
        assert numbers(sink.messages) == [1, "reset"]
        assert "history" in sink.messages[-1].data
        engine.insert_documents("c", [{"n": 7}])
        wait_for(lambda: numbers(sink.messages)[-1:] == [7])
        assert numbers(sink.messages) == [1, "reset", 7]
        assert sub.ended is None
    finally:
        hub.close_all()
        for watcher in list(hub.watchers.values()):
            watcher.stop()
        engine.close()


# ----------------------------------------------------------------------------- review findings


def test_a_control_message_does_not_end_the_skip_of_a_resumed_subscriber(hub, engine):
    """A client resumed ahead of this worker's watcher: an error in between must not let the
    changes it already saw through."""
    from services.hub import Message, error_message

    engine.resume_problem = lambda token: None  # the store has position 5; the watcher lags
    sub = hub.subscribe("c", "all", None, engine.token(5), "sse")
    assert sub.skip_through == 5
    sub.push(Batch([error_message("pipeline error")]))
    sub.push(Batch([Message("change", "{}", 3, "3")]))
    sub.push(Batch([Message("change", "{}", 6, "6")]))
    assert [(m.kind, m.position) for m in sub.take()] == [("error", None), ("change", 6)]


def test_a_resume_from_the_buffer_skips_what_it_saw_when_it_comes_live(hub, engine):
    from services.hub import Message

    _, sink = subscribe(hub)
    engine.insert(1, 2, 3, 4)
    wait_for(lambda: len(sink.messages) == 4)
    sub = hub.subscribe("c", "all", None, engine.token(3), "sse")
    assert numbers(sub.take()) == [4]
    # a change the watcher had read but not yet dispatched when the client joined
    sub.push(Batch([Message("change", "{}", 3, "3"), Message("change", "{}", 5, "5")]))
    assert [m.position for m in sub.take()] == [5]


def slow_watches(engine, monkeypatch) -> None:
    """Opening a stream yields, as MongoDB's watch does (a network round trip)."""
    real_watch = engine.watch

    def slow_watch(*args):
        gevent.sleep(0.05)
        return real_watch(*args)

    monkeypatch.setattr(engine, "watch", slow_watch)


def test_subscribers_racing_to_open_a_key_share_one_watcher(hub, engine, monkeypatch):
    slow_watches(engine, monkeypatch)
    subs = [gevent.spawn(hub.subscribe, "c", "all", None, None, "sse") for _ in range(3)]
    gevent.joinall(subs, timeout=5)
    watchers = {g.value.watcher for g in subs}
    assert len(watchers) == 1 and list(hub.watchers.values()) == list(watchers)
    assert len(next(iter(watchers)).subscribers) == 3


def test_a_subscribe_in_flight_when_the_drain_starts_is_refused(hub, engine, monkeypatch):
    slow_watches(engine, monkeypatch)
    pending = gevent.spawn(hub.subscribe, "c", "all", None, None, "sse", owner=("user", "u"))
    gevent.sleep(0.01)
    hub.close_all()
    pending.join(timeout=5)
    assert "shutting down" in str(pending.exception)
    assert hub.status()["clients"] == 0 and hub.open_by_owner == {}


def test_a_fault_of_the_hub_itself_ends_the_subscribers_instead_of_silence(hub, engine, monkeypatch):
    import services.hub as hub_module

    sub, _ = subscribe(hub)

    def broken(change, visibility=None):
        raise RuntimeError("a bug in encoding")

    monkeypatch.setattr(hub_module, "change_message", broken)
    engine.insert(1)
    wait_for(lambda: sub.ended is not None)
    assert sub.ended.reason == "error" and hub.watchers == {}


def test_history_lost_during_catch_up_sends_what_was_read_then_a_reset(hub, engine):
    _, sink = subscribe(hub)
    engine.insert(*range(1, 13))
    wait_for(lambda: len(sink.messages) == 12)
    settle()
    sub = hub.subscribe("c", "all", None, engine.token(2), "sse")
    engine.faults[engine.reads + 4] = HistoryLost("the stream fell behind")  # the catch-up's 4th read
    replayed = [m for batch in sub.catch_up() for m in batch]
    assert numbers(replayed) == [3, 4, 5, "reset"]


def test_a_catch_up_the_engine_cannot_open_is_told_and_ended(hub, engine):
    _, sink = subscribe(hub)
    engine.insert(*range(1, 13))
    wait_for(lambda: len(sink.messages) == 12)
    sub = hub.subscribe("c", "all", None, engine.token(2), "sse")
    engine.watch_faults = [RuntimeError("database unreachable")]
    replayed = [m for batch in sub.catch_up() for m in batch]
    assert [m.kind for m in replayed] == ["error"] and "unreachable" in replayed[0].data
    assert sub.ended is not None and sub.ended.reason == "error"


def test_a_binding_filters_live_from_the_buffer_and_in_catch_up_on_one_watcher(hub, engine):
    """A bound stage runs per subscriber over one watcher, and resume stays exact."""
    engine.props["c"] = {
        "streams": [{"uri": "over", "stages": [{"_$match": {"fullDocument::n": {"_$gt": {"_$var": "min"}}}}]}]
    }
    sub = hub.subscribe("c", "over", None, None, "sse", query_vars={"min": 2})
    sink = RecordingSink(sub)
    _, everything = subscribe(hub, uri="over", query_vars={"min": 0})
    engine.insert(1, 2, 3, 4)
    wait_for(lambda: len(everything.messages) == 4)
    assert numbers(sink.messages) == [3, 4] and len(hub.watchers) == 1
    from_buffer = hub.subscribe("c", "over", None, engine.token(2), "sse", query_vars={"min": 2})
    assert numbers(from_buffer.take()) == [3, 4]
    engine.insert(*range(5, 13))
    wait_for(lambda: len(everything.messages) == 12)
    far = hub.subscribe("c", "over", None, engine.token(1), "sse", query_vars={"min": 9})  # before the buffer
    assert numbers([m for batch in far.catch_up() for m in batch]) == [10, 11, 12]
    engine.insert(1, 13)
    gevent.sleep(0.05)
    assert numbers(far.take()) == [13]  # then live, filtered too
    assert hub.status()["streams"][0]["bindings"] == 3 and hub.status()["watchers"] == 1


def test_subscribers_with_the_same_notify_binding_share_one_evaluation_per_batch(hub, engine, monkeypatch):
    from services import pipeline

    engine.props["c"] = {
        "streams": [{"uri": "t", "stages": [], "notify_when": {"fullDocument::n": {"_$var": "v"}}}]
    }
    calls = []
    real = pipeline.NotifyFilter.__call__
    monkeypatch.setattr(
        pipeline.NotifyFilter, "__call__", lambda self, event: calls.append(1) or real(self, event)
    )
    sinks = [
        RecordingSink(hub.subscribe("c", "t", None, None, "sse", query_vars={"v": v})) for v in (1, 1, 1, 2)
    ]
    engine.insert(1, 2, 3)
    wait_for(lambda: all(s.messages for s in sinks))
    assert [numbers(s.messages) for s in sinks] == [[1], [1], [1], [2]]
    assert len(hub.watchers) == 1
    # one evaluation per binding the change can match: the index sends n=1 to v=1 only
    assert len(calls) == 2
    assert sinks[0].batches[0] is sinks[1].batches[0]  # and the kept batch (its encodings) is shared
