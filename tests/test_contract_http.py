"""HTTP-level stream contract, run against both engines through real gunicorn.

The embedded leg always runs. The mongo leg runs where MONGO_URI names a replica set
(each run uses its own database) and says clearly when it is skipped.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
import requests

from .conftest import ADMIN
from .test_live_streams import open_sse, open_ws, post, put_streams

pytestmark = pytest.mark.live

ENGINES = ["embedded", "mongo"]


@pytest.fixture(params=ENGINES)
def server(request, live_factory):
    if request.param == "mongo":
        uri = os.environ.get("MONGO_URI")
        if not uri:
            pytest.skip("MONGO_URI not set: the mongo leg of the HTTP contract needs a replica set")
        return live_factory(
            MONGO_URI=uri,
            MONGO_DB=f"changefeed_test_{uuid.uuid4().hex[:8]}",
            SSE_HEARTBEAT_SECONDS=1,
            STREAM_LINGER_SECONDS=0,
        )
    return live_factory(MONGO_URI="", SSE_HEARTBEAT_SECONDS=1, STREAM_LINGER_SECONDS=0)


def test_tutorial_events_are_the_same_on_every_engine(server):
    base = server.url
    assert put_streams(base) == 201
    sse = open_sse(base, "/messages/_streams/all")
    ws = open_ws(base, "/messages/_streams/all")
    doc_id = post(base, {"message": "Hello SSE!", "name": "uji", "n": 1}).json()["_id"]["$oid"]
    ins = sse.next_event()
    data = ins.json()
    assert data["operationType"] == "insert"
    assert data["documentKey"] == {"_id": {"$oid": doc_id}}
    assert data["fullDocument"]["message"] == "Hello SSE!" and data["fullDocument"]["n"] == 1
    assert set(data) == {"operationType", "wallTime", "fullDocument", "documentKey"}
    assert json.loads(ws.recv()) == {"_id": json.loads(ins.id), **data}  # the token first on WebSocket

    r = requests.patch(
        f"{base}/messages/{doc_id}",
        auth=ADMIN,
        json={"message": "edited", "$inc": {"n": 1}, "$push": {"tags": "a"}},
    )
    assert r.status_code == 200
    upd = sse.next_event().json()
    assert upd["operationType"] == "update"
    fields = upd["updateDescription"]["updatedFields"]
    assert fields["message"] == "edited" and fields["n"] == 2 and fields["tags"] == ["a"]
    assert upd["updateDescription"]["removedFields"] == []
    assert upd["fullDocument"]["n"] == 2
    sse.close()
    ws.close()

    # resume after the insert: exactly the update, then live
    resumed = open_sse(base, "/messages/_streams/all", headers={"Last-Event-ID": ins.id})
    assert resumed.next_event().json()["operationType"] == "update"
    post(base, {"message": "live"})
    assert resumed.next_event().json()["fullDocument"]["message"] == "live"
    resumed.close()


def test_bad_requests_are_the_same_on_every_engine(server):
    base = server.url
    put_streams(base)
    assert (
        requests.get(
            f"{base}/messages/_streams/nope", auth=ADMIN, headers={"Accept": "text/event-stream"}
        ).status_code
        == 404
    )
    r = requests.get(f"{base}/messages/_streams/all", auth=ADMIN, headers={"Last-Event-ID": "x"})
    assert r.status_code == 400
    r = requests.get(f"{base}/messages/_streams/mine", auth=ADMIN, headers={"Accept": "text/event-stream"})
    assert r.status_code == 400 and r.json()["message"] == "variable n not bound"
    r = requests.put(
        f"{base}/messages", auth=ADMIN, json={"streams": [{"uri": "x", "stages": [{"$out": "y"}]}]}
    )
    assert r.status_code == 400
