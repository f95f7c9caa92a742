"""Tests for services.pipeline: unescape, validation, avars, variable binding and evaluation."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime, timedelta

import pytest
from bson import ObjectId
from bson.timestamp import Timestamp

from services.pipeline import (
    ALLOWED_STAGES,
    AvarsError,
    EventError,
    Pipeline,
    PipelineError,
    VariableError,
    bind_variables,
    compile_pipeline,
    parse_avars,
    unescape,
    validate_streams,
    with_pre_images,
)

# ---------------------------------------------------------------------------------------------
# fixtures: realistic change events
# ---------------------------------------------------------------------------------------------

OID1 = ObjectId("64a1f0c2e4b0a1b2c3d4e5f6")
OID2 = ObjectId("64a1f0c2e4b0a1b2c3d4e5f7")
OID3 = ObjectId("64a1f0c2e4b0a1b2c3d4e5f8")
ETAG = ObjectId("64a1f0c2e4b0a1b2c3d4e600")
T0 = Timestamp(1680529011, 1)
W0 = datetime(2023, 4, 3, 13, 36, 51, 123000, tzinfo=UTC)
NS = {"db": "restheart", "coll": "messages"}


def _token(n: int) -> dict:
    return {"_data": f"8264A1F0C2000000{n:02d}2B022C0100296E5A1004"}


INSERT = {
    "_id": _token(1),
    "operationType": "insert",
    "clusterTime": T0,
    "wallTime": W0,
    "fullDocument": {
        "_id": OID1,
        "name": "uji",
        "message": "hello",
        "qty": 7,
        "price": 2.5,
        "tags": ["red", "blue"],
        "secret": "s3",
        "owner": {"tier": "gold", "id": 42},
        "items": [{"sku": "A1", "n": 2}, {"sku": "B2", "n": 5}],
        "note": None,
        "_etag": ETAG,
        "createdAt": datetime(2023, 4, 1, tzinfo=UTC),
    },
    "ns": NS,
    "documentKey": {"_id": OID1},
}
UPDATE = {
    "_id": _token(2),
    "operationType": "update",
    "clusterTime": Timestamp(1680529012, 3),
    "wallTime": W0 + timedelta(seconds=1),
    "fullDocument": {
        "_id": OID2,
        "name": "Bob",
        "message": "edited",
        "qty": 1,
        "tags": ["green"],
        "owner": {"tier": "basic", "id": 7},
        "_etag": ETAG,
    },
    "ns": NS,
    "documentKey": {"_id": OID2},
    "updateDescription": {
        "updatedFields": {"message": "edited", "_etag": ETAG},
        "removedFields": ["draft"],
        "truncatedArrays": [],
    },
}
REPLACE = {
    "_id": _token(3),
    "operationType": "replace",
    "clusterTime": Timestamp(1680529013, 1),
    "wallTime": W0 + timedelta(seconds=2),
    "fullDocument": {"_id": OID3, "name": "uji", "message": "replaced", "qty": 0, "tags": [], "_etag": ETAG},
    "ns": NS,
    "documentKey": {"_id": OID3},
}
DELETE = {
    "_id": _token(4),
    "operationType": "delete",
    "clusterTime": Timestamp(1680529014, 1),
    "wallTime": W0 + timedelta(seconds=3),
    "ns": NS,
    "documentKey": {"_id": OID1},
}
EVENTS = {"insert": INSERT, "update": UPDATE, "replace": REPLACE, "delete": DELETE}


def _run(stages: list, event: dict, avars: dict | None = None) -> dict | None:
    return compile_pipeline(stages, avars or {}).apply(event)


def _matched(stages: list, avars: dict | None = None) -> list[str]:
    pipeline = compile_pipeline(stages, avars or {})
    return [name for name, event in EVENTS.items() if pipeline.apply(event) is not None]


# ---------------------------------------------------------------------------------------------
# unescape
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"_$match": {"a": 1}}, {"$match": {"a": 1}}),
        ({"fullDocument::name": "x"}, {"fullDocument.name": "x"}),
        ({"updateDescription::updatedFields::a": 1}, {"updateDescription.updatedFields.a": 1}),
        ({"_$set": {"x": "_$fullDocument.n"}}, {"$set": {"x": "$fullDocument.n"}}),
        (
            [{"_$match": {"_$or": [{"a": 1}, {"b": {"_$in": [1, "_$x"]}}]}}],
            [{"$match": {"$or": [{"a": 1}, {"b": {"$in": [1, "$x"]}}]}}],
        ),
        (
            {"$match": {"fullDocument.name": "$x"}},
            {"$match": {"fullDocument.name": "$x"}},
        ),  # unescaped passes
        ({"a_$b": "x_$y", "_x": "_y"}, {"a_$b": "x_$y", "_x": "_y"}),  # only a leading _$ is an escape
        ({"_$var": "n"}, {"$var": "n"}),
        ("_$x", "$x"),
        (5, 5),
        (None, None),
        ({"_$_$x": "_$_$y"}, {"$_$x": "$_$y"}),  # one level only
    ],
)
def test_unescape(raw, expected):
    before = copy.deepcopy(raw)
    assert unescape(raw) == expected
    assert raw == before  # returns a copy


def test_unescape_is_idempotent_on_unescaped():
    once = unescape({"_$match": {"a::b": "_$c"}})
    assert unescape(once) == once


# ---------------------------------------------------------------------------------------------
# validate_streams
# ---------------------------------------------------------------------------------------------

TUTORIAL = [
    {
        "uri": "all",
        "stages": [{"_$match": {"_$or": [{"operationType": "insert"}, {"operationType": "update"}]}}],
    },
    {"uri": "mine", "stages": [{"_$match": {"fullDocument::name": {"_$var": "n"}}}]},
]


@pytest.mark.parametrize(
    "streams",
    [
        TUTORIAL,
        [],
        [{"uri": "empty", "stages": []}],
        [{"uri": "raw", "stages": [{"$match": {"operationType": "insert"}}]}],
        [{"uri": "a-b_c.d~e", "stages": [{"$project": {"fullDocument": 1, "operationType": 1}}]}],
        [{"uri": "x", "stages": [{"$project": {"_id": 1, "fullDocument.name": 1}}]}],
        [{"uri": "x", "stages": [{"$project": {"fullDocument.secret": 0}}]}],
        [{"uri": "x", "stages": [{"$addFields": {"total": {"$multiply": ["$fullDocument.qty", 2]}}}]}],
        [{"uri": "x", "stages": [{"_$set": {"fullDocument::tag": {"_$var": ["t", "none"]}}}]}],
        [{"uri": "x", "stages": [{"$unset": "fullDocument.secret"}, {"$unset": ["ns", "wallTime"]}]}],
        [{"uri": "x", "stages": [{"$replaceRoot": {"newRoot": {"_id": "$_id", "doc": "$fullDocument"}}}]}],
        [{"uri": "x", "stages": [{"_$replaceWith": {"_id": "_$_id", "op": "_$operationType"}}]}],
        [{"uri": "x", "stages": [{"$redact": {"$cond": [{"$eq": ["$level", 5]}, "$$PRUNE", "$$DESCEND"]}}]}],
        [{"uri": "x" * 100, "stages": []}],
    ],
)
def test_validate_streams_accepts(streams):
    assert validate_streams(streams) is streams


@pytest.mark.parametrize(
    "streams, uri, fault",
    [
        ({"uri": "x"}, None, "'streams' must be an array"),
        ("all", None, "'streams' must be an array"),
        (["all"], "#1", "must be an object"),
        ([{"stages": []}], "#1", "missing 'uri'"),
        ([{"uri": 5, "stages": []}], "#1", "'uri' must be a string"),
        ([{"uri": "", "stages": []}], "#1", "must not be empty"),
        ([{"uri": "a/b", "stages": []}], "'a/b'", "A-Z a-z 0-9"),
        ([{"uri": "a b", "stages": []}], "'a b'", "A-Z a-z 0-9"),
        ([{"uri": "x" * 101, "stages": []}], "'" + "x" * 100, "1 to 100"),
        ([{"uri": "dup", "stages": []}, {"uri": "dup", "stages": []}], "'dup'", "more than once"),
        # a key we do not implement is refused, never stored and ignored
        (
            [{"uri": "x", "stages": [], "notify_when": {"fullDocument::tenant": 1}}],
            "'x'",
            "notify_when: the value must be a variable",
        ),
        (
            [{"uri": "x", "stages": [], "notify_when": {"a::b": {"$var": "t"}, "c::d": {"$var": "u"}}}],
            "'x'",
            "notify_when must be an object with exactly one entry",
        ),
        ([{"uri": "x", "stages": [], "notify_when": {"tenant": {"$var": "t"}}}], "'x'", "'<field>::<path>'"),
        ([{"uri": "x", "stages": [], "fullDocument": "whenAvailable"}], "'x'", "unknown key 'fullDocument'"),
        ([{"uri": "s"}], "'s'", "missing 'stages'"),
        ([{"uri": "s", "stages": {"$match": {}}}], "'s'", "must be an array of stage objects"),
        ([{"uri": "s", "stages": ["$match"]}], "'s'", "stage 1 must be an object with exactly one key"),
        ([{"uri": "s", "stages": [{"$match": {}, "$project": {"a": 1}}]}], "'s'", "exactly one key"),
        (
            [{"uri": "all", "stages": [{"$match": {}}, {"$group": {"_id": 1}}]}],
            "'all'",
            "stage 2 uses $group, allowed stages are " + ", ".join(ALLOWED_STAGES),
        ),
        ([{"uri": "s", "stages": [{"_$lookup": {"from": "users"}}]}], "'s'", "uses $lookup"),
        ([{"uri": "s", "stages": [{"$ifvar": ["n"]}]}], "'s'", "$ifvar needs [variable names, stage]"),
        ([{"uri": "s", "stages": [{"$ifvar": [[], {"$match": {}}]}]}], "'s'", "a non-empty array of them"),
        (
            [{"uri": "s", "stages": [{"$ifvar": ["n", {"$group": {"_id": 1}}]}]}],
            "'s'",
            "($ifvar): stage 1 uses $group",
        ),
        (
            [{"uri": "s", "stages": [{"$ifvar": ["n", {"$match": {}}, {"$match": {"$where": "1"}}]}]}],
            "'s'",
            "($ifvar): stage 2 uses the forbidden operator $where",
        ),
        ([{"uri": "s", "stages": [{"$match": {"$where": "true"}}]}], "'s'", "forbidden operator $where"),
        (
            [{"uri": "s", "stages": [{"_$match": {"_$expr": {"_$function": {"body": "f"}}}}]}],
            "'s'",
            "forbidden operator $function",
        ),
        (
            [{"uri": "s", "stages": [{"$addFields": {"a": {"$x": [{"b": {"$Accumulator": {}}}]}}}]}],
            "'s'",
            "forbidden operator $Accumulator",
        ),
        ([{"uri": "s", "stages": [{"$match": []}]}], "'s'", "$match takes a query object"),
        ([{"uri": "p", "stages": [{"$project": {"_id": 0}}]}], "'p'", "must not remove or change _id"),
        (
            [{"uri": "p", "stages": [{"$project": {"_id": False, "a": 1}}]}],
            "'p'",
            "must not remove or change _id",
        ),
        (
            [{"uri": "p", "stages": [{"$project": {"_id": "$fullDocument._id"}}]}],
            "'p'",
            "must not remove or change _id",
        ),
        ([{"uri": "p", "stages": [{"$project": {"_id::_data": 1}}]}], "'p'", "must not remove or change _id"),
        ([{"uri": "p", "stages": [{"$project": {}}]}], "'p'", "non-empty object"),
        (
            [{"uri": "p", "stages": [{"$project": {"a": 1, "b": 0}}]}],
            "'p'",
            "cannot mix inclusion and exclusion",
        ),
        ([{"uri": "u", "stages": [{"$unset": "_id"}]}], "'u'", "must not remove _id"),
        ([{"uri": "u", "stages": [{"$unset": ["a", "_id._data"]}]}], "'u'", "must not remove _id"),
        ([{"uri": "u", "stages": [{"$unset": [1]}]}], "'u'", "field name or an array of field names"),
        ([{"uri": "u", "stages": [{"$unset": []}]}], "'u'", "field name or an array of field names"),
        ([{"uri": "a", "stages": [{"$addFields": {"_id": "x"}}]}], "'a'", "must not change _id"),
        ([{"uri": "a", "stages": [{"$set": {"_id._data": "x"}}]}], "'a'", "must not change _id"),
        ([{"uri": "a", "stages": [{"_$set": {"_id::_data": "x"}}]}], "'a'", "must not change _id"),
        ([{"uri": "a", "stages": [{"$set": {}}]}], "'a'", "non-empty object"),
        (
            [{"uri": "r", "stages": [{"$replaceRoot": {"newRoot": "$fullDocument"}}]}],
            "'r'",
            "keeps the resume token",
        ),
        (
            [{"uri": "r", "stages": [{"$replaceRoot": {"newRoot": {"doc": "$fullDocument"}}}]}],
            "'r'",
            "keeps the resume token",
        ),
        (
            [{"uri": "r", "stages": [{"$replaceRoot": {"newRoot": {"_id": "$documentKey"}}}]}],
            "'r'",
            "keeps the resume token",
        ),
        ([{"uri": "r", "stages": [{"$replaceRoot": {"root": {"_id": "$_id"}}}]}], "'r'", "takes {'newRoot'"),
        (
            [
                {
                    "uri": "r",
                    "stages": [{"$replaceWith": {"$mergeObjects": ["$fullDocument", {"_id": "$_id"}]}}],
                }
            ],
            "'r'",
            "keeps the resume token",
        ),
        ([{"uri": "v", "stages": [{"$match": {"a": {"$var": 1}}}]}], "'v'", "wrong variable name"),
        ([{"uri": "v", "stages": [{"$match": {"a": {"$var": ""}}}]}], "'v'", "wrong variable name"),
        ([{"uri": "v", "stages": [{"$match": {"a": {"$var": ["a"]}}}]}], "'v'", "wrong variable name"),
        ([{"uri": "v", "stages": [{"$match": {"a": {"$var": [1, "x"]}}}]}], "'v'", "wrong variable name"),
        ([{"uri": "v", "stages": [{"$match": {"a": {"$var": ["a", 1, 2]}}}]}], "'v'", "wrong variable name"),
        ([{"uri": "v", "stages": [{"_$match": {"a": {"_$var": "n", "x": 1}}}]}], "'v'", "exactly one key"),
        ([{"uri": "v", "stages": [{"$set": {"a": {"$var": {"n": 1}}}}]}], "'v'", "wrong variable name"),
        ([{"uri": "v", "stages": [{"$match": {"$var": "q"}}]}], "'v'", "cannot be used as a query document"),
        (
            [{"uri": "v", "stages": [{"$addFields": {"$var": "q"}}]}],
            "'v'",
            "variables can only supply values",
        ),
        ([{"uri": "v", "stages": [{"$unset": {"$var": "f"}}]}], "'v'", "field name or an array"),
        ([{"uri": "ok", "stages": []}, {"uri": "bad", "stages": [{"$out": "x"}]}], "'bad'", "uses $out"),
    ],
)
def test_validate_streams_rejects(streams, uri, fault):
    with pytest.raises(PipelineError) as info:
        validate_streams(streams)
    message = str(info.value)
    assert fault in message
    if uri is not None:
        assert message.startswith("stream " + uri), message


# ---------------------------------------------------------------------------------------------
# parse_avars
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, {}),
        ("{}", {}),
        ('{"n": "uji"}', {"n": "uji"}),
        (
            '{"n": 1, "o": {"a": [1, {"b": null}]}, "f": 1.5, "t": true}',
            {"n": 1, "o": {"a": [1, {"b": None}]}, "f": 1.5, "t": True},
        ),
        ('{"a.b": 1}', {"a.b": 1}),
        ('{"x": "$fullDocument.secret"}', {"x": "$fullDocument.secret"}),  # $ in values is fine
        ('{"x@y": 1, "y": {"@nested": 2}}', {"x@y": 1, "y": {"@nested": 2}}),  # only top-level @ is reserved
        # what curl sends for ?avars={"n":"uji"}: its URL globbing drops the braces
        ('"n":"uji"', {"n": "uji"}),
        ('"n": {"a": [1]}, "m": 2', {"n": {"a": [1]}, "m": 2}),
    ],
)
def test_parse_avars_ok(raw, expected):
    assert parse_avars(raw) == expected


@pytest.mark.parametrize(
    "raw, fault",
    [
        ("{n: 1}", "illegal avars parameter, it is not a json object: {n: 1}"),
        ('"n":', 'illegal avars parameter, it is not a json object: "n":'),  # quoted as sent
        ('"@user": {"_id": "admin"}', "variable names starting with '@' are reserved"),  # braces or not
        ('"x": {"$gt": 1}', "cannot include operators"),
        ("{'n': 'uji'}", "illegal avars parameter, it is not a json object: {'n': 'uji'}"),
        ("not json", "illegal avars parameter, it is not a json object: not json"),
        ('{"a": 1', "it is not a json object"),
        ("[1]", "it is an array, not a json object: [1]"),
        ("5", "it is a number, not a json object"),
        ('"s"', "it is a string, not a json object"),
        ("null", "it is null, not a json object"),
        ("true", "it is a boolean, not a json object"),
        ("", "it is empty"),
        ("   ", "it is empty"),
        ('{"$where": "x"}', "illegal avars parameter: aggregation variables cannot include operators"),
        ('{"a": {"b": [{"$gt": 1}]}}', "aggregation variables cannot include operators"),
        ('{"id": {"$oid": "64a1f0c2e4b0a1b2c3d4e5f6"}}', "aggregation variables cannot include operators"),
        ('{"@user": {"_id": "root"}}', "reserved"),
        ('{"@user._id": "root"}', "@user._id"),
        ("[" * 5000 + "]" * 5000, "not"),
    ],
)
def test_parse_avars_errors(raw, fault):
    with pytest.raises(AvarsError) as info:
        parse_avars(raw)
    assert fault in str(info.value)


# ---------------------------------------------------------------------------------------------
# bind_variables
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stages, avars, expected",
    [
        # tutorial: escaped, query field-equality
        (
            [{"_$match": {"fullDocument::name": {"_$var": "n"}}}],
            {"n": "uji"},
            [{"$match": {"fullDocument.name": "uji"}}],
        ),
        # default used / overridden
        ([{"$match": {"a": {"$var": ["n", "dflt"]}}}], {}, [{"$match": {"a": "dflt"}}]),
        ([{"$match": {"a": {"$var": ["n", "dflt"]}}}], {"n": 3}, [{"$match": {"a": 3}}]),
        ([{"$match": {"a": {"$var": ["n", None]}}}], {}, [{"$match": {"a": None}}]),
        # dotted names: nested navigation, literal key wins
        ([{"$match": {"a": {"$var": "o.p"}}}], {"o": {"p": 9}}, [{"$match": {"a": 9}}]),
        ([{"$match": {"a": {"$var": "o.p"}}}], {"o.p": 1, "o": {"p": 9}}, [{"$match": {"a": 1}}]),
        ([{"$match": {"a": {"$var": "l.1"}}}], {"l": [5, 6]}, [{"$match": {"a": 6}}]),
        # injection attempts in query context
        (
            [{"$match": {"a": {"$var": "x"}}}],
            {"x": "$fullDocument.secret"},
            [{"$match": {"a": {"$eq": "$fullDocument.secret"}}}],
        ),
        ([{"$match": {"a": {"$var": "x"}}}], {"x": {"b": 1}}, [{"$match": {"a": {"$eq": {"b": 1}}}}]),
        # operator arguments: as-is
        (
            [{"$match": {"a": {"$in": {"$var": "l"}}}}],
            {"l": [1, "$x"]},
            [{"$match": {"a": {"$in": [1, "$x"]}}}],
        ),
        (
            [{"$match": {"a": {"$nin": [{"$var": "x"}, 2]}}}],
            {"x": {"k": 1}},
            [{"$match": {"a": {"$nin": [{"k": 1}, 2]}}}],
        ),
        ([{"$match": {"a": {"$gt": {"$var": "x"}}}}], {"x": 4}, [{"$match": {"a": {"$gt": 4}}}]),
        (
            [{"$match": {"$or": [{"a": {"$var": "x"}}, {"b": 1}]}}],
            {"x": "$y"},
            [{"$match": {"$or": [{"a": {"$eq": "$y"}}, {"b": 1}]}}],
        ),
        (
            [{"$match": {"items": {"$elemMatch": {"sku": {"$var": "s"}}}}}],
            {"s": "A1"},
            [{"$match": {"items": {"$elemMatch": {"sku": "A1"}}}}],
        ),
        # expression context: $literal
        (
            [{"$match": {"$expr": {"$eq": ["$a", {"$var": "x"}]}}}],
            {"x": "$b"},
            [{"$match": {"$expr": {"$eq": ["$a", {"$literal": "$b"}]}}}],
        ),
        (
            [{"_$addFields": {"v": {"_$var": "x"}}}],
            {"x": "$fullDocument.secret"},
            [{"$addFields": {"v": {"$literal": "$fullDocument.secret"}}}],
        ),
        (
            [{"$set": {"v": {"$concat": ["a", {"$var": "x"}]}}}],
            {"x": "b"},
            [{"$set": {"v": {"$concat": ["a", {"$literal": "b"}]}}}],
        ),
        ([{"$project": {"v": {"$var": "x"}}}], {"x": 1}, [{"$project": {"v": {"$literal": 1}}}]),
        (
            [{"$replaceWith": {"_id": "$_id", "v": {"$var": "x"}}}],
            {"x": {"y": 1}},
            [{"$replaceWith": {"_id": "$_id", "v": {"$literal": {"y": 1}}}}],
        ),
        (
            [{"$redact": {"$cond": [{"$eq": ["$l", {"$var": "x"}]}, "$$PRUNE", "$$DESCEND"]}}],
            {"x": 2},
            [{"$redact": {"$cond": [{"$eq": ["$l", {"$literal": 2}]}, "$$PRUNE", "$$DESCEND"]}}],
        ),
        # no variables: unchanged (but unescaped)
        ([{"_$match": {"a": "_$b"}}], {}, [{"$match": {"a": "$b"}}]),
    ],
)
def test_bind_variables(stages, avars, expected):
    before = copy.deepcopy(stages)
    assert bind_variables(stages, avars) == expected
    assert stages == before


@pytest.mark.parametrize(
    "stages, avars, fault",
    [
        ([{"$match": {"a": {"$var": "n"}}}], {}, "variable n not bound"),
        ([{"$match": {"a": {"$var": "o.q"}}}], {"o": {"p": 1}}, "variable o.q not bound"),
        ([{"$set": {"a": {"$var": "n"}}}], {"m": 1}, "variable n not bound"),
        ([{"$match": {"a": {"$var": 1}}}], {}, "wrong variable name"),
        ([{"$match": {"$var": "q"}}], {"q": {"a": 1}}, "cannot be used as a query document"),
        ([{"$match": {"$or": [{"$var": "q"}]}}], {"q": {"a": 1}}, "cannot be used as a query document"),
    ],
)
def test_bind_variables_errors(stages, avars, fault):
    with pytest.raises(VariableError) as info:
        bind_variables(stages, avars)
    assert fault in str(info.value)


def test_injection_string_matches_only_literal_value():
    stages = [{"_$match": {"fullDocument::name": {"_$var": "n"}}}]
    evil = "$fullDocument.secret"
    assert _matched(stages, {"n": evil}) == []
    event = copy.deepcopy(INSERT)
    event["fullDocument"]["name"] = evil
    assert compile_pipeline(stages, {"n": evil}).apply(event) is not None
    # an object value is an exact-object equality, never an operator document
    assert _matched(
        [{"$match": {"fullDocument.owner": {"$var": "o"}}}], {"o": {"tier": "gold", "id": 42}}
    ) == ["insert"]
    assert _matched([{"$match": {"fullDocument.qty": {"$var": "o"}}}], {"o": {"x": 1}}) == []


def test_injection_in_expression_context_is_literal():
    out = _run([{"_$addFields": {"v": {"_$var": "x"}}}], INSERT, {"x": "$fullDocument.secret"})
    assert out["v"] == "$fullDocument.secret"
    out = _run([{"$addFields": {"v": {"$var": "x"}}}], INSERT, {"x": {"k": "$fullDocument.secret"}})
    assert out["v"] == {"k": "$fullDocument.secret"}
    out = _run([{"$project": {"v": {"$var": "x"}}}], INSERT, {"x": 0})
    assert out == {"_id": INSERT["_id"], "v": 0}  # a bound 0/1 is a value, not an exclusion/inclusion
    assert (
        _matched(
            [{"$match": {"$expr": {"$eq": ["$fullDocument.name", {"$var": "x"}]}}}],
            {"x": "$fullDocument.name"},
        )
        == []
    )


# ---------------------------------------------------------------------------------------------
# evaluation: $match operators (one row per operator, positive and negative)
# ---------------------------------------------------------------------------------------------

MATCH_TABLE = [
    # (id, $match spec, events expected to pass)
    ("eq-implicit", {"operationType": "insert"}, ["insert"]),
    ("eq-dotted", {"fullDocument.name": "uji"}, ["insert", "replace"]),
    ("eq-dotted-none", {"fullDocument.name": "nobody"}, []),
    ("eq-objectid", {"documentKey._id": OID1}, ["insert", "delete"]),
    ("eq-op", {"fullDocument.qty": {"$eq": 7}}, ["insert"]),
    ("ne", {"operationType": {"$ne": "insert"}}, ["update", "replace", "delete"]),
    ("gt", {"fullDocument.qty": {"$gt": 1}}, ["insert"]),
    ("gte", {"fullDocument.qty": {"$gte": 1}}, ["insert", "update"]),
    ("lt", {"fullDocument.qty": {"$lt": 1}}, ["replace"]),
    ("lte", {"fullDocument.qty": {"$lte": 1}}, ["update", "replace"]),
    ("gt-type-bracketing", {"fullDocument.name": {"$gt": 5}}, []),
    ("or", {"$or": [{"operationType": "insert"}, {"operationType": "update"}]}, ["insert", "update"]),
    ("or-none", {"$or": [{"operationType": "drop"}, {"operationType": "rename"}]}, []),
    ("and", {"$and": [{"fullDocument.name": "uji"}, {"fullDocument.qty": {"$gt": 0}}]}, ["insert"]),
    ("nor", {"$nor": [{"operationType": "insert"}, {"operationType": "delete"}]}, ["update", "replace"]),
    ("not-op", {"fullDocument.qty": {"$not": {"$gt": 1}}}, ["update", "replace", "delete"]),
    ("not-regex", {"fullDocument.name": {"$not": re.compile("^u")}}, ["update", "delete"]),
    ("in", {"operationType": {"$in": ["insert", "delete"]}}, ["insert", "delete"]),
    ("in-array-field", {"fullDocument.tags": {"$in": ["blue", "green"]}}, ["insert", "update"]),
    ("in-null-missing", {"fullDocument": {"$in": [None]}}, ["delete"]),
    ("nin", {"operationType": {"$nin": ["insert", "delete"]}}, ["update", "replace"]),
    ("regex", {"fullDocument.name": {"$regex": "^b"}}, []),
    ("regex-options-i", {"fullDocument.name": {"$regex": "^b", "$options": "i"}}, ["update"]),
    ("regex-literal", {"fullDocument.message": re.compile("^(hel|rep)")}, ["insert", "replace"]),
    ("exists-true", {"updateDescription": {"$exists": True}}, ["update"]),
    ("exists-false", {"fullDocument": {"$exists": False}}, ["delete"]),
    ("exists-nested", {"updateDescription.updatedFields.message": {"$exists": True}}, ["update"]),
    ("type-string", {"fullDocument.name": {"$type": "string"}}, ["insert", "update", "replace"]),
    ("type-number-code", {"fullDocument.price": {"$type": 1}}, ["insert"]),
    ("type-list", {"fullDocument.price": {"$type": ["double", "null"]}}, ["insert"]),
    ("type-null", {"fullDocument.note": {"$type": "null"}}, ["insert"]),
    ("type-objectid", {"fullDocument._id": {"$type": "objectId"}}, ["insert", "update", "replace"]),
    ("type-timestamp", {"clusterTime": {"$type": "timestamp"}}, ["insert", "update", "replace", "delete"]),
    ("type-date", {"wallTime": {"$type": "date"}}, ["insert", "update", "replace", "delete"]),
    ("elemMatch", {"fullDocument.items": {"$elemMatch": {"sku": "B2", "n": {"$gte": 5}}}}, ["insert"]),
    ("elemMatch-neg", {"fullDocument.items": {"$elemMatch": {"sku": "A1", "n": {"$gte": 5}}}}, []),
    ("array-dotted", {"fullDocument.items.sku": "A1"}, ["insert"]),
    ("size", {"fullDocument.tags": {"$size": 2}}, ["insert"]),
    ("size-0", {"fullDocument.tags": {"$size": 0}}, ["replace"]),
    ("all", {"fullDocument.tags": {"$all": ["red", "blue"]}}, ["insert"]),
    ("all-neg", {"fullDocument.tags": {"$all": ["red", "green"]}}, []),
    ("array-contains", {"fullDocument.tags": "green"}, ["update"]),
    ("null-missing", {"updateDescription": None}, ["insert", "replace", "delete"]),
    ("null-explicit", {"fullDocument.note": None}, ["update", "replace", "delete", "insert"]),
    ("ne-null", {"fullDocument.note": {"$ne": None}}, []),
    ("mod", {"fullDocument.qty": {"$mod": [2, 1]}}, ["insert", "update"]),
    ("expr-gt", {"$expr": {"$gt": ["$fullDocument.qty", 5]}}, ["insert"]),
    (
        "expr-fields",
        {"$expr": {"$eq": ["$fullDocument._id", "$documentKey._id"]}},
        ["insert", "update", "replace"],
    ),
    ("expr-missing-lt", {"$expr": {"$lt": ["$fullDocument.qty", 5]}}, ["update", "replace", "delete"]),
    ("expr-in", {"$expr": {"$in": ["$operationType", ["replace", "delete"]]}}, ["replace", "delete"]),
    (
        "expr-and",
        {
            "$expr": {
                "$and": [{"$eq": ["$operationType", "update"]}, {"$gt": [{"$size": "$fullDocument.tags"}, 0]}]
            }
        },
        ["update"],
    ),
    ("timestamp-gt", {"clusterTime": {"$gt": Timestamp(1680529012, 3)}}, ["replace", "delete"]),
    ("timestamp-eq", {"clusterTime": Timestamp(1680529012, 3)}, ["update"]),
    ("timestamp-expr", {"$expr": {"$lte": ["$clusterTime", Timestamp(1680529012, 3)]}}, ["insert", "update"]),
    ("date-aware", {"wallTime": {"$gte": W0 + timedelta(seconds=2)}}, ["replace", "delete"]),
    ("date-naive", {"wallTime": {"$lt": datetime(2023, 4, 3, 13, 36, 52)}}, ["insert"]),
    ("ns", {"ns.coll": "messages", "ns.db": "restheart"}, ["insert", "update", "replace", "delete"]),
    ("updated-field-dotted-key", {"updateDescription.updatedFields._etag": ETAG}, ["update"]),
    ("removed-fields", {"updateDescription.removedFields": "draft"}, ["update"]),
]


@pytest.mark.parametrize(
    "spec, expected", [(s, e) for _, s, e in MATCH_TABLE], ids=[i for i, _, _ in MATCH_TABLE]
)
def test_match_operators(spec, expected):
    pipeline = Pipeline([{"$match": spec}])
    assert pipeline.filters_only
    got = [name for name, event in EVENTS.items() if pipeline.apply(event) is not None]
    assert sorted(got) == sorted(expected)


@pytest.mark.parametrize(
    "spec, expected", [(s, e) for _, s, e in MATCH_TABLE[:12]], ids=[i for i, _, _ in MATCH_TABLE[:12]]
)
def test_match_after_reshaping_stage(spec, expected):
    # the same $match evaluated after a reshaping stage (non-fast path) gives the same answer
    pipeline = Pipeline([{"$addFields": {"x": 1}}, {"$match": spec}])
    got = [name for name, event in EVENTS.items() if pipeline.apply(event) is not None]
    assert sorted(got) == sorted(expected)


def test_tutorial_streams_evaluate():
    assert _matched(TUTORIAL[0]["stages"]) == ["insert", "update"]
    assert _matched(TUTORIAL[1]["stages"], {"n": "uji"}) == ["insert", "replace"]
    assert _matched(TUTORIAL[1]["stages"], {"n": "Bob"}) == ["update"]
    with pytest.raises(VariableError, match="variable n not bound"):
        compile_pipeline(TUTORIAL[1]["stages"], {})


def test_filter_only_returns_equal_copy():
    pipeline = Pipeline([{"$match": {"operationType": "insert"}}])
    out = pipeline.apply(INSERT)
    assert out == INSERT and out is not INSERT
    assert out["clusterTime"] is INSERT["clusterTime"]


# ---------------------------------------------------------------------------------------------
# evaluation: reshaping stages
# ---------------------------------------------------------------------------------------------


def test_project_inclusion():
    out = _run(
        [{"$project": {"operationType": 1, "fullDocument.name": 1, "fullDocument.items.sku": 1}}], INSERT
    )
    assert out == {
        "_id": INSERT["_id"],
        "operationType": "insert",
        "fullDocument": {"name": "uji", "items": [{"sku": "A1"}, {"sku": "B2"}]},
    }


def test_project_exclusion():
    out = _run([{"$project": {"fullDocument.secret": 0, "ns": 0, "wallTime": 0}}], INSERT)
    expected = copy.deepcopy(INSERT)
    del expected["fullDocument"]["secret"], expected["ns"], expected["wallTime"]
    assert out == expected


def test_project_computed():
    out = _run(
        [
            {
                "_$project": {
                    "_id": 1,
                    "total": {"_$multiply": ["_$fullDocument.qty", "_$fullDocument.price"]},
                    "op": "_$operationType",
                    "k": {"_$literal": 1},
                }
            }
        ],
        INSERT,
    )
    assert out == {"_id": INSERT["_id"], "total": 17.5, "op": "insert", "k": 1}


def test_add_fields_and_set():
    out = _run(
        [
            {
                "$addFields": {
                    "fullDocument.upper": {"$toUpper": "$fullDocument.name"},
                    "isBig": {"$gt": ["$fullDocument.qty", 5]},
                }
            },
            {
                "$set": {
                    "label": {"$concat": ["$ns.db", "/", "$ns.coll"]},
                    "lit": {"$literal": "$fullDocument.secret"},
                }
            },
        ],
        INSERT,
    )
    assert out["fullDocument"]["upper"] == "UJI"
    assert out["isBig"] is True
    assert out["label"] == "restheart/messages"
    assert out["lit"] == "$fullDocument.secret"
    assert out["clusterTime"] == INSERT["clusterTime"] and isinstance(out["clusterTime"], Timestamp)
    assert out["wallTime"] == INSERT["wallTime"]


def test_add_fields_missing_source_is_not_added():
    out = _run(
        [{"$set": {"copy": "$fullDocument.name", "cond": {"$ifNull": ["$fullDocument.name", "gone"]}}}],
        DELETE,
    )
    assert "copy" not in out
    assert out["cond"] == "gone"


def test_unset():
    out = _run([{"$unset": ["fullDocument.secret", "ns"]}, {"$unset": "wallTime"}], INSERT)
    assert "secret" not in out["fullDocument"] and "ns" not in out and "wallTime" not in out
    assert out["fullDocument"]["name"] == "uji" and out["_id"] == INSERT["_id"]


def test_replace_root_and_replace_with():
    out = _run(
        [{"$replaceRoot": {"newRoot": {"_id": "$_id", "op": "$operationType", "doc": "$fullDocument.name"}}}],
        UPDATE,
    )
    assert out == {"_id": UPDATE["_id"], "op": "update", "doc": "Bob"}
    out = _run(
        [{"_$replaceWith": {"_id": "_$_id", "key": "_$documentKey._id", "ts": "_$clusterTime"}}], DELETE
    )
    assert out == {"_id": DELETE["_id"], "key": OID1, "ts": DELETE["clusterTime"]}


def test_redact():
    event = copy.deepcopy(INSERT)
    event["fullDocument"]["sections"] = [
        {"level": 1, "text": "public"},
        {"level": 5, "text": "hidden"},
        {"level": 1, "sub": {"level": 5, "text": "deep hidden"}},
        3,
    ]
    event["fullDocument"]["classified"] = {"level": 5, "x": 1}
    stages = [{"$redact": {"$cond": {"if": {"$eq": ["$level", 5]}, "then": "$$PRUNE", "else": "$$DESCEND"}}}]
    out = _run(stages, event)
    assert out["fullDocument"]["sections"] == [{"level": 1, "text": "public"}, {"level": 1}, 3]
    assert "classified" not in out["fullDocument"]
    assert out["_id"] == event["_id"]
    # $$KEEP at the top keeps everything; $$PRUNE at the top filters the event out
    assert _run([{"$redact": "$$KEEP"}], event) == event
    assert (
        _run([{"$redact": {"$cond": [{"$eq": ["$operationType", "insert"]}, "$$PRUNE", "$$KEEP"]}}], event)
        is None
    )
    # $$ROOT is the event, not the sub-document
    keep_if_insert = {"$cond": [{"$eq": ["$$ROOT.operationType", "insert"]}, "$$DESCEND", "$$PRUNE"]}
    assert _run([{"$redact": keep_if_insert}], event) == event


def test_redact_bad_result_is_event_error():
    with pytest.raises(EventError, match=r"\$redact's expression should not return"):
        _run([{"$redact": "keep"}], INSERT)


def test_match_then_reshape_then_match():
    stages = [
        {"$match": {"operationType": {"$in": ["insert", "update"]}}},
        {"$addFields": {"big": {"$gt": ["$fullDocument.qty", 5]}}},
        {"$match": {"big": True}},
        {"$project": {"big": 1, "fullDocument.name": 1}},
    ]
    pipeline = compile_pipeline(stages, {})
    assert not pipeline.filters_only
    assert pipeline.apply(UPDATE) is None
    assert pipeline.apply(INSERT) == {"_id": INSERT["_id"], "big": True, "fullDocument": {"name": "uji"}}


# ---------------------------------------------------------------------------------------------
# evaluation: errors and invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stages",
    [
        [{"$addFields": {"x": {"$divide": ["$fullDocument.qty", "$fullDocument.name"]}}}],
        [{"$addFields": {"x": {"$divide": ["$fullDocument.qty", 0]}}}],
        [{"$addFields": {"x": {"$abs": "$fullDocument.name"}}}],
    ],
)
def test_runtime_error_is_event_error(stages):
    with pytest.raises(EventError, match="PlanExecutor error during aggregation"):
        _run(stages, INSERT)


ID_ERROR = (
    "Encountered an event whose _id field, which contains the resume token, was modified by the pipeline. "
    "Modifying the _id field of an event makes it impossible to resume the stream from that point."
)


def test_id_removed_at_runtime_is_event_error():
    # statically valid: $redact can only be judged per event; here it prunes the _id sub-document
    stages = [{"$redact": {"$cond": [{"$ifNull": ["$_data", False]}, "$$PRUNE", "$$DESCEND"]}}]
    with pytest.raises(EventError) as info:
        _run(stages, INSERT)
    assert str(info.value).startswith(ID_ERROR)
    assert "Expected: {_id: {'_data': '" in str(info.value)


def test_id_changed_at_runtime_is_event_error():
    # the static rules make this unreachable through compile_pipeline; check the runtime guard itself
    pipeline = Pipeline([{"$addFields": {"x": 1}}])
    pipeline._segments = [("engine", [{"$addFields": {"_id": {"_data": "forged"}}}])]
    with pytest.raises(EventError) as info:
        pipeline.apply(INSERT)
    assert str(info.value).startswith(ID_ERROR)
    assert "but found: {_id: {'_data': 'forged'}}" in str(info.value)


def test_id_removed_by_redact_message():
    with pytest.raises(EventError, match="but found: {_id: missing}"):
        _run([{"$redact": {"$cond": [{"$ifNull": ["$_data", False]}, "$$PRUNE", "$$DESCEND"]}}], INSERT)


@pytest.mark.parametrize(
    "stages",
    [
        [{"$group": {"_id": None}}],
        [{"$project": {"_id": 0}}],
        [{"$unset": "_id"}],
        [{"$match": {"a": {"$var": "n"}}}],  # unbound placeholder passed straight to Pipeline
        [{"$match": {"a": {"$bogus": 1}}}],  # unknown query operator found at compile time
        [{"$match": {"a": {"$in": 5}}}],
        [{"$match": {"$text": {"$search": "x"}}}],
    ],
)
def test_pipeline_constructor_rejects(stages):
    with pytest.raises(PipelineError):
        Pipeline(stages)


def test_compile_rejects_bound_values_that_break_rules():
    with pytest.raises(PipelineError, match=r"\$in needs an array"):
        compile_pipeline([{"$match": {"a": {"$in": {"$var": "l"}}}}], {"l": "notalist"})


@pytest.mark.parametrize(
    "stages",
    [
        [{"$match": {"fullDocument.name": "uji"}}],
        [{"$addFields": {"fullDocument.owner.extra": 1, "fullDocument.items.0.n": 99}}],
        [{"$set": {"fullDocument.owner.tier": "x"}}, {"$unset": ["fullDocument.items", "ns.db"]}],
        [{"$project": {"fullDocument.owner": 0}}],
        [
            {"$replaceRoot": {"newRoot": {"_id": "$_id", "o": "$fullDocument.owner"}}},
            {"$set": {"o.tier": "z"}},
        ],
        [{"$redact": {"$cond": [{"$eq": ["$tier", "gold"]}, "$$PRUNE", "$$DESCEND"]}}],
    ],
)
@pytest.mark.parametrize("event", [INSERT, UPDATE], ids=["insert", "update"])
def test_input_not_mutated(stages, event):
    before = copy.deepcopy(event)
    pipeline = compile_pipeline(stages, {})
    pipeline.apply(event)
    pipeline.apply(event)
    assert event == before


def test_outputs_are_independent():
    pipeline = compile_pipeline([{"$set": {"fullDocument.owner.flag": True}}], {})
    first = pipeline.apply(INSERT)
    second = pipeline.apply(INSERT)
    first["fullDocument"]["owner"]["flag"] = False
    assert second["fullDocument"]["owner"]["flag"] is True
    assert "flag" not in INSERT["fullDocument"]["owner"]


def test_compile_pipeline_end_to_end_with_avars():
    stored = [
        {
            "_$match": {
                "_$and": [
                    {"operationType": {"_$in": {"_$var": "ops"}}},
                    {"fullDocument::owner::tier": {"_$var": ["tier", "gold"]}},
                ]
            }
        },
        {"_$project": {"fullDocument::name": 1, "who": {"_$var": "who"}}},
    ]
    validate_streams([{"uri": "s", "stages": stored}])
    avars = parse_avars('{"ops": ["insert", "update"], "who": "$fullDocument.secret"}')
    pipeline = compile_pipeline(stored, avars)
    assert pipeline.apply(INSERT) == {
        "_id": INSERT["_id"],
        "fullDocument": {"name": "uji"},
        "who": "$fullDocument.secret",
    }
    assert pipeline.apply(UPDATE) is None
    assert compile_pipeline(stored, {"ops": ["update"], "tier": "basic", "who": 1}).apply(UPDATE)["who"] == 1


@pytest.mark.parametrize(
    "stage, operator",
    [
        ({"$addFields": {"x": {"$getField": "a"}}}, "$getField"),
        ({"$set": {"x": {"$concat": ["a", {"$dateAdd": {}}]}}}, "$dateAdd"),
        ({"$project": {"x": {"$mergeObjects": ["$a", "$b"]}}}, "$mergeObjects"),
        ({"$match": {"$or": [{"$expr": {"$bogus": 1}}]}}, "$bogus"),
        ({"$redact": {"$switchh": {}}}, "$switchh"),
    ],
)
def test_unknown_expression_operators_rejected(stage, operator):
    with pytest.raises(PipelineError, match=rf"stream 'e': stage 1 uses the expression operator \{operator}"):
        validate_streams([{"uri": "e", "stages": [stage]}])
    with pytest.raises(PipelineError):
        Pipeline([stage])


def test_validate_streams_deep_nesting():
    deep: dict = {"a": 1}
    for _ in range(3000):
        deep = {"$and": [deep]}
    with pytest.raises(PipelineError, match="stream 'deep': 'stages' is nested too deeply"):
        validate_streams([{"uri": "deep", "stages": [{"$match": deep}]}])


# ----------------------------------------------------------------------------- query-parameter variables


def test_query_parameters_bind_variables_as_json_or_strings():
    from services.pipeline import query_variables

    params = [("n", "uji"), ("v", "5"), ("o", '{"a": [1]}'), ("t", "true"), ("s", '"quoted"'), ("x", "{oops")]
    assert query_variables(params) == {
        "n": "uji",
        "v": 5,
        "o": {"a": [1]},
        "t": True,
        "s": "quoted",
        "x": "{oops",
    }
    # the server's own parameters are never variables
    server = [
        (name, "1")
        for name in ("avars", "access_token", "lastEventId", "noauthchallenge", "page", "pagesize")
    ]
    assert query_variables(server) == {}


@pytest.mark.parametrize(
    "params, fault",
    [
        ([("@user", "x")], "variable names starting with '@' are reserved"),
        ([("@user._id", '"admin"')], "variable names starting with '@' are reserved"),
        ([("n", "1"), ("n", "2")], "a variable may be given once"),
        ([("avars", '{"n": "a"}'), ("avars", '{"n": "b"}')], "'avars': it may be given once"),
        ([("lastEventId", "a"), ("lastEventId", "b")], "'lastEventId': it may be given once"),
        ([("x", '{"$gt": 1}')], "cannot include operators"),
        ([("x", '[{"$ne": null}]')], "cannot include operators"),
        ([("x", "NaN")], None),  # not JSON here (constants are refused): the string "NaN"
    ],
)
def test_query_parameter_variables_refuse_what_avars_refuses(params, fault):
    from services.pipeline import query_variables

    if fault is None:
        assert query_variables(params) == {"x": "NaN"}
        return
    with pytest.raises(AvarsError, match=re.escape(fault)):
        query_variables(params)


def test_avars_win_over_query_parameters_and_values_stay_literals():
    from services.pipeline import query_variables

    stages = [{"_$match": {"fullDocument::name": {"_$var": "n"}}}]
    merged = {**query_variables([("n", "from-query")]), **parse_avars('{"n": "from-avars"}')}
    pipeline = compile_pipeline(stages, merged)
    assert pipeline.stages == with_pre_images([{"$match": {"fullDocument.name": "from-avars"}}])
    # an object from a parameter is a value to compare with, never a query
    tricky = compile_pipeline(stages, query_variables([("n", '{"a": 1}')]))
    assert tricky.stages == with_pre_images([{"$match": {"fullDocument.name": {"$eq": {"a": 1}}}}])


# ----------------------------------------------------------------------------- $ifvar


IFVAR = [
    {"_$ifvar": ["n", {"_$match": {"fullDocument::name": {"_$var": "n"}}}]},
    {"_$ifvar": [["a", "b"], {"_$set": {"both": True}}, {"_$set": {"both": False}}]},
]


@pytest.mark.parametrize(
    "avars, stages",
    [
        ({}, [{"$set": {"both": False}}]),
        ({"n": "uji"}, [{"$match": {"fullDocument.name": "uji"}}, {"$set": {"both": False}}]),
        ({"a": 1}, [{"$set": {"both": False}}]),
        ({"a": 1, "b": None}, [{"$set": {"both": True}}]),  # bound to null is bound
        ({"n": "x", "a": 1, "b": 2}, [{"$match": {"fullDocument.name": "x"}}, {"$set": {"both": True}}]),
    ],
)
def test_ifvar_applies_its_stage_when_every_variable_is_bound_else_the_else_stage(avars, stages):
    assert validate_streams([{"uri": "s", "stages": IFVAR}])
    assert compile_pipeline(IFVAR, avars).stages == with_pre_images(stages)


def test_ifvar_stages_are_checked_for_variables_on_both_branches_when_written():
    bad_else = [{"_$ifvar": ["n", {"_$match": {}}, {"_$match": {"a": {"_$var": 1}}}]}]
    with pytest.raises(PipelineError, match="wrong variable name"):
        validate_streams([{"uri": "s", "stages": bad_else}])


# ----------------------------------------------------------------------------- server-bound variables


def test_server_variables_come_from_the_account_without_its_password():
    from services.pipeline import server_variables

    user = {"_id": "ann", "password": "$2b$hash", "roles": ["member"], "team": "red", "org": {"id": 7}}
    bound = server_variables(user, {"owner": "ann"})
    assert bound == {
        "@mongoPermissions": {"readFilter": {"owner": "ann"}},
        "@user": {"_id": "ann", "roles": ["member"], "team": "red", "org": {"id": 7}},
    }
    assert "@user" not in server_variables(None, None)
    stages = [
        {
            "_$match": {
                "fullDocument::team": {"_$var": "@user.team"},
                "fullDocument::org": {"_$var": "@user.org.id"},
            }
        },
        {"_$set": {"who": {"_$var": "@user._id"}, "roles": {"_$var": "@user.roles"}}},
    ]
    assert compile_pipeline(stages, bound).stages == with_pre_images(
        [
            {"$match": {"fullDocument.team": "red", "fullDocument.org": 7}},
            {"$set": {"who": {"$literal": "ann"}, "roles": {"$literal": ["member"]}}},
        ]
    )
    with pytest.raises(VariableError, match="password"):  # the hash is never a variable
        compile_pipeline([{"_$set": {"p": {"_$var": "@user.password"}}}], bound)


@pytest.mark.parametrize(
    "stages, expected",
    [
        ([{"_$match": {"t": {"_$var": "@user.team"}}}], (True, True)),
        ([{"_$match": {"t": {"_$var": ["@user.team", "none"]}}}], (True, False)),
        ([{"_$match": {"t": {"_$var": "@user"}}}], (True, True)),
        ([{"_$ifvar": ["@user.team", {"_$match": {"t": {"_$var": "@user.team"}}}]}], (True, False)),
        ([{"_$match": {"t": {"_$var": "@username"}}}], (False, False)),  # not @user
        ([{"_$match": {"t": {"_$var": "n"}}}], (False, False)),
    ],
)
def test_which_streams_are_bound_to_the_account(stages, expected):
    from services.pipeline import account_variables

    assert account_variables(stages) == expected


def test_query_variables_are_bounded_like_avars():
    from services.pipeline import query_variables

    deep = '{"a":' * 150 + "1" + "}" * 150
    with pytest.raises(
        AvarsError, match="illegal query parameters: one of them is nested deeper than 100 levels"
    ):
        query_variables([("x", deep)])
    with pytest.raises(AvarsError, match="illegal avars parameter: it is nested deeper than 100 levels"):
        parse_avars(deep)


# ----------------------------------------------------------------------------- notify_when


NOTIFY = {"uri": "s", "stages": [], "notify_when": {"fullDocument::tenantId": {"_$var": "tid"}}}


@pytest.mark.parametrize(
    "bound, event, delivered",
    [
        ("acme", {"fullDocument": {"tenantId": "acme"}}, True),
        ("acme", {"fullDocument": {"tenantId": ["x", "acme"]}}, True),  # an array holding it
        ("acme", {"fullDocument": {"tenantId": "ACME"}}, False),  # exact
        ("acme", {"fullDocument": {"other": 1}}, False),  # no field: not delivered
        ("acme", {"operationType": "delete", "documentKey": {"_id": 1}}, False),
        (5, {"fullDocument": {"tenantId": 5.0}}, True),  # BSON equality: numbers match numbers
        (5, {"fullDocument": {"tenantId": "5"}}, False),
        ({"a": 1}, {"fullDocument": {"tenantId": {"a": 1}}}, True),
    ],
)
def test_notify_when_delivers_what_equals_the_bound_value(bound, event, delivered):
    from services.pipeline import notify_filter

    assert validate_streams([NOTIFY])
    accepts = notify_filter(NOTIFY, {"tid": bound})
    assert accepts is not None and accepts(event) is delivered


def test_notify_when_without_its_binding_delivers_everything():
    from services.pipeline import notify_filter

    assert notify_filter(NOTIFY, {}) is None
    assert notify_filter({"uri": "s", "stages": []}, {"tid": "acme"}) is None
    with_default = {**NOTIFY, "notify_when": {"fullDocument::tenantId": {"$var": ["tid", "public"]}}}
    assert notify_filter(with_default, {})({"fullDocument": {"tenantId": "public"}}) is True
