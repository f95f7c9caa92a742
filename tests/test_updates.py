"""Tests for services.updates: operator application and updateDescription.

Each row of the table is a case from MongoDB's own update-node unit tests
(src/mongo/db/update/*_test.cpp in the server's repository, 5.0+): a document, an
operator update, the document after it and the updateDescription the server's change
stream reports for it.  Ids 10 and 62-66 are missing: those cases use positional paths
($, $[], $[<id>]) or arrayFilters, which changefeed does not support (normalize_patch
rejects such paths, see test_positional_paths_rejected).
"""

from __future__ import annotations

import copy
import datetime

import pytest
from bson import json_util
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.objectid import ObjectId
from bson.timestamp import Timestamp

from services.updates import UpdateError, apply_update, normalize_patch

NOW = datetime.datetime(2024, 5, 6, 7, 8, 9, 123000)
NO_EVENT = None


def canon(value):
    """Type- and order-exact rendering (1 != 1.0 != Int64(1); key order matters)."""
    return json_util.dumps(value, json_options=json_util.CANONICAL_JSON_OPTIONS)


def run(before, update):
    return apply_update(before, normalize_patch(update), NOW)


# (id, before, update, after, updatedFields, removedFields); after=None means unchanged.
ROWS = [
    ("01", {"_id": 1, "a": 1}, {"$set": {"a": 2}}, {"_id": 1, "a": 2}, {"a": 2}, []),
    ("02", {"_id": 1, "b": 1}, {"$set": {"a": 2}}, {"_id": 1, "b": 1, "a": 2}, {"a": 2}, []),
    ("03", {"a": 5}, {"$set": {"a": 5}}, None, NO_EVENT, None),
    ("04", {"a": 2}, {"$set": {"a": Int64(2)}}, {"a": Int64(2)}, {"a": Int64(2)}, []),
    (
        "05",
        {"_id": 1, "r": {"a": 1, "b": 2}},
        {"$set": {"r.a": 2}},
        {"_id": 1, "r": {"a": 2, "b": 2}},
        {"r.a": 2},
        [],
    ),
    ("06", {"a": {}}, {"$set": {"a.b": 2}}, {"a": {"b": 2}}, {"a.b": 2}, []),
    ("07", {"a": {"d": 5}}, {"$set": {"a.b.c": 6}}, {"a": {"d": 5, "b": {"c": 6}}}, {"a.b": {"c": 6}}, []),
    ("08", {"c": 5}, {"$set": {"a.b": 6}}, {"c": 5, "a": {"b": 6}}, {"a": {"b": 6}}, []),
    (
        "09",
        {"a": {"b": 2}},
        {"$set": {"a": {"b": 2, "c": 3}}},
        {"a": {"b": 2, "c": 3}},
        {"a": {"b": 2, "c": 3}},
        [],
    ),
    # row 10 ($set 'a.$'): positional operator, unsupported.
    (
        "11",
        {"a": [{"b": 0}, {"b": 1}]},
        {"$set": {"a.2.b": 2}},
        {"a": [{"b": 0}, {"b": 1}, {"b": 2}]},
        {"a.2": {"b": 2}},
        [],
    ),
    ("12", {"a": []}, {"$set": {"a.2.b": 2}}, {"a": [None, None, {"b": 2}]}, {"a.2": {"b": 2}}, []),
    ("13", {"a": [{"b": 0}]}, {"$set": {"a.0.c": 2}}, {"a": [{"b": 0, "c": 2}]}, {"a.0.c": 2}, []),
    ("14", {"a": {}}, {"$set": {"a.2.b": 2}}, {"a": {"2": {"b": 2}}}, {"a.2": {"b": 2}}, []),
    ("15", {"a": 5}, {"$unset": {"a": 1}}, {}, {}, ["a"]),
    ("16", {"a": {"b": {"c": 6}}}, {"$unset": {"a.b.c": 1}}, {"a": {"b": {}}}, {}, ["a.b.c"]),
    ("17", {"b": 5}, {"$unset": {"a": 1}}, None, NO_EVENT, None),
    ("18", {"a": [1], "b": 1}, {"$unset": {"a.0": 1}}, {"a": [None], "b": 1}, {"a.0": None}, []),
    ("19", {"a": [{"b": 1}]}, {"$unset": {"a.0.b": 1}}, {"a": [{}]}, {}, ["a.0.b"]),
    ("20", {"_id": 3, "a": 5, "b": 1}, {"$inc": {"b": 2}}, {"_id": 3, "a": 5, "b": 3}, {"b": 3}, []),
    ("21", {"a": 5}, {"$inc": {"a": 6}}, {"a": 11}, {"a": 11}, []),
    ("22", {"c": 5}, {"$inc": {"a.b": 6}}, {"c": 5, "a": {"b": 6}}, {"a": {"b": 6}}, []),
    ("23", {"a": 6.022e23}, {"$inc": {"a": 0}}, None, NO_EVENT, None),
    ("24", {"a": 2}, {"$inc": {"a": Int64(0)}}, {"a": Int64(2)}, {"a": Int64(2)}, []),
    (
        "25",
        {"a": 5},
        {"$inc": {"a": Decimal128("0.0")}},
        {"a": Decimal128("5.0")},
        {"a": Decimal128("5.0")},
        [],
    ),
    ("26", {"a": 2}, {"$mul": {"a": Int64(1)}}, {"a": Int64(2)}, {"a": Int64(2)}, []),
    ("27", {"_id": 2}, {"$mul": {"price": 3}}, {"_id": 2, "price": 0}, {"price": 0}, []),
    ("28", {"a": 1}, {"$min": {"a": 0}}, {"a": 0}, {"a": 0}, []),
    ("29-min", {"a": 1}, {"$min": {"a": 2}}, None, NO_EVENT, None),
    ("29-max", {"a": 1}, {"$max": {"a": 1}}, None, NO_EVENT, None),
    ("30", {"a": 1.0}, {"$max": {"a": Int64(1)}}, None, NO_EVENT, None),
    ("31", {}, {"$max": {"a": 0}}, {"a": 0}, {"a": 0}, []),
    ("32", {"a": {"b": 2}}, {"$max": {"a": {"b": 3}}}, {"a": {"b": 3}}, {"a": {"b": 3}}, []),
    ("33", {"a": 1}, {"$currentDate": {"a": True}}, {"a": NOW}, {"a": NOW}, []),
    (
        "33-ts",
        {"a": 1},
        {"$currentDate": {"a": {"$type": "timestamp"}}},
        {"a": Timestamp(1714979289, 1)},
        {"a": Timestamp(1714979289, 1)},
        [],
    ),
    ("34", {"a": 2}, {"$rename": {"a": "b"}}, {"b": 2}, {"b": 2}, ["a"]),
    ("35", {"a": 2, "b": 1}, {"$rename": {"a": "b"}}, {"b": 2}, {"b": 2}, ["a"]),
    (
        "36",
        {"a": {"c": {"d": 6}}, "b": 1},
        {"$rename": {"a.c": "b"}},
        {"a": {}, "b": {"d": 6}},
        {"b": {"d": 6}},
        ["a.c"],
    ),
    ("37", {"a": 2}, {"$rename": {"a": "b.c.d"}}, {"b": {"c": {"d": 2}}}, {"b": {"c": {"d": 2}}}, ["a"]),
    ("38", {"b": 2}, {"$rename": {"a": "b"}}, None, NO_EVENT, None),
    ("39", {"a": [0]}, {"$push": {"a": 1}}, {"a": [0, 1]}, {"a.1": 1}, []),
    ("40", {"a": [0]}, {"$push": {"a": {"$each": [1, 2]}}}, {"a": [0, 1, 2]}, {"a.1": 1, "a.2": 2}, []),
    ("41", {"a": []}, {"$push": {"a": 1}}, {"a": [1]}, {"a": [1]}, []),
    ("42", {}, {"$push": {"a": {"$each": [1, 2]}}}, {"a": [1, 2]}, {"a": [1, 2]}, []),
    ("43", {"a": [0]}, {"$push": {"a": {"$each": []}}}, None, NO_EVENT, None),
    ("44", {}, {"$push": {"a": {"$each": []}}}, {"a": []}, {"a": []}, []),
    (
        "45",
        {"a": [0, 1, 2, 3, 4]},
        {"$push": {"a": {"$each": [5], "$position": -2}}},
        {"a": [0, 1, 2, 5, 3, 4]},
        {"a": [0, 1, 2, 5, 3, 4]},
        [],
    ),
    ("46", {"a": [0]}, {"$push": {"a": {"$each": [1], "$position": 0}}}, {"a": [1, 0]}, {"a": [1, 0]}, []),
    ("47", {"a": [0]}, {"$push": {"a": {"$each": [1], "$position": 1000}}}, {"a": [0, 1]}, {"a.1": 1}, []),
    (
        "48",
        {"a": [3]},
        {"$push": {"a": {"$each": [2, -1], "$sort": 1}}},
        {"a": [-1, 2, 3]},
        {"a": [-1, 2, 3]},
        [],
    ),
    ("49", {"a": [3]}, {"$push": {"a": {"$each": [2, -1], "$slice": 1}}}, {"a": [3]}, {"a": [3]}, []),
    (
        "50",
        {"choices": {"first": {"choice": "b"}}},
        {"$push": {"choices.first.votes": 1}},
        {"choices": {"first": {"choice": "b", "votes": [1]}}},
        {"choices.first.votes": [1]},
        [],
    ),
    ("51", {"a": [0]}, {"$addToSet": {"a": 1}}, {"a": [0, 1]}, {"a": [0, 1]}, []),
    ("52", {"a": [0]}, {"$addToSet": {"a": {"$each": [0, 1]}}}, {"a": [0, 1]}, {"a": [0, 1]}, []),
    ("53", {"a": [0]}, {"$addToSet": {"a": {"$each": [0]}}}, None, NO_EVENT, None),
    ("54", {}, {"$addToSet": {"a": {"$each": []}}}, {"a": []}, {"a": []}, []),
    ("55", {"_id": 1, "a": [1, []]}, {"$addToSet": {"a.1": 1}}, {"_id": 1, "a": [1, [1]]}, {"a.1": [1]}, []),
    ("56", {"a": [0, 1, 2, 3]}, {"$pull": {"a": {"$lt": 1}}}, {"a": [1, 2, 3]}, {"a": [1, 2, 3]}, []),
    ("57", {"a": [2, 3, 4, 5]}, {"$pull": {"a": {"$lt": 1}}}, None, NO_EVENT, None),
    ("58", {"a": [0, 1, 0, 2]}, {"$pullAll": {"a": [0]}}, {"a": [1, 2]}, {"a": [1, 2]}, []),
    ("59", {"a": {"b": [1, 2, 3]}}, {"$pop": {"a.b": 1}}, {"a": {"b": [1, 2]}}, {"a.b": [1, 2]}, []),
    ("60", {"a": {"b": [1, 2, 3]}}, {"$pop": {"a.b": -1}}, {"a": {"b": [2, 3]}}, {"a.b": [2, 3]}, []),
    ("61", {"a": {"b": []}}, {"$pop": {"a.b": 1}}, None, NO_EVENT, None),
    # rows 62-66 ($[], $[<id>], arrayFilters): unsupported.
    ("67", {"x": 1}, {"$setOnInsert": {"a": 2}}, None, NO_EVENT, None),
    ("68", {"a": 1, "b": 1}, {"$set": {"b": 2}, "$unset": {"a": 1}}, {"b": 2}, {"b": 2}, ["a"]),
    ("69", {"a": 1}, {"$bit": {"a": {"or": 4}}}, {"a": 5}, {"a": 5}, []),
    ("70", {"_id": 1, "a": 1}, {}, None, NO_EVENT, None),
]


