"""services/views.py and the pre-image rewrite of services/pipeline.py, in-process.

The property test (test_view_properties.py) proves a shared watcher equals each subscriber's
own pipeline; these pin the pieces: which values share an index key, which filters are
indexed, what a readFilter makes of an event, and that an event costs one evaluation per
binding it can match, however many bindings there are.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from bson import Decimal128, Int64, ObjectId, Regex

from services import pipeline as pipelines
from services.messages import Batch, Message
from services.views import _UNKEYED, Router, View, equality_entries, scoped, value_key, values_at

OID = ObjectId("5f0000000000000000000001")


@pytest.mark.parametrize(
    "a, b",
    [
        (5, 5.0),
        (5, Int64(5)),
        (5, Decimal128("5")),
        (5.0, Decimal128("5.0")),
        ("x", "x"),
        (OID, ObjectId(str(OID))),
    ],
)
def test_values_mongodb_holds_equal_share_a_key(a, b):
    assert value_key(a) == value_key(b) and hash(value_key(a)) == hash(value_key(b))


@pytest.mark.parametrize("a, b", [("5", 5), (OID, str(OID)), ("x", b"x")])
def test_values_held_apart_do_not(a, b):
    assert value_key(a) != value_key(b)


def test_a_boolean_shares_the_key_of_one_as_the_evaluator_matches_it():
    """(MongoDB holds true apart from 1; mongomock does not. The index must never drop what
    the evaluator would match, and a shared key only costs an evaluation.)"""
    assert value_key(True) == value_key(1) and value_key(False) == value_key(0)


@pytest.mark.parametrize(
    "value", [None, float("nan"), Decimal128("NaN"), datetime(2026, 1, 1), {"a": 1}, [1], Regex("^a")]
)
def test_values_that_cannot_be_keyed_exactly_are_not(value):
    assert value_key(value) is _UNKEYED


def test_values_at_traverses_arrays_as_queries_do():
    doc = {"a": [{"b": 1}, {"b": [2, 3]}, 4], "c": {"d": "x"}}
    assert values_at(doc, "c.d") == ["x"]
    assert 1 in values_at(doc, "a.b") and 2 in values_at(doc, "a.b") and 3 in values_at(doc, "a.b")
    assert values_at(doc, "a.0.b") == [1]
    assert 4 in values_at(doc, "a")
    assert values_at(doc, "missing.path") == []


@pytest.mark.parametrize(
    "query, entries",
    [
        ({"fullDocument.o": "a"}, [("fullDocument.o", "a")]),
        ({"fullDocument.o": {"$eq": 2}}, [("fullDocument.o", 2)]),
        ({"fullDocument.o": {"$in": ["a", "b"]}}, [("fullDocument.o", "a"), ("fullDocument.o", "b")]),
        ({"$and": [{"x": {"$gt": 1}}, {"y": "b"}]}, [("y", "b")]),
        ({"$or": [{"x": 1}, {"y": "b"}]}, [("x", 1), ("y", "b")]),
        ({"x": {"$gt": 1}, "y": "b"}, [("y", "b")]),
    ],
)
def test_equality_entries(query, entries):
    assert equality_entries(query) == entries


@pytest.mark.parametrize(
    "query",
    [
        {"x": {"$ne": 1}},
        {"x": None},  # null also matches a missing field
        {"x": {"a": 1}},  # a whole document
        {"$or": [{"x": 1}, {"y": {"$gt": 1}}]},  # a branch without an equality
        {"x": {"$in": list(range(100))}},
        {"$nor": [{"x": 1}]},
        {"x": datetime(2026, 1, 1)},
    ],
)
def test_filters_without_a_usable_equality_are_not_indexed(query):
    assert equality_entries(query) is None


def event(op="update", after=None, before=None, **extra):
    out = {"_id": {"_data": "00"}, "operationType": op, "documentKey": {"_id": 1}, **extra}
    if after is not None:
        out["fullDocument"] = after
    if before is not None:
        out["fullDocumentBeforeChange"] = before
    return out


MINE = {"owner": "ann"}


def test_scoped_keeps_an_event_of_a_document_that_stays_in():
    e = event(after={"owner": "ann", "v": 2}, before={"owner": "ann", "v": 1}, updateDescription={})
    assert scoped(e, MINE) is e


def test_scoped_hides_the_pre_image_of_a_document_that_entered():
    e = event(after={"owner": "ann"}, before={"owner": "ben", "secret": 1})
    assert scoped(e, MINE) == event(after={"owner": "ann"})


def test_scoped_tells_that_a_document_left_without_its_new_content():
    e = event(
        after={"owner": "ben", "x": 1}, before={"owner": "ann"}, updateDescription={"updatedFields": {}}
    )
    assert scoped(e, MINE) == event(before={"owner": "ann"})


def test_scoped_delete_needs_a_pre_image_that_matched():
    assert scoped(event("delete", before={"owner": "ann"}), MINE) == event("delete", before={"owner": "ann"})
    assert scoped(event("delete", before={"owner": "ben"}), MINE) is None
    assert scoped(event("delete"), MINE) is None  # no pre-image: it cannot be placed
    assert scoped(event("update", after={"owner": "ben"}, before=None), MINE) is None


def test_pre_image_rewrite_passes_leavers_and_leaves_inserts_as_written():
    (stage,) = pipelines.with_pre_images(
        [{"$match": {"fullDocument.o": {"$ne": "a"}, "operationType": "update"}}]
    )
    compiled = pipelines.Pipeline([stage])
    insert = event("insert", after={"o": "a"})
    assert compiled.apply(insert) is None  # an insert has no pre-image: the $ne is not dodged
    moved_out = event(after={"o": "a"}, before={"o": "b"})
    assert compiled.apply(moved_out) is not None
    assert compiled.apply(event(after={"o": "a"}, before={"o": "a"})) is None
    # stages after a reshaping stage, and $expr, are left as written
    stages = [{"$project": {"fullDocument": 1}}, {"$match": {"fullDocument.o": "a"}}]
    assert pipelines.with_pre_images(stages) == stages
    expr = [{"$match": {"$expr": {"$eq": ["$fullDocument.o", "a"]}}}]
    assert pipelines.with_pre_images(expr) == expr


def test_shared_stages_are_the_leading_variable_free_filters_without_expr():
    count = pipelines.shared_stage_count
    assert (
        count([{"_$match": {"operationType": "insert"}}, {"_$match": {"fullDocument::o": {"_$var": "o"}}}])
        == 1
    )
    assert count([{"_$project": {"fullDocument": 1}}, {"_$match": {"x": 1}}]) == 0
    assert count([{"_$match": {"_$expr": {"_$eq": ["$x", 1]}}}]) == 0
    assert count([{"_$ifvar": ["o", {"_$match": {"x": 1}}]}]) == 0


def change(n: int, owner: str) -> Message:
    m = Message("change", f'{{"n": {n}}}', position=n, id=f'{{"_data":"{n:02X}"}}')
    m.event = {
        "_id": {"_data": f"{n:02X}"},
        "operationType": "insert",
        "fullDocument": {"owner": owner, "n": n},
    }
    return m


def test_an_event_is_evaluated_once_for_the_one_binding_of_a_thousand_it_matches(monkeypatch):
    router = Router()
    for i in range(1000):
        own = pipelines.compile_pipeline(
            [{"_$match": {"fullDocument::owner": {"_$var": "o"}}}], {"o": f"u{i}"}
        )
        router.view(f"k{i}", lambda own=own, i=i: View(f"k{i}", own, None, None))
    unindexed = router.view(
        "gt", lambda: View("gt", pipelines.Pipeline([{"$match": {"fullDocument.n": {"$gt": 0}}}]), None, None)
    )
    assert len(router.indexed) == 1000 and router.unindexed == {unindexed}
    calls = []
    real = pipelines.Pipeline.apply
    monkeypatch.setattr(pipelines.Pipeline, "apply", lambda self, e: calls.append(self) or real(self, e))
    batch = Batch([change(1, "u7"), change(2, "u7"), change(3, "u900")])
    routed = dict(router.route(batch))
    assert {v.key for v in routed} == {"k7", "k900", "gt"}
    assert [m.position for m in routed[router.views["k7"]].items] == [1, 2]
    assert routed[unindexed] is batch  # everything kept: the same batch, its encodings shared
    assert routed[router.views["k900"]].items[0] is batch.items[2]  # a filter reuses the message
    assert len(calls) == 3 + 3  # u7 twice and u900 once, and the unindexed binding once per event
    router.remove(router.views["k7"])
    assert "fullDocument.owner" in router.by_path and "u7" not in router.by_path["fullDocument.owner"]


def test_a_read_filter_indexes_both_sides_of_the_change():
    view = View("k", None, None, None, read_filter={"owner": "ann"})
    assert view.entries == [("fullDocument.owner", "ann"), ("fullDocumentBeforeChange.owner", "ann")]
    router = Router()
    router.view("k", lambda: view)
    deleted = Message("change", "{}", position=1, id='{"_data":"01"}')
    deleted.event = event("delete", before={"owner": "ann"})
    assert router.candidates(deleted.event) == {view}
