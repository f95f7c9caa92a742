"""The embedded engine on its own: the change log it writes, resume tokens, retention, and
several processes writing one data directory at once.

Events are read two ways: through `watch()` (what the stream hub uses) and straight from
the SQLite file, so a test notices both a wrong event and a wrong log.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import sqlite3
import time

import pytest
from bson.int64 import Int64
from bson.objectid import ObjectId
from bson.timestamp import Timestamp

from services.errors import (
    BadRequest,
    CollectionNotFound,
    DocumentNotFound,
    DuplicateKey,
    EtagMismatch,
    HistoryLost,
)
from services.storage.embedded import EmbeddedEngine, decode
from services.updates import UpdateError, normalize_patch

EVENT_KEYS_INSERT = ["_id", "operationType", "clusterTime", "wallTime", "fullDocument", "ns", "documentKey"]
# the pre-image (fullDocumentBeforeChange) comes last, as MongoDB appends it
EVENT_KEYS_REPLACE = EVENT_KEYS_INSERT + ["fullDocumentBeforeChange"]
EVENT_KEYS_UPDATE = EVENT_KEYS_INSERT + ["updateDescription", "fullDocumentBeforeChange"]
EVENT_KEYS_DELETE = [
    "_id",
    "operationType",
    "clusterTime",
    "wallTime",
    "ns",
    "documentKey",
    "fullDocumentBeforeChange",
]
EVENT_KEYS_DROP = ["_id", "operationType", "clusterTime", "wallTime", "ns"]


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def engine(tmp_path):
    eng = EmbeddedEngine(str(tmp_path / "data"))
    eng.put_collection("c", {})
    yield eng
    eng.close()


def log_rows(
    path: str, coll: str | None = None, kind: str | None = "event"
) -> list[tuple[int, str, str, dict]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT seq, coll, kind, event FROM changes ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [
        (seq, c, k, decode(text))
        for seq, c, k, text in rows
        if (coll is None or c == coll) and (kind is None or k == kind)
    ]


def drain(engine: EmbeddedEngine, stream, timeout: float = 0.2) -> list[dict]:
    """Every event the stream has now (pulling the change log into the process feed first)."""
    engine.tail_once()
    out = []
    while True:
        change = stream.try_next(timeout)
        if change is None:
            return out
        assert change.error is None
        assert change.event is not None
        assert change.event["_id"] == change.token
        out.append(change.event)


def watch_all(engine: EmbeddedEngine, coll: str = "c"):
    """A stream that starts at the current end of the feed."""
    engine.tail_once()
    return engine.watch(coll, None)


def update(engine, doc_id, spec, coll="c"):
    return engine.update_document(coll, doc_id, normalize_patch(spec))


def check_common(event: dict, engine: EmbeddedEngine, op: str, coll: str = "c") -> None:
    assert event["operationType"] == op
    assert event["ns"] == {"db": "restheart", "coll": coll}
    token = event["_id"]
    assert set(token) == {"_data"}
    assert len(token["_data"]) == 32 and int(token["_data"], 16) >= 0
    assert token["_data"][:16] == engine.epoch
    assert isinstance(event["clusterTime"], Timestamp)
    assert abs(event["clusterTime"].time - time.time()) < 60
    assert event["clusterTime"].inc == engine.position(token)
    wall = event["wallTime"]
    assert isinstance(wall, dt.datetime)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert abs((now - wall).total_seconds()) < 60
    assert wall.microsecond % 1000 == 0  # BSON dates have millisecond precision


# ----------------------------------------------------------------------------- event contents


def test_insert_event(engine):
    stream = watch_all(engine)
    (stored,) = engine.insert_documents("c", [{"_id": "a", "n": 1, "l": Int64(7)}])
    assert stored == {"_id": "a", "n": 1, "l": 7, "_etag": stored["_etag"]}
    assert isinstance(stored["_etag"], ObjectId)
    (event,) = drain(engine, stream)
    assert list(event) == EVENT_KEYS_INSERT
    check_common(event, engine, "insert")
    assert event["documentKey"] == {"_id": "a"}
    assert event["fullDocument"] == stored
    assert list(event["fullDocument"]) == ["_id", "n", "l", "_etag"]
    assert type(event["fullDocument"]["l"]) is Int64


def test_insert_generates_objectid_first(engine):
    stream = watch_all(engine)
    (stored,) = engine.insert_documents("c", [{"x": 1}])
    assert isinstance(stored["_id"], ObjectId)
    assert list(stored) == ["_id", "x", "_etag"]
    (event,) = drain(engine, stream)
    assert event["documentKey"] == {"_id": stored["_id"]}


def test_bulk_insert_is_one_event_per_document(engine):
    stream = watch_all(engine)
    engine.insert_documents("c", [{"_id": i} for i in range(3)])
    evs = drain(engine, stream)
    assert [e["operationType"] for e in evs] == ["insert"] * 3
    assert [e["documentKey"]["_id"] for e in evs] == [0, 1, 2]
    seqs = [engine.position(e["_id"]) for e in evs]
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    assert len(log_rows(engine.path, "c")) == 3


def test_failed_bulk_insert_writes_nothing(engine):
    engine.insert_documents("c", [{"_id": "a"}])
    before = log_rows(engine.path, kind=None)
    with pytest.raises(DuplicateKey):
        engine.insert_documents("c", [{"_id": "b"}, {"_id": "a"}])
    with pytest.raises(DuplicateKey):
        engine.insert_documents("c", [{"_id": "d"}, {"_id": "d"}])
    assert log_rows(engine.path, kind=None) == before
    assert [d["_id"] for d in engine.find("c", {}, [("_id", 1)], None, 0, 0)] == ["a"]
    with pytest.raises(CollectionNotFound):
        engine.insert_documents("missing", [{"_id": 1}])
    assert log_rows(engine.path, kind=None) == before


def test_replace_event(engine):
    engine.insert_documents("c", [{"_id": "a", "x": 1, "y": 2}])
    stream = watch_all(engine)
    created, new = engine.replace_document("c", "a", {"z": 3}, upsert=False)
    assert created is False
    assert new == {"_id": "a", "z": 3, "_etag": new["_etag"]}
    (event,) = drain(engine, stream)
    assert list(event) == EVENT_KEYS_REPLACE
    check_common(event, engine, "replace")
    assert event["fullDocument"] == new
    assert {k: v for k, v in event["fullDocumentBeforeChange"].items() if k != "_etag"} == {
        "_id": "a",
        "x": 1,
        "y": 2,
    }
    assert event["documentKey"] == {"_id": "a"}


def test_replace_upsert_inserts_and_missing_without_upsert_raises(engine):
    stream = watch_all(engine)
    with pytest.raises(DocumentNotFound):
        engine.replace_document("c", "n", {"a": 1}, upsert=False)
    created, new = engine.replace_document("c", "n", {"a": 1}, upsert=True)
    assert created is True
    (event,) = drain(engine, stream)
    assert event["operationType"] == "insert"
    assert event["fullDocument"] == new == {"_id": "n", "a": 1, "_etag": new["_etag"]}


def test_delete_event(engine):
    oid = ObjectId()
    engine.insert_documents("c", [{"_id": oid}])
    stream = watch_all(engine)
    engine.delete_document("c", oid)
    (event,) = drain(engine, stream)
    assert list(event) == EVENT_KEYS_DELETE
    check_common(event, engine, "delete")
    assert event["documentKey"] == {"_id": oid}
    assert event["fullDocumentBeforeChange"]["_id"] == oid
    with pytest.raises(DocumentNotFound):
        engine.delete_document("c", oid)
    assert len(log_rows(engine.path, "c")) == 2


def test_drop_event(engine):
    engine.insert_documents("c", [{"_id": 1}, {"_id": 2}])
    stream = watch_all(engine)
    etag = engine.get_collection("c")["_etag"]["$oid"]
    with pytest.raises(EtagMismatch):
        engine.drop_collection("c", str(ObjectId()))
    engine.drop_collection("c", etag)
    (event,) = drain(engine, stream)
    assert list(event) == EVENT_KEYS_DROP
    check_common(event, engine, "drop")
    # one drop event, not one delete per document
    assert [e["operationType"] for _, _, _, e in log_rows(engine.path, "c")] == ["insert", "insert", "drop"]
    assert "c" not in engine.list_collections()
    with pytest.raises(CollectionNotFound):
        engine.get_document("c", 1)


def test_etag_mismatch_writes_nothing(engine):
    (doc,) = engine.insert_documents("c", [{"_id": "a", "n": 1}])
    before = log_rows(engine.path, kind=None)
    wrong = str(ObjectId())
    with pytest.raises(EtagMismatch):
        engine.update_document("c", "a", normalize_patch({"$inc": {"n": 1}}), if_match=wrong)
    with pytest.raises(EtagMismatch):
        engine.replace_document("c", "a", {}, upsert=False, if_match=wrong)
    with pytest.raises(EtagMismatch):
        engine.delete_document("c", "a", if_match=wrong)
    assert log_rows(engine.path, kind=None) == before
    _, new = engine.update_document("c", "a", normalize_patch({"$inc": {"n": 1}}), if_match=str(doc["_etag"]))
    assert new["n"] == 2


# ----------------------------------------------------------------------------- updateDescription


UPDATE_CASES = [
    # (id, before, update, after (without _id/_etag), updatedFields (without _etag), removedFields)
    ("set", {"a": 1}, {"$set": {"a": 2}}, {"a": 2}, {"a": 2}, []),
    ("set-new-path", {"c": 5}, {"$set": {"a.b": 6}}, {"c": 5, "a": {"b": 6}}, {"a": {"b": 6}}, []),
    ("set-nested", {"r": {"a": 1, "b": 2}}, {"$set": {"r.a": 3}}, {"r": {"a": 3, "b": 2}}, {"r.a": 3}, []),
    ("unset", {"a": 5, "b": 1}, {"$unset": {"a": ""}}, {"b": 1}, {}, ["a"]),
    ("inc", {"a": 5, "b": 1}, {"$inc": {"b": 2}}, {"a": 5, "b": 3}, {"b": 3}, []),
    ("inc-create", {}, {"$inc": {"n": 4}}, {"n": 4}, {"n": 4}, []),
    ("push-append", {"arr": [1, 2]}, {"$push": {"arr": 3}}, {"arr": [1, 2, 3]}, {"arr.2": 3}, []),
    (
        "push-each",
        {"arr": [0]},
        {"$push": {"arr": {"$each": [1, 2]}}},
        {"arr": [0, 1, 2]},
        {"arr.1": 1, "arr.2": 2},
        [],
    ),
    ("push-empty", {"arr": []}, {"$push": {"arr": 1}}, {"arr": [1]}, {"arr": [1]}, []),
    ("pull", {"arr": [0, 1, 2, 3]}, {"$pull": {"arr": {"$lt": 2}}}, {"arr": [2, 3]}, {"arr": [2, 3]}, []),
    ("addToSet", {"arr": [0]}, {"$addToSet": {"arr": 1}}, {"arr": [0, 1]}, {"arr": [0, 1]}, []),
    ("rename", {"a": 2, "z": 0}, {"$rename": {"a": "b"}}, {"z": 0, "b": 2}, {"b": 2}, ["a"]),
    ("mul", {"p": 2}, {"$mul": {"p": 5}}, {"p": 10}, {"p": 10}, []),
    ("min", {"a": 1}, {"$min": {"a": 0}}, {"a": 0}, {"a": 0}, []),
    ("max", {}, {"$max": {"a": 0}}, {"a": 0}, {"a": 0}, []),
    ("set-and-unset", {"a": 1, "b": 1}, {"$set": {"b": 2}, "$unset": {"a": 1}}, {"b": 2}, {"b": 2}, ["a"]),
    ("plain-fields", {"a": 1}, {"a": 9, "$unset": {"a2": 1}}, {"a": 9}, {"a": 9}, []),
]


@pytest.mark.parametrize(
    "before, spec, after, updated, removed", [c[1:] for c in UPDATE_CASES], ids=[c[0] for c in UPDATE_CASES]
)
def test_update_description(engine, before, spec, after, updated, removed):
    (old,) = engine.insert_documents("c", [{"_id": 1, **before}])
    stream = watch_all(engine)
    created, new = update(engine, 1, spec)
    assert created is False
    assert new["_etag"] != old["_etag"]
    assert {k: v for k, v in new.items() if k != "_etag"} == {"_id": 1, **after}
    (event,) = drain(engine, stream)
    assert list(event) == EVENT_KEYS_UPDATE
    check_common(event, engine, "update")
    assert event["documentKey"] == {"_id": 1}
    assert event["fullDocument"] == new
    assert event["fullDocumentBeforeChange"] == old
    desc = event["updateDescription"]
    assert list(desc) == ["updatedFields", "removedFields", "truncatedArrays"]
    assert desc["updatedFields"] == {**updated, "_etag": new["_etag"]}
    assert desc["removedFields"] == removed
    assert desc["truncatedArrays"] == []


def test_current_date_description(engine):
    engine.insert_documents("c", [{"_id": 1, "a": 1}])
    stream = watch_all(engine)
    _, new = update(engine, 1, {"$currentDate": {"a": True}})
    (event,) = drain(engine, stream)
    assert isinstance(new["a"], dt.datetime)
    assert event["updateDescription"]["updatedFields"] == {"a": new["a"], "_etag": new["_etag"]}
    assert new["a"] == event["wallTime"]


@pytest.mark.parametrize(
    "spec",
    [
        {"$set": {"a": 1}},
        {"$unset": {"missing": 1}},
        {"$inc": {"a": 0}},
        {"$push": {"arr": {"$each": []}}},
        {"$pull": {"arr": 99}},
        {"$addToSet": {"arr": 1}},
        {"$rename": {"missing": "b"}},
        {"$min": {"a": 5}},
        {"$max": {"a": 0}},
    ],
)
def test_noop_update_makes_no_event(engine, spec):
    (old,) = engine.insert_documents("c", [{"_id": 1, "a": 1, "arr": [1]}])
    before = log_rows(engine.path, kind=None)
    created, doc = update(engine, 1, spec)
    assert created is False
    assert doc == old  # nothing written, not even a new _etag
    assert engine.get_document("c", 1) == old
    assert log_rows(engine.path, kind=None) == before


def test_failed_update_writes_nothing(engine):
    (old,) = engine.insert_documents("c", [{"_id": 1, "s": "x", "n": 1}])
    before = log_rows(engine.path, kind=None)
    with pytest.raises(UpdateError):
        update(engine, 1, {"$set": {"n": 2}, "$inc": {"s": 1}})
    with pytest.raises(DocumentNotFound):
        update(engine, 2, {"$set": {"n": 2}})
    assert engine.get_document("c", 1) == old
    assert log_rows(engine.path, kind=None) == before


def test_upsert_update_inserts(engine):
    stream = watch_all(engine)
    created, new = engine.update_document(
        "c", "u", normalize_patch({"$set": {"a": 1}, "$inc": {"n": 2}}), upsert=True
    )
    assert created is True
    assert {k: v for k, v in new.items() if k != "_etag"} == {"_id": "u", "a": 1, "n": 2}
    (event,) = drain(engine, stream)
    assert event["operationType"] == "insert"
    assert event["fullDocument"] == new
    assert "updateDescription" not in event


def test_events_are_per_collection(engine):
    engine.put_collection("other", {})
    stream = watch_all(engine)
    engine.insert_documents("other", [{"_id": 1}])
    engine.insert_documents("c", [{"_id": 2}])
    (event,) = drain(engine, stream)
    assert event["documentKey"] == {"_id": 2}


# ----------------------------------------------------------------------------- tokens and resume


def test_resume_after_yields_exactly_the_later_events(engine):
    stream = watch_all(engine)
    for i in range(10):
        engine.insert_documents("c", [{"_id": i}])
    events = drain(engine, stream)
    assert [e["documentKey"]["_id"] for e in events] == list(range(10))
    tokens = [e["_id"] for e in events]
    positions = [engine.position(t) for t in tokens]
    assert positions == sorted(positions) and len(set(positions)) == 10

    resumed = engine.watch("c", None, resume_after=tokens[3])
    again = drain(engine, resumed)
    assert [e["documentKey"]["_id"] for e in again] == list(range(4, 10))
    assert [e["_id"] for e in again] == tokens[4:]
    assert again == events[4:]

    last = engine.watch("c", None, resume_after=tokens[-1])
    assert drain(engine, last) == []
    engine.insert_documents("c", [{"_id": 10}])
    assert [e["documentKey"]["_id"] for e in drain(engine, last)] == [10]


def test_resume_from_another_engine_instance(engine):
    stream = watch_all(engine)
    engine.insert_documents("c", [{"_id": i} for i in range(5)])
    tokens = [e["_id"] for e in drain(engine, stream)]
    second = EmbeddedEngine(os.path.dirname(engine.path))
    try:
        assert second.epoch == engine.epoch
        resumed = second.watch("c", None, resume_after=tokens[1])
        assert [e["documentKey"]["_id"] for e in drain(second, resumed)] == [2, 3, 4]
        assert second.current_token()["_data"] == tokens[-1]["_data"]
    finally:
        second.close()


def test_current_token_is_now(engine):
    engine.insert_documents("c", [{"_id": 1}])
    engine.tail_once()
    now = engine.current_token()
    stream = engine.watch("c", None, resume_after=now)
    assert drain(engine, stream) == []
    engine.insert_documents("c", [{"_id": 2}])
    assert [e["documentKey"]["_id"] for e in drain(engine, stream)] == [2]


@pytest.mark.parametrize(
    "token",
    [
        "82abc",
        {},
        {"_data": 5},
        {"_data": "xyz"},
        {"_data": "0" * 31},
        {"_data": "0" * 33},
        {"_data": "g" * 32},
        {"_data": "0" * 32, "extra": 1},
        [{"_data": "0" * 32}],
    ],
)
def test_malformed_token_is_bad_request(engine, token):
    with pytest.raises(BadRequest):
        engine.position(token)
    with pytest.raises(BadRequest):
        engine.watch("c", None, resume_after=token)
    assert BadRequest.status == 400


def test_token_from_another_data_dir_is_history_lost(engine, tmp_path):
    other = EmbeddedEngine(str(tmp_path / "other"))
    try:
        other.put_collection("c", {})
        stream = watch_all(other)
        other.insert_documents("c", [{"_id": 1}])
        (event,) = drain(other, stream)
        assert other.epoch != engine.epoch
        engine.insert_documents("c", [{"_id": 1}, {"_id": 2}])  # same seq range, other store
        with pytest.raises(HistoryLost):
            engine.watch("c", None, resume_after=event["_id"])
    finally:
        other.close()


def test_token_ahead_of_the_store_is_history_lost(engine):
    engine.tail_once()
    ahead = engine.token(engine.position(engine.current_token()) + 1000)
    with pytest.raises(HistoryLost):
        engine.watch("c", None, resume_after=ahead)


# ----------------------------------------------------------------------------- retention


def test_retention_by_event_count(tmp_path):
    engine = EmbeddedEngine(str(tmp_path / "data"), max_events=100)
    try:
        engine.put_collection("c", {})
        stream = watch_all(engine)
        for i in range(150):
            engine.insert_documents("c", [{"_id": i}])
        tokens = [e["_id"] for e in drain(engine, stream, timeout=0.5)]
        assert len(tokens) == 150
        last = engine.position(tokens[-1])
        engine.prune()

        rows = log_rows(engine.path, kind=None)
        assert len(rows) == 100
        assert rows[0][0] == last - 99 and rows[-1][0] == last
        # the oldest event still in the log, and the one before it
        first_kept = next(t for t in tokens if engine.position(t) == last - 99)
        boundary = engine.token(last - 100)  # resuming after it needs only retained events
        too_old = tokens[0]

        with pytest.raises(HistoryLost):
            engine.watch("c", None, resume_after=too_old)
        with pytest.raises(HistoryLost):
            engine.watch("c", None, resume_after=engine.token(last - 101))
        # a fresh engine instance (reading the table, not its feed) agrees
        fresh = EmbeddedEngine(str(tmp_path / "data"), max_events=100)
        try:
            with pytest.raises(HistoryLost):
                fresh.watch("c", None, resume_after=too_old)
            got = drain(fresh, fresh.watch("c", None, resume_after=boundary))
            assert len(got) == 100
            assert got[0]["_id"] == first_kept
            assert [e["documentKey"]["_id"] for e in got] == list(range(50, 150))
        finally:
            fresh.close()

        recent = engine.watch("c", None, resume_after=tokens[-3])
        assert [e["documentKey"]["_id"] for e in drain(engine, recent)] == [148, 149]
    finally:
        engine.close()


def test_retention_by_age(tmp_path):
    engine = EmbeddedEngine(str(tmp_path / "data"), retention_days=1.0 / 86400)  # one second
    try:
        engine.put_collection("c", {})
        stream = watch_all(engine)
        engine.insert_documents("c", [{"_id": i} for i in range(5)])
        old_tokens = [e["_id"] for e in drain(engine, stream)]
        time.sleep(1.3)
        engine.insert_documents("c", [{"_id": 5}])
        engine.insert_documents("c", [{"_id": 6}])
        new_tokens = [e["_id"] for e in drain(engine, stream)]
        engine.prune()
        kept = [r[3]["documentKey"]["_id"] for r in log_rows(engine.path, "c")]
        assert kept == [5, 6]
        for token in old_tokens[:-1]:
            with pytest.raises(HistoryLost):
                engine.watch("c", None, resume_after=token)
        # the last old event is the boundary: everything after it is still here
        got = drain(engine, engine.watch("c", None, resume_after=old_tokens[-1]))
        assert [e["documentKey"]["_id"] for e in got] == [5, 6]
        got = drain(engine, engine.watch("c", None, resume_after=new_tokens[0]))
        assert [e["documentKey"]["_id"] for e in got] == [6]
    finally:
        engine.close()


def test_prune_never_drops_the_latest_event(tmp_path):
    engine = EmbeddedEngine(str(tmp_path / "data"), retention_days=1e-9, max_events=1)
    try:
        engine.put_collection("c", {})
        engine.insert_documents("c", [{"_id": 1}])
        engine.prune()
        rows = log_rows(engine.path, kind=None)
        assert len(rows) == 1 and rows[0][3]["documentKey"] == {"_id": 1}
        engine.tail_once()
        token = engine.current_token()
        stream = engine.watch("c", None, resume_after=token)
        engine.insert_documents("c", [{"_id": 2}])
        assert [e["documentKey"]["_id"] for e in drain(engine, stream)] == [2]
    finally:
        engine.close()


def test_stream_that_falls_behind_the_window_reports_history_lost(tmp_path):
    engine = EmbeddedEngine(str(tmp_path / "data"), max_events=100)
    try:
        engine.put_collection("c", {})
        engine.insert_documents("c", [{"_id": -1}])
        engine.tail_once()
        early = engine.current_token()
        for i in range(150):
            engine.insert_documents("c", [{"_id": i}])
        engine.prune()
        # an engine whose feed starts after the pruned rows must read the table and see the loss
        fresh = EmbeddedEngine(str(tmp_path / "data"), max_events=100)
        try:
            with pytest.raises(HistoryLost):
                fresh.watch("c", None, resume_after=early)
            with pytest.raises(HistoryLost):
                fresh.read_batch("c", engine.position(early), 10_000)[0]
        finally:
            fresh.close()
    finally:
        engine.close()


def test_catch_up_from_the_table_is_read_in_byte_bounded_batches_and_loses_nothing(tmp_path):
    engine = EmbeddedEngine(str(tmp_path / "data"))
    try:
        engine.put_collection("c", {})
        engine.put_collection("other", {})
        start = engine.current_token()
        big = "x" * (512 << 10)
        for i in range(30):  # 15 MiB of events, interleaved with another collection's
            engine.insert_documents("c", [{"_id": i, "big": big}])
            engine.insert_documents("other", [{"_id": i}])
        fresh = EmbeddedEngine(str(tmp_path / "data"))  # its feed starts after all of them
        try:
            rows, complete = fresh.read_batch("c", engine.position(start), 10_000)
            assert 1 <= len(rows) < 30 and not complete  # cut by bytes, and says so
            stream = fresh.watch("c", None, resume_after=start)
            seen = []
            while (change := stream.try_next(timeout=0)) is not None:
                seen.append(change.event["documentKey"]["_id"])
            assert seen == list(range(30))
        finally:
            fresh.close()
    finally:
        engine.close()


def test_the_process_feed_is_bounded_in_bytes_and_a_stream_behind_it_loses_nothing(tmp_path, monkeypatch):
    """The feed keeps about _FEED_BYTES of row text, however few rows that is; a stream
    left behind it reads the rest from the table. A large row's decoded event is not kept."""
    from services.storage import embedded

    monkeypatch.setattr(embedded, "_FEED_BYTES", 1 << 20)
    engine = EmbeddedEngine(str(tmp_path / "data"))
    try:
        engine.put_collection("c", {})
        early = watch_all(engine)  # not read while the others are written: falls behind the feed
        big = "x" * (256 << 10)
        for i in range(20):  # 5 MiB of events, far fewer than _FEED_ROWS rows
            engine.insert_documents("c", [{"_id": i, "big": big}])
            engine.tail_once()
        feed = engine._feed
        assert feed.bytes == sum(len(r.text) for r in feed.rows) <= (1 << 20) * 1.25
        assert 0 < len(feed.rows) < 20
        assert [e["documentKey"]["_id"] for e in drain(engine, early)] == list(range(20))
        assert all(r._event is None for r in feed.rows)  # 256 KiB rows: decoded per reader
        engine.insert_documents("c", [{"_id": "small"}])
        engine.tail_once()
        assert feed.rows[-1].event() is feed.rows[-1].event()  # a small row's is shared
    finally:
        engine.close()


