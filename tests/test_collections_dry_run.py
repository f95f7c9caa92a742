"""`PUT`/`PATCH /<coll>?dryRun=true`: the write's checks and answers, nothing stored.

The console's stream-definition editor validates with it before saving, so a dry run must
answer exactly what the write would (the same 400 message for a bad stage), and a valid one
must leave the collection, its ETag and the change log as they were.
"""

from __future__ import annotations

import pytest
from bson import ObjectId

GOOD = {"streams": [{"uri": "all", "stages": [{"_$match": {"operationType": "insert"}}]}]}
BAD = {"streams": [{"uri": "bad", "stages": [{"_$foo": 1}]}]}


def meta(client, coll: str = "messages"):
    r = client.get(f"/{coll}/_meta")
    return r.status_code, r.get_json()


def error(r) -> str:
    body = r.get_json()
    assert body["http status code"] == r.status_code
    return body["message"]


def test_valid_put_dry_run_is_200_and_creates_nothing(client):
    r = client.put("/messages?dryRun=true", json=GOOD)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json() == {"valid": True, "dryRun": True, "collection": "messages", "exists": False}
    assert "ETag" not in r.headers
    assert meta(client)[0] == 404
    assert "messages" not in client.get("/").get_json()


def test_valid_dry_runs_change_nothing_of_an_existing_collection(client):
    etag = client.put("/messages", json={"a": 1, "streams": []}).headers["ETag"]
    before = meta(client)[1]
    for method in ("put", "patch"):
        r = getattr(client, method)("/messages?dryRun=true", json=GOOD)
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.get_json()["exists"] is True
        assert meta(client)[1] == before
    assert client.get("/messages/_meta").headers["ETag"] == etag


def test_dry_run_false_is_the_write(client):
    assert client.put("/messages?dryRun=false", json=GOOD).status_code == 201
    assert meta(client)[1]["streams"] == GOOD["streams"]
    assert client.patch("/messages?dryRun=false", json={"x": 1}).status_code == 200
    assert meta(client)[1]["x"] == 1


@pytest.mark.parametrize("method", ["put", "patch"])
def test_invalid_dry_run_answers_the_writes_400(client, method):
    client.put("/messages", json={"a": 1})
    before = meta(client)[1]
    real = getattr(client, method)("/messages", json=BAD)
    dry = getattr(client, method)("/messages?dryRun=true", json=BAD)
    assert real.status_code == dry.status_code == 400
    assert error(dry) == error(real)
    assert "invalid streams of collection 'messages'" in error(dry)
    assert meta(client)[1] == before


def test_other_invalid_bodies_answer_as_the_write(client):
    for kwargs in ({"data": "[1]", "content_type": "application/json"}, {"data": "x"}):
        real = client.put("/messages", **kwargs)
        dry = client.put("/messages?dryRun=true", **kwargs)
        assert (dry.status_code, error(dry)) == (real.status_code, error(real))
    real = client.put("/_meta", json=GOOD)
    dry = client.put("/_meta?dryRun=true", json=GOOD)
    assert (dry.status_code, error(dry)) == (real.status_code, error(real)) == (400, error(real))


def test_dry_run_checks_if_match_and_existence_like_the_write(client):
    etag = client.put("/messages", json={"a": 1}).headers["ETag"]
    stale = {"If-Match": str(ObjectId())}
    for method in ("put", "patch"):
        dry = getattr(client, method)("/messages?dryRun=true", json=GOOD, headers=stale)
        assert dry.status_code == 409 and "ETag" in error(dry)
        ok = getattr(client, method)("/messages?dryRun=true", json=GOOD, headers={"If-Match": etag})
        assert ok.status_code == 200
    real = client.patch("/nothing", json=GOOD)
    dry = client.patch("/nothing?dryRun=true", json=GOOD)
    assert (dry.status_code, error(dry)) == (real.status_code, error(real)) == (404, error(real))
    assert meta(client)[1]["a"] == 1 and "streams" not in meta(client)[1]


@pytest.mark.parametrize(
    "query", ["dryRun=maybe", "dryRun=", "dryRun=TRUE", "dryRun=1", "dryRun=true&dryRun=true"]
)
def test_dry_run_takes_only_true_or_false(client, query):
    for method in ("put", "patch"):
        r = getattr(client, method)(f"/messages?{query}", json=GOOD)
        assert r.status_code == 400, (method, query)
        assert "dryRun" in error(r)
    assert meta(client)[0] == 404


@pytest.mark.parametrize("name", ["dryrun", "DRYRUN", "DryRun"])
def test_a_misspelt_dry_run_is_refused_not_written(client, name):
    r = client.put(f"/messages?{name}=true", json=GOOD)
    assert r.status_code == 400 and "dryRun" in error(r)
    assert meta(client)[0] == 404


def test_dry_run_needs_the_writes_permission(app, anon):
    r = anon.put("/messages?dryRun=true", json=GOOD)
    assert r.status_code == 401
