"""The MongoDB engine at the wire level, against mockupdb (no MongoDB server needed).

mockupdb is MongoDB's own wire-protocol test server for drivers: each test lets the
engine call PyMongo in a background greenlet (`mockupdb.go`), asserts the exact command
PyMongo sent (`server.receives()`) and scripts the reply (`.ok(...)`, `.command_err(...)`,
`.hangup()`), errors included. It runs monkey-patched like the rest of the suite
(tests/conftest.py); mockupdb's threads and sockets are then greenlets and cooperative
sockets, which works (this file proves it by passing).

What this proves and what it cannot: the commands, options and reply handling are
PyMongo's real code paths; the *server's* behaviour (event shapes, token order, which
errors carry which labels) is scripted here as MongoDB's documentation, source and the
drivers' change-streams specification describe it.
"""

from __future__ import annotations

import time

import gevent
import pytest
from bson.objectid import ObjectId
from mockupdb import MockupDB

from services.errors import DocumentNotFound, DuplicateKey, EtagMismatch, Forbidden, HistoryLost, Unavailable
from services.pipeline import compile_pipeline
from services.storage import MetaChange
from services.storage.mongo import ENDED_MESSAGE, MongoEngine, Position
from services.updates import normalize_patch

T0 = "8264A0000000000001" + "2B0229296E04"  # high-water-mark-like tokens, increasing
T1 = "8264A0000100000001" + "2B022C0100296E5A1004"
T2 = "8264A0000200000001" + "2B022C0100296E5A1004"
T3 = "8264A0000300000001" + "2B022C0100296E5A1004"
INV = "8264A0000300000001" + "2B022C010029705A1004"  # fromInvalidate bit set


def go(fn, *args):
    """Run a blocking engine call in a greenlet; the returned function gets its result.

    (mockupdb's own `go` re-raises by calling the exception class with one argument, which
    our domain errors do not take.)
    """
    greenlet = gevent.spawn(fn, *args)
    return lambda timeout=10: greenlet.get(timeout=timeout)


def primary_hello(address: str) -> dict:
    return {
        "ismaster": True,
        "isWritablePrimary": True,
        "helloOk": True,
        "setName": "rs0",
        "hosts": [address],
        "me": address,
        "minWireVersion": 0,
        "maxWireVersion": 21,
        "logicalSessionTimeoutMinutes": 30,
        "ok": 1,
    }


def start_server(hello: dict | None = None) -> MockupDB:
    server = MockupDB(request_timeout=10)
    server.run()
    reply = hello if hello is not None else primary_hello(server.address_string)
    server.autoresponds("ismaster", reply)
    server.autoresponds("hello", reply)

    def housekeeping(request):  # replies nobody asserts on; any other request is queued
        if request.command_name == "killCursors":
            return request.ok(cursorsKilled=request.doc["cursors"])
        if request.command_name == "endSessions":
            return request.ok()
        return False

    server.autoresponds(housekeeping)
    return server


@pytest.fixture
def server():
    s = start_server()
    yield s
    s.stop()


@pytest.fixture
def engine(server):
    eng = MongoEngine(
        f"mongodb://{server.address_string}/?replicaSet=rs0", "db", server_selection_timeout_ms=3000
    )
    yield eng
    eng.close()


def event(token: str, op: str = "insert", doc_id=1, **extra) -> dict:
    ev = {"_id": {"_data": token}, "operationType": op, "ns": {"db": "db", "coll": "c"}}
    if op not in ("drop", "invalidate"):
        ev["documentKey"] = {"_id": doc_id}
    if op == "invalidate":
        ev.pop("ns")
    ev.update(extra)
    return ev


def cursor_reply(request, batch: list, pbrt: str, cursor_id: int = 77, first: bool = False) -> None:
    key = "firstBatch" if first else "nextBatch"
    request.ok(cursor={"id": cursor_id, "ns": "db.c", key: batch, "postBatchResumeToken": {"_data": pbrt}})


def open_stream(server, engine, pipeline=None, resume_after=None, pbrt=T0, batch=()):
    """Open a stream; return (stream, the aggregate command PyMongo sent)."""
    future = go(engine.watch, "c", pipeline, resume_after)
    request = recv(server, "aggregate")
    cursor_reply(request, list(batch), pbrt, first=True)
    return future(), request


def recv(server, name: str, timeout: float = 10):
    """The next request, which must be the command `name` (any other field may be there)."""
    request = server.receives(timeout=timeout)
    assert request.command_name == name, f"expected {name}, got {request}"
    return request


