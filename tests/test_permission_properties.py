"""Rules that must hold for every input (hypothesis), in-process:

1. No oracle: whatever filter, sort and keys a user with a projectResponse sends, the
   answer (status and documents) is the same whatever the hidden fields hold, and no
   hidden value is ever in it. Hidden here: `secret` and `profile.pin`.
2. No escape: whatever sequence of writes a user makes under a writeFilter and a
   mergeRequest on `owner` (inserts, bulk inserts, replaces, upserts, operator updates,
   deletes, bulk updates and deletes), every other user's documents are exactly as they
   were, and every document the user could have written is inside the user's filter.
Neither may ever answer 500.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_security import basic

BOB = basic("bob", "pw-bob")
HIDDEN_VALUES = ("HIDDEN-1", "HIDDEN-2", 424242, 737373)
PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch):
    monkeypatch.setattr("services.auth.BCRYPT_ROUNDS", 4)


def setup(client, mongo: dict) -> None:
    assert (
        client.post("/users", json={"_id": "bob", "password": "pw-bob", "roles": ["user"]}).status_code == 201
    )
    assert client.put("/docs", json={}).status_code == 201
    rule = {"_id": "r", "roles": ["user"], "priority": 1, "predicate": "path-prefix(/docs)", "mongo": mongo}
    assert client.post("/acl", json=rule).status_code == 201, client.get("/acl").get_data()


def reset(engine, docs: list[dict]) -> None:
    engine.delete_many("docs", {})
    engine.insert_documents("docs", docs)


# --------------------------------------------------------------------------- 1. no oracle

FIELDS = ["title", "n", "secret", "profile", "profile.name", "profile.pin", "tags", "_id", "profile.x"]
scalars = st.one_of(
    st.sampled_from(["a", "b", "HIDDEN-1", "x1", ""]),
    st.integers(-3, 3),
    st.sampled_from([424242, True, None]),
)
field_refs = st.sampled_from(
    [
        "$title",
        "$n",
        "$secret",
        "$profile",
        "$profile.pin",
        "$profile.name",
        "$$ROOT",
        "$$CURRENT",
        "$$CURRENT.secret",
        "$tags",
        "$_id",
    ]
)
expressions = st.recursive(
    st.one_of(scalars, field_refs),
    lambda inner: st.one_of(
        st.builds(
            lambda op, a, b: {op: [a, b]}, st.sampled_from(["$eq", "$gt", "$lt", "$ne", "$gte"]), inner, inner
        ),
        st.builds(lambda a: {"$objectToArray": a}, inner),
        st.builds(lambda a: {"$getField": a}, st.sampled_from(["secret", "title"])),
        st.builds(
            lambda a, b: {"$let": {"vars": {"e": a}, "in": b}}, inner, st.sampled_from(["$$e", "$$e.v"])
        ),
        st.builds(lambda a: {"$literal": a}, st.sampled_from(["$secret", "plain"])),
        st.builds(lambda a: {"$size": {"$ifNull": [a, []]}}, inner),
    ),
    max_leaves=6,
)
operators = st.one_of(
    st.builds(lambda op, v: {op: v}, st.sampled_from(["$eq", "$ne", "$gt", "$lt", "$gte"]), scalars),
    st.builds(lambda v: {"$in": v}, st.lists(scalars, max_size=3)),
    st.builds(lambda v: {"$exists": v}, st.booleans()),
    st.builds(lambda v: {"$regex": v}, st.sampled_from(["^H", "a", "1$", "."])),
    st.builds(lambda v: {"$size": v}, st.integers(0, 2)),
)
queries = st.recursive(
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(scalars, operators), min_size=1, max_size=2),
    lambda inner: st.one_of(
        st.builds(
            lambda op, qs: {op: qs},
            st.sampled_from(["$and", "$or", "$nor"]),
            st.lists(inner, min_size=1, max_size=3),
        ),
        st.builds(lambda f, q: {f: {"$elemMatch": q}}, st.sampled_from(["tags", "profile"]), inner),
        st.builds(lambda f, o: {f: {"$not": o}}, st.sampled_from(FIELDS), operators),
        st.builds(lambda e: {"$expr": e}, expressions),
        st.just({"$jsonSchema": {"required": ["secret"]}}),
    ),
    max_leaves=5,
)
sorts = st.lists(
    st.tuples(st.sampled_from(FIELDS), st.sampled_from([1, -1])), max_size=2, unique_by=lambda t: t[0]
)
keys = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(FIELDS[:-1]), st.sampled_from([0, 1]), min_size=1, max_size=2).filter(
        lambda k: len({v for f, v in k.items() if f != "_id"}) <= 1
    ),
)


def documents(values: tuple) -> list[dict]:
    s1, s2 = values
    return [
        {
            "_id": "d1",
            "title": "a",
            "n": 1,
            "secret": s1,
            "profile": {"name": "x1", "pin": s2},
            "tags": ["a", "b"],
        },
        {"_id": "d2", "title": "b", "n": 2, "secret": s2, "profile": {"name": "x2", "pin": s1}, "tags": []},
        {"_id": "d3", "title": "x1", "n": -1, "profile": {"name": "a"}, "tags": ["x1"]},
        {"_id": "d4", "n": 3, "secret": {"deep": s1}, "tags": [{"k": "v"}], "profile": {"pin": [s2]}},
    ]


def ask(anon, flt, sort, proj):
    args = {}
    if flt is not None:
        args["filter"] = json.dumps(flt)
    if sort:
        args["sort"] = json.dumps(dict(sort))
    if proj is not None:
        args["keys"] = json.dumps(proj)
    r = anon.get("/docs", headers=BOB, query_string=args)
    assert r.status_code != 500, r.get_data(as_text=True)
    body = r.get_json()
    if r.status_code == 200:
        for doc in body:
            doc.pop("_etag", None)
    return r.status_code, body


@PROPS
@given(flt=st.one_of(st.none(), queries), sort=sorts, proj=keys)
def test_no_oracle_on_hidden_fields(client, anon, app, flt, sort, proj):
    engine = app.extensions["changefeed.engine"]
    if not engine.list_collections().count("docs"):
        setup(client, {"projectResponse": {"secret": 0, "profile.pin": 0}})
    reset(engine, documents(("HIDDEN-1", 424242)))
    first = ask(anon, flt, sort, proj)
    reset(engine, documents((737373, "HIDDEN-2")))
    second = ask(anon, flt, sort, proj)
    assert first[0] == second[0]
    if first[0] == 200:
        assert first[1] == second[1], (flt, sort, proj)
        text = json.dumps(first[1]) + json.dumps(second[1])
        for value in ("secret", "pin", "HIDDEN-1", "HIDDEN-2", "424242", "737373"):
            assert value not in text, (value, flt, proj)


# --------------------------------------------------------------------------- 2. no escape

ALICES = [{"_id": "a1", "owner": "alice", "n": 1, "tag": "x"}, {"_id": "a2", "owner": "alice", "n": 2}]
BOBS = [{"_id": "b1", "owner": "bob", "n": 3}]
ids = st.sampled_from(["a1", "a2", "b1", "new1", "new2"])
values = st.one_of(st.sampled_from(["alice", "bob", "x"]), st.integers(0, 3))
fields = st.sampled_from(["owner", "n", "tag", "owner.sub", "other"])
bodies = st.dictionaries(st.sampled_from(["owner", "n", "tag", "other"]), values, max_size=3)
update_specs = st.one_of(
    bodies,
    st.builds(
        lambda op, f, v: {op: {f: v}},
        st.sampled_from(["$set", "$setOnInsert", "$max", "$min"]),
        fields,
        values,
    ),
    st.builds(lambda f: {"$unset": {f: 1}}, fields),
    st.builds(
        lambda a, b: {"$rename": {a: b}},
        st.sampled_from(["owner", "tag", "n"]),
        st.sampled_from(["owner", "was", "tag2"]),
    ),
    st.builds(lambda f, v: {"$inc": {f: v}}, fields, st.integers(1, 2)),
    st.builds(lambda f, v: {"$push": {f: v}}, fields, values),
)
filters = st.one_of(
    st.just({}), st.builds(lambda f, v: {f: v}, st.sampled_from(["owner", "n", "_id"]), values)
)
modes = st.sampled_from([None, "insert", "update", "upsert"])
operations = st.one_of(
    st.tuples(st.just("post"), st.none(), bodies, st.none()),
    st.tuples(st.just("post"), st.none(), st.lists(bodies, min_size=1, max_size=3), st.none()),
    st.tuples(st.just("put"), ids, bodies, modes),
    st.tuples(st.just("patch"), ids, update_specs, modes),
    st.tuples(st.just("delete"), ids, st.none(), st.none()),
    st.tuples(st.just("bulk-patch"), filters, update_specs, st.none()),
    st.tuples(st.just("bulk-delete"), filters, st.none(), st.none()),
)


def perform(anon, op) -> int:
    kind, target, body, mode = op
    args = {"wm": mode} if mode else {}
    if kind == "post":
        r = anon.post("/docs", headers=BOB, json=body)
    elif kind in ("put", "patch"):
        r = getattr(anon, kind)(f"/docs/{target}", headers=BOB, json=body, query_string=args)
    elif kind == "delete":
        r = anon.delete(f"/docs/{target}", headers=BOB)
    elif kind == "bulk-patch":
        r = anon.patch("/docs/*", headers=BOB, json=body, query_string={"filter": json.dumps(target)})
    else:
        r = anon.delete("/docs/*", headers=BOB, query_string={"filter": json.dumps(target)})
    assert r.status_code != 500, (op, r.get_data(as_text=True))
    return r.status_code


@PROPS
@given(ops=st.lists(operations, min_size=1, max_size=6))
def test_writes_never_leave_the_write_filter(client, anon, app, ops):
    engine = app.extensions["changefeed.engine"]
    if not engine.list_collections().count("docs"):
        setup(
            client,
            {
                "writeFilter": {"owner": "@user._id"},
                "mergeRequest": {"owner": "@user._id"},
                "allowWriteMode": True,
                "allowBulkPatch": True,
                "allowBulkDelete": True,
            },
        )
    reset(engine, ALICES + BOBS)
    before = {d["_id"]: d for d in engine.find("docs", {"owner": "alice"}, [], None, 0, 0)}
    for op in ops:
        perform(anon, op)
    after = engine.find("docs", {}, [], None, 0, 0)
    assert {d["_id"]: d for d in after if d["_id"] in before} == before, ops  # alice's, untouched
    for doc in after:
        if doc["_id"] not in before:
            assert doc.get("owner") == "bob", (doc, ops)