@pytest.mark.parametrize(
    "before,update,after,updated,removed", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS]
)
def test_operator_table(before, update, after, updated, removed):
    original = copy.deepcopy(before)
    new_doc, desc = run(before, update)
    assert canon(before) == canon(original), "input document was mutated"
    assert canon(new_doc) == canon(original if after is None else after)
    if updated is NO_EVENT:
        assert desc is None
    else:
        assert desc is not None
        assert canon(desc["updatedFields"]) == canon(updated)
        assert desc["removedFields"] == removed
        assert desc["truncatedArrays"] == []


# Extra behaviour beyond the cases above.
EXTRA = [
    (
        "plain-fields-are-set",
        {"_id": 1, "a": 1},
        {"a": 2, "b.c": 3},
        {"_id": 1, "a": 2, "b": {"c": 3}},
        {"a": 2, "b": {"c": 3}},
        [],
    ),
    (
        "int32-overflow-to-long",
        {"a": 2**31 - 1},
        {"$inc": {"a": 1}},
        {"a": Int64(2**31)},
        {"a": Int64(2**31)},
        [],
    ),
    ("int-plus-double", {"a": 1}, {"$inc": {"a": 0.5}}, {"a": 1.5}, {"a": 1.5}, []),
    ("mul-missing-double", {}, {"$mul": {"a": 2.5}}, {"a": 0.0}, {"a": 0.0}, []),
    ("mul-missing-long", {}, {"$mul": {"a": Int64(2)}}, {"a": Int64(0)}, {"a": Int64(0)}, []),
    ("inc-missing-long", {}, {"$inc": {"a": Int64(2)}}, {"a": Int64(2)}, {"a": Int64(2)}, []),
    (
        "inc-decimal",
        {"a": Decimal128("1.1")},
        {"$inc": {"a": 1}},
        {"a": Decimal128("2.1")},
        {"a": Decimal128("2.1")},
        [],
    ),
    (
        "inc-double-to-decimal",
        {"a": 0.1},
        {"$inc": {"a": Decimal128("0")}},
        {"a": Decimal128("0.100000000000000")},
        {"a": Decimal128("0.100000000000000")},
        [],
    ),
    ("set-int-to-double-is-change", {"a": 1}, {"$set": {"a": 1.0}}, {"a": 1.0}, {"a": 1.0}, []),
    (
        "set-same-subdoc-noop",
        {"a": {"b": [1, {"c": 2}]}},
        {"$set": {"a": {"b": [1, {"c": 2}]}}},
        None,
        NO_EVENT,
        None,
    ),
    (
        "set-reordered-subdoc-is-change",
        {"a": {"x": 1, "y": 2}},
        {"$set": {"a": {"y": 2, "x": 1}}},
        {"a": {"y": 2, "x": 1}},
        {"a": {"y": 2, "x": 1}},
        [],
    ),
    (
        "sibling-creations-share-parent",
        {},
        {"$set": {"x.b": 2, "x.a": 1}},
        {"x": {"a": 1, "b": 2}},
        {"x": {"a": 1, "b": 2}},
        [],
    ),
    (
        "array-padding-two-targets",
        {"a": []},
        {"$set": {"a.3": 3, "a.1": 1}},
        {"a": [None, 1, None, 3]},
        {"a.1": 1, "a.3": 3},
        [],
    ),
    (
        "numeric-order",
        {},
        {"$set": {"b": 1, "a10": 1, "a2": 1, "c.10": 1, "c.9": 1}},
        {"a10": 1, "a2": 1, "b": 1, "c": {"9": 1, "10": 1}},
        {"a10": 1, "a2": 1, "b": 1, "c": {"9": 1, "10": 1}},
        [],
    ),
    (
        "numeric-order-array",
        {"c": [0] * 11},
        {"$set": {"c.10": 1, "c.9": 1}},
        {"c": [0] * 9 + [1, 1]},
        {"c.9": 1, "c.10": 1},
        [],
    ),
    (
        "removed-sorted",
        {"b": 1, "a": 1, "c": 1},
        {"$unset": {"c": "", "a": ""}, "$set": {"d": 1}},
        {"b": 1, "d": 1},
        {"d": 1},
        ["a", "c"],
    ),
    ("unset-missing-through-scalar-noop", {"a": 5}, {"$unset": {"a.b": 1}}, None, NO_EVENT, None),
    ("unset-array-past-end-noop", {"a": [1]}, {"$unset": {"a.3": 1}}, None, NO_EVENT, None),
    ("min-creates", {}, {"$min": {"a.b": 3}}, {"a": {"b": 3}}, {"a": {"b": 3}}, []),
    ("max-cross-type-order", {"a": 5}, {"$max": {"a": "x"}}, {"a": "x"}, {"a": "x"}, []),
    ("min-cross-type-order-noop", {"a": 5}, {"$min": {"a": "x"}}, None, NO_EVENT, None),
    (
        "push-sort-by-field-slice",
        {"a": [{"s": 3}, {"s": 1}]},
        {"$push": {"a": {"$each": [{"s": 2}], "$sort": {"s": -1}, "$slice": 2}}},
        {"a": [{"s": 3}, {"s": 2}]},
        {"a": [{"s": 3}, {"s": 2}]},
        [],
    ),
    (
        "push-negative-slice",
        {"a": [1, 2]},
        {"$push": {"a": {"$each": [3], "$slice": -2}}},
        {"a": [2, 3]},
        {"a": [2, 3]},
        [],
    ),
    (
        "push-missing-with-modifiers",
        {},
        {"$push": {"a": {"$each": [3, 1, 2], "$sort": 1, "$slice": 2}}},
        {"a": [1, 2]},
        {"a": [1, 2]},
        [],
    ),
    (
        "push-position-at-end-appends",
        {"a": [0]},
        {"$push": {"a": {"$each": [1], "$position": 1}}},
        {"a": [0, 1]},
        {"a.1": 1},
        [],
    ),
    (
        "push-position-on-empty-whole",
        {"a": []},
        {"$push": {"a": {"$each": [1], "$position": 0}}},
        {"a": [1]},
        {"a": [1]},
        [],
    ),
    (
        "push-empty-each-with-position-noop",
        {"a": [0]},
        {"$push": {"a": {"$each": [], "$position": 0}}},
        None,
        NO_EVENT,
        None,
    ),
    (
        "push-array-element-value",
        {"a": [0]},
        {"$push": {"a": [1, 2]}},
        {"a": [0, [1, 2]]},
        {"a.1": [1, 2]},
        [],
    ),
    ("addtoset-numeric-equality", {"a": [1]}, {"$addToSet": {"a": 1.0}}, None, NO_EVENT, None),
    (
        "addtoset-dedupes-each",
        {},
        {"$addToSet": {"a": {"$each": [1, 1, 2]}}},
        {"a": [1, 2]},
        {"a": [1, 2]},
        [],
    ),
    ("pull-equality", {"a": [1, 2.0, "2", 2]}, {"$pull": {"a": 2}}, {"a": [1, "2"]}, {"a": [1, "2"]}, []),
    (
        "pull-document-query",
        {"a": [{"x": 1, "y": 1}, {"x": 2}, 1]},
        {"$pull": {"a": {"x": 1}}},
        {"a": [{"x": 2}, 1]},
        {"a": [{"x": 2}, 1]},
        [],
    ),
    ("pull-in", {"a": [1, 2, 3]}, {"$pull": {"a": {"$in": [1, 3]}}}, {"a": [2]}, {"a": [2]}, []),
    ("pull-missing-noop", {}, {"$pull": {"a.b": 1}}, None, NO_EVENT, None),
    ("pullall-missing-noop", {"x": {}}, {"$pullAll": {"x.a": [1]}}, None, NO_EVENT, None),
    ("pop-missing-noop", {}, {"$pop": {"a": 1}}, None, NO_EVENT, None),
    (
        "rename-nested-to-new-parent",
        {"a": {"b": 1, "c": 2}},
        {"$rename": {"a.b": "x.y"}},
        {"a": {"c": 2}, "x": {"y": 1}},
        {"x": {"y": 1}},
        ["a.b"],
    ),
    ("rename-onto-identical-value", {"a": 1, "b": 1}, {"$rename": {"a": "b"}}, {"b": 1}, {}, ["a"]),
    ("inc-array-element", {"a": [1, 2]}, {"$inc": {"a.1": 5}}, {"a": [1, 7]}, {"a.1": 7}, []),
    ("currentdate-existing-same-date", {"a": NOW}, {"$currentDate": {"a": True}}, {"a": NOW}, {"a": NOW}, []),
    ("bit-and-long", {"a": Int64(6)}, {"$bit": {"a": {"and": 3}}}, {"a": Int64(2)}, {"a": Int64(2)}, []),
    (
        "etag-style-combined",
        {"_id": 1, "a": 1, "_etag": ObjectId("0" * 24)},
        {"a": 1, "$set": {"_etag": ObjectId("1" * 24)}},
        {"_id": 1, "a": 1, "_etag": ObjectId("1" * 24)},
        {"_etag": ObjectId("1" * 24)},
        [],
    ),
]