def change_stream_spec(request) -> dict:
    return request.doc["pipeline"][0]["$changeStream"]


# ----------------------------------------------------------------------------- opening


def test_aggregate_command_carries_options_and_the_bound_unescaped_pipeline(server, engine):
    compiled = compile_pipeline(
        [
            {
                "_$match": {
                    "fullDocument::status": {"$var": "status"},
                    "operationType": {"_$in": ["insert", "update"]},
                }
            },
            {"_$project": {"fullDocument::secret": 0}},
        ],
        {"status": "open"},
    )
    stream, request = open_stream(server, engine, compiled)
    assert request.doc["aggregate"] == "c"
    assert request.doc["$db"] == "db"
    assert request.doc["cursor"] == {}
    written = {"fullDocument.status": "open", "operationType": {"$in": ["insert", "update"]}}
    on_pre_image = {"fullDocumentBeforeChange.status": "open", "operationType": {"$in": ["insert", "update"]}}
    assert request.doc["pipeline"] == [
        {"$changeStream": {"fullDocument": "updateLookup", "fullDocumentBeforeChange": "whenAvailable"}},
        # the leading $match also passes what matched before the change (issue 11, item 7)
        {
            "$match": {
                "$or": [written, {"$and": [{"fullDocumentBeforeChange": {"$type": "object"}}, on_pre_image]}]
            }
        },
        {"$project": {"fullDocument.secret": 0}},
    ]
    assert stream.position == T0 and isinstance(stream.position, Position)
    assert engine.token(stream.position) == {"_data": T0}


def test_users_streams_strip_password_hashes_on_the_server(server, engine):
    future = go(engine.watch, "users", None)
    request = recv(server, "aggregate")
    cursor_reply(request, [], T0, first=True)
    future()
    stages = request.doc["pipeline"]
    assert stages[0] == {
        "$changeStream": {"fullDocument": "updateLookup", "fullDocumentBeforeChange": "whenAvailable"}
    }
    assert stages[1] == {"$unset": ["fullDocument.password", "fullDocumentBeforeChange.password"]}
    assert "updateDescription" in stages[2]["$set"]


def test_get_more_loop_returns_events_and_advances_on_empty_batches(server, engine):
    stream, _ = open_stream(server, engine)
    future = go(stream.try_next, 0.5)
    request = recv(server, "getMore")
    assert request.doc["getMore"] == 77 and request.doc["collection"] == "c"
    assert 1 <= request.doc["maxTimeMS"] <= 500
    ev = event(T1, fullDocument={"_id": 1, "a": 1})
    cursor_reply(request, [ev], T1)
    change = future()
    assert change.error is None and change.event == ev
    assert change.position == T1 and change.token == {"_data": T1}
    assert stream.position == T1

    future = go(stream.try_next, 0)
    request = recv(server, "getMore")
    assert request.doc["maxTimeMS"] == 1
    cursor_reply(request, [], T2)  # an empty batch moves the high-water mark
    assert future() is None
    assert stream.position == T2 > T1

    # two events in one batch: both returned, in order, without another getMore
    future = go(stream.try_next, 0.5)
    cursor_reply(recv(server, "getMore"), [event(T3, doc_id=2), event(T3 + "00", doc_id=3)], T3 + "00")
    assert future().event["documentKey"] == {"_id": 2}
    assert stream.try_next(0).event["documentKey"] == {"_id": 3}


def test_resume_after_token_and_start_after_for_an_invalidate_token(server, engine):
    stream, request = open_stream(server, engine, resume_after={"_data": T1})
    assert change_stream_spec(request) == {
        "fullDocument": "updateLookup",
        "fullDocumentBeforeChange": "whenAvailable",
        "resumeAfter": {"_data": T1},
    }
    assert stream.position == T1

    future = go(engine.watch, "c", None, {"_data": INV})
    request = recv(server, "aggregate")
    assert change_stream_spec(request)["resumeAfter"] == {"_data": INV}
    request.command_err(
        260,
        "Attempting to resume a change stream using 'resumeAfter' is not allowed "
        "from an invalidate notification.",
    )
    request = recv(server, "aggregate")
    assert change_stream_spec(request) == {
        "fullDocument": "updateLookup",
        "fullDocumentBeforeChange": "whenAvailable",
        "startAfter": {"_data": INV},
    }
    cursor_reply(request, [], INV, first=True)
    assert future().position == INV


