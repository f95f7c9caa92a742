"""The whole `mongo` permission object, in-process: each option on each method it governs.

One attack is the backbone: users alice and bob share a collection
under one rule that gives each a readFilter and writeFilter on `owner`, a mergeRequest that
stamps `owner`, a projectResponse hiding `secret`, and no management, bulk or write-mode
rights. Bob must not replace, take over, plant into, read the secret of, redefine or drop
what is alice's; each refusal is checked here, method by method, and so is the same
operation when it is allowed. Live versions over real sockets are in test_live_attacks.py.
"""

from __future__ import annotations

import base64
import json

import pytest

from .test_security import assert_error, basic

RULE = {
    "_id": "tenants",
    "roles": ["user"],
    "priority": 1,
    "predicate": "path-prefix(/docs)",
    "mongo": {
        "readFilter": {"owner": "@user._id"},
        "writeFilter": {"owner": "@user._id"},
        "mergeRequest": {"owner": "@user._id"},
        "projectResponse": {"secret": 0},
        "allowManagementRequests": False,
    },
}
ALICE, BOB = basic("alice", "pw-alice"), basic("bob", "pw-bob")
STREAMS = {"streams": [{"uri": "all", "stages": []}]}


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch):
    monkeypatch.setattr("services.auth.BCRYPT_ROUNDS", 4)


def q(value) -> str:
    """A JSON query argument (the test client percent-encodes it)."""
    return json.dumps(value)


def with_rule(client, **mongo) -> None:
    rule = json.loads(json.dumps(RULE))
    rule["mongo"].update(mongo)
    rule["mongo"] = {k: v for k, v in rule["mongo"].items() if v is not None}
    r = client.put("/acl/tenants", json=rule, query_string={"wm": "upsert"})
    assert r.status_code in (200, 201), r.get_data(as_text=True)


@pytest.fixture
def docs(client, app):
    for user in ("alice", "bob"):
        r = client.post("/users", json={"_id": user, "password": f"pw-{user}", "roles": ["user"]})
        assert r.status_code == 201
    assert client.put("/docs", json=STREAMS).status_code == 201
    r = client.post(
        "/docs",
        json=[
            {"_id": "a1", "owner": "alice", "title": "alice's", "secret": "s-a1"},
            {"_id": "a2", "owner": "alice", "title": "alice's 2", "secret": "s-a2"},
            {"_id": "b1", "owner": "bob", "title": "bob's", "secret": "s-b1"},
        ],
    )
    assert r.status_code == 201
    with_rule(client)
    return app.extensions["changefeed.engine"]


def stored(engine, doc_id):
    return engine.get_document("docs", doc_id)


# --------------------------------------------------------------------------- readFilter + projectResponse


def test_reads_see_only_own_documents_without_the_hidden_field(anon, docs):
    r = anon.get("/docs", headers=BOB)
    assert r.status_code == 200
    assert r.get_json() == [
        {"_id": "b1", "owner": "bob", "title": "bob's", "_etag": r.get_json()[0]["_etag"]}
    ]
    assert anon.get("/docs/b1", headers=BOB).get_json().keys() == {"_id", "owner", "title", "_etag"}
    assert_error(anon.get("/docs/a1", headers=BOB), 404)  # alice's: as absent as in the list
    assert anon.get("/docs/_size", headers=BOB).get_json() == {"_size": 1}
    assert anon.get("/docs/_size", headers=ALICE).get_json() == {"_size": 2}
    assert "s-a" not in anon.get("/docs", headers=ALICE).get_data(as_text=True)


@pytest.mark.parametrize(
    "args",
    [
        {"filter": q({"secret": "s-b1"})},
        {"filter": q({"secret": {"$regex": "^s"}})},
        {"filter": q({"$or": [{"title": "x"}, {"secret": {"$gt": "a"}}]})},
        {"filter": q({"$expr": {"$gt": ["$secret", "a"]}})},
        {"filter": q({"$expr": {"$gt": [{"$size": {"$objectToArray": "$$ROOT"}}, 3]}})},
        {"filter": q({"$jsonSchema": {"required": ["secret"]}})},
        {"sort": "secret"},
        {"sort": q({"secret": -1})},
        {"keys": q({"secret": 1})},
        {"keys": q({"secret": 0})},
    ],
)
def test_hidden_field_has_no_oracle(anon, docs, args):
    assert_error(anon.get("/docs", headers=BOB, query_string=args), 403)
    if "filter" in args:
        assert_error(anon.get("/docs/_size", headers=BOB, query_string={"filter": args["filter"]}), 403)