def test_a_stream_reading_behind_the_feed_loses_nothing_when_the_feed_moves_meanwhile(tmp_path, monkeypatch):
    """A stream behind the feed reads the table up to where the feed starts; the read
    yields, and the tailer may trim the feed further meanwhile: the rows between the two
    starts must still be read (they were skipped when the start was read twice)."""
    from services.storage import embedded

    monkeypatch.setattr(embedded, "_FEED_BYTES", 1 << 20)
    engine = EmbeddedEngine(str(tmp_path / "data"))
    try:
        engine.put_collection("c", {})
        stream = watch_all(engine)
        big = "x" * (600 << 10)
        for i in range(3):
            engine.insert_documents("c", [{"_id": i, "big": big}])
            engine.tail_once()
        read_batch = engine.read_batch
        moved = []

        def read_batch_while_the_feed_moves(*args):
            out = read_batch(*args)
            if not moved:  # what the tailer does while the read is in the threadpool
                for i in (3, 4):
                    engine.insert_documents("c", [{"_id": i, "big": big}])
                    engine.tail_once()
                moved.append(engine._feed.start_seq)
            return out

        monkeypatch.setattr(engine, "read_batch", read_batch_while_the_feed_moves)
        assert engine._feed.start_seq > engine.position(engine.current_token()) - 3  # trimmed
        assert [e["documentKey"]["_id"] for e in drain(engine, stream)] == [0, 1, 2, 3, 4]
        assert moved
    finally:
        engine.close()