@pytest.mark.parametrize(
    "before,update,after,updated,removed", [row[1:] for row in EXTRA], ids=[row[0] for row in EXTRA]
)
def test_extra_cases(before, update, after, updated, removed):
    test_operator_table(before, update, after, updated, removed)


def test_normalize_merges_plain_fields_into_set():
    assert normalize_patch({"a": 1, "$unset": {"b": 1}}) == {"$set": {"a": 1}, "$unset": {"b": 1}}
    assert normalize_patch({"$set": {"x": 1}, "a.b": 2}) == {"$set": {"x": 1, "a.b": 2}}
    assert normalize_patch({}) == {}


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"$foo": {"a": 1}}, "unknown update operator $foo"),
        ({"$set": 1}, "Modifiers operate on fields"),
        ({"$set": [1]}, "Modifiers operate on fields"),
        ({"_id": 2}, "_id"),
        ({"$set": {"_id": 2}}, "_id field cannot be updated"),
        ({"$set": {"_id.x": 2}}, "_id field cannot be updated"),
        ({"$unset": {"_id": 1}}, "_id field cannot be updated"),
        ({"$rename": {"a": "_id"}}, "_id field cannot be updated"),
        ({"$rename": {"_id": "a"}}, "_id field cannot be updated"),
        ({"$set": {"a": 1, "a.b": 2}}, "Updating the path 'a.b' would create a conflict at 'a'"),
        ({"$set": {"a.b": 1}, "$unset": {"a": 1}}, "Updating the path 'a' would create a conflict at 'a'"),
        ({"a": 1, "$set": {"a": 2}}, "conflict at 'a'"),
        ({"$inc": {"a": 1}, "$set": {"a": 2}}, "conflict at 'a'"),
        ({"$rename": {"a": "b"}, "$set": {"b.c": 1}}, "conflict at 'b'"),
        ({"$rename": {"a": "b"}, "$set": {"a": 1}}, "conflict at 'a'"),
        ({"$set": {"": 1}}, "empty"),
        ({"$set": {"a..b": 1}}, "empty field name"),
        ({"$set": {"a.": 1}}, "empty field name"),
        ({"$set": {"$a": 1}}, "must not start with '$'"),
        ({"$set": {"a.$b": 1}}, "must not start with '$'"),
        ({"$rename": {"a": 1}}, "must be a string"),
        ({"$rename": {"a": "a"}}, "must differ"),
        ({"$rename": {"a": "a.b"}}, "same path"),
        ({"$rename": {"a.b": "a"}}, "same path"),
        ({"$rename": {"a": "b..c"}}, "empty field name"),
        ({"$push": {"a": {"$each": 1}}}, "$each in $push must be an array"),
        ({"$push": {"a": {"$each": [1], "$foo": 1}}}, "Unrecognized clause in $push: $foo"),
        ({"$push": {"a": {"$slice": 1}}}, "require $each"),
        ({"$push": {"a": {"$each": [1], "$slice": "x"}}}, "$slice must be an integer"),
        ({"$push": {"a": {"$each": [1], "$slice": 1.5}}}, "$slice must be an integer"),
        ({"$push": {"a": {"$each": [1], "$position": True}}}, "$position must be an integer"),
        ({"$push": {"a": {"$each": [1], "$sort": 2}}}, "$sort"),
        ({"$push": {"a": {"$each": [1], "$sort": {}}}}, "$sort pattern is empty"),
        ({"$push": {"a": {"$each": [1], "$sort": {"x": 0}}}}, "either 1 or -1"),
        ({"$addToSet": {"a": {"$each": [1], "$slice": 1}}}, "unexpected fields after $each"),
        ({"$addToSet": {"a": {"$each": "x"}}}, "$each in $addToSet must be an array"),
        ({"$inc": {"a": "1"}}, "Cannot increment with non-numeric argument"),
        ({"$inc": {"a": True}}, "Cannot increment with non-numeric argument"),
        ({"$inc": {"a": None}}, "Cannot increment with non-numeric argument"),
        ({"$mul": {"a": "2"}}, "Cannot multiply with non-numeric argument"),
        ({"$currentDate": {"a": False}}, "not valid type for $currentDate"),
        ({"$currentDate": {"a": 1}}, "not valid type for $currentDate"),
        ({"$currentDate": {"a": {"$type": "string"}}}, "not valid type for $currentDate"),
        ({"$pop": {"a": 2}}, "$pop expects 1 or -1"),
        ({"$pullAll": {"a": 1}}, "$pullAll requires an array argument"),
        ({"$pull": {"a": {"$foo": 1}}}, "invalid $pull condition"),
        ({"$bit": {"a": {"nand": 1}}}, "only supports 'and', 'or', and 'xor'"),
        ({"$bit": {"a": {"and": 1.0}}}, "must be an Integer"),
        ([{"$set": {"a": 1}}], "pipeline-style updates"),
        ("x", "must be a JSON object"),
    ],
)
def test_normalize_patch_errors(body, fragment):
    with pytest.raises(UpdateError) as info:
        normalize_patch(body)
    assert fragment in str(info.value)