def test_network_error_mid_stream_resumes_from_the_last_token(server, engine):
    stream, _ = open_stream(server, engine)
    future = go(stream.try_next, 5)
    cursor_reply(recv(server, "getMore"), [event(T1)], T1)
    assert future().position == T1

    # PyMongo's own single resume: the aggregate after reconnecting carries resumeAfter T1
    future = go(stream.try_next, 5)
    recv(server, "getMore").hangup()
    request = recv(server, "aggregate")
    assert change_stream_spec(request) == {
        "fullDocument": "updateLookup",
        "fullDocumentBeforeChange": "whenAvailable",
        "resumeAfter": {"_data": T1},
    }
    cursor_reply(request, [event(T2, doc_id=2)], T2, cursor_id=78, first=True)
    change = future()
    assert change.position == T2 and change.event["documentKey"] == {"_id": 2}

    # two failures in a row: PyMongo gives up, the engine re-opens after T2 (no loss, no repeat)
    future = go(stream.try_next, 10)
    recv(server, "getMore").hangup()
    recv(server, "aggregate").hangup()
    request = recv(server, "aggregate", timeout=10)
    assert change_stream_spec(request) == {
        "fullDocument": "updateLookup",
        "fullDocumentBeforeChange": "whenAvailable",
        "resumeAfter": {"_data": T2},
    }
    cursor_reply(request, [event(T3, doc_id=3)], T3, cursor_id=79, first=True)
    change = future()
    assert change.position == T3 and change.event["documentKey"] == {"_id": 3}


def test_resumable_error_label_on_get_more_resumes(server, engine):
    stream, _ = open_stream(server, engine)
    future = go(stream.try_next, 5)
    recv(server, "getMore").command_err(189, "PrimarySteppedDown", errorLabels=["ResumableChangeStreamError"])
    request = recv(server, "aggregate")
    assert change_stream_spec(request)["resumeAfter"] == {"_data": T0}
    cursor_reply(request, [event(T1)], T1, cursor_id=80, first=True)
    assert future().position == T1


def test_history_lost_286_on_open_and_on_get_more(server, engine):
    future = go(engine.watch, "c", None, {"_data": T1})
    recv(server, "aggregate").command_err(
        286,
        "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
        errorLabels=["NonResumableChangeStreamError"],
    )
    with pytest.raises(HistoryLost, match="no longer be in the oplog"):
        future()

    stream, _ = open_stream(server, engine)
    future = go(stream.try_next, 1)
    recv(server, "getMore").command_err(
        280,
        "cannot resume stream; the resume token was not found.",
        errorLabels=["NonResumableChangeStreamError"],
    )
    with pytest.raises(HistoryLost, match="resume token was not found"):
        future()


def test_history_lost_in_a_coalesced_batch_ends_in_reset_then_the_live_stream(server, engine, monkeypatch):
    """The hub over the mongo engine: a getMore brings two events, the next one (the watcher
    coalescing what else is ready) fails with ChangeStreamHistoryLost. Before, that error
    was swallowed and the stream, which had closed itself, returned nothing forever: the
    clients got heartbeats and nothing else. Now: both events, a reset, then live events.
    """
    import json

    from services.hub import Hub

    streams = {"streams": [{"uri": "all", "stages": []}]}
    monkeypatch.setattr(engine, "get_collection", lambda coll: streams)
    config = {
        "STREAM_CLIENT_QUEUE": 100,
        "STREAM_REPLAY_BUFFER": 10,
        "STREAM_LINGER_SECONDS": 5,
        "STREAM_MAX_PER_USER": 10,
        "STREAM_MAX_PER_ADDRESS": 10,
        "STREAM_MAX_WATCHERS": 10,
    }
    hub = Hub(engine, config)
    got: list = []

    class Sink:
        def write_now(self, batch):
            got.extend(batch.items)

    future = go(hub.subscribe, "c", "all", None, None, "sse")
    cursor_reply(recv(server, "aggregate"), [], T0, first=True)
    sub = future()
    sub.attach(Sink())
    try:
        cursor_reply(recv(server, "getMore"), [event(T1, doc_id=1), event(T2, doc_id=2)], T2)
        recv(server, "getMore").command_err(
            286,
            "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
            errorLabels=["NonResumableChangeStreamError"],
        )
        request = recv(server, "aggregate")  # the watcher starts again from now
        assert "resumeAfter" not in change_stream_spec(request)
        cursor_reply(request, [], T2, cursor_id=81, first=True)
        cursor_reply(recv(server, "getMore"), [event(T3, doc_id=3)], T3, cursor_id=81)
        cursor_reply(recv(server, "getMore"), [], T3, cursor_id=81)  # nothing else is ready
        deadline = time.monotonic() + 10
        while len(got) < 4 and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert [m.kind for m in got] == ["change", "change", "reset", "change"]
        assert [json.loads(m.data)["documentKey"]["_id"] for m in got if m.kind == "change"] == [1, 2, 3]
        assert "no longer be in the oplog" in got[2].data and got[2].id == f'{{"_data":"{T2}"}}'
        assert sub.ended is None
    finally:
        hub.close_all()
        for watcher in list(hub.watchers.values()):
            watcher.stop()