# ----------------------------------------------------------------------------- several processes


PROCESSES = 4
WRITES = 500


def _writer(data_dir: str, worker: int, writes: int) -> None:
    """One process: its own engine on the shared directory, a mix of inserts and $inc."""
    import sys

    from services.storage.embedded import EmbeddedEngine as Engine
    from services.updates import normalize_patch as norm

    engine = Engine(data_dir)
    try:
        for i in range(writes):
            if i % 2 == 0:
                engine.insert_documents("c", [{"_id": f"w{worker}-{i}", "worker": worker, "i": i}])
            else:
                engine.update_document("c", "counter", norm({"$inc": {"n": 1}}))
    except BaseException as exc:  # make the parent see why
        print(f"writer {worker} failed: {exc!r}", file=sys.stderr)
        _mark_done(data_dir, worker, f"failed: {exc!r}")
        raise
    finally:
        engine.close()
    _mark_done(data_dir, worker, "ok")


def _mark_done(data_dir: str, worker: int, outcome: str) -> None:
    # The parent waits for these files, not for exit codes: once another library in the
    # test process installed its own SIGCHLD handling (Playwright's asyncio), gevent's
    # patched waitpid can miss a child's exit.
    path = os.path.join(data_dir, f"writer-{worker}.done")
    with open(path + ".tmp", "w") as f:
        f.write(outcome)
    os.replace(path + ".tmp", path)