@pytest.mark.parametrize("path", ["a.$", "a.$[]", "a.$[i].b", "$"])
def test_positional_paths_rejected(path):
    with pytest.raises(UpdateError, match="positional operator"):
        normalize_patch({"$set": {path: 1}})


@pytest.mark.parametrize(
    "before,update,message",
    [
        (
            {"_id": 1, "a": "x"},
            {"$inc": {"a": 1}},
            "Cannot apply $inc to a value of non-numeric type. {_id: 1} has the field 'a' of "
            "non-numeric type string",
        ),
        (
            {"_id": 1, "a": True},
            {"$mul": {"a": 2}},
            "Cannot apply $mul to a value of non-numeric type. {_id: 1} has the field 'a' of "
            "non-numeric type bool",
        ),
        (
            {"_id": 1, "a": Int64(2**63 - 1)},
            {"$inc": {"a": 1}},
            "Failed to apply $inc operations to current value ((NumberLong)9223372036854775807) for "
            "document {_id: 1}",
        ),
        ({"_id": 1, "a": 5}, {"$set": {"a.b": 1}}, "Cannot create field 'b' in element {a: 5}"),
        ({"_id": 1, "a": [1]}, {"$set": {"a.b": 1}}, "Cannot create field 'b' in element {a: [ 1 ]}"),
        (
            {"_id": 1, "a": {"b": None}},
            {"$inc": {"a.b.c": 1}},
            "Cannot create field 'c' in element {b: null}",
        ),
        (
            {"_id": 1, "a": 1},
            {"$push": {"a": 2}},
            "The field 'a' must be an array but is of type int in document {_id: 1}",
        ),
        (
            {"_id": 1, "a": {}},
            {"$addToSet": {"a": 2}},
            "Cannot apply $addToSet to non-array field. Field named 'a' has non-array type object",
        ),
        ({"_id": 1, "a": 1}, {"$pull": {"a": 2}}, "Cannot apply $pull to a non-array value"),
        ({"_id": 1, "a": "s"}, {"$pullAll": {"a": [2]}}, "Cannot apply $pull to a non-array value"),
        ({"_id": 1, "a": 1}, {"$pop": {"a": 1}}, "Path 'a' contains an element of non-array type 'int'"),
        (
            {"_id": 1, "a": 5},
            {"$pop": {"a.b": 1}},
            "Cannot use the part (b) of (a.b) to traverse the element ({a: 5})",
        ),
        (
            {"_id": 1, "a": [{"b": 1}]},
            {"$rename": {"a.0.b": "c"}},
            "The source field cannot be an array element, 'a.0.b' in doc with _id: 1 has an array field "
            "called 'a'",
        ),
        (
            {"_id": 1, "a": 1, "b": [1]},
            {"$rename": {"a": "b.0"}},
            "The destination field cannot be an array element, 'b.0' in doc with _id: 1 has an array "
            "field called 'b'",
        ),
        (
            {"_id": 1, "a": 1, "b": 2},
            {"$rename": {"a": "b.c"}},
            "Cannot use the part (c) of (b.c) to traverse the element ({b: 2})",
        ),
        ({"_id": 1, "a": 1.5}, {"$bit": {"a": {"or": 1}}}, "Cannot apply $bit to a value of non-integral"),
        ({"_id": 1, "a": []}, {"$set": {"a.99999999": 1}}, "can't backfill array"),
    ],
)
def test_apply_errors(before, update, message):
    original = copy.deepcopy(before)
    with pytest.raises(UpdateError) as info:
        run(before, update)
    assert message in str(info.value)
    assert canon(before) == canon(original)