def test_pipeline_error_is_reported_once_in_band_then_reopens_after_the_last_good_token(server, engine):
    stream, _ = open_stream(server, engine)
    future = go(stream.try_next, 5)
    cursor_reply(recv(server, "getMore"), [event(T1)], T1)
    assert future().position == T1

    future = go(stream.try_next, 5)
    recv(server, "getMore").command_err(
        241, "PlanExecutor error during aggregation :: caused by :: Failed to parse number 'x' in $convert"
    )
    change = future()
    assert change.event is None and "Failed to parse number" in change.error
    assert change.position == T1 and change.token == {"_data": T1}

    # re-open after T1 (with backoff); the same error again is not reported a second time
    future = go(stream.try_next, 5)
    request = recv(server, "aggregate")
    assert change_stream_spec(request)["resumeAfter"] == {"_data": T1}
    request.command_err(
        241, "PlanExecutor error during aggregation :: caused by :: Failed to parse number 'x' in $convert"
    )
    request = recv(server, "aggregate", timeout=10)
    assert change_stream_spec(request)["resumeAfter"] == {"_data": T1}
    cursor_reply(request, [event(T2, doc_id=2)], T2, cursor_id=81, first=True)
    change = future()
    assert change.error is None and change.position == T2


def test_invalidate_ends_the_stream_with_a_reason(server, engine):
    stream, _ = open_stream(server, engine)
    future = go(stream.try_next, 5)
    request = recv(server, "getMore")
    request.ok(
        cursor={
            "id": 0,
            "ns": "db.c",
            "nextBatch": [event(T1, "drop"), event(INV, "invalidate")],
            "postBatchResumeToken": {"_data": INV},
        }
    )
    assert future().event["operationType"] == "drop"
    change = stream.try_next(1)
    assert change.event is None and change.error == ENDED_MESSAGE % "c"
    assert change.position == INV and change.token == {"_data": INV}
    assert stream.ended and stream.closed
    started = time.monotonic()
    assert stream.try_next(0.1) is None  # no command is sent any more
    assert time.monotonic() - started < 1


def test_malformed_tokens_are_bad_requests(engine):
    from services.errors import BadRequest

    for bad in [
        "82",
        {},
        {"_data": 5},
        {"_data": "xyz"},
        {"_data": "abc"},
        {"_data": ""},
        {"_data": "82", "extra": 1},
        [{"_data": "82"}],
    ]:
        with pytest.raises(BadRequest):
            engine.position(bad)
    pos = engine.position({"_data": "82ab"})
    assert pos == "82AB" and engine.token(pos) == {"_data": "82ab"}
    bits = {"_data": "82AB", "_typeBits": {"$binary": {"base64": "QA==", "subType": "00"}}}
    assert engine.token(engine.position(bits)) == bits


def test_current_token_is_the_post_batch_resume_token_of_a_database_stream(server, engine):
    future = go(engine.current_token)
    request = recv(server, "aggregate")
    assert request.doc["aggregate"] == 1
    assert request.doc["pipeline"] == [{"$changeStream": {}}]
    cursor_reply(request, [], T2, first=True)
    assert future() == {"_data": T2}


@pytest.mark.parametrize("token, ahead", [(T3, True), (T1, False), (T2, False)])
def test_a_resume_token_ahead_of_the_cluster_is_a_problem(server, engine, token, ahead):
    """Issue 12, item 1: a token from the future (another cluster, a restored backup) is
    refused before the hub would skip through it as already seen."""
    future = go(engine.resume_problem, {"_data": token})
    cursor_reply(recv(server, "aggregate"), [], T2, first=True)  # the cluster is at T2
    problem = future()
    assert (problem is not None and "ahead of every change" in problem) is ahead


