"""Tests of services.hidden: projectResponse validation, projecting documents and change
events, and refusing queries that could reveal hidden fields (oracles)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.errors import Forbidden
from services.hidden import Visibility, validate_projection

# --------------------------------------------------------------------------- validate_projection

VALID = [
    ({"secret": 0}, {"secret": 0}),
    ({"a.b": False, "_id": 1}, {"a.b": 0, "_id": 1}),
    ({"_id": True, "secret": 0}, {"_id": 1, "secret": 0}),
    ({"name": 1, "owner": True}, {"name": 1, "owner": 1}),
    ({"_id": 1, "name": 1}, {"_id": 1, "name": 1}),
    ({"_id": 1}, {"_id": 1}),
    ({"x": 1.0, "y.z": 1}, {"x": 1, "y.z": 1}),
    ({"a": 0, "ab": 0, "a_b.c": 0}, {"a": 0, "ab": 0, "a_b.c": 0}),
    ({"0": 0}, {"0": 0}),  # a top-level field named "0" is a field, not an index
]


@pytest.mark.parametrize("spec,expected", VALID)
def test_validate_projection_accepts(spec, expected):
    assert validate_projection(spec) == expected


INVALID = [
    ([], "must be an object"),
    ("secret", "must be an object"),
    (None, "must be an object"),
    ({}, "must not be empty"),
    ({"a": 2}, "must be 0, 1, true or false"),
    ({"a": -1}, "must be 0, 1, true or false"),
    ({"a": "0"}, "must be 0, 1, true or false"),
    ({"a": None}, "must be 0, 1, true or false"),
    ({"a": float("nan")}, "must be 0, 1, true or false"),
    ({"a": {"b": 0}}, "must be 0, 1, true or false"),
    ({"a": {"$slice": 1}}, "must be 0, 1, true or false"),
    ({"a": 1, "b": 0}, "cannot mix inclusion (1) and exclusion (0)"),
    ({"a": True, "b.c": False}, "cannot mix inclusion"),
    ({"": 0}, "empty"),
    ({"$where": 0}, "'$'"),
    ({"a.$": 1}, "'$'"),
    ({"a.$[]": 1}, "'$'"),
    ({"a..b": 0}, "empty part"),
    ({".a": 0}, "empty part"),
    ({"a.": 0}, "empty part"),
    ({"a\0b": 0}, "NUL"),
    ({1: 0}, "must be strings"),
    ({"_id": 0}, "cannot hide _id"),
    ({"_id": False, "name": 1}, "cannot hide _id"),
    ({"_id": 0, "secret": 0}, "cannot hide _id"),
    ({"_id.x": 0}, "_id names the document"),
    ({"_id.x": 1}, "_id names the document"),
    ({"arr.0.secret": 0}, "array index"),
    ({"items.3": 1}, "array index"),
    ({"a": 0, "a.b": 0}, "path collision"),
    ({"a.b.c": 1, "a.b": 1}, "path collision"),
]


@pytest.mark.parametrize("spec,fragment", INVALID)
def test_validate_projection_refuses(spec, fragment):
    with pytest.raises(ValueError) as info:
        validate_projection(spec)
    assert fragment in str(info.value)


def test_hiding_id_says_why():
    with pytest.raises(ValueError, match="_id names the document in URLs and change events"):
        validate_projection({"_id": 0})


# --------------------------------------------------------------------------- Visibility.of


def test_of_returns_none_when_nothing_is_hidden():
    assert Visibility.of(None) is None
    assert Visibility.of(None, ()) is None


def test_of_builds_visibility():
    for vis in (
        Visibility.of({"secret": 0}),
        Visibility.of(None, ("password",)),
        Visibility.of({"_id": 1}),
        Visibility.of({"name": 1}, ("password",)),
    ):
        assert vis is not None and vis.hides_anything


@pytest.mark.parametrize(
    "projection,always",
    [
        ({}, ()),
        ({"_id": 0}, ()),
        ([], ()),
        (None, ("_id",)),
        (None, ("_id.x",)),
        (None, ("a..b",)),
        (None, ("",)),
        (None, ("$x",)),
        (None, ("a.0",)),
    ],
)
def test_of_refuses_bad_input(projection, always):
    with pytest.raises(ValueError):
        Visibility.of(projection, always)


def test_describe():
    assert Visibility.of({"secret": 0, "a.b": 0}, ("password",)).describe() == "hides secret, a.b, password"
    assert (
        Visibility.of({"name": 1}, ("password",)).describe() == "shows only _id, name; always hides password"
    )
    assert Visibility.of({"_id": 1}).describe() == "shows only _id"


# --------------------------------------------------------------------------- reveals

EXCL = Visibility.of({"secret": 0, "profile.pin": 0, "items.secret": 0}, ("password",))
INCL = Visibility.of({"name": 1, "profile.name": 1, "tags": 1}, ("password",))
INCL_PW = Visibility.of({"name": 1, "password": 1}, ("password",))
USERS = Visibility.of(None, ("password",))

REVEALS = [
    (EXCL, "secret", True),
    (EXCL, "secret.x", True),
    (EXCL, "secret.0", True),
    (EXCL, "profile", True),
    (EXCL, "profile.pin", True),
    (EXCL, "profile.pin.x", True),
    (EXCL, "profile.name", False),
    (EXCL, "items", True),
    (EXCL, "items.0", True),
    (EXCL, "items.0.secret", True),
    (EXCL, "items.3.secret.y", True),
    (EXCL, "items.0.1.secret", True),
    (EXCL, "items.0.x", False),
    (EXCL, "items.x", False),
    (EXCL, "name", False),
    (EXCL, "password", True),
    (EXCL, "password.x", True),
    (EXCL, "passwords", False),
    (EXCL, "secretive", False),
    (EXCL, "sec", False),
    (EXCL, "_id", False),
    (EXCL, "_id.secret", False),
    (EXCL, "", True),
    (EXCL, "a..b", True),
    (EXCL, ".secret", True),
    (EXCL, "0", False),
    (INCL, "name", False),
    (INCL, "name.first", False),
    (INCL, "profile", True),
    (INCL, "profile.name", False),
    (INCL, "profile.name.0", False),
    (INCL, "profile.0.name", False),
    (INCL, "profile.0", True),
    (INCL, "profile.pin", True),
    (INCL, "other", True),
    (INCL, "tags", False),
    (INCL, "tags.5", False),
    (INCL, "_id", False),
    (INCL, "_id.x", False),
    (INCL, "password", True),
    (INCL, "nam", True),
    (INCL_PW, "password", True),
    (INCL_PW, "name", False),
    (USERS, "password", True),
    (USERS, "password.x", True),
    (USERS, "roles", False),
    (USERS, "passwords", False),
    (USERS, "_id", False),
]


@pytest.mark.parametrize("vis,path,expected", REVEALS)
def test_reveals(vis, path, expected):
    assert vis.reveals(path) is expected


# --------------------------------------------------------------------------- project_document

PROJECT = [
    # exclusion
    ({"secret": 0}, (), {"_id": 1, "name": "n", "secret": "s"}, {"_id": 1, "name": "n"}),
    ({"a.b": 0}, (), {"_id": 1, "a": {"b": 1, "c": 2}, "b": 3}, {"_id": 1, "a": {"c": 2}, "b": 3}),
    ({"a.b.c": 0}, (), {"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"d": 2}}}),
    (
        {"a.b": 0},
        (),
        {"a": [{"b": 1, "c": 2}, {"b": 3}, 4, [{"b": 5, "d": 6}]]},
        {"a": [{"c": 2}, {}, 4, [{"d": 6}]]},
    ),
    ({"tags.secret": 0}, (), {"tags": ["x", "y"]}, {"tags": ["x", "y"]}),
    ({"secret": 0}, (), {"_id": 1, "name": "n"}, {"_id": 1, "name": "n"}),
    ({"a.b": 0}, (), {"a": 5}, {"a": 5}),
    ({"a.b": 0}, (), {"a": None, "b": 1}, {"a": None, "b": 1}),
    ({"_id": 1, "secret": 0}, (), {"_id": 9, "secret": 1}, {"_id": 9}),
    ({"secret": 0}, ("password",), {"_id": 1, "secret": 1, "password": "h", "x": 1}, {"_id": 1, "x": 1}),
    # inclusion
    (
        {"name": 1, "owner": 1},
        (),
        {"_id": 7, "name": "n", "owner": "o", "secret": "s"},
        {"_id": 7, "name": "n", "owner": "o"},
    ),
    (
        {"profile.name": 1},
        (),
        {"_id": 1, "profile": {"name": "n", "pin": 1}, "x": 1},
        {"_id": 1, "profile": {"name": "n"}},
    ),
    (
        {"a.b": 1},
        (),
        {"_id": 1, "a": [{"b": 1, "c": 2}, {"c": 3}, 4, [{"b": 5, "c": 6}, 7]]},
        {"_id": 1, "a": [{"b": 1}, {}, [{"b": 5}]]},
    ),
    ({"tags": 1}, (), {"_id": 1, "tags": [1, 2], "x": 1}, {"_id": 1, "tags": [1, 2]}),
    ({"a.b": 1}, (), {"_id": 1, "a": 5}, {"_id": 1}),
    ({"a.b": 1}, (), {"_id": 1, "a": [1, 2]}, {"_id": 1, "a": []}),
    ({"a.b": 1}, (), {"_id": 1, "a": {"c": 1}}, {"_id": 1, "a": {}}),
    ({"name": 1}, (), {"_id": 1}, {"_id": 1}),
    ({"name": 1}, (), {"name": "n", "x": 1}, {"name": "n"}),
    ({"_id": 1}, (), {"_id": 1, "x": 2}, {"_id": 1}),
    ({"_id": 1, "name": 1}, (), {"_id": {"k": 1}, "name": "n", "x": 2}, {"_id": {"k": 1}, "name": "n"}),
    # always hidden: stays hidden even when an inclusion lists it
    (
        {"name": 1, "password": 1},
        ("password",),
        {"_id": "u", "name": "n", "password": "$2b$10$x"},
        {"_id": "u", "name": "n"},
    ),
    (None, ("password",), {"_id": "u", "roles": ["r"], "password": "$2b$10$x"}, {"_id": "u", "roles": ["r"]}),
    (
        {"profile": 1},
        ("profile.pin",),
        {"_id": 1, "profile": {"pin": 1, "name": "n"}, "x": 1},
        {"_id": 1, "profile": {"name": "n"}},
    ),
    (
        {"profile": 1},
        ("profile.pin",),
        {"_id": 1, "profile": [{"pin": 1, "n": 1}, 3]},
        {"_id": 1, "profile": [{"n": 1}, 3]},
    ),
]


@pytest.mark.parametrize("projection,always,doc,expected", PROJECT)
def test_project_document(projection, always, doc, expected):
    vis = Visibility.of(projection, always)
    before = copy.deepcopy(doc)
    assert vis.project_document(doc) == expected
    assert doc == before


def test_inclusion_keeps_document_order():
    vis = Visibility.of({"b": 1, "a": 1})
    assert list(vis.project_document({"a": 1, "x": 0, "b": 2, "_id": 3})) == ["a", "b", "_id"]


def test_projection_shares_nothing_with_input():
    doc = {"_id": {"k": [1]}, "a": {"b": [{"c": 1}]}, "secret": 1}
    for vis in (Visibility.of({"secret": 0}), Visibility.of({"a": 1, "_id": 1})):
        out = vis.project_document(doc)
        out["_id"]["k"].append(2)
        out["a"]["b"][0]["c"] = 99
        assert doc == {"_id": {"k": [1]}, "a": {"b": [{"c": 1}]}, "secret": 1}


def test_projection_of_deep_document():
    deep = leaf = {}
    for _ in range(150):
        leaf["n"] = {}
        leaf = leaf["n"]
    leaf["secret"] = 1
    out = Visibility.of({"secret": 0}).project_document({"n": deep, "secret": 1})
    assert out == {"n": deep}


# --------------------------------------------------------------------------- project_event

TOKEN = {"_data": "8264A1F0C2000000012B022C0100296E5A1004"}
NS = {"db": "restheart", "coll": "messages"}


def test_project_insert_event():
    vis = Visibility.of({"secret": 0})
    event = {
        "_id": TOKEN,
        "operationType": "insert",
        "ns": NS,
        "documentKey": {"_id": 1},
        "wallTime": 5,
        "fullDocument": {"_id": 1, "name": "n", "secret": "s"},
    }
    out = vis.project_event(event)
    assert out == {
        "_id": TOKEN,
        "operationType": "insert",
        "ns": NS,
        "documentKey": {"_id": 1},
        "wallTime": 5,
        "fullDocument": {"_id": 1, "name": "n"},
    }
    assert event["fullDocument"]["secret"] == "s"


def test_project_replace_event_with_before_image():
    vis = Visibility.of({"name": 1})
    event = {
        "_id": TOKEN,
        "operationType": "replace",
        "documentKey": {"_id": 2},
        "fullDocument": {"_id": 2, "name": "new", "pin": 1},
        "fullDocumentBeforeChange": {"_id": 2, "name": "old", "pin": 0},
    }
    out = vis.project_event(event)
    assert out["fullDocument"] == {"_id": 2, "name": "new"}
    assert out["fullDocumentBeforeChange"] == {"_id": 2, "name": "old"}
    assert out["documentKey"] == {"_id": 2}


def test_project_delete_event():
    vis = Visibility.of({"secret": 0})
    event = {
        "_id": TOKEN,
        "operationType": "delete",
        "documentKey": {"_id": 3},
        "ns": NS,
        "fullDocumentBeforeChange": None,
    }
    out = vis.project_event(event)
    assert out == event and out is not event and out["documentKey"] is not event["documentKey"]


def test_project_update_event_exclusion():
    vis = Visibility.of({"secret": 0, "a.secret": 0, "arr.secret": 0})
    event = {
        "_id": TOKEN,
        "operationType": "update",
        "documentKey": {"_id": 4},
        "fullDocument": {"_id": 4, "secret": 1, "a": {"secret": 2, "b": 3}, "arr": [{"secret": 1, "x": 2}]},
        "updateDescription": {
            "updatedFields": {
                "secret": 1,
                "secret.x": 2,
                "a.secret": 3,
                "a.secret.deep": 3,
                "a": {"secret": 1, "b": 2},
                "a.b": 3,
                "arr.1": {"secret": 1, "x": 2},
                "arr.1.secret": 5,
                "arr.1.x": 6,
                "arr.2": 7,
                "arr": [{"secret": 1, "y": 1}, 5, [{"secret": 2}]],
                "name": "n",
                "_id": 4,
            },
            "removedFields": ["secret", "a.secret", "a", "name", "arr.0.secret", "secret.z", "arr.0"],
            "truncatedArrays": [
                {"field": "arr", "newSize": 1},
                {"field": "secret", "newSize": 0},
                {"field": "a.secret", "newSize": 2},
                {"field": "secret.list", "newSize": 2},
            ],
            "disambiguatedPaths": {"arr.1.secret": ["arr", 1, "secret"], "arr.1": ["arr", 1]},
        },
    }
    before = copy.deepcopy(event)
    out = vis.project_event(event)
    assert event == before
    assert out["fullDocument"] == {"_id": 4, "a": {"b": 3}, "arr": [{"x": 2}]}
    assert out["updateDescription"] == {
        "updatedFields": {
            "a": {"b": 2},
            "a.b": 3,
            "arr.1": {"x": 2},
            "arr.1.x": 6,
            "arr.2": 7,
            "arr": [{"y": 1}, 5, [{}]],
            "name": "n",
            "_id": 4,
        },
        "removedFields": ["a", "name", "arr.0"],
        "truncatedArrays": [{"field": "arr", "newSize": 1}],
        "disambiguatedPaths": {"arr.1": ["arr", 1]},
    }
    assert out["documentKey"] == {"_id": 4}


def test_project_update_event_inclusion():
    vis = Visibility.of({"name": 1, "profile.name": 1, "tags": 1}, ("password",))
    event = {
        "_id": TOKEN,
        "operationType": "update",
        "documentKey": {"_id": "u"},
        "updateDescription": {
            "updatedFields": {
                "name": "n",
                "password": "h",
                "password.x": 1,
                "profile": {"name": "p", "pin": 1},
                "profile.pin": 2,
                "profile.name": "q",
                "other": 1,
                "tags.3": "t",
                "profile.list": 1,
                "profile.2": {"name": "e", "pin": 0},
                "profile.3": 7,
            },
            "removedFields": ["other", "profile", "profile.name", "password", "profile.pin", "tags.0"],
            "truncatedArrays": [
                {"field": "tags", "newSize": 2},
                {"field": "other", "newSize": 1},
                {"field": "profile", "newSize": 1},
            ],
        },
    }
    out = vis.project_event(event)["updateDescription"]
    assert out["updatedFields"] == {
        "name": "n",
        "profile": {"name": "p"},
        "profile.name": "q",
        "tags.3": "t",
        "profile.2": {"name": "e"},
    }
    assert out["removedFields"] == ["profile", "profile.name", "tags.0"]
    assert out["truncatedArrays"] == [{"field": "tags", "newSize": 2}, {"field": "profile", "newSize": 1}]


def test_project_update_event_inclusion_drops_scalar_ancestor():
    vis = Visibility.of({"profile.name": 1})
    event = {"operationType": "update", "updateDescription": {"updatedFields": {"profile": 5}}}
    assert vis.project_event(event)["updateDescription"]["updatedFields"] == {}


def test_project_users_update_event():
    event = {
        "operationType": "update",
        "documentKey": {"_id": "bob"},
        "updateDescription": {
            "updatedFields": {"password": "$2b$10$abc", "roles": ["x"]},
            "removedFields": ["password", "tmp"],
            "truncatedArrays": [],
        },
    }
    out = USERS.project_event(event)["updateDescription"]
    assert out == {"updatedFields": {"roles": ["x"]}, "removedFields": ["tmp"], "truncatedArrays": []}


def test_project_event_keeps_unknown_shapes():
    vis = Visibility.of({"secret": 0})
    event = {
        "operationType": "update",
        "updateDescription": {"updatedFields": None, "extra": [1]},
        "fullDocument": None,
        "clusterTime": 7,
    }
    assert vis.project_event(event) == event


# --------------------------------------------------------------------------- oracles: filters

PROBE = {
    "$expr": {
        "$gte": [
            {"$let": {"vars": {"e": {"$arrayElemAt": [{"$objectToArray": "$$ROOT"}, 1]}}, "in": "$$e.v"}},
            {"$literal": "$2b$10$N9qo8uLOickgx2ZMRZoMye"},
        ]
    }
}

FILTER_REFUSED = [
    (EXCL, {"secret": "x"}, "the field 'secret' is hidden by your permission"),
    (EXCL, {"password": {"$regex": "^\\$2b"}}, "the field 'password' is hidden"),
    (EXCL, {"profile.pin": 1}, "'profile.pin'"),
    (EXCL, {"profile.pin.x": {"$gt": 1}}, "'profile.pin.x'"),
    (
        EXCL,
        {"profile": {"name": "a", "pin": 1}},
        "'profile' is hidden by your permission (it contains the hidden field 'profile.pin')",
    ),
    (EXCL, {"profile": {"$exists": True}}, "'profile'"),
    (EXCL, {"items.0.secret": 1}, "'items.0.secret'"),
    (EXCL, {"items.0": {"secret": 1}}, "'items.0'"),
    (EXCL, {"items": {"$size": 2}}, "'items'"),
    (EXCL, {"items": {"$elemMatch": {"secret": 1}}}, "'items.secret'"),
    (EXCL, {"items": {"$elemMatch": {"x": 1, "secret": {"$gt": 1}}}}, "'items.secret'"),
    (EXCL, {"items": {"$elemMatch": {"$and": [{"x": 1}, {"secret": 2}]}}}, "'items.secret'"),
    (EXCL, {"items": {"$all": [{"$elemMatch": {"secret": 1}}]}}, "'items.secret'"),
    (EXCL, {"items": {"$elemMatch": {"$gt": 1}}}, "'items'"),
    (EXCL, {"items": {"$elemMatch": {}}}, "'items'"),
    (EXCL, {"items": {"$elemMatch": {"x": 1}, "$size": 1}}, "'items'"),
    (EXCL, {"secret": {"$not": {"$gt": 1}}}, "'secret'"),
    (EXCL, {"items": {"$not": {"$elemMatch": {"secret": 1}}}}, "items"),
    (EXCL, {"$and": [{"name": 1}, {"$or": [{"x": 1}, {"$nor": [{"secret": 1}]}]}]}, "'secret'"),
    (EXCL, {"$or": [{"name": 1}, {"profile.pin": 2}]}, "'profile.pin'"),
    (EXCL, {"$expr": {"$eq": ["$secret", "x"]}}, "'secret'"),
    (EXCL, {"$expr": {"$gt": [{"$strLenCP": "$password"}, 0]}}, "'password'"),
    (EXCL, {"$expr": {"$eq": ["$profile", {}]}}, "'profile'"),
    (EXCL, {"$expr": {"$eq": ["$$ROOT", {}]}}, "$$ROOT is not allowed"),
    (EXCL, {"$expr": {"$eq": ["$$CURRENT", 1]}}, "$$CURRENT is not allowed"),
    (EXCL, {"$expr": {"$eq": ["$$CURRENT.secret", 1]}}, "the field 'secret' is hidden"),
    (EXCL, {"$expr": {"$eq": ["$$ROOT.profile.pin", 1]}}, "the field 'profile.pin' is hidden"),
    (EXCL, {"$expr": {"$eq": [{"$size": {"$objectToArray": "$name"}}, 3]}}, "$objectToArray is not allowed"),
    (EXCL, {"$expr": {"$eq": [{"$getField": "secret"}, 1]}}, "$getField is not allowed"),
    (EXCL, {"$expr": {"$eq": [{"$getField": {"field": "name", "input": "$profile"}}, 1]}}, "not allowed"),
    (
        EXCL,
        {"$expr": {"$eq": [{"$setField": {"field": "a", "input": "$name", "value": 1}}, 1]}},
        "$setField is not allowed",
    ),
    (
        EXCL,
        {"$expr": {"$eq": [{"$unsetField": {"field": "a", "input": "$name"}}, 1]}},
        "$unsetField is not allowed",
    ),
    (EXCL, {"$expr": {"$let": {"vars": {"r": "$$ROOT"}, "in": {"$eq": ["$$r.secret", 1]}}}}, "$$ROOT"),
    (EXCL, {"$expr": {"$let": {"vars": {"CURRENT": "$$ROOT"}, "in": {"$eq": ["$name", 1]}}}}, "$$ROOT"),
    (EXCL, {"$expr": {"$let": {"vars": {"p": "$profile"}, "in": {"$eq": ["$$p.pin", 1]}}}}, "'profile'"),
    (
        EXCL,
        {"$expr": {"$anyElementTrue": {"$map": {"input": "$items", "in": {"$eq": ["$$this.secret", 1]}}}}},
        "'items'",
    ),
    (EXCL, {"$expr": {"$eq": [{"$mergeObjects": ["$$ROOT", {"a": 1}]}, {}]}}, "$$ROOT"),
    (EXCL, {"$jsonSchema": {"properties": {"name": {"type": "string"}}}}, "$jsonSchema is not allowed"),
    (EXCL, {"$where": "this.secret == 'x'"}, "$where is not allowed"),
    (EXCL, {"$expr": {"$function": {"body": "f", "args": [], "lang": "js"}}}, "$function is not allowed"),
    (EXCL, {"$text": {"$search": "x"}}, "$text is not allowed"),
    (EXCL, {"$unknownOperator": 1}, "cannot be checked"),
    (EXCL, {"items": {"$elemMatch": {"$expr": {"$eq": ["$x", 1]}}}}, "$expr inside $elemMatch"),
    (EXCL, {"": 1}, "not a valid field path"),
    (USERS, PROBE, "$objectToArray is not allowed"),
    (USERS, {"password": {"$gte": "$2b$10$N"}}, "the field 'password' is hidden"),
    (USERS, {"password": {"$exists": True}}, "'password'"),
    (USERS, {"$expr": {"$lt": ["$password", "$2c"]}}, "'password'"),
    (
        INCL,
        {"profile": {"name": "x"}},
        "'profile' is hidden by your permission (only part of it is visible: profile.name)",
    ),
    (INCL, {"profile.pin": 1}, "'profile.pin'"),
    (INCL, {"other": 1}, "'other' is hidden by your permission (your permission shows only _id, name"),
    (INCL, {"password": 1}, "'password'"),
    (INCL_PW, {"password": 1}, "'password'"),
    (INCL, {"$expr": {"$eq": ["$other", 1]}}, "'other'"),
    (INCL, {"profile": {"$elemMatch": {"pin": 1}}}, "'profile.pin'"),
]


@pytest.mark.parametrize("vis,flt,fragment", FILTER_REFUSED)
def test_check_filter_refuses(vis, flt, fragment):
    with pytest.raises(Forbidden) as info:
        vis.check_filter(flt)
    assert info.value.status == 403
    assert fragment in info.value.message
    assert info.value.message.startswith("filter: ")


FILTER_ALLOWED = [
    (EXCL, {}),
    (EXCL, None),
    (EXCL, {"name": "x"}),
    (EXCL, {"_id": 1}),
    (EXCL, {"_id.secret": 1}),
    (EXCL, {"profile.name": "a"}),
    (EXCL, {"items.x": 1}),
    (EXCL, {"items.0.x": 1}),
    (EXCL, {"items": {"$elemMatch": {"x": 1, "y": {"$gt": 2}}}}),
    (EXCL, {"items": {"$elemMatch": {"$or": [{"x": 1}, {"y": 2}]}}}),
    (EXCL, {"items": {"$all": [{"$elemMatch": {"x": 1}}, {"$elemMatch": {"y": {"$lt": 0}}}]}}),
    (EXCL, {"name": {"$in": ["$secret", "$$ROOT"]}}),
    (EXCL, {"name": {"$eq": {"$objectToArray": "$$ROOT"}}}),
    (EXCL, {"name": {"$regex": "^a", "$options": "i"}}),
    (EXCL, {"name": {"$not": {"$regex": "^a"}}}),
    (EXCL, {"$expr": {"$eq": ["$name", {"$literal": "$secret"}]}}),
    (EXCL, {"$expr": {"$eq": [{"$literal": "$$ROOT"}, "x"]}}),
    (EXCL, {"$expr": {"$eq": [{"$literal": {"$objectToArray": "$$ROOT"}}, "x"]}}),
    (
        EXCL,
        {"$expr": {"$anyElementTrue": {"$map": {"input": "$tags", "as": "t", "in": {"$eq": ["$$t", "x"]}}}}},
    ),
    (EXCL, {"$expr": {"$anyElementTrue": {"$map": {"input": "$tags", "in": {"$eq": ["$$this", "x"]}}}}}),
    (
        EXCL,
        {
            "$expr": {
                "$gt": [{"$reduce": {"input": "$tags", "initialValue": 0, "in": {"$add": ["$$value", 1]}}}, 1]
            }
        },
    ),
    (EXCL, {"$expr": {"$let": {"vars": {"n": "$name"}, "in": {"$eq": ["$$n", "x"]}}}}),
    (EXCL, {"$expr": {"$eq": ["$$ROOT.name", "x"]}}),
    (EXCL, {"$expr": {"$lt": ["$$NOW", "$createdAt"]}}),
    (EXCL, {"$and": [{"name": 1}, {"$or": [{"profile.name": 1}, {"_id": 2}]}], "$comment": "c"}),
    (INCL, {"name": 1}),
    (INCL, {"name.first": 1}),
    (INCL, {"profile.name": {"$exists": True}}),
    (INCL, {"profile": {"$elemMatch": {"name": "x"}}}),
    (INCL, {"tags": {"$elemMatch": {"$eq": "x"}}}),
    (INCL, {"tags": {"$all": ["a", "b"]}, "_id": {"$gt": 1}}),
    (INCL, {"$expr": {"$in": ["x", "$tags"]}}),
    (USERS, {"roles": "admin", "_id": "alice"}),
    (USERS, {"$expr": {"$in": ["admin", "$roles"]}}),
]


@pytest.mark.parametrize("vis,flt", FILTER_ALLOWED)
def test_check_filter_allows(vis, flt):
    vis.check_filter(flt)


def test_nesting_100_deep():
    inner: dict = {"secret": 1}
    ok: dict = {"name": 1}
    for _ in range(100):
        inner, ok = {"$and": [inner]}, {"$and": [ok]}
    with pytest.raises(Forbidden, match="'secret'"):
        EXCL.check_filter(inner)
    EXCL.check_filter(ok)


def test_expression_nesting_deeper_than_the_recursion_limit():
    bad: object = "$secret"
    good: object = "$name"
    for _ in range(5000):
        bad, good = {"$not": [bad]}, {"$not": [good]}
    with pytest.raises(Forbidden, match="'secret'"):
        EXCL.check_filter({"$expr": bad})
    EXCL.check_filter({"$expr": good})


def test_elem_match_nesting():
    flt: dict = {"secret": 1}
    for _ in range(100):
        flt = {"a": {"$elemMatch": flt}}
    vis = Visibility.of({".".join(["a"] * 100 + ["secret"]): 0})
    with pytest.raises(Forbidden):
        vis.check_filter(flt)
    Visibility.of({"secret": 0}).check_filter(flt)  # a.a....secret is not the top-level secret


def test_check_expression():
    with pytest.raises(Forbidden, match="expression: the field 'secret'"):
        EXCL.check_expression({"$toUpper": "$secret"})
    EXCL.check_expression({"$toUpper": "$name"})


# --------------------------------------------------------------------------- oracles: sort, keys


@pytest.mark.parametrize(
    "vis,sort",
    [
        (EXCL, [("secret", 1)]),
        (EXCL, [("name", 1), ("profile", -1)]),
        (EXCL, [("items.0.secret", 1)]),
        (EXCL, [("items", 1)]),
        (USERS, [("password", 1)]),
        (INCL, [("other", 1)]),
        (INCL, [("profile", 1)]),
        (EXCL, ["secret"]),
        (EXCL, {"secret": 1}),
    ],
)
def test_check_sort_refuses(vis, sort):
    with pytest.raises(Forbidden, match="^sort: the field '.*' is hidden by your permission"):
        vis.check_sort(sort)


@pytest.mark.parametrize(
    "vis,sort",
    [
        (EXCL, [("name", 1), ("_id", -1)]),
        (EXCL, [("profile.name", 1), ("items.x", -1)]),
        (EXCL, []),
        (EXCL, None),
        (USERS, [("roles", 1)]),
        (INCL, [("profile.name", -1), ("tags", 1)]),
    ],
)
def test_check_sort_allows(vis, sort):
    vis.check_sort(sort)


@pytest.mark.parametrize(
    "vis,keys",
    [
        (EXCL, {"secret": 0}),
        (EXCL, {"secret": 1}),
        (EXCL, {"profile": 1}),
        (EXCL, {"name": 1, "items.secret": 1}),
        (USERS, {"password": 0}),
        (INCL, {"other": 1}),
        (INCL, {"profile": 0}),
    ],
)
def test_check_keys_refuses(vis, keys):
    with pytest.raises(Forbidden, match="^keys: the field '.*' is hidden by your permission"):
        vis.check_keys(keys)


@pytest.mark.parametrize(
    "vis,keys",
    [
        (EXCL, None),
        (EXCL, {}),
        (EXCL, {"name": 1, "_id": 0}),
        (EXCL, {"profile.name": 1}),
        (INCL, {"name": 1, "profile.name": 1}),
        (USERS, {"roles": 1}),
    ],
)
def test_check_keys_allows(vis, keys):
    vis.check_keys(keys)


# --------------------------------------------------------------------------- oracles: stream stages

STAGES_REFUSED = [
    (
        [{"$match": {"fullDocument.secret": "x"}}],
        "the field 'fullDocument.secret' is hidden by your permission",
    ),
    ([{"$match": {"fullDocumentBeforeChange.profile.pin": 1}}], "'fullDocumentBeforeChange.profile.pin'"),
    ([{"$match": {"fullDocument.profile": {"a": 1}}}], "'fullDocument.profile'"),
    ([{"$match": {"updateDescription.updatedFields.secret": {"$exists": True}}}], "updatedFields.secret"),
    ([{"$match": {"updateDescription.updatedFields.profile": {"$exists": True}}}], "updatedFields.profile"),
    ([{"$match": {"updateDescription.updatedFields": {"$exists": True}}}], "reads every updated field"),
    ([{"$match": {"fullDocument": {"$exists": True}}}], "'fullDocument' is hidden"),
    ([{"$match": {"fullDocumentBeforeChange": None}}], "'fullDocumentBeforeChange'"),
    ([{"$match": {"updateDescription.removedFields": "secret"}}], "'updateDescription.removedFields'"),
    ([{"$match": {"updateDescription.truncatedArrays.field": "items"}}], "truncatedArrays"),
    ([{"$match": {"updateDescription": {"$exists": True}}}], "'updateDescription'"),
    ([{"$match": {"$or": [{"operationType": "delete"}, {"fullDocument.secret": 1}]}}], "fullDocument.secret"),
    ([{"$match": {"$expr": {"$eq": ["$fullDocument.secret", 1]}}}], "'fullDocument.secret'"),
    ([{"$match": {"$expr": {"$eq": ["$$ROOT.fullDocument.password", 1]}}}], "'fullDocument.password'"),
    ([{"$match": {"$expr": {"$gt": [{"$size": {"$objectToArray": "$fullDocument"}}, 1]}}}], "not allowed"),
    ([{"$match": {"$expr": {"$eq": ["$$ROOT", 1]}}}], "$$ROOT is not allowed"),
    ([{"$match": {"$expr": {"$eq": ["$$CURRENT.fullDocument", 1]}}}], "'fullDocument'"),
    ([{"$addFields": {"x": "$fullDocument"}}], "'fullDocument'"),
    ([{"$set": {"x": "$fullDocument.secret"}}], "'fullDocument.secret'"),
    ([{"$set": {"x": {"$toUpper": "$updateDescription.updatedFields.password"}}}], "updatedFields.password"),
    ([{"$project": {"_id": 1, "leak": {"$concat": ["$fullDocument.password"]}}}], "'fullDocument.password'"),
    ([{"$project": {"nested": {"deeper": "$fullDocument.profile"}}}], "'fullDocument.profile'"),
    ([{"$replaceWith": {"_id": "$_id", "d": "$fullDocumentBeforeChange"}}], "'fullDocumentBeforeChange'"),
    (
        [{"$replaceRoot": {"newRoot": {"_id": "$_id", "d": "$updateDescription.updatedFields"}}}],
        "updatedFields",
    ),
    ([{"$redact": "$$KEEP"}], "$redact is not allowed"),
    ([{"$lookup": {"from": "x"}}], "the stage $lookup is not allowed"),
]


@pytest.mark.parametrize("stages,fragment", STAGES_REFUSED)
def test_check_stages_refuses(stages, fragment):
    with pytest.raises(Forbidden) as info:
        EXCL.check_stages(stages)
    assert fragment in info.value.message
    assert info.value.message.startswith("stream stage 1 (")


def test_check_stages_names_the_stage():
    with pytest.raises(Forbidden, match=r"^stream stage 2 \(\$match\): the field 'fullDocument.secret'"):
        EXCL.check_stages([{"$match": {"operationType": "update"}}, {"$match": {"fullDocument.secret": 1}}])


STAGES_ALLOWED = [
    [],
    [{"$match": {"operationType": {"$in": ["insert", "update"]}}}],
    [
        {
            "$match": {
                "fullDocument.name": "x",
                "documentKey._id": 1,
                "ns.coll": "c",
                "wallTime": {"$gt": 1},
                "clusterTime": {"$gt": 0},
                "_id": {"$exists": True},
                "documentKey": {"_id": 1},
            }
        }
    ],
    [{"$match": {"updateDescription.updatedFields.name": {"$exists": True}}}],
    [{"$match": {"fullDocument.items": {"$elemMatch": {"x": 1}}}}],
    [{"$match": {"$expr": {"$eq": ["$$ROOT.operationType", "insert"]}}}],
    [{"$match": {"$expr": {"$eq": ["$fullDocument.profile.name", "$fullDocumentBeforeChange.name"]}}}],
    [{"$project": {"fullDocument": 1, "operationType": 1}}],
    [{"$unset": ["fullDocument.secret", "fullDocument"]}],
    [{"$unset": "updateDescription"}],
    [{"$addFields": {"kind": "$operationType", "n": {"$literal": "$fullDocument"}}}],
    [{"$set": {"name": {"$toUpper": "$fullDocument.name"}}}],
    [{"$set": {"c": {"$size": {"$map": {"input": "$fullDocument.tags", "in": "$$this"}}}}}],
    [{"$replaceWith": {"_id": "$_id", "op": "$operationType", "key": "$documentKey"}}],
    [{"$replaceRoot": {"newRoot": {"_id": "$_id", "name": "$fullDocument.name"}}}],
]


@pytest.mark.parametrize("stages", STAGES_ALLOWED)
def test_check_stages_allows(stages):
    EXCL.check_stages(stages)


def test_users_stream_stages():
    with pytest.raises(Forbidden, match="fullDocument.password"):
        USERS.check_stages([{"$match": {"fullDocument.password": {"$regex": "^\\$2b"}}}])
    USERS.check_stages([{"$match": {"fullDocument.roles": "admin", "operationType": "update"}}])


# --------------------------------------------------------------------------- property tests

FIELDS = ["a", "b", "secret", "password", "x"]
SCALARS = st.one_of(st.integers(-3, 3), st.text(alphabet="xyz", max_size=2), st.none(), st.booleans())
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.sampled_from(FIELDS), children, max_size=3)
    ),
    max_leaves=12,
)
DOCS = st.tuples(st.booleans(), st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=5)).map(
    lambda t: {"_id": 1, **t[1]} if t[0] else t[1]
)
PATHS = st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3).map(tuple)


def _strip(path: str) -> tuple:
    parts = path.split(".")
    return (parts[0],) + tuple(p for p in parts[1:] if not p.isdigit())


def _under(path: tuple, other: tuple) -> bool:
    return path[: len(other)] == other


@st.composite
def models(draw):
    """A random projection (exclusion or inclusion) with always-hidden paths, as
    (Visibility, mode, shown-or-hidden paths, always-hidden paths)."""
    chosen: list[tuple] = []
    for path in draw(st.lists(PATHS, min_size=1, max_size=4)):
        if not any(_under(path, c) or _under(c, path) for c in chosen):
            chosen.append(path)
    include = draw(st.booleans())
    always = draw(st.sampled_from([(), ("password",), ("b.secret",), ("password", "a.secret")]))
    projection = {".".join(p): int(include) for p in chosen}
    if include and draw(st.booleans()):
        projection["_id"] = 1
    vis = Visibility.of(projection, always)
    return vis, ("include" if include else "exclude"), chosen, [tuple(p.split(".")) for p in always]


def _node_visible(model, path: tuple) -> bool:
    """May a (dict key) node at ``path`` appear in projected output?"""
    _, mode, paths, always = model
    if path[0] == "_id":
        return True
    if any(_under(path, h) for h in always):
        return False
    if mode == "exclude":
        return not any(_under(path, h) for h in paths)
    return any(_under(path, i) or _under(i, path) for i in paths)


def _scalar_visible(model, path: tuple) -> bool:
    """May a scalar value at ``path`` appear in projected output?"""
    _, mode, paths, always = model
    if path[0] == "_id":
        return True
    if any(_under(path, h) for h in always):
        return False
    if mode == "exclude":
        return not any(_under(path, h) for h in paths)
    return any(_under(path, i) for i in paths)


def _violations(model, value, path: tuple):
    """Every node or scalar of ``value`` (found at ``path``) that must not be visible."""
    out = []
    stack = [(value, path)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                sub = at + (key,)
                if not _node_visible(model, sub):
                    out.append(sub)
                stack.append((child, sub))
        elif isinstance(item, list):
            stack.extend((child, at) for child in item)
        elif at and not _scalar_visible(model, at):
            out.append(at)
    return out


def _has_hidden_node(model, doc) -> bool:
    _, _, paths, always = model
    stack = [(doc, ())]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if any(_under(at + (key,), h) for h in list(paths) + always):
                    return True
                stack.append((child, at + (key,)))
        elif isinstance(item, list):
            stack.extend((child, at) for child in item)
    return False


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(models(), DOCS)
def test_property_no_hidden_value_survives_projection(model, doc):
    vis, mode = model[0], model[1]
    before = copy.deepcopy(doc)
    out = vis.project_document(doc)
    assert doc == before
    assert _violations(model, out, ()) == []
    assert vis.project_document(out) == out  # idempotent
    if "_id" in doc:
        assert out["_id"] == doc["_id"]
    if mode == "exclude" and not _has_hidden_node(model, doc):
        assert out == doc


KEY_SEGMENTS = FIELDS + ["0", "1"]
KEYS = st.tuples(st.sampled_from(FIELDS), st.lists(st.sampled_from(KEY_SEGMENTS), max_size=3)).map(
    lambda t: ".".join([t[0], *t[1]])
)
UPDATES = st.fixed_dictionaries(
    {
        "updatedFields": st.dictionaries(KEYS, VALUES, max_size=6),
        "removedFields": st.lists(KEYS, max_size=4),
        "truncatedArrays": st.lists(
            st.fixed_dictionaries({"field": KEYS, "newSize": st.integers(0, 3)}), max_size=3
        ),
    }
)


@PROPERTY
@given(models(), UPDATES, st.one_of(st.none(), DOCS))
def test_property_no_hidden_path_in_projected_events(model, desc, full):
    vis, mode = model[0], model[1]
    event = {"_id": TOKEN, "operationType": "update", "documentKey": {"_id": 1}, "updateDescription": desc}
    if full is not None:
        event["fullDocument"] = full
    before = copy.deepcopy(event)
    out = vis.project_event(event)
    assert event == before
    assert out["documentKey"] == {"_id": 1} and out["_id"] == TOKEN
    if full is not None:
        assert _violations(model, out["fullDocument"], ()) == []
    projected = out["updateDescription"]
    for key, value in projected["updatedFields"].items():
        at = _strip(key)
        assert _node_visible(model, at), key
        assert _violations(model, value, at) == [], key
    for key in projected["removedFields"]:
        assert _node_visible(model, _strip(key)), key
    for entry in projected["truncatedArrays"]:
        assert _node_visible(model, _strip(entry["field"])), entry
    if mode == "exclude":  # what hides nothing is kept as is
        for key, value in desc["updatedFields"].items():
            at = _strip(key)
            if not any(_under(at, h) or _under(h, at) for h in model[2] + model[3]):
                assert projected["updatedFields"][key] == value


# filters: a fixed exclusion and a fixed inclusion model, and an independent oracle of which
# paths a filter may name

FILTER_MODELS = {
    "exclude": (
        Visibility.of({"secret": 0, "b.secret": 0}, ("password",)),
        lambda p: any(_under(p, h) or _under(h, p) for h in [("secret",), ("b", "secret"), ("password",)]),
    ),
    "include": (
        Visibility.of({"a": 1, "b.c": 1, "x": 1}, ("password",)),
        lambda p: (
            not any(_under(p, i) for i in [("a",), ("b", "c"), ("x",)])
            or any(_under(p, h) or _under(h, p) for h in [("password",)])
        ),
    ),
}
REL_FIELDS = [
    "a",
    "b",
    "c",
    "x",
    "secret",
    "password",
    "a.x",
    "b.c",
    "b.secret",
    "a.1.x",
    "b.0.secret",
    "secret.y",
    "_id",
    "_id.k",
]
ELEM_FIELDS = ["a", "b", "c", "secret"]
LITERALS = st.one_of(st.integers(-2, 2), st.sampled_from(["$secret", "$$ROOT", "v"]), st.none())


def _hidden(model: str, path: str) -> bool:
    segments = _strip(path)
    return segments[0] != "_id" and FILTER_MODELS[model][1](segments)


def _join(prefix: str, key: str) -> str:
    return prefix + "." + key if prefix else key


def _fields(model: str, prefix: str, visible_only: bool) -> list[str]:
    return [f for f in REL_FIELDS if not (visible_only and _hidden(model, _join(prefix, f)))]


@st.composite
def filters(draw, model: str, visible_only: bool, prefix: str = "", depth: int = 0):
    """(filter, whether it names a hidden path) over the model's fields."""
    flt: dict = {}
    bad = False
    kinds = ["eq", "op", "not", "in", "expr"] + (["logic", "elem"] if depth < 3 else [])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(kinds))
        if kind == "logic":
            op = draw(st.sampled_from(["$and", "$or", "$nor"]))
            count = draw(st.integers(1, 3))
            subs = [draw(filters(model, visible_only, prefix, depth + 1)) for _ in range(count)]
            key, value, mentions = op, [s for s, _ in subs], any(m for _, m in subs)
        elif kind == "elem":
            options = [f for f in ELEM_FIELDS if _fields(model, _join(prefix, f), visible_only)]
            field = draw(st.sampled_from(options))
            sub, mentions = draw(filters(model, visible_only, _join(prefix, field), depth + 1))
            key, value = field, {"$elemMatch": sub}
        elif kind == "expr":
            if prefix:  # $expr only applies to whole documents
                continue
            field = draw(st.sampled_from(_fields(model, "", visible_only)))
            key, mentions = "$expr", _hidden(model, field)
            value = {"$eq": ["$" + field, {"$literal": draw(LITERALS)}]}
        else:
            field = draw(st.sampled_from(_fields(model, prefix, visible_only)))
            literal = draw(LITERALS)
            value = {
                "eq": literal,
                "op": {draw(st.sampled_from(["$gt", "$lte", "$ne", "$exists"])): literal},
                "not": {"$not": {"$gt": literal}},
                "in": {"$in": [literal, 1]},
            }[kind]
            key, mentions = field, _hidden(model, _join(prefix, field))
        if key in flt:
            continue
        flt[key] = value
        bad = bad or mentions
    if not flt:  # every draw was skipped: name one field (a visible one if there is one)
        field = (_fields(model, prefix, True) or REL_FIELDS)[0]
        flt, bad = {field: 1}, _hidden(model, _join(prefix, field))
    return flt, bad