def test_apply_update_rejects_bad_spec():
    with pytest.raises(UpdateError, match="unknown update operator"):
        apply_update({"a": 1}, {"$foo": {"a": 1}}, NOW)
    with pytest.raises(UpdateError, match="conflict"):
        apply_update({"a": 1}, {"$set": {"a": 1}, "$inc": {"a": 1}}, NOW)


def test_input_not_mutated_and_result_independent():
    before = {"_id": 1, "a": {"b": [1, 2]}, "c": [{"d": 1}]}
    original = copy.deepcopy(before)
    pushed = {"x": 1}
    spec = normalize_patch(
        {"$push": {"a.b": pushed}, "$set": {"c.0.d": 2, "e": {"f": 1}}, "$unset": {"a.z": 1}}
    )
    new_doc, desc = apply_update(before, spec, NOW)
    assert canon(before) == canon(original)
    assert new_doc == {"_id": 1, "a": {"b": [1, 2, {"x": 1}]}, "c": [{"d": 2}], "e": {"f": 1}}
    assert desc == {
        "updatedFields": {"a.b.2": {"x": 1}, "c.0.d": 2, "e": {"f": 1}},
        "removedFields": [],
        "truncatedArrays": [],
    }
    pushed["x"] = 99
    desc["updatedFields"]["e"]["f"] = 42
    assert new_doc["a"]["b"][2] == {"x": 1}
    assert new_doc["e"] == {"f": 1}


def test_noop_returns_equal_copy():
    before = {"_id": 1, "a": [1]}
    new_doc, desc = run(before, {"$set": {"a": [1]}})
    assert desc is None
    assert new_doc == before and new_doc is not before


def test_currentdate_truncates_to_milliseconds():
    now = datetime.datetime(2024, 1, 2, 3, 4, 5, 678999)
    new_doc, desc = apply_update({}, normalize_patch({"$currentDate": {"t": True}}), now)
    assert new_doc["t"] == datetime.datetime(2024, 1, 2, 3, 4, 5, 678000)
    assert desc["updatedFields"] == {"t": new_doc["t"]}