def test_resumes_within_the_newest_position_seen_cost_no_round_trip(server, engine):
    """A storm of reconnecting clients asks the cluster's position once, not once each."""
    future = go(engine.resume_problem, {"_data": T3})
    cursor_reply(recv(server, "aggregate"), [], T3, first=True)
    assert future() is None
    for token in (T1, T2, T3):  # nobody answers: a request would time the call out
        assert go(engine.resume_problem, {"_data": token})(timeout=2) is None


# ----------------------------------------------------------------------------- start-up


def test_standalone_server_stops_start_up_with_instructions():
    server = start_server(
        {"ismaster": True, "isWritablePrimary": True, "minWireVersion": 0, "maxWireVersion": 21, "ok": 1}
    )
    engine = MongoEngine(server.uri, "db", server_selection_timeout_ms=2000)
    try:
        with pytest.raises(RuntimeError) as info:
            go(engine.ensure_collection, "users")()
        message = str(info.value)
        assert "standalone" in message and "--replSet rs0" in message and "rs.initiate()" in message
        assert "docker compose" in message
    finally:
        engine.close()
        server.stop()


def test_unreachable_server_is_reported_by_current_token():
    from tests.conftest import free_port

    engine = MongoEngine(f"mongodb://127.0.0.1:{free_port()}/", "db", server_selection_timeout_ms=200)
    try:
        engine.start()  # the metadata greenlet retries in the background
        with pytest.raises(Unavailable, match="unreachable"):
            engine.current_token()
        assert engine._meta is not None and not engine._meta.dead
    finally:
        engine.close()


# ----------------------------------------------------------------------------- writes


def props_found(server, coll: str = "c") -> None:
    request = recv(server, "find")
    assert request.doc["find"] == "_properties" and request.doc["filter"] == {"_id": coll}
    request.ok(cursor={"id": 0, "ns": "db._properties", "firstBatch": [{"_id": coll}]})


def test_insert_stamps_an_etag(server, engine):
    future = go(engine.insert_documents, "c", [{"a": 1}])
    props_found(server)
    request = recv(server, "insert")
    assert request.doc["insert"] == "c"
    (doc,) = request.doc["documents"]
    assert list(doc) == ["_id", "a", "_etag"]
    assert isinstance(doc["_id"], ObjectId) and isinstance(doc["_etag"], ObjectId)
    request.ok(n=1)
    (stored,) = future()
    assert stored == doc


def test_duplicate_key_11000(server, engine):
    future = go(engine.insert_documents, "c", [{"_id": "a"}])
    props_found(server)
    recv(server, "insert").ok(
        n=0,
        writeErrors=[
            {"index": 0, "code": 11000, "keyValue": {"_id": "a"}, "errmsg": "E11000 duplicate key error"}
        ],
    )
    with pytest.raises(DuplicateKey, match='"a"'):
        future()


def test_update_sends_the_operator_spec_with_an_etag_filter(server, engine):
    etag = ObjectId()
    spec = normalize_patch({"n": 2, "$inc": {"k": 1}})
    future = go(engine.update_document, "c", 1, spec, str(etag))
    props_found(server)
    request = recv(server, "find")
    assert request.doc["find"] == "c" and request.doc["filter"] == {"_id": 1}
    request.ok(cursor={"id": 0, "ns": "db.c", "firstBatch": [{"_id": 1, "n": 1, "k": 1, "_etag": etag}]})
    request = recv(server, "findAndModify")
    assert request.doc["query"] == {"_id": 1, "_etag": etag}
    update = request.doc["update"]
    assert update["$inc"] == {"k": 1}
    assert update["$set"]["n"] == 2 and isinstance(update["$set"]["_etag"], ObjectId)
    assert request.doc["new"] is True
    new = {"_id": 1, "n": 2, "k": 2, "_etag": update["$set"]["_etag"]}
    request.ok(value=new, lastErrorObject={"n": 1, "updatedExisting": True})
    assert future() == (False, new)


def test_update_if_match_mismatch_and_noop_write_nothing(server, engine):
    etag = ObjectId()
    future = go(engine.update_document, "c", 1, normalize_patch({"n": 2}), str(ObjectId()))
    props_found(server)
    recv(server, "find").ok(cursor={"id": 0, "ns": "db.c", "firstBatch": [{"_id": 1, "n": 1, "_etag": etag}]})
    with pytest.raises(EtagMismatch):
        future()
    future = go(engine.update_document, "c", 1, normalize_patch({"n": 1}))
    props_found(server)
    old = {"_id": 1, "n": 1, "_etag": etag}
    recv(server, "find").ok(cursor={"id": 0, "ns": "db.c", "firstBatch": [old]})
    assert future() == (False, old)  # no findAndModify was sent: the next request is ours
    future = go(engine.get_document, "c", 9)
    props_found(server)
    recv(server, "find").ok(cursor={"id": 0, "ns": "db.c", "firstBatch": []})
    with pytest.raises(DocumentNotFound):
        future()