@PROPERTY
@given(st.sampled_from(sorted(FILTER_MODELS)).flatmap(lambda m: st.tuples(st.just(m), filters(m, True))))
def test_property_visible_filters_pass(case):
    model, (flt, bad) = case
    assert not bad
    FILTER_MODELS[model][0].check_filter(flt)


@PROPERTY
@given(st.sampled_from(sorted(FILTER_MODELS)).flatmap(lambda m: st.tuples(st.just(m), filters(m, False))))
def test_property_filters_naming_hidden_fields_are_refused(case):
    model, (flt, bad) = case
    vis = FILTER_MODELS[model][0]
    if bad:
        with pytest.raises(Forbidden, match="is hidden by your permission"):
            vis.check_filter(flt)
    else:
        vis.check_filter(flt)


def test_elem_match_on_an_entirely_hidden_field_is_refused():
    """Even an empty condition on the elements tells whether the field is a non-empty array."""
    vis = Visibility.of({"secret": 0, "items.pin": 0})
    for flt in (
        {"secret": {"$elemMatch": {"$and": [{}]}}},
        {"secret": {"$elemMatch": {"x": 1}}},
        {"secret": {"$all": [{"$elemMatch": {"a": 1}}]}},
    ):
        with pytest.raises(Forbidden):
            vis.check_filter(flt)
    vis.check_filter({"items": {"$elemMatch": {"name": "x"}}})  # items is visible but for items.pin
    with pytest.raises(Forbidden):
        vis.check_stages([{"$match": {"fullDocument.secret": {"$elemMatch": {"$and": [{}]}}}}])


@pytest.mark.parametrize(
    "spec",
    [
        {"$set": {"secret.0": "x"}},
        {"$currentDate": {"secret.0": True}},
        {"$set": {"secret.00": 1}},
        {"$rename": {"title": "secret.0"}},
        {"$unset": {"secret.1": 1}},
    ],
)
def test_array_indexes_inside_a_hidden_field_are_writes_into_it(spec):
    with pytest.raises(Forbidden):
        Visibility.of({"secret": 0}).check_update(spec)