def test_visible_fields_can_be_queried(anon, docs):
    r = anon.get(
        "/docs",
        headers=ALICE,
        query_string={"filter": q({"title": {"$regex": "2$"}}), "sort": "-title", "keys": q({"title": 1})},
    )
    assert r.status_code == 200
    assert [d["title"] for d in r.get_json()] == ["alice's 2"]


# --------------------------------------------------------------------------- writeFilter + mergeRequest


def test_bob_cannot_replace_or_take_over_alices_document(anon, docs):
    before = stored(docs, "a1")
    # alice's document is outside bob's readFilter: it does not exist for him (404, as GET),
    # whatever else is wrong with the request (the ETag, the operators)
    for body in (
        {"title": "mine now"},
        {"title": "mine now", "owner": "bob"},
        {"owner": "alice", "title": "x"},
        {"$set": {"title.x": 1}},
        {"$inc": {"title": 1}},
    ):  # these two would fail on alice's data
        if "$set" not in body and "$inc" not in body:
            assert_error(anon.put("/docs/a1", headers=BOB, json=body), 404)
        assert_error(anon.patch("/docs/a1", headers=BOB, json=body), 404)
        assert_error(anon.patch("/docs/a1", headers={**BOB, "If-Match": "wrong"}, json=body), 404)
    assert_error(anon.delete("/docs/a1", headers=BOB), 404)
    assert_error(anon.delete("/docs/a1", headers={**BOB, "If-Match": "wrong"}), 404)
    assert stored(docs, "a1") == before


def test_writable_but_not_readable_is_a_403_not_a_404(client, anon, docs):
    with_rule(client, readFilter=None)  # bob may read everything, write only his own
    assert_error(anon.patch("/docs/a1", headers=BOB, json={"title": "x"}), 403)
    assert_error(anon.delete("/docs/a1", headers=BOB), 403)


@pytest.mark.parametrize(
    "body",
    [
        {"$set": {"secret.x": 1}},
        {"$inc": {"secret": 1}},
        {"$push": {"secret": 1}},
        {"$pull": {"secret": 1}},
        {"$rename": {"secret": "leak"}},
        {"$max": {"secret": "z"}},
        {"$set": {"secret.a.b": 1}},
    ],
)
def test_updates_cannot_read_hidden_fields(anon, docs, body):
    msg = assert_error(anon.patch("/docs/b1", headers=BOB, json=body), 403)
    assert "hidden by your permission" in msg
    assert stored(docs, "b1")["secret"] == "s-b1"


def test_hidden_fields_can_still_be_overwritten(anon, docs):
    for body in (
        {"secret": "new"},
        {"$set": {"secret": {"a": 1}}},
        {"$unset": {"secret": 1}},
        {"$rename": {"title": "secret"}},
        {"$currentDate": {"secret": True}},
    ):
        assert anon.patch("/docs/b1", headers=BOB, json=body).status_code == 200, body
    assert "secret" in stored(docs, "b1")


def test_bob_cannot_plant_documents_in_alices_list(anon, docs):
    r = anon.post("/docs", headers=BOB, json={"_id": "planted", "owner": "alice", "title": "gift"})
    assert r.status_code == 201
    assert stored(docs, "planted")["owner"] == "bob"  # the merge wins over the forged owner
    r = anon.post("/docs", headers=BOB, json=[{"owner": "alice", "n": 1}, {"n": 2}])
    assert r.status_code == 201
    assert {d["owner"] for d in docs.find("docs", {"n": {"$exists": True}}, [], None, 0, 0)} == {"bob"}
    assert [d["_id"] for d in anon.get("/docs", headers=ALICE).get_json()] == ["a2", "a1"]


