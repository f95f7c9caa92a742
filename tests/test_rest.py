"""The RESTHeart-compatible REST API through Flask's test client.

Every write is checked twice: the HTTP answer, and the change log the engine wrote in the
same transaction (read straight from its SQLite file). Every refused input is checked
for its exact status, RESTHeart's error body ({"http status code", "http status
description", "message"}), and for leaving neither a partial document nor a change event
behind.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sqlite3
from urllib.parse import quote

import bcrypt
import pytest
from bson.binary import Binary
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.objectid import ObjectId

from services.storage.embedded import decode

ERROR_KEYS = ["http status code", "http status description", "message"]
OID = "5f0000000000000000000001"


# ----------------------------------------------------------------------------- helpers


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def q(value) -> str:
    """A query-string value: JSON, percent-encoded."""
    return quote(value if isinstance(value, str) else json.dumps(value), safe="")


def assert_error(response, status: int, contains: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert list(body) == ERROR_KEYS
    assert body["http status code"] == status
    assert isinstance(body["http status description"], str) and body["http status description"]
    assert isinstance(body["message"], str) and body["message"]
    assert '"' not in body["message"]
    if contains is not None:
        assert contains in body["message"], body["message"]
    return body


def engine_of(app):
    return app.extensions["changefeed.engine"]


def change_rows(app) -> list[tuple[int, str, str, dict]]:
    """Every change-log row (seq, coll, kind, event), straight from the SQLite file."""
    conn = sqlite3.connect(engine_of(app).path)
    try:
        rows = conn.execute("SELECT seq, coll, kind, event FROM changes ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [(seq, coll, kind, decode(text)) for seq, coll, kind, text in rows]


def events(app, coll: str | None = None) -> list[dict]:
    return [e for _, c, kind, e in change_rows(app) if kind == "event" and (coll is None or c == coll)]


def documents_in(app, coll: str) -> list[dict]:
    conn = sqlite3.connect(engine_of(app).path)
    try:
        rows = conn.execute("SELECT doc FROM documents WHERE coll=?", (coll,)).fetchall()
    finally:
        conn.close()
    return [decode(r[0]) for r in rows]


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch):
    """bcrypt at its lowest cost: every app hashes the admin password at start-up."""
    from services import auth

    monkeypatch.setattr(auth, "BCRYPT_ROUNDS", 4)


@pytest.fixture
def coll(client):
    assert client.put("/things", json={}).status_code == 201
    return "things"


def post(client, coll, doc):
    r = client.post(f"/{coll}", json=doc)
    assert r.status_code == 201, r.get_data(as_text=True)
    return r


# ----------------------------------------------------------------------------- collections


def test_put_collection_creates_201_then_replaces_200(client, app):
    r = client.put("/messages", json={"a": 1, "b": {"c": 2}})
    assert r.status_code == 201
    assert r.get_json() == {}
    etag1 = r.headers["ETag"]
    assert len(etag1) == 24 and int(etag1, 16) >= 0
    meta = client.get("/messages/_meta").get_json()
    assert meta == {"_id": "_meta", "a": 1, "b": {"c": 2}, "_etag": {"$oid": etag1}}

    r = client.put("/messages", json={"x": True})
    assert r.status_code == 200
    etag2 = r.headers["ETag"]
    assert etag2 != etag1
    r = client.get("/messages/_meta")
    assert r.status_code == 200
    assert r.get_json() == {"_id": "_meta", "x": True, "_etag": {"$oid": etag2}}
    assert r.headers["ETag"] == etag2


def test_put_collection_with_stale_if_match_is_409(client):
    etag = client.put("/messages", json={"a": 1}).headers["ETag"]
    assert_error(client.put("/messages", json={"a": 2}, headers={"If-Match": str(ObjectId())}), 409)
    assert client.get("/messages/_meta").get_json()["a"] == 1
    assert client.put("/messages", json={"a": 3}, headers={"If-Match": etag}).status_code == 200
    assert client.get("/messages/_meta").get_json()["a"] == 3


def test_patch_collection_merges_top_level(client):
    client.put("/messages", json={"a": 1, "b": {"x": 1, "y": 2}, "streams": [{"uri": "one", "stages": []}]})
    r = client.patch("/messages", json={"b": {"z": 3}, "c": 4, "streams": [{"uri": "two", "stages": []}]})
    assert r.status_code == 200
    meta = client.get("/messages/_meta").get_json()
    assert meta == {
        "_id": "_meta",
        "a": 1,
        "b": {"z": 3},
        "streams": [{"uri": "two", "stages": []}],
        "c": 4,
        "_etag": {"$oid": r.headers["ETag"]},
    }


def test_patch_missing_collection_is_404(client):
    assert_error(client.patch("/nothing", json={"a": 1}), 404, "nothing")


def test_meta_keeps_escaped_keys_as_stored(client):
    """As in RESTHeart, `_meta` is returned as stored: `_$match` is not unescaped."""
    streams = [
        {
            "uri": "all",
            "stages": [{"_$match": {"_$or": [{"operationType": "insert"}, {"operationType": "update"}]}}],
        },
        {"uri": "mine", "stages": [{"_$match": {"fullDocument::name": {"_$var": "n"}}}]},
    ]
    assert client.put("/messages", json={"streams": streams, "$odd": {"$date": 1}}).status_code == 201
    meta = client.get("/messages/_meta").get_json()
    assert meta["streams"] == streams
    assert meta["$odd"] == {"$date": 1}  # plain JSON, not decoded as Extended JSON
    assert list(meta) == ["_id", "streams", "$odd", "_etag"]


def test_get_root_lists_collections(client):
    assert client.get("/").get_json() == ["acl", "users"]
    client.put("/zeta", json={})
    client.put("/alpha", json={})
    assert client.get("/").get_json() == ["acl", "alpha", "users", "zeta"]


def test_delete_collection_needs_the_right_if_match(client, app):
    etag = client.put("/messages", json={}).headers["ETag"]
    post(client, "messages", {"_id": "m1"})
    assert_error(client.delete("/messages"), 409, "If-Match")
    assert_error(client.delete("/messages", headers={"If-Match": str(ObjectId())}), 409)
    assert client.get("/messages/m1").status_code == 200
    assert [e["operationType"] for e in events(app, "messages")] == ["insert"]

    r = client.delete("/messages", headers={"If-Match": etag})
    assert r.status_code == 204
    assert r.data == b""
    assert_error(client.get("/messages"), 404, "Collection 'messages' does not exist")
    assert_error(client.get("/messages/_meta"), 404)
    assert "messages" not in client.get("/").get_json()
    assert documents_in(app, "messages") == []
    drop = events(app, "messages")[-1]
    assert drop["operationType"] == "drop"
    assert drop["ns"] == {"db": "restheart", "coll": "messages"}
    assert "documentKey" not in drop and "fullDocument" not in drop


def test_delete_missing_collection_is_404(client):
    assert_error(client.delete("/nothing", headers={"If-Match": "x"}), 404)


def test_security_collections_cannot_be_dropped(client):
    etag = client.get("/users/_meta").headers["ETag"]
    assert_error(client.delete("/users", headers={"If-Match": etag}), 400)
    assert client.get("/users/admin").status_code == 200


# ----------------------------------------------------------------------------- documents: writes


def test_post_object_201_location_etag_and_insert_event(client, app, coll):
    r = client.post("/things", json={"name": "uji", "n": 1})
    assert r.status_code == 201
    new_id = r.get_json()["_id"]["$oid"]
    assert ObjectId.is_valid(new_id)
    assert r.headers["Location"] == f"/things/{new_id}"
    etag = r.headers["ETag"]

    got = client.get(f"/things/{new_id}")
    assert got.status_code == 200
    assert got.headers["ETag"] == etag
    assert got.get_json() == {"_id": {"$oid": new_id}, "name": "uji", "n": 1, "_etag": {"$oid": etag}}

    (event,) = events(app, "things")
    assert event["operationType"] == "insert"
    assert event["ns"] == {"db": "restheart", "coll": "things"}
    assert event["documentKey"] == {"_id": ObjectId(new_id)}
    assert event["fullDocument"] == {"_id": ObjectId(new_id), "name": "uji", "n": 1, "_etag": ObjectId(etag)}


def test_post_with_string_id_location(client, coll):
    r = client.post("/things", json={"_id": "hello", "v": 1})
    assert r.status_code == 201
    assert r.get_json() == {"_id": "hello"}
    assert r.headers["Location"] == "/things/hello"
    assert client.get("/things/hello").get_json()["v"] == 1


def test_bulk_post_inserts_each_with_one_event(client, app, coll):
    r = client.post("/things", json=[{"_id": "a", "n": 1}, {"_id": "b", "n": 2}, {"n": 3}])
    assert r.status_code == 201
    body = r.get_json()
    assert body["inserted"] == 3
    assert body["_ids"][:2] == ["a", "b"] and ObjectId.is_valid(body["_ids"][2]["$oid"])
    evs = events(app, "things")
    assert [e["operationType"] for e in evs] == ["insert"] * 3
    assert [e["documentKey"]["_id"] for e in evs] == ["a", "b", ObjectId(body["_ids"][2]["$oid"])]
    assert sorted(d["n"] for d in documents_in(app, "things")) == [1, 2, 3]


def test_bulk_post_with_duplicate_is_all_or_nothing(client, app, coll):
    post(client, "things", {"_id": "a"})
    before = change_rows(app)
    assert_error(client.post("/things", json=[{"_id": "x"}, {"_id": "a"}]), 409, "Duplicate key")
    assert_error(client.post("/things", json=[{"_id": "y"}, {"_id": "y"}]), 409)
    assert change_rows(app) == before
    assert [d["_id"] for d in documents_in(app, "things")] == ["a"]


def test_post_duplicate_id_409_no_event(client, app, coll):
    post(client, "things", {"_id": "dup", "v": 1})
    before = change_rows(app)
    assert_error(client.post("/things", json={"_id": "dup", "v": 2}), 409, "dup")
    assert change_rows(app) == before
    assert client.get("/things/dup").get_json()["v"] == 1


def test_put_document_upsert_replace_and_plain_404(client, app, coll):
    assert_error(client.put("/things/d1", json={"a": 1}), 404, "Document 'd1' does not exist")
    assert events(app, "things") == []

    r = client.put("/things/d1?wm=upsert", json={"a": 1})
    assert r.status_code == 201
    assert r.get_json() == {"_id": "d1"}
    r = client.put("/things/d1?wm=upsert", json={"b": 2})
    assert r.status_code == 200
    r = client.put("/things/d1", json={"c": 3, "_id": "d1"})
    assert r.status_code == 200
    got = client.get("/things/d1").get_json()
    assert got == {"_id": "d1", "c": 3, "_etag": {"$oid": r.headers["ETag"]}}

    evs = events(app, "things")
    assert [e["operationType"] for e in evs] == ["insert", "replace", "replace"]
    assert evs[1]["fullDocument"]["b"] == 2 and "a" not in evs[1]["fullDocument"]
    assert all("updateDescription" not in e for e in evs)


def test_put_document_id_mismatch_400(client, app, coll):
    assert_error(client.put("/things/d1?wm=upsert", json={"_id": "other"}), 400, "_id")
    assert documents_in(app, "things") == [] and events(app, "things") == []


def test_put_wm_insert_on_existing_is_409(client, coll):
    post(client, "things", {"_id": "d1"})
    assert_error(client.put("/things/d1?wm=insert", json={"a": 1}), 409)
    assert_error(client.put("/things/d1?wm=bogus", json={"a": 1}), 400, "wm")


def test_patch_document_operators_and_update_event(client, app, coll):
    post(client, "things", {"_id": "p", "a": 1, "b": 2, "arr": [1, 2], "n": 5})
    r = client.patch("/things/p", json={"a": 10, "$unset": {"b": 1}, "$inc": {"n": 2}, "$push": {"arr": 3}})
    assert r.status_code == 200
    assert r.get_json() == {"_id": "p"}
    etag = r.headers["ETag"]
    doc = client.get("/things/p").get_json()
    assert doc == {"_id": "p", "a": 10, "arr": [1, 2, 3], "n": 7, "_etag": {"$oid": etag}}

    ev = events(app, "things")[-1]
    assert ev["operationType"] == "update"
    desc = ev["updateDescription"]
    assert desc["updatedFields"] == {"a": 10, "n": 7, "arr.2": 3, "_etag": ObjectId(etag)}
    assert desc["removedFields"] == ["b"]
    assert desc["truncatedArrays"] == []
    assert ev["fullDocument"] == {"_id": "p", "a": 10, "arr": [1, 2, 3], "n": 7, "_etag": ObjectId(etag)}


@pytest.mark.parametrize(
    "before, update, after",
    [
        ({"a": 2}, {"$mul": {"a": 3}}, {"a": 6}),
        ({"a": [1, 2, 1]}, {"$pull": {"a": 1}}, {"a": [2]}),
        ({"a": [1]}, {"$addToSet": {"a": 2}}, {"a": [1, 2]}),
        ({"a": 1}, {"$rename": {"a": "b"}}, {"b": 1}),
        ({"a": 5}, {"$min": {"a": 3}}, {"a": 3}),
        ({"a": 5}, {"$max": {"a": 9}}, {"a": 9}),
    ],
)
def test_patch_each_operator(client, coll, before, update, after):
    post(client, "things", {"_id": "x", **before})
    assert client.patch("/things/x", json=update).status_code == 200
    doc = client.get("/things/x").get_json()
    doc.pop("_etag")
    assert doc == {"_id": "x", **after}


def test_patch_current_date(client, app, coll):
    post(client, "things", {"_id": "x"})
    before = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=1)
    assert client.patch("/things/x", json={"$currentDate": {"at": True}}).status_code == 200
    at = engine_of(app).get_document("things", "x")["at"]
    assert isinstance(at, dt.datetime)
    assert before <= at <= before + dt.timedelta(seconds=30)
    assert client.get("/things/x").get_json()["at"]["$date"].endswith("Z")


def test_patch_noop_makes_no_event_and_keeps_etag(client, app, coll):
    etag = post(client, "things", {"_id": "x", "a": 1}).headers["ETag"]
    r = client.patch("/things/x", json={"$set": {"a": 1}})
    assert r.status_code == 200
    assert r.headers["ETag"] == etag
    assert [e["operationType"] for e in events(app, "things")] == ["insert"]


def test_patch_upsert_creates(client, app, coll):
    assert_error(client.patch("/things/new", json={"$set": {"a": 1}}), 404)
    r = client.patch("/things/new?wm=upsert", json={"$set": {"a": 1}})
    assert r.status_code == 201
    assert client.get("/things/new").get_json()["a"] == 1
    assert [e["operationType"] for e in events(app, "things")] == ["insert"]


def test_delete_document_204_and_delete_event(client, app, coll):
    post(client, "things", {"_id": OID and {"$oid": OID}, "a": 1})
    r = client.delete(f"/things/{OID}")
    assert r.status_code == 204 and r.data == b""
    assert_error(client.get(f"/things/{OID}"), 404)
    assert_error(client.delete(f"/things/{OID}"), 404)
    ev = events(app, "things")[-1]
    assert ev["operationType"] == "delete"
    assert ev["documentKey"] == {"_id": ObjectId(OID)}
    assert "fullDocument" not in ev


def test_24_hex_id_is_objectid_else_string(client, app, coll):
    post(client, "things", {"_id": {"$oid": OID}, "kind": "oid"})
    post(client, "things", {"_id": OID.upper()[:23] + "z", "kind": "str23z"})
    post(client, "things", {"_id": "123", "kind": "str123"})
    assert client.get(f"/things/{OID}").get_json()["kind"] == "oid"
    assert client.get("/things/123").get_json()["kind"] == "str123"
    assert client.get("/things/" + OID.upper()[:23] + "z").get_json()["kind"] == "str23z"
    ids = {repr(d["_id"]) for d in documents_in(app, "things")}
    assert ids == {repr(ObjectId(OID)), repr("123"), repr(OID.upper()[:23] + "z")}
    # a string _id that looks like an ObjectId is not found through the URL (STRING_OID)
    post(client, "things", {"_id": "aaaaaaaaaaaaaaaaaaaaaaaa"})
    assert_error(client.get("/things/aaaaaaaaaaaaaaaaaaaaaaaa"), 404)


# ----------------------------------------------------------------------------- ETags


def test_document_etag_if_match(client, app, coll):
    etag = post(client, "things", {"_id": "e", "v": 1}).headers["ETag"]
    wrong = str(ObjectId())
    n_events = len(events(app))

    assert_error(client.patch("/things/e", json={"v": 2}, headers={"If-Match": wrong}), 409, "ETag")
    assert_error(client.put("/things/e", json={"v": 2}, headers={"If-Match": wrong}), 409)
    assert_error(client.delete("/things/e", headers={"If-Match": wrong}), 409)
    assert len(events(app)) == n_events
    assert client.get("/things/e").get_json()["v"] == 1

    r = client.patch("/things/e", json={"v": 2}, headers={"If-Match": etag})
    assert r.status_code == 200
    etag2 = r.headers["ETag"]
    assert etag2 != etag
    assert_error(client.put("/things/e", json={"v": 3}, headers={"If-Match": etag}), 409)
    r = client.put("/things/e", json={"v": 3}, headers={"If-Match": f'"{etag2}"'})
    assert r.status_code == 200
    etag3 = r.headers["ETag"]
    assert client.get("/things/e", headers={"If-None-Match": etag3}).status_code == 304
    assert client.delete("/things/e", headers={"If-Match": etag3}).status_code == 204


def test_etag_in_body_is_ignored_and_restamped(client, coll):
    r = client.post("/things", json={"_id": "e", "_etag": {"$oid": OID}})
    assert r.status_code == 201
    assert r.headers["ETag"] != OID
    assert client.get("/things/e").get_json()["_etag"] == {"$oid": r.headers["ETag"]}
    assert_error(client.patch("/things/e", json={"$set": {"_etag": 1}}), 400, "_etag")


# ----------------------------------------------------------------------------- listing


@pytest.fixture
def numbers(client, coll):
    client.post(
        "/things", json=[{"_id": f"n{i}", "n": i, "even": i % 2 == 0, "extra": "x"} for i in range(1, 8)]
    )
    return coll


def ids(response):
    assert response.status_code == 200, response.get_data(as_text=True)
    return [d["_id"] for d in response.get_json()]


def test_list_default_sort_is_id_descending(client, numbers):
    assert ids(client.get("/things")) == [f"n{i}" for i in range(7, 0, -1)]


def test_list_filter_sort_keys_page(client, numbers):
    assert ids(client.get("/things?filter=" + q({"n": {"$gt": 4}}) + "&sort=" + q({"n": 1}))) == [
        "n5",
        "n6",
        "n7",
    ]
    assert ids(client.get("/things?filter=" + q({"even": True}) + "&sort=n")) == ["n2", "n4", "n6"]
    assert ids(client.get("/things?sort=-even,n")) == ["n2", "n4", "n6", "n1", "n3", "n5", "n7"]
    # two filters are ANDed
    assert ids(
        client.get("/things?filter=" + q({"n": {"$gt": 2}}) + "&filter=" + q({"n": {"$lt": 5}}) + "&sort=n")
    ) == ["n3", "n4"]
    r = client.get("/things?keys=" + q({"n": 1}) + "&sort=n&pagesize=2")
    assert r.get_json() == [{"_id": "n1", "n": 1}, {"_id": "n2", "n": 2}]
    r = client.get("/things?keys=" + q({"extra": 0, "_etag": 0, "even": 0}) + "&sort=n&pagesize=1")
    assert r.get_json() == [{"_id": "n1", "n": 1}]
    r = client.get("/things?keys=" + q({"_id": 0, "n": 1}) + "&sort=n&pagesize=1")
    assert r.get_json() == [{"n": 1}]
    assert ids(client.get("/things?sort=n&pagesize=3&page=2")) == ["n4", "n5", "n6"]
    assert ids(client.get("/things?sort=n&pagesize=3&page=3")) == ["n7"]
    assert ids(client.get("/things?sort=n&pagesize=3&page=4")) == []


def test_list_pagesize_zero_returns_no_documents(client, numbers):
    """RESTHeart: pagesize=0 lists no documents (it must not mean "no limit")."""
    r = client.get("/things?pagesize=0")
    assert r.status_code == 200
    assert r.get_json() == []
    assert_error(client.get("/nothing?pagesize=0"), 404)
    assert len(client.get("/things?pagesize=1000").get_json()) == 7


def test_list_filter_extended_json(client, coll):
    post(client, "things", {"_id": {"$oid": OID}, "at": {"$date": "2024-01-01T00:00:00Z"}})
    post(client, "things", {"_id": "late", "at": {"$date": "2025-01-01T00:00:00Z"}})
    r = client.get("/things?filter=" + q({"at": {"$lt": {"$date": "2024-06-01T00:00:00Z"}}}))
    assert ids(r) == [{"$oid": OID}]
    assert ids(client.get("/things?filter=" + q({"_id": {"$oid": OID}}))) == [{"$oid": OID}]


def test_list_unknown_collection_404(client):
    assert_error(client.get("/nothing"), 404, "Collection 'nothing' does not exist")


# ----------------------------------------------------------------------------- Extended JSON


def test_extended_json_round_trip(client, app, coll):
    doc = {
        "_id": {"$oid": OID},
        "when": {"$date": "2024-02-03T04:05:06.789Z"},
        "old": {"$date": {"$numberLong": "-86400000"}},
        "small": 7,
        "long": {"$numberLong": "5000000000"},
        "longSmall": {"$numberLong": "3"},
        "dbl": 2.5,
        "whole": 1.0,
        "dec": {"$numberDecimal": "1.10"},
        "bin": {"$binary": {"base64": "AAEC/w==", "subType": "00"}},
        "uuidish": {"$binary": {"base64": "AAAAAAAAAAAAAAAAAAAAAA==", "subType": "04"}},
        "ref": {"$oid": "6000000000000000000000ff"},
        "nested": {"arr": [1, [2, {"x": [3, {"y": None}]}], {"z": True}], "doc": {"deep": {"deeper": "s"}}},
        "empty": {"obj": {}, "arr": []},
        "unicode": "héllo ✓",
    }
    r = client.post("/things", json=doc)
    assert r.status_code == 201
    got = client.get(f"/things/{OID}").get_json()
    etag = got.pop("_etag")
    assert etag == {"$oid": r.headers["ETag"]}
    assert got == {
        **doc,
        "old": {"$date": {"$numberLong": "-86400000"}},
        "long": 5000000000,  # relaxed Extended JSON shows int64 as a number
        "longSmall": 3,
        "bin": {"$binary": {"base64": "AAEC/w==", "subType": "00"}},
    }
    # the types themselves are kept (relaxed JSON hides int32 vs int64)
    stored = engine_of(app).get_document("things", ObjectId(OID))
    assert stored["when"] == dt.datetime(2024, 2, 3, 4, 5, 6, 789000)
    assert type(stored["small"]) is int
    assert type(stored["long"]) is Int64 and stored["long"] == 5000000000
    assert type(stored["longSmall"]) is Int64
    assert type(stored["whole"]) is float
    assert stored["dec"] == Decimal128("1.10") and str(stored["dec"]) == "1.10"
    assert isinstance(stored["bin"], bytes) and stored["bin"] == b"\x00\x01\x02\xff"
    assert isinstance(stored["uuidish"], Binary) and stored["uuidish"].subtype == 4
    assert stored["ref"] == ObjectId("6000000000000000000000ff")
    assert stored["nested"]["arr"][1][1]["x"][1] == {"y": None}
    # and the change event carries the same typed document
    ev = events(app, "things")[-1]
    assert type(ev["fullDocument"]["long"]) is Int64
    assert ev["fullDocument"]["dec"] == Decimal128("1.10")
    assert isinstance(ev["wallTime"], dt.datetime)


def test_extended_json_survives_list_and_patch(client, coll):
    post(client, "things", {"_id": "x", "d": {"$numberDecimal": "2.50"}})
    assert client.patch("/things/x", json={"$set": {"l": {"$numberLong": "9000000000"}}}).status_code == 200
    (doc,) = client.get("/things").get_json()
    assert doc["d"] == {"$numberDecimal": "2.50"}
    assert doc["l"] == 9000000000


# ----------------------------------------------------------------------------- users and auth


def test_default_admin_exists(client, app):
    admin = client.get("/users/admin").get_json()
    assert admin["_id"] == "admin" and admin["roles"] == ["admin"]
    assert "password" not in admin
    stored = engine_of(app).get_document("users", "admin")["password"]
    assert bcrypt.checkpw(b"secret", stored.encode())


def test_post_user_hashes_password_and_never_returns_it(client, anon, app):
    r = client.post("/users", json={"_id": "bob", "password": "pw-bob", "roles": ["user"]})
    assert r.status_code == 201
    assert r.headers["Location"] == "/users/bob"
    stored = engine_of(app).get_document("users", "bob")
    assert stored["password"].startswith("$2b$")
    assert stored["password"] != "pw-bob"
    assert bcrypt.checkpw(b"pw-bob", stored["password"].encode())

    assert "password" not in client.get("/users/bob").get_json()
    for url in ["/users", "/users?keys=" + q({"roles": 0})]:
        r = client.get(url)
        assert r.status_code == 200
        assert "password" not in r.get_data(as_text=True)
        assert "$2b$" not in r.get_data(as_text=True)
    # naming the password at all is refused, even for the admin: no oracle on the hash
    for url in [
        "/users?keys=" + q({"password": 1}),
        "/users?filter=" + q({"password": {"$exists": True}}),
        "/users?sort=password",
    ]:
        assert_error(client.get(url), 403)

    # bob authenticates (what he may then do is the ACL's business: not a 401)
    assert anon.get("/", headers=basic("bob", "pw-bob")).status_code != 401
    assert_error(anon.get("/", headers=basic("bob", "wrong")), 401)
    client.post("/users", json={"_id": "root2", "password": "pw-root2", "roles": ["admin"]})
    r = anon.get("/", headers=basic("root2", "pw-root2"))
    assert r.status_code == 200
    assert r.get_json() == ["acl", "users"]


def test_user_password_change_takes_effect(client, anon):
    client.post("/users", json={"_id": "eve", "password": "one", "roles": ["admin"]})
    assert anon.get("/", headers=basic("eve", "one")).status_code == 200
    assert client.patch("/users/eve", json={"$set": {"password": "two"}}).status_code == 200
    assert_error(anon.get("/", headers=basic("eve", "one")), 401)
    assert anon.get("/", headers=basic("eve", "two")).status_code == 200
    # a PUT with a password hashes it too
    assert client.put("/users/eve", json={"password": "three", "roles": ["admin"]}).status_code == 200
    assert anon.get("/", headers=basic("eve", "three")).status_code == 200


def test_bad_user_documents_400(client, app):
    before = change_rows(app)
    assert_error(client.post("/users", json={"_id": "a:b", "password": "x"}), 400)
    assert_error(client.post("/users", json={"_id": "c", "password": ""}), 400)
    assert_error(client.post("/users", json={"_id": "c", "password": "x", "roles": "admin"}), 400)
    assert_error(client.patch("/users/admin", json={"$unset": {"password": 1}}), 400)
    assert_error(client.patch("/users/admin", json={"$rename": {"password": "pw"}}), 400)
    assert_error(client.patch("/users/admin", json={"$inc": {"password": 1}}), 400)
    assert_error(client.patch("/users/admin", json={"$set": {"password": 5}}), 400)
    assert change_rows(app) == before
    # a plain-text value moved into `password` would bypass the hashing
    assert client.patch("/users/admin", json={"$set": {"tmp": "plain"}}).status_code == 200
    before = change_rows(app)
    assert_error(client.patch("/users/admin", json={"$rename": {"tmp": "password"}}), 400)
    assert engine_of(app).get_document("users", "admin")["password"].startswith("$2b$")
    assert change_rows(app) == before


def test_401_with_and_without_challenge(anon):
    r = anon.get("/")
    body = assert_error(r, 401)
    assert r.headers["WWW-Authenticate"] == 'Basic realm="changefeed"'
    assert body["http status description"] == "Unauthorized"

    r = anon.get("/", headers={"No-Auth-Challenge": "true"})
    assert_error(r, 401)
    assert "WWW-Authenticate" not in r.headers

    r = anon.get("/?noauthchallenge")
    assert_error(r, 401)
    assert "WWW-Authenticate" not in r.headers


@pytest.mark.parametrize(
    "headers",
    [
        basic("admin", "wrong"),
        basic("nobody", "secret"),
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
    ],
)
def test_wrong_credentials_401(anon, headers):
    r = anon.get("/things", headers=headers)
    assert_error(r, 401)
    assert r.headers["WWW-Authenticate"].startswith("Basic realm=")


def test_every_endpoint_needs_auth(anon, client, coll):
    post(client, "things", {"_id": "x"})
    for method, url in [
        ("get", "/things"),
        ("get", "/things/x"),
        ("post", "/things"),
        ("put", "/things"),
        ("patch", "/things/x"),
        ("delete", "/things/x"),
        ("get", "/things/_meta"),
    ]:
        r = getattr(anon, method)(url, json={})
        assert_error(r, 401)
    assert client.get("/things/x").status_code == 200


def test_health_is_public(anon):
    assert anon.get("/_health").status_code == 200


def test_health_is_liveness_and_ready_is_readiness(app, anon, monkeypatch):
    """/_health answers while the worker does; /_ready is 503, with the reason, while the
    engine does not answer or the security collections are not set up yet."""
    assert anon.get("/_ready").get_json() == {"status": "ok", "engine": "embedded"}
    app.extensions["changefeed.state"]["set_up"] = False
    r = anon.get("/_ready")
    assert r.status_code == 503 and "not set up" in r.get_json()["error"]
    assert anon.get("/_health").status_code == 200
    app.extensions["changefeed.state"]["set_up"] = True

    def away():
        raise ConnectionError("the database is away")

    monkeypatch.setattr(app.extensions["changefeed.engine"], "current_token", away)
    r = anon.get("/_ready")
    assert r.status_code == 503 and r.get_json()["error"] == "the database is away"
    assert anon.get("/_health").get_json()["status"] == "ok"


# ----------------------------------------------------------------------------- bad input


J = "application/json"

BAD_INPUT = [
    # (id, method, url, kwargs, status, message fragment)
    ("post-not-json", "post", "/things", {"data": "{nope", "content_type": J}, 400, "not valid JSON"),
    ("post-empty-body", "post", "/things", {"data": "", "content_type": J}, 400, "empty"),
    ("post-bad-utf8", "post", "/things", {"data": b"\xff\xfe", "content_type": J}, 400, None),
    ("post-string", "post", "/things", {"data": '"x"', "content_type": J}, 400, None),
    ("post-number", "post", "/things", {"data": "3", "content_type": J}, 400, None),
    ("post-null", "post", "/things", {"data": "null", "content_type": J}, 400, None),
    ("post-empty-array", "post", "/things", {"data": "[]", "content_type": J}, 400, None),
    ("post-array-of-numbers", "post", "/things", {"data": "[1, 2]", "content_type": J}, 400, None),
    ("post-array-mixed", "post", "/things", {"data": '[{"a": 1}, 2]', "content_type": J}, 400, None),
    ("post-dollar-field", "post", "/things", {"json": {"$set": {"a": 1}}}, 400, "$"),
    ("post-nested-dollar-field", "post", "/things", {"json": {"a": {"$bad": 1}}}, 400, "$"),
    ("post-bad-oid", "post", "/things", {"json": {"_id": {"$oid": "zz"}}}, 400, None),
    ("post-bad-date", "post", "/things", {"json": {"d": {"$date": "yesterday"}}}, 400, None),
    ("post-bad-long", "post", "/things", {"json": {"d": {"$numberLong": "x"}}}, 400, None),
    (
        "post-int-too-big",
        "post",
        "/things",
        {"data": '{"n": 123456789012345678901234567890}', "content_type": J},
        400,
        "64 bits",
    ),
    (
        "post-too-deep",
        "post",
        "/things",
        {"data": '{"a":' * 150 + "1" + "}" * 150, "content_type": J},
        400,
        "nested",
    ),
    ("post-very-deep", "post", "/things", {"data": "[" * 50000 + "]" * 50000, "content_type": J}, 400, None),
    ("post-array-id", "post", "/things", {"json": {"_id": [1, 2]}}, 400, "_id"),
    (
        "post-text-plain",
        "post",
        "/things",
        {"data": "{}", "content_type": "text/plain"},
        415,
        "application/json",
    ),
    ("post-form", "post", "/things", {"data": {"a": "1"}}, 415, None),
    ("post-no-type", "post", "/things", {"data": "{}"}, 415, None),
    ("put-coll-array", "put", "/newcoll", {"json": [1]}, 400, "json object"),
    ("put-coll-not-json", "put", "/newcoll", {"data": "{", "content_type": J}, 400, None),
    ("put-coll-text", "put", "/newcoll", {"data": "{}", "content_type": "text/plain"}, 415, None),
    ("patch-coll-array", "patch", "/things", {"json": [{}]}, 400, None),
    ("put-doc-array", "put", "/things/x", {"json": [{"a": 1}]}, 400, None),
    ("put-doc-text", "put", "/things/x", {"data": "{}", "content_type": "text/plain"}, 415, None),
    ("patch-doc-string", "patch", "/things/x", {"json": "a"}, 400, None),
    ("patch-unknown-operator", "patch", "/things/x", {"json": {"$foo": {"a": 1}}}, 400, "$foo"),
    ("patch-operator-not-object", "patch", "/things/x", {"json": {"$set": 5}}, 400, None),
    ("patch-inc-not-number", "patch", "/things/x", {"json": {"$inc": {"a": "one"}}}, 400, None),
    ("patch-inc-string-field", "patch", "/things/x", {"json": {"$inc": {"s": 1}}}, 400, None),
    ("patch-push-non-array", "patch", "/things/x", {"json": {"$push": {"s": 1}}}, 400, None),
    ("patch-id", "patch", "/things/x", {"json": {"$set": {"_id": "y"}}}, 400, "_id"),
    ("patch-empty-path", "patch", "/things/x", {"json": {"$set": {"": 1}}}, 400, None),
    ("patch-positional", "patch", "/things/x", {"json": {"$set": {"a.$": 1}}}, 400, None),
    ("patch-deep-path", "patch", "/things/x", {"json": {"$set": {".".join(["a"] * 2000): 1}}}, 400, None),
    (
        "patch-push-dollar-field",
        "patch",
        "/things/x",
        {"json": {"$push": {"arr": {"a": {"$bad": 1}}}}},
        400,
        "$bad",
    ),
    (
        "patch-push-each-dollar-field",
        "patch",
        "/things/x",
        {"json": {"$push": {"arr": {"$each": [{"$bad": 1}]}}}},
        400,
        "$bad",
    ),
    ("patch-max-dollar-field", "patch", "/things/x", {"json": {"$max": {"m": {"$bad": 1}}}}, 400, "$bad"),
    (
        "patch-set-dollar-field",
        "patch",
        "/things/x",
        {"json": {"$set": {"m": {"k": {"$bad": 1}}}}},
        400,
        "$bad",
    ),
    ("patch-set-nul-field", "patch", "/things/x", {"json": {"$set": {"m": {"a\u0000": 1}}}}, 400, "NUL"),
    ("patch-text", "patch", "/things/x", {"data": "{}", "content_type": "text/plain"}, 415, None),
    # a string _id may hold any character, NUL included: these name documents that do not exist
    ("id-nul-get", "get", "/things/a%00b", {}, 404, None),
    ("id-nul-put", "put", "/things/a%00b", {"json": {}}, 404, None),
    ("id-nul-delete", "delete", "/things/%00", {}, 404, None),
    ("filter-not-json", "get", "/things?filter=" + q("{bad"), {}, 400, "filter"),
    ("filter-not-object", "get", "/things?filter=" + q([1]), {}, 400, "filter"),
    ("filter-where", "get", "/things?filter=" + q({"$where": "sleep(1000)"}), {}, 400, "$where"),
    (
        "filter-where-nested",
        "get",
        "/things?filter=" + q({"$or": [{"a": 1}, {"$where": "x"}]}),
        {},
        400,
        "$where",
    ),
    (
        "filter-function",
        "get",
        "/things?filter=" + q({"$expr": {"$function": {"body": "x", "args": [], "lang": "js"}}}),
        {},
        400,
        "$function",
    ),
    (
        "filter-accumulator",
        "get",
        "/things?filter=" + q({"$expr": {"$gt": [{"$accumulator": {}}, 1]}}),
        {},
        400,
        "$accumulator",
    ),
    ("filter-unknown-op", "get", "/things?filter=" + q({"a": {"$bogus": 1}}), {}, 400, "filter"),
    ("filter-bad-in", "get", "/things?filter=" + q({"a": {"$in": 5}}), {}, 400, None),
    ("filter-bad-or", "get", "/things?filter=" + q({"$or": 5}), {}, 400, None),
    ("filter-bad-regex", "get", "/things?filter=" + q({"s": {"$regex": "("}}), {}, 400, None),
    ("filter-mod-zero", "get", "/things?filter=" + q({"a": {"$mod": [0, 0]}}), {}, 400, None),
    ("filter-too-deep", "get", "/things?filter=" + q('{"a":' * 3000 + "1" + "}" * 3000), {}, 400, None),
    ("filter-int-too-big", "get", "/things?filter=" + q('{"a": 99999999999999999999999}'), {}, 400, None),
    ("sort-not-json", "get", "/things?sort=" + q("{bad"), {}, 400, "sort"),
    ("sort-bad-direction", "get", "/things?sort=" + q({"a": 2}), {}, 400, "sort"),
    ("sort-empty-object", "get", "/things?sort=" + q({}), {}, 400, "sort"),
    ("sort-empty-name", "get", "/things?sort=a,,b", {}, 400, "sort"),
    ("sort-dollar-name", "get", "/things?sort=" + q({"$a": 1}), {}, 400, "sort"),
    ("keys-not-json", "get", "/things?keys=" + q("{bad"), {}, 400, "keys"),
    ("keys-not-object", "get", "/things?keys=" + q([1]), {}, 400, "keys"),
    ("keys-mixed", "get", "/things?keys=" + q({"a": 1, "b": 0}), {}, 400, "keys"),
    ("keys-bad-value", "get", "/things?keys=" + q({"a": "yes"}), {}, 400, "keys"),
    ("page-zero", "get", "/things?page=0", {}, 400, "page"),
    ("page-text", "get", "/things?page=x", {}, 400, "page"),
    ("pagesize-negative", "get", "/things?pagesize=-1", {}, 400, "pagesize"),
    ("pagesize-huge", "get", "/things?pagesize=100000", {}, 400, "pagesize"),
    ("name-streams", "put", "/_streams", {"json": {}}, 400, "reserved"),
    ("name-meta", "put", "/_meta", {"json": {}}, 400, "reserved"),
    ("name-underscore", "put", "/_anything", {"json": {}}, 400, "reserved"),
    ("name-system", "put", "/system.x", {"json": {}}, 400, "system."),
    ("name-dollar", "put", "/a$b", {"json": {}}, 400, "$"),
    ("name-dollar-encoded", "put", "/a%24b", {"json": {}}, 400, "$"),
    ("name-nul", "put", "/a%00b", {"json": {}}, 400, None),
    ("name-too-long", "put", "/" + "a" * 121, {"json": {}}, 400, "120"),
    ("name-too-long-bytes", "put", "/" + quote("é" * 61), {"json": {}}, 400, "120"),
    ("post-name-streams", "post", "/_streams", {"json": {}}, 400, "reserved"),
    ("post-name-system", "post", "/system.users", {"json": {}}, 400, None),
    ("patch-name-meta", "patch", "/_meta", {"json": {}}, 400, None),
    ("delete-name-dollar", "delete", "/a$b", {"headers": {"If-Match": "x"}}, 400, None),
    ("unknown-coll-get", "get", "/nothing", {}, 404, "nothing"),
    ("unknown-coll-meta", "get", "/nothing/_meta", {}, 404, None),
    ("unknown-coll-post", "post", "/nothing", {"json": {"a": 1}}, 404, "nothing"),
    ("unknown-coll-doc", "get", "/nothing/x", {}, 404, None),
    ("unknown-coll-upsert", "put", "/nothing/x?wm=upsert", {"json": {}}, 404, None),
    ("unknown-coll-patch-doc", "patch", "/nothing/x?wm=upsert", {"json": {"a": 1}}, 404, None),
    ("unknown-doc-get", "get", "/things/missing", {}, 404, "missing"),
    ("unknown-doc-put", "put", "/things/missing", {"json": {}}, 404, None),
    ("unknown-doc-patch", "patch", "/things/missing", {"json": {"a": 1}}, 404, None),
    ("unknown-doc-delete", "delete", "/things/missing", {}, 404, None),
    ("unknown-oid-get", "get", f"/things/{OID}", {}, 404, None),
    ("dup-id", "post", "/things", {"json": {"_id": "x"}}, 409, "x"),
    ("etag-mismatch", "patch", "/things/x", {"json": {"a": 1}, "headers": {"If-Match": OID}}, 409, None),
    ("drop-no-if-match", "delete", "/things", {}, 409, "If-Match"),
    ("method-post-doc", "post", "/things/x", {"json": {}}, 405, None),
    ("no-route", "get", "/a/b/c/d", {}, 404, None),
]


@pytest.mark.parametrize(
    "name, method, url, kwargs, status, fragment", BAD_INPUT, ids=[b[0] for b in BAD_INPUT]
)
def test_bad_input(client, app, coll, name, method, url, kwargs, status, fragment):
    post(client, "things", {"_id": "x", "s": "text", "a": 1})
    before_rows = change_rows(app)
    before_docs = documents_in(app, "things")
    before_colls = client.get("/").get_json()
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code != 500
    assert_error(r, status, fragment)
    assert change_rows(app) == before_rows, "a refused request wrote a change event"
    assert documents_in(app, "things") == before_docs, "a refused request changed documents"
    assert client.get("/").get_json() == before_colls


def test_body_over_max_content_length_413(tmp_path):
    from app import create_app

    small = create_app({"DATA_DIR": str(tmp_path / "small"), "MAX_CONTENT_LENGTH": 1000})
    try:
        c = small.test_client()
        c.environ_base["HTTP_AUTHORIZATION"] = basic("admin", "secret")["Authorization"]
        assert c.put("/things", json={}).status_code == 201
        before = change_rows(small)
        assert c.post("/things", json={"pad": "x" * 900}).status_code == 201
        before = change_rows(small)
        for method, url in [
            ("post", "/things"),
            ("put", "/things/big?wm=upsert"),
            ("patch", "/things/big"),
            ("put", "/things"),
        ]:
            r = getattr(c, method)(url, json={"pad": "x" * 2000})
            assert_error(r, 413, "MAX_CONTENT_LENGTH")
        assert change_rows(small) == before
        assert len(documents_in(small, "things")) == 1
    finally:
        small.extensions["changefeed.hub"].close_all()
        small.extensions["changefeed.engine"].close()


def test_failed_update_leaves_document_and_log_untouched(client, app, coll):
    post(client, "things", {"_id": "x", "s": "text", "n": 1})
    before_rows = change_rows(app)
    before = client.get("/things/x").get_json()
    # the first operator would succeed, the second fails: nothing may be applied
    assert_error(client.patch("/things/x", json={"$set": {"n": 2}, "$inc": {"s": 1}}), 400)
    assert client.get("/things/x").get_json() == before
    assert change_rows(app) == before_rows


def test_no_500_on_odd_but_valid_documents(client, coll):
    """Values MongoDB stores are accepted and read back, never a 500."""
    for doc in [
        {"a.b": 1},
        {"": 1},
        {"x": float("inf")},
        {"_id": 7},
        {"s": "\u0000 inside a value"},
        {"deep": json.loads('{"a":' * 90 + "1" + "}" * 90)},
    ]:
        r = client.post("/things", json=doc)
        assert r.status_code == 201, (doc, r.get_data(as_text=True))
    # ids no URL could name are refused (400), never a 500 or an unreachable document
    for doc in [{"_id": {"a": 1}}, {"_id": None}]:
        assert_error(client.post("/things", json=doc), 400)
    r = client.get("/things?pagesize=100")
    assert r.status_code == 200
    assert len(r.get_json()) == 6


def test_expected_errors_print_no_traceback(client, coll, capfd):
    """A 404/409 raised inside the engine's threadpool call is not dumped on stderr by gevent."""
    capfd.readouterr()
    assert_error(client.get("/things/missing"), 404)
    assert_error(client.delete("/things"), 409)
    post(client, "things", {"_id": "d"})
    assert_error(client.post("/things", json={"_id": "d"}), 409)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "failed with" not in err, err


def test_a_collection_named_static_is_the_users(client):
    """No static-file route shadows it (the console serves its own files)."""
    assert client.put("/static", json={}).status_code == 201
    assert client.post("/static", json={"_id": "x1"}).status_code == 201
    assert client.get("/static/x1").get_json()["_id"] == "x1"