def test_replace_with_if_match(server, engine):
    etag = ObjectId()
    future = go(engine.replace_document, "c", 1, {"x": 1, "_etag": "ignored"}, False, f'"{etag}"')
    props_found(server)
    request = recv(server, "update")
    (op,) = request.doc["updates"]
    assert op["q"] == {"_id": 1, "_etag": {"$in": [etag]}}
    assert list(op["u"]) == ["_id", "x", "_etag"] and op["u"]["_etag"] != etag
    assert not op.get("upsert", False)
    request.ok(n=1, nModified=1)
    created, new = future()
    assert created is False and new == op["u"]


def test_delete_with_if_match_filter(server, engine):
    etag = ObjectId()
    future = go(engine.delete_document, "c", 1, str(etag))
    props_found(server)
    request = recv(server, "delete")
    assert request.doc["deletes"] == [{"q": {"_id": 1, "_etag": {"$in": [etag]}}, "limit": 1}]
    request.ok(n=0)
    request = recv(server, "find")  # did not match: missing or another ETag?
    request.ok(cursor={"id": 0, "ns": "db.c", "firstBatch": [{"_id": 1}]})
    with pytest.raises(EtagMismatch):
        future()


def test_put_collection_stores_props_as_json_text(server, engine):
    streams = [{"uri": "s", "stages": [{"_$match": {"a": 1}}]}]
    future = go(engine.put_collection, "c", {"streams": streams})
    recv(server, "find").ok(cursor={"id": 0, "ns": "db._properties", "firstBatch": []})
    request = recv(server, "create")
    assert request.doc["create"] == "c"
    request.ok()
    request = recv(server, "insert")
    (doc,) = request.doc["documents"]
    assert doc["_id"] == "c" and isinstance(doc["props"], str) and ObjectId.is_valid(doc["etag"])
    request.ok(n=1)
    created, stored = future()
    assert created is True
    assert stored == {"_id": "_meta", "streams": streams, "_etag": {"$oid": doc["etag"]}}


# ----------------------------------------------------------------------------- metadata across nodes


def test_metadata_watcher_turns_events_into_listener_calls(server, engine):
    metas, docs = [], []
    engine.on_meta_change(metas.append)
    engine.on_document_change(lambda coll, key: docs.append((coll, key)))
    go(engine.check_topology)()
    engine.start()
    request = recv(server, "aggregate")
    assert request.doc["aggregate"] == 1
    assert request.doc["pipeline"][0] == {"$changeStream": {}}
    assert request.doc["pipeline"][1]["$match"]["$or"][0] == {
        "ns.coll": {"$in": ["_properties", "acl", "users"]}
    }
    cursor_reply(request, [], T0, first=True)
    deadline = time.monotonic() + 5
    while not engine._meta_live and time.monotonic() < deadline:
        time.sleep(0.01)
    v0 = engine.collection_version("acl")
    assert v0 == engine.collection_version("acl")
    batch = [
        {
            "_id": {"_data": T1},
            "operationType": "update",
            "ns": {"db": "db", "coll": "_properties"},
            "documentKey": {"_id": "c"},
        },
        {
            "_id": {"_data": T2},
            "operationType": "insert",
            "ns": {"db": "db", "coll": "acl"},
            "documentKey": {"_id": "p1"},
        },
        {"_id": {"_data": T3}, "operationType": "drop", "ns": {"db": "db", "coll": "other"}},
    ]
    cursor_reply(recv(server, "getMore"), batch, T3)
    deadline = time.monotonic() + 5
    while len(metas) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metas == [MetaChange("props", "c"), MetaChange("drop", "other")]
    assert docs == [("acl", "p1")]
    assert engine.collection_version("acl") != v0


# ----------------------------------------------------------------------------- guarded writes
# A permission's writeFilter (and the users roles rule) run as a guard: the engine reads the
# document, checks it, then writes only if the document is still the one it checked.