def test_own_writes_work_and_keep_the_owner(anon, docs):
    assert anon.patch("/docs/b1", headers=BOB, json={"title": "edited", "owner": "alice"}).status_code == 200
    assert stored(docs, "b1")["owner"] == "bob" and stored(docs, "b1")["title"] == "edited"
    assert anon.patch("/docs/b1", headers=BOB, json={"$set": {"owner": "alice"}}).status_code == 200
    assert stored(docs, "b1")["owner"] == "bob"
    assert anon.put("/docs/b1", headers=BOB, json={"title": "replaced"}).status_code == 200
    assert stored(docs, "b1")["owner"] == "bob"
    assert stored(docs, "b1")["title"] == "replaced" and "secret" not in stored(docs, "b1")
    assert anon.delete("/docs/b1", headers=BOB).status_code == 204


@pytest.mark.parametrize(
    "body",
    [
        {"$unset": {"owner": 1}},
        {"$rename": {"owner": "was"}},
        {"$rename": {"title": "owner"}},
        {"$set": {"owner.x": 1}},
        {"$push": {"owner": "x"}},
        {"$inc": {"owner": 1}},
    ],
)
def test_operators_cannot_undo_the_merge(anon, docs, body):
    msg = assert_error(anon.patch("/docs/b1", headers=BOB, json=body), 403)
    assert "mongo.mergeRequest" in msg
    assert stored(docs, "b1")["owner"] == "bob"


def test_write_filter_without_merge_refuses_a_write_that_leaves_it(client, anon, docs):
    with_rule(client, mergeRequest=None)
    assert_error(anon.patch("/docs/b1", headers=BOB, json={"owner": "alice"}), 403)
    assert_error(anon.post("/docs", headers=BOB, json={"owner": "alice"}), 403)
    assert_error(anon.post("/docs", headers=BOB, json=[{"owner": "bob"}, {"owner": "alice"}]), 403)
    assert docs.count("docs", {}) == 3  # the bulk insert was all or nothing
    assert anon.post("/docs", headers=BOB, json={"owner": "bob"}).status_code == 201


# --------------------------------------------------------------------------- allow* options


def test_management_requests_need_the_option(client, anon, docs):
    assert_error(anon.put("/docs", headers=BOB, json={"streams": []}), 403)
    assert_error(anon.patch("/docs", headers=BOB, json={"streams": []}), 403)
    assert_error(anon.delete("/docs", headers={**BOB, "If-Match": "*"}), 403)
    assert docs.get_collection("docs")["streams"] == STREAMS["streams"]
    assert anon.get("/docs/_meta", headers=BOB).status_code == 200  # reading is not management
    with_rule(client, allowManagementRequests=True)
    assert anon.patch("/docs", headers=BOB, json={"note": 1}).status_code == 200


def test_write_mode_needs_the_option(client, anon, docs):
    for mode in ("upsert", "insert", "update"):
        assert_error(anon.put(f"/docs/new-{mode}", headers=BOB, json={}, query_string={"wm": mode}), 403)
        assert_error(
            anon.patch("/docs/b1", headers=BOB, json={"x": 1}, query_string={"writeMode": mode}), 403
        )
    with_rule(client, allowWriteMode=True)
    r = anon.put("/docs/new", headers=BOB, json={"title": "upserted"}, query_string={"wm": "upsert"})
    assert r.status_code == 201
    assert stored(docs, "new")["owner"] == "bob"
    # an upsert onto alice's existing document is a replace of it: refused (404: not his to see)
    assert_error(anon.put("/docs/a1", headers=BOB, json={}, query_string={"wm": "upsert"}), 404)


def test_bulk_patch_and_delete_need_their_options(client, anon, docs):
    everything = {"filter": q({"_id": {"$exists": True}})}
    assert_error(anon.patch("/docs/*", headers=BOB, json={"title": "all"}, query_string=everything), 403)
    assert_error(anon.delete("/docs/*", headers=BOB, query_string=everything), 403)
    with_rule(client, allowBulkPatch=True, allowBulkDelete=True)
    r = anon.patch("/docs/*", headers=BOB, json={"title": "all"}, query_string=everything)
    assert r.get_json() == {"inserted": 0, "deleted": 0, "modified": 1, "matched": 1}
    assert stored(docs, "a1")["title"] == "alice's"
    assert_error(
        anon.patch("/docs/*", headers=BOB, json={"$unset": {"owner": 1}}, query_string=everything), 403
    )
    assert_error(
        anon.patch("/docs/*", headers=BOB, json={"x": 1}, query_string={"filter": q({"secret": "s"})}), 403
    )
    assert_error(anon.patch("/docs/*", headers=BOB, json={"x": 1}), 400)  # a bulk write needs a filter
    r = anon.delete("/docs/*", headers=BOB, query_string=everything)
    assert r.get_json()["deleted"] == 1
    assert docs.count("docs", {}) == 2