def test_four_processes_lose_nothing_and_share_one_order(tmp_path):
    data_dir = str(tmp_path / "data")
    engine = EmbeddedEngine(data_dir)
    try:
        engine.put_collection("c", {})
        engine.insert_documents("c", [{"_id": "counter", "n": 0}])
        engine.tail_once()
        start = engine.current_token()

        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_writer, args=(data_dir, w, WRITES)) for w in range(PROCESSES)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        # poll rather than join(): under gevent's monkey-patching a join() can miss the exit
        deadline = time.monotonic() + 120
        done = [os.path.join(data_dir, f"writer-{w}.done") for w in range(PROCESSES)]
        while not all(os.path.exists(d) for d in done) and time.monotonic() < deadline:
            time.sleep(0.05)
        outcomes = []
        for d in done:
            with open(d) if os.path.exists(d) else open(os.devnull) as f:
                outcomes.append(f.read() or "no answer")
        assert outcomes == ["ok"] * PROCESSES
        assert time.monotonic() - t0 < 60

        incs = PROCESSES * (WRITES // 2)
        inserts = PROCESSES * (WRITES - WRITES // 2)
        assert engine.get_document("c", "counter")["n"] == incs
        docs = engine.find("c", {"worker": {"$exists": True}}, [], None, 0, 0)
        assert sorted(d["_id"] for d in docs) == sorted(
            f"w{w}-{i}" for w in range(PROCESSES) for i in range(0, WRITES, 2)
        )

        rows = [
            r
            for r in log_rows(engine.path, "c")
            if r[3]["documentKey"]["_id"] != "counter" or r[3]["operationType"] == "update"
        ]
        all_rows = log_rows(engine.path, "c")
        assert len(all_rows) == 1 + PROCESSES * WRITES
        assert len(rows) == PROCESSES * WRITES
        seqs = [r[0] for r in all_rows]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        ops = [r[3]["operationType"] for r in all_rows[1:]]
        assert ops.count("insert") == inserts and ops.count("update") == incs
        # the counter's events count up one by one in log order: no lost or reordered $inc
        counts = [r[3]["fullDocument"]["n"] for r in all_rows[1:] if r[3]["operationType"] == "update"]
        assert counts == list(range(1, incs + 1))
        assert all(
            r[3]["updateDescription"]["updatedFields"]["n"] == r[3]["fullDocument"]["n"]
            for r in all_rows[1:]
            if r[3]["operationType"] == "update"
        )
        # each writer's own inserts appear in the order it made them
        for w in range(PROCESSES):
            mine = [
                r[3]["fullDocument"]["i"]
                for r in all_rows
                if r[3]["operationType"] == "insert" and r[3]["fullDocument"].get("worker") == w
            ]
            assert mine == list(range(0, WRITES, 2))
        assert (
            int(
                sqlite3.connect(os.path.join(data_dir, "changefeed.sqlite3"))
                .execute("SELECT value FROM meta WHERE key='last_seq'")
                .fetchone()[0]
            )
            == seqs[-1]
        )

        # this engine's stream (its feed) and a second instance (reading the table) agree
        expected = [(engine.token(seq), ev["documentKey"]) for seq, _, _, ev in all_rows[1:]]
        for reader in (engine, EmbeddedEngine(data_dir)):
            stream = reader.watch("c", None, resume_after=start)
            got = []
            deadline = time.monotonic() + 30
            while len(got) < len(expected) and time.monotonic() < deadline:
                reader.tail_once()
                change = stream.try_next(0.5)
                if change is not None:
                    got.append((change.token, change.event["documentKey"]))
            assert got == expected
            if reader is not engine:
                reader.close()
    finally:
        engine.close()