def owned_by(owner: str):
    def guard(old, new):
        for doc in (old, new):
            if doc is not None and doc.get("owner") != owner:
                raise Forbidden("outside the writeFilter")

    return guard


def test_guarded_replace_reads_checks_then_writes_conditionally(server, engine):
    etag = ObjectId()
    future = go(engine.replace_document, "c", 1, {"owner": "bob", "x": 2}, False, None, owned_by("bob"))
    props_found(server)
    recv(server, "find").ok(
        cursor={"id": 0, "ns": "db.c", "firstBatch": [{"_id": 1, "owner": "bob", "_etag": etag}]}
    )
    request = recv(server, "update")
    (op,) = request.doc["updates"]
    assert op["q"] == {"_id": 1, "_etag": etag}  # only the document that was checked
    assert op["u"]["owner"] == "bob" and not op.get("upsert", False)
    request.ok(n=1, nModified=1)
    assert future()[0] is False


def test_guarded_replace_refuses_before_writing_and_retries_a_lost_race(server, engine):
    future = go(engine.replace_document, "c", 1, {"owner": "bob"}, False, None, owned_by("bob"))
    props_found(server)
    recv(server, "find").ok(
        cursor={"id": 0, "ns": "db.c", "firstBatch": [{"_id": 1, "owner": "alice", "_etag": ObjectId()}]}
    )
    with pytest.raises(Forbidden):
        future()  # no update was sent: the next request is the next test step's
    first, second = ObjectId(), ObjectId()
    future = go(engine.replace_document, "c", 1, {"owner": "bob"}, False, None, owned_by("bob"))
    props_found(server)
    recv(server, "find").ok(
        cursor={"id": 0, "ns": "db.c", "firstBatch": [{"_id": 1, "owner": "bob", "_etag": first}]}
    )
    recv(server, "update").ok(n=0, nModified=0)  # changed meanwhile
    recv(server, "find").ok(
        cursor={"id": 0, "ns": "db.c", "firstBatch": [{"_id": 1, "owner": "alice", "_etag": second}]}
    )
    with pytest.raises(Forbidden):
        future()  # checked again as it is now: alice's


def test_guarded_upsert_insert_and_delete(server, engine):
    future = go(engine.replace_document, "c", 7, {"owner": "alice"}, True, None, owned_by("bob"))
    props_found(server)
    recv(server, "find").ok(cursor={"id": 0, "ns": "db.c", "firstBatch": []})
    with pytest.raises(Forbidden):
        future()  # the new document would be outside: nothing inserted
    future = go(engine.replace_document, "c", 7, {"owner": "bob"}, True, None, owned_by("bob"))
    props_found(server)
    recv(server, "find").ok(cursor={"id": 0, "ns": "db.c", "firstBatch": []})
    request = recv(server, "insert")
    assert request.doc["documents"][0]["owner"] == "bob"
    request.ok(n=1)
    assert future()[0] is True
    etag = ObjectId()
    future = go(engine.delete_document, "c", 7, None, owned_by("bob"))
    props_found(server)
    recv(server, "find").ok(
        cursor={"id": 0, "ns": "db.c", "firstBatch": [{"_id": 7, "owner": "bob", "_etag": etag}]}
    )
    request = recv(server, "delete")
    assert request.doc["deletes"] == [{"q": {"_id": 7, "_etag": etag}, "limit": 1}]
    request.ok(n=1)
    future()


def test_guarded_update_checks_the_computed_result(server, engine):
    etag = ObjectId()
    future = go(
        engine.update_document, "c", 1, normalize_patch({"owner": "alice"}), None, False, owned_by("bob")
    )
    props_found(server)
    recv(server, "find").ok(
        cursor={"id": 0, "ns": "db.c", "firstBatch": [{"_id": 1, "owner": "bob", "_etag": etag}]}
    )
    with pytest.raises(Forbidden):
        future()  # no findAndModify: the update would move it out of the filter


# --------------------------------------------------------------------------- through the HTTP app

VALIDATION_FAILED = {"index": 0, "code": 121, "errmsg": "Document failed validation"}