def test_admin_keeps_every_option(client, docs):
    everything = {"filter": q({"_id": {"$exists": True}})}
    assert client.patch("/docs/*", json={"tag": 1}, query_string=everything).get_json()["modified"] == 3
    assert client.put("/docs/z", json={}, query_string={"wm": "upsert"}).status_code == 201
    assert "secret" in client.get("/docs/a1").get_json()
    assert client.get("/docs", query_string={"filter": q({"secret": "s-a1"})}).get_json()[0]["_id"] == "a1"
    assert client.delete("/docs/*", query_string=everything).get_json()["deleted"] == 4


# --------------------------------------------------------------------------- ACL documents


@pytest.mark.parametrize(
    "mongo, fault",
    [
        ({"readFilter": {"$where": "1"}}, "$where"),
        ({"writeFilter": {"a": {"$bogus": 1}}}, "mongo.writeFilter"),
        ({"mergeRequest": {"_id": "x"}}, "managed by the server"),
        ({"mergeRequest": {"$set": {"a": 1}}}, "invalid field name"),
        ({"mergeRequest": {}}, "must not be empty"),
        ({"projectResponse": {"a": 1, "b": 0}}, "mongo.projectResponse"),
        ({"projectResponse": {"_id": 0}}, "mongo.projectResponse"),
        ({"projectResponse": {"a": 2}}, "mongo.projectResponse"),
        ({"allowBulkPatch": "yes"}, "true or false"),
        ({"readFilters": {}}, "unknown key 'readFilters'"),
    ],
)
def test_unusable_mongo_options_are_refused_when_written(client, mongo, fault):
    rule = {"_id": "x", "roles": ["user"], "predicate": "path(/x)", "mongo": mongo}
    assert fault in assert_error(client.post("/acl", json=rule), 400)
    assert client.get("/acl").get_json() == []


def test_unknown_acl_keys_are_refused(client):
    rule = {"_id": "x", "roles": ["user"], "predicate": "path(/x)", "readFilter": {"a": 1}}
    assert "unknown key 'readFilter'" in assert_error(client.post("/acl", json=rule), 400)
    assert_error(
        client.patch("/acl/x", json={"priority": 1, "filter": 2}, query_string={"wm": "upsert"}), 400
    )


# --------------------------------------------------------------------------- users: roles are the admin's

SELF_SERVICE = {
    "_id": "selfService",
    "roles": ["user"],
    "priority": 1,
    "predicate": (
        "path-template(/users/{id}) and equals(@user._id, ${id}) and bson-request-whitelist(password)"
    ),
}
LAX = {"_id": "lax", "roles": ["user"], "priority": 0, "predicate": "path-prefix(/users)"}


@pytest.fixture
def users(client):
    for user in ("alice", "bob"):
        client.post("/users", json={"_id": user, "password": f"pw-{user}", "roles": ["user"]})


def test_self_service_rule_changes_the_password_and_nothing_else(client, anon, users):
    assert client.post("/acl", json=SELF_SERVICE).status_code == 201
    assert anon.patch("/users/alice", headers=ALICE, json={"password": "new-pw"}).status_code == 200
    new = basic("alice", "new-pw")
    assert anon.get("/users/alice", headers=new).status_code == 200
    for body in (
        {"$set": {"roles": ["admin"]}},
        {"roles": ["admin"]},
        {"password": "x", "roles": []},
        {"$rename": {"password": "roles"}},
        {"$push": {"roles": "admin"}},
    ):
        assert_error(anon.patch("/users/alice", headers=new, json=body), 403)
    assert_error(anon.patch("/users/bob", headers=new, json={"password": "owned"}), 403)
    assert client.get("/users/alice").get_json()["roles"] == ["user"]


