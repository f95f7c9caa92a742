"""Regexes are matched by RE2 wherever the embedded engine evaluates them (services.linear_regex,
installed into mongomock by services.mongomock_compat).

`^(a+)+$` against 31 characters held a worker for 30 s under Python's `re` until gunicorn
killed it. Against 60 characters a backtracking matcher would need ~2^60 steps, so the
subprocess checks below only finish, within their generous bound, if matching is linear.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mongomock.filtering import filter_applies

from services import mongomock_compat, pipeline, query, updates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL = "^(a+)+$"
VICTIM = "a" * 60 + "!"


def run_isolated(code: str) -> str:
    """Run `code` in a fresh interpreter (so a runaway match cannot hang this one)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(
    "expression",
    [
        f'filter_applies({{"name": {{"$regex": {EVIL!r}}}}}, {{"name": {VICTIM!r}}})',
        f'filter_applies({{"name": {{"$regex": {EVIL!r}, "$options": "i"}}}}, {{"name": {VICTIM!r}}})',
        f'filter_applies({{"name": {{"$in": [re.compile({EVIL!r})]}}}}, {{"name": {VICTIM!r}}})',
        f'filter_applies({{"name": {{"$not": {{"$regex": {EVIL!r}}}}}}}, {{"name": {VICTIM!r}}})',
        f'filter_applies({{"$expr": {{"$regexMatch": {{"input": "$name", "regex": {EVIL!r}}}}}}}, '
        f'{{"name": {VICTIM!r}}})',
    ],
)
def test_catastrophic_patterns_finish_in_a_fresh_process(expression):
    out = run_isolated(
        "import re\nfrom services import query\nfrom mongomock.filtering import filter_applies\n"
        f"print({expression})"
    )
    assert out in ("True", "False")


def test_stream_stages_and_pull_conditions_use_it_too():
    out = run_isolated(
        "from services import pipeline, updates\nimport datetime\n"
        f"p = pipeline.compile_pipeline([{{'$match': {{'fullDocument.name': {{'$regex': {EVIL!r}}}}}}}], "
        "{})\n"
        f"print(p.apply({{'_id': 1, 'fullDocument': {{'name': {VICTIM!r}}}}}))\n"
        f"doc, _ = updates.apply_update({{'_id': 1, 'tags': [{VICTIM!r}, 'b']}}, "
        f"{{'$pull': {{'tags': {{'$regex': {EVIL!r}}}}}}}, datetime.datetime.now())\n"
        "print(doc['tags'])"
    )
    assert out.splitlines() == ["None", "['a" + "a" * 59 + "!', 'b']"]


def test_semantics_match_mongodb_options():
    assert filter_applies({"n": {"$regex": "^ab"}}, {"n": "abc"})
    assert not filter_applies({"n": {"$regex": "^AB"}}, {"n": "abc"})
    assert filter_applies({"n": {"$regex": "^AB", "$options": "i"}}, {"n": "abc"})
    assert filter_applies({"n": {"$regex": "^b", "$options": "m"}}, {"n": "a\nb"})
    assert not filter_applies({"n": {"$regex": "^b"}}, {"n": "a\nb"})
    assert filter_applies({"n": {"$regex": "a.b", "$options": "s"}}, {"n": "a\nb"})
    assert filter_applies({"n": {"$regex": "é$"}}, {"n": "café"})
    assert filter_applies({"tags": {"$regex": "^x"}}, {"tags": ["a", "xy"]})
    assert not filter_applies({"n": {"$regex": "1"}}, {"n": 1})  # not a string: no match
    assert filter_applies(
        {"$expr": {"$regexMatch": {"input": "$n", "regex": "B", "options": "i"}}}, {"n": "abc"}
    )


@pytest.mark.parametrize("pattern, options", [("(a)\\1", ""), ("a(?=b)", ""), ("(?<!x)a", ""), ("a b", "x")])
def test_backtracking_only_constructs_are_refused_with_a_reason(client, pattern, options):
    client.put("/things", json={})
    client.post("/things", json={"n": "ab"})
    spec = {"n": {"$regex": pattern, "$options": options}} if options else {"n": {"$regex": pattern}}
    r = client.get("/things", query_string={"filter": json.dumps(spec)})
    assert r.status_code == 400, r.get_data(as_text=True)
    assert "not supported" in r.get_json()["message"]


def test_the_attack_over_http_answers(client):
    client.put("/things", json={})
    client.post("/things", json={"name": "a" * 31 + "!"})
    r = client.get("/things", query_string={"filter": json.dumps({"name": {"$regex": EVIL}})})
    assert r.status_code == 200 and r.get_json() == []
    expr = {"$expr": {"$regexMatch": {"input": "$name", "regex": EVIL}}}
    assert client.get("/things", query_string={"filter": json.dumps(expr)}).get_json() == []


def test_modules_apply_it_explicitly():
    assert "linear_regex" in mongomock_compat.applied()
    assert pipeline.mongomock_compat is query.mongomock_compat is updates.mongomock_compat is mongomock_compat