@pytest.fixture
def mongo_app(server, tmp_path):
    """The Flask app on the mongo engine; a responder plays a database holding one user,
    `admin` (password `secret`), one collection `c`, no ACL, and no change streams."""
    from app import create_app
    from services.auth import hash_password

    admin = {"_id": "admin", "password": hash_password("secret"), "roles": ["admin"]}

    def database(request):
        name, doc = request.command_name, request.doc
        if name == "find":
            coll, flt = doc["find"], doc.get("filter") or {}
            if coll == "_properties":
                found = [{"_id": flt.get("_id", "c"), "props": '{"_id": "_meta"}', "etag": "e"}]
            elif coll == "users" and flt.get("_id") == "admin":
                found = [admin]
            else:
                found = []
            return request.ok(cursor={"id": 0, "ns": f"db.{coll}", "firstBatch": found})
        if name == "aggregate" and "$changeStream" in doc["pipeline"][0]:
            return request.command_err(40573, "change streams are not scripted here")
        if name == "aggregate":  # count_documents
            return request.ok(cursor={"id": 0, "ns": "db.x", "firstBatch": [{"_id": 1, "n": 1}]})
        return False  # the writes under test: queued for the test to answer

    server.autoresponds(database)
    eng = MongoEngine(
        f"mongodb://{server.address_string}/?replicaSet=rs0", "db", server_selection_timeout_ms=3000
    )
    app = create_app({"DATA_DIR": str(tmp_path / "data")}, engine=eng)
    app.testing = True
    yield app
    app.extensions["changefeed.hub"].close_all()
    eng.close()


def put(app, path: str, body: dict):
    """A PUT as admin in a greenlet, so the test can answer the write it sends."""
    import base64

    client = app.test_client()
    auth = "Basic " + base64.b64encode(b"admin:secret").decode()
    return go(lambda: client.put(path, json=body, headers={"Authorization": auth}))


def test_put_whose_replace_the_server_refuses_is_a_400(server, mongo_app):
    response = put(mongo_app, "/c/1", {"x": 1})
    recv(server, "update").ok(n=0, writeErrors=[VALIDATION_FAILED])
    response = response()
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["message"] == "Document failed validation"


def test_put_whose_guarded_upsert_the_server_refuses_is_a_400(server, mongo_app):
    # the users collection always has a write guard: read, check, then insert
    response = put(mongo_app, "/users/bob?wm=upsert", {"password": "pw-of-bob", "roles": ["user"]})
    recv(server, "insert").ok(n=0, writeErrors=[VALIDATION_FAILED])
    response = response()
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["message"] == "Document failed validation"


def test_a_server_without_pre_images_is_asked_once_then_streams_without_them(server, engine):
    """MongoDB < 6.0 refuses the fullDocumentBeforeChange option (40415): the engine stops
    asking for it, and the stream opens at once (deletes then reach only unfiltered streams)."""
    future = go(engine.watch, "c", None)
    recv(server, "aggregate").command_err(
        40415, "BSON field '$changeStream.fullDocumentBeforeChange' is an unknown field."
    )
    again = recv(server, "aggregate")
    assert change_stream_spec(again) == {"fullDocument": "updateLookup"}
    cursor_reply(again, [], T0, first=True)
    assert future().position == T0 and engine.pre_images is False
    future = go(engine.watch, "c", None)
    request = recv(server, "aggregate")
    assert "fullDocumentBeforeChange" not in change_stream_spec(request)
    cursor_reply(request, [], T0, first=True)
    future()


def test_a_stream_closed_while_its_get_more_waits_returns_nothing(server, engine):
    """The watcher stops (close) while its greenlet waits in a getMore: the read ends with
    None, not an AttributeError on the dropped cursor."""
    stream, _ = open_stream(server, engine)
    future = go(stream.try_next, 5)
    request = recv(server, "getMore")
    stream.close()
    cursor_reply(request, [], T1)
    assert future() is None


def test_a_standalone_server_stops_the_whole_server_at_start_up(tmp_path):
    """Issue 12, item 7: gunicorn with the real gunicorn.conf.py against a standalone mongod
    (mockupdb) exits non-zero, soon, with the replica-set instructions in its log; it does
    not run on warning every 20-30 s."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, free_port

    server = start_server(
        {"ismaster": True, "isWritablePrimary": True, "minWireVersion": 0, "maxWireVersion": 21, "ok": 1}
    )
    log_path = tmp_path / "gunicorn.log"
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "DATA_DIR": str(tmp_path / "data"),
        "MONGO_URI": f"mongodb://{server.address_string}/",
        "LOG_LEVEL": "warning",
    }
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "gunicorn.conf.py")],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            deadline = time.time() + 30
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
                pytest.fail("the server kept running against a standalone mongod")
        text = log_path.read_text()
        assert proc.returncode != 0
        assert "standalone" in text and "--replSet rs0" in text and "rs.initiate()" in text
    finally:
        server.stop()
