"""One engine contract, run against every engine.

`embedded` always runs. `mongo` runs when MONGO_URI names a replica set (or mongos): each
test then uses a fresh database `changefeed_contract_<random>` and drops it afterwards.
Without MONGO_URI the mongo leg is skipped with a message saying so.
"""

from __future__ import annotations

import os
import secrets
import time

import pytest
from bson.objectid import ObjectId

from services.errors import BadRequest, DocumentNotFound, EtagMismatch
from services.updates import normalize_patch

ENGINES = ["embedded", "mongo"]


def _mongo_engine():
    uri = os.environ.get("MONGO_URI")
    if not uri:
        pytest.skip("MONGO_URI not set: the mongo leg of the contract suite needs a replica set")
    from services.storage.mongo import MongoEngine

    engine = MongoEngine(uri, f"changefeed_contract_{secrets.token_hex(4)}", server_selection_timeout_ms=3000)
    try:
        engine.check_topology()
    except RuntimeError as exc:
        engine.close()
        pytest.skip(f"MONGO_URI is not a replica set: {exc}")
    return engine


@pytest.fixture(params=ENGINES)
def engine(request, tmp_path):
    if request.param == "embedded":
        from services.storage.embedded import EmbeddedEngine

        eng = EmbeddedEngine(str(tmp_path / "data"))
    else:
        eng = _mongo_engine()
    eng.start()
    eng.put_collection("c", {})
    yield eng
    if request.param == "mongo":
        eng.client.drop_database(eng.db_name)
    eng.close()


def drain(stream, expect: int, timeout: float = 10.0) -> list[dict]:
    """Read `expect` events (or fail after `timeout`), then check that no more follow."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(out) < expect and time.monotonic() < deadline:
        change = stream.try_next(0.5)
        if change is None:
            continue
        assert change.error is None, change.error
        assert change.event["_id"]["_data"] == change.token["_data"]
        assert change.position == stream.position
        out.append(change.event)
    assert len(out) == expect, f"got {len(out)} of {expect} events"
    extra = stream.try_next(0.3)
    assert extra is None, f"unexpected event {extra}"
    return out


def watch(engine, coll="c", resume_after=None):
    """Open a stream at the end of the feed (the embedded engine first pulls in its own writes)."""
    engine.tail_once()
    return engine.watch(coll, None, resume_after=resume_after)


def user_fields(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "_etag"}


def test_insert_event_shape(engine):
    stream = watch(engine)
    (stored,) = engine.insert_documents("c", [{"_id": "a", "n": 1}])
    assert isinstance(stored["_etag"], ObjectId)
    (event,) = drain(stream, 1)
    assert event["operationType"] == "insert"
    assert event["ns"]["coll"] == "c"
    assert event["documentKey"] == {"_id": "a"}
    assert event["fullDocument"] == stored
    assert "updateDescription" not in event


def test_update_event_shape(engine):
    engine.insert_documents("c", [{"_id": 1, "a": 1, "arr": [1]}])
    stream = watch(engine)
    created, new = engine.update_document("c", 1, normalize_patch({"a": 2, "$push": {"arr": 2}}))
    assert created is False and user_fields(new) == {"_id": 1, "a": 2, "arr": [1, 2]}
    (event,) = drain(stream, 1)
    assert event["operationType"] == "update"
    assert event["documentKey"] == {"_id": 1}
    assert event["fullDocument"] == new
    desc = event["updateDescription"]
    assert desc["updatedFields"] == {"a": 2, "arr.1": 2, "_etag": new["_etag"]}
    assert desc["removedFields"] == [] and desc["truncatedArrays"] == []


def test_noop_update_emits_nothing(engine):
    (old,) = engine.insert_documents("c", [{"_id": 1, "a": 1}])
    stream = watch(engine)
    assert engine.update_document("c", 1, normalize_patch({"a": 1})) == (False, old)
    drain(stream, 0, timeout=0.5)


def test_replace_and_delete_event_shapes(engine):
    (old,) = engine.insert_documents("c", [{"_id": 1, "a": 1}])
    stream = watch(engine)
    with pytest.raises(EtagMismatch):
        engine.replace_document("c", 1, {"b": 2}, upsert=False, if_match=str(ObjectId()))
    created, new = engine.replace_document("c", 1, {"b": 2}, upsert=False, if_match=str(old["_etag"]))
    assert created is False and user_fields(new) == {"_id": 1, "b": 2}
    engine.delete_document("c", 1, if_match=str(new["_etag"]))
    with pytest.raises(DocumentNotFound):
        engine.delete_document("c", 1)
    replace, delete = drain(stream, 2)
    assert replace["operationType"] == "replace" and replace["fullDocument"] == new
    assert "updateDescription" not in replace
    assert delete["operationType"] == "delete" and delete["documentKey"] == {"_id": 1}
    assert "fullDocument" not in delete or delete["fullDocument"] is None


def test_resume_after_a_token_yields_exactly_the_later_events(engine):
    stream = watch(engine)
    engine.insert_documents("c", [{"_id": i} for i in range(6)])
    events = drain(stream, 6)
    positions = [engine.position(e["_id"]) for e in events]
    assert positions == sorted(positions) and len(set(positions)) == 6
    resumed = watch(engine, resume_after=events[2]["_id"])
    again = drain(resumed, 3)
    assert [e["documentKey"]["_id"] for e in again] == [3, 4, 5]
    assert [e["_id"]["_data"] for e in again] == [e["_id"]["_data"] for e in events[3:]]


def test_current_token_is_now(engine):
    engine.insert_documents("c", [{"_id": 1}])
    engine.tail_once()
    stream = watch(engine, resume_after=engine.current_token())
    drain(stream, 0, timeout=0.5)
    engine.insert_documents("c", [{"_id": 2}])
    assert [e["documentKey"]["_id"] for e in drain(stream, 1)] == [2]


@pytest.mark.parametrize(
    "token",
    ["82abc", {}, {"_data": 5}, {"_data": "xyz"}, {"_data": "0" * 32, "extra": 1}, [{"_data": "0" * 32}]],
)
def test_malformed_token_is_bad_request(engine, token):
    with pytest.raises(BadRequest):
        engine.position(token)
    with pytest.raises(BadRequest):
        engine.watch("c", None, resume_after=token)


def test_meta_changes_reach_the_listeners(engine):
    seen = []
    engine.on_meta_change(seen.append)
    engine.put_collection("d", {"streams": []})
    deadline = time.monotonic() + 10
    while not any(m.coll == "d" and m.kind == "props" for m in seen) and time.monotonic() < deadline:
        engine.tail_once()
        time.sleep(0.05)
    assert any(m.coll == "d" and m.kind == "props" for m in seen)
