"""services.mongomock_compat: each patch gives MongoDB's answer where plain mongomock 4.x fails.

One test per patch, through `query.run_query` (the embedded engine's `GET /<coll>`
evaluator), which turns any mongomock exception into a 400 "cannot run the query": without
its patch, each test below fails. The last tests show the patches hold in a process that
imported nothing but services.query, and that applying them twice changes nothing.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.timestamp import Timestamp
from mongomock import filtering

from services import mongomock_compat
from services.errors import BadRequest
from services.query import run_query

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ids(docs: list[dict], flt: dict, sort: list | None = None) -> list:
    return [d["_id"] for d in run_query(docs, flt, sort or [], None, 0, 0)]


def test_every_patch_is_in_effect():
    assert mongomock_compat.applied() == set(mongomock_compat.PATCHES)


def test_bson_order_compares_and_sorts_timestamps_minkey_and_maxkey():
    when = datetime.datetime(2024, 1, 1)
    docs = [
        {"_id": "max", "v": MaxKey()},
        {"_id": "ts2", "v": Timestamp(20, 1)},
        {"_id": "re", "v": re.compile("a")},
        {"_id": "min", "v": MinKey()},
        {"_id": "date", "v": when},
        {"_id": "ts1", "v": Timestamp(10, 1)},
    ]
    assert ids(docs, {"v": {"$gt": Timestamp(10, 1)}}) == ["ts2"]  # a change event's clusterTime
    assert ids(docs, {}, [("v", 1)]) == ["min", "date", "ts1", "ts2", "re", "max"]  # BSON type order


@pytest.mark.parametrize(
    "type_, expected",
    [
        ("timestamp", ["ts"]),
        ("null", ["null"]),
        ("regex", ["re"]),
        (2, ["str"]),  # numeric type code: string
        (10, ["null"]),
        (["int", "string"], ["int", "str"]),  # any of the listed types
    ],
)
def test_type_aliases_codes_and_lists(type_, expected):
    docs = [
        {"_id": "ts", "v": Timestamp(1, 1)},
        {"_id": "null", "v": None},
        {"_id": "re", "v": re.compile("a")},
        {"_id": "str", "v": "s"},
        {"_id": "int", "v": 1},
    ]
    assert sorted(ids(docs, {"v": {"$type": type_}})) == sorted(expected)


def test_mod_in_queries_with_truncated_modulo():
    docs = [{"_id": i, "n": n} for i, n in enumerate([5, -3, 9.7, "5", True, 4])]
    assert ids(docs, {"n": {"$mod": [4, 1]}}, [("_id", 1)]) == [0, 2]  # 5 and 9.7 (truncated to 9)
    assert ids(docs, {"n": {"$mod": [4, -3]}}) == [1]  # the remainder keeps the dividend's sign
    with pytest.raises(BadRequest, match="divisor cannot be 0"):
        ids(docs, {"n": {"$mod": [0, 1]}})


def test_missing_fields_in_aggregation_comparisons():
    docs = [{"_id": 1, "n": None}, {"_id": 2}]
    assert ids(docs, {"$expr": {"$gt": ["$n", "$absent"]}}) == [1]  # null > missing; missing = missing
    assert ids(docs, {"$expr": {"$lt": ["$absent", None]}}) == [1, 2]  # missing sorts below null
    assert ids(docs, {"$expr": {"$eq": ["$absent", None]}}) == []  # and equals only itself
    assert ids(docs, {"$expr": {"$eq": [{"$cmp": ["$n", "$absent"]}, 1]}}) == [1]


def test_and_short_circuits_in_expressions():
    docs = [{"_id": 1, "d": 0}, {"_id": 2, "d": 2}]
    guarded = {"$and": [{"$ne": ["$d", 0]}, {"$gt": [{"$divide": [1, "$d"]}, 0]}]}
    assert ids(docs, {"$expr": guarded}) == [2]  # 1/d is never evaluated for d = 0


@pytest.mark.parametrize(
    "flt",
    [
        {"n": {"$regex": "(a)\\1"}},
        {"n": {"$in": [re.compile("(a)\\1")]}},
        {"$expr": {"$regexMatch": {"input": "$n", "regex": "(a)\\1"}}},
    ],
)
def test_linear_regex_runs_patterns_through_re2(flt):
    # Python's re would match "aa"; RE2 has no backreferences, so the query is refused
    with pytest.raises(BadRequest, match="backreferences and lookaround are not supported"):
        ids([{"_id": 1, "n": "aa"}], flt)


def test_the_patches_hold_in_a_process_that_imports_only_services_query():
    code = """
import json, re, sys
from bson.timestamp import Timestamp
from services.query import run_query
from services.errors import BadRequest

docs = [{"_id": 1, "n": 5, "v": Timestamp(2, 1), "d": 0, "s": "aa"}, {"_id": 2, "n": 6, "v": None, "d": 2}]

def ids(flt, sort=()):
    try:
        return [d["_id"] for d in run_query(docs, flt, list(sort), None, 0, 0)]
    except BadRequest as exc:
        return exc.message

print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.startswith("services.")),
    "bson_order": ids({"v": {"$gt": Timestamp(1, 1)}}),
    "type_aliases": ids({"v": {"$type": ["timestamp", 10]}}),
    "mod": ids({"n": {"$mod": [4, 1]}}),
    "missing_in_comparisons": ids({"$expr": {"$gt": ["$n", "$absent"]}}),
    "and_short_circuit": ids({"$expr": {"$and": [{"$ne": ["$d", 0]}, {"$gt": [{"$divide": [1, "$d"]}, 0]}]}}),
    "linear_regex": ids({"s": {"$regex": "(a)\\\\1"}}),
}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "services.pipeline" not in out["modules"] and "services.updates" not in out["modules"]
    assert "services.mongomock_compat" in out["modules"]
    assert out["bson_order"] == [1]
    assert out["type_aliases"] == [1, 2]
    assert out["mod"] == [1]
    assert out["missing_in_comparisons"] == [1, 2]
    assert out["and_short_circuit"] == [2]
    assert "backreferences and lookaround are not supported" in out["linear_regex"]


def test_applying_again_patches_nothing_twice():
    before = (filtering._get_compare_type, dict(filtering._filterer_inst._operator_map), filtering._regex)
    mongomock_compat.apply()
    importlib.reload(mongomock_compat)
    after = (filtering._get_compare_type, dict(filtering._filterer_inst._operator_map), filtering._regex)
    assert after == before
    assert ids([{"_id": 1, "v": ["x", 1]}], {"v": {"$type": ["int"]}}) == [1]