@pytest.mark.parametrize(
    "method, url, body, args",
    [
        ("patch", "/users/alice", {"$set": {"roles": ["admin"]}}, {}),
        ("patch", "/users/alice", {"roles": ["user", "admin"]}, {}),
        ("patch", "/users/alice", {"$push": {"roles": "admin"}}, {}),
        ("patch", "/users/alice", {"$addToSet": {"roles": "admin"}}, {}),
        ("patch", "/users/alice", {"$rename": {"tag": "roles"}}, {}),
        ("patch", "/users/alice", {"$set": {"roles.0": "admin"}}, {}),
        ("patch", "/users/alice", {"$unset": {"roles": 1}}, {}),
        ("put", "/users/alice", {"password": "x", "roles": ["admin"]}, {}),
        ("put", "/users/alice", {"password": "x"}, {}),  # a replace without roles changes them too
        ("post", "/users", {"_id": "mallory", "password": "x", "roles": ["admin"]}, {}),
        ("put", "/users/mallory", {"password": "x", "roles": ["admin"]}, {"wm": "upsert"}),
        ("patch", "/users/mallory", {"password": "x", "roles": ["admin"]}, {"wm": "upsert"}),
    ],
)
def test_roles_need_the_admin_whatever_the_acl_says(client, anon, users, method, url, body, args):
    lax = {**LAX, "mongo": {"allowWriteMode": True}}
    assert client.post("/acl", json=lax).status_code == 201
    client.patch("/users/alice", json={"tag": ["x"]})
    r = getattr(anon, method)(url, headers=ALICE, json=body, query_string=args)
    assert_error(r, 403, "only an admin may set or change a user's roles")
    assert client.get("/users/alice").get_json()["roles"] == ["user"]
    assert_error(client.get("/users/mallory"), 404)
    # the admin may
    assert getattr(client, method)(url, json=body, query_string=args).status_code in (200, 201)


def test_users_without_roles_may_be_created_by_a_signup_rule(client, anon):
    signup = {"_id": "signup", "roles": ["$unauthenticated"], "predicate": "path(/users) and method(POST)"}
    assert client.post("/acl", json=signup).status_code == 201
    assert anon.post("/users", json={"_id": "newbie", "password": "pw"}).status_code == 201
    assert_error(anon.post("/users", json={"_id": "evil", "password": "pw", "roles": ["admin"]}), 403)


def test_password_limits(client):
    assert "72 bytes" in assert_error(client.post("/users", json={"_id": "long", "password": "é" * 37}), 400)
    assert client.post("/users", json={"_id": "ok", "password": "x" * 72}).status_code == 201
    assert "72 bytes" in assert_error(client.patch("/users/ok", json={"password": "y" * 73}), 400)


def test_basic_auth_never_base64_errors(anon, client):
    # a password over 72 bytes at login is just a wrong password
    header = {"Authorization": "Basic " + base64.b64encode(b"admin:" + b"p" * 100).decode()}
    assert_error(anon.get("/", headers=header), 401)


# --------------------------------------------------------------------------- errors describe nothing hidden


@pytest.mark.parametrize(
    "flt",
    [
        {"$expr": {"$cond": [{"$eq": ["$owner", "alice"]}, {"$toInt": "$_id"}, False]}},
        {"$expr": {"$cond": [{"$eq": ["$owner", "alice"]}, {"$divide": [1, 0]}, False]}},
        {"$or": [{"title": "x"}, {"$expr": {"$toInt": "$title"}}]},
    ],
)
def test_expressions_are_refused_under_a_read_filter(anon, docs, flt):
    """An expression that fails on a document outside the readFilter would describe it."""
    for url in ("/docs", "/docs/_size"):
        msg = assert_error(anon.get(url, headers=BOB, query_string={"filter": q(flt)}), 403)
        assert "$expr" in msg and "a1" not in msg and "alice" not in msg


def test_expressions_are_fine_without_a_read_filter(client, anon, docs):
    with_rule(client, readFilter=None, writeFilter=None, mergeRequest=None)
    r = anon.get("/docs", headers=BOB, query_string={"filter": q({"$expr": {"$eq": ["$title", "bob's"]}})})
    assert [d["_id"] for d in r.get_json()] == ["b1"]


def test_bulk_filters_may_not_probe_outside_the_write_filter(client, anon, docs):
    with_rule(client, allowBulkPatch=True, readFilter=None)
    flt = {"$expr": {"$cond": [{"$eq": ["$owner", "alice"]}, {"$divide": [1, 0]}, False]}}
    assert_error(anon.patch("/docs/*", headers=BOB, json={"x": 1}, query_string={"filter": q(flt)}), 403)
