"""Bad stream requests are refused in-process, before any stream opens (Flask test client)."""

import pytest

from services import pipeline

SSE = {"Accept": "text/event-stream"}


@pytest.fixture
def streams(client):
    r = client.put(
        "/m",
        json={
            "streams": [
                {"uri": "all", "stages": []},
                {"uri": "mine", "stages": [{"$match": {"fullDocument.n": {"$var": "n"}}}]},
            ]
        },
    )
    assert r.status_code == 201
    return client


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ("[" * 50_000 + "]" * 50_000, "too long"),
        ('{"_data":"' + "A" * 5000 + '"}', "too long"),
        ("[" * 500 + "]" * 500, "not a valid resume token"),
    ],
)
def test_last_event_id_that_cannot_be_a_token_is_400(streams, raw, fragment):
    r = streams.get("/m/_streams/all", headers={**SSE, "Last-Event-ID": raw})
    assert r.status_code == 400
    assert fragment in r.json["message"] and len(r.json["message"]) < 400


@pytest.mark.parametrize(
    "raw",
    [
        '{"n": NaN}',
        '{"n": Infinity}',
        '{"n": ' + "9" * 40 + "}",
        '{"n":' * 200 + "1" + "}" * 200,
        '{"a":' * 5000 + "1" + "}" * 5000,
    ],
)
def test_avars_beyond_json_and_bson_are_400(streams, raw):
    r = streams.get("/m/_streams/mine", headers=SSE, query_string={"avars": raw})
    assert r.status_code == 400
    assert "avars" in r.json["message"] and len(r.json["message"]) < 400
    with pytest.raises(pipeline.AvarsError):
        pipeline.parse_avars(raw)


SCOPED = {
    "streams": [
        {"uri": "team", "stages": [{"_$match": {"fullDocument::team": {"_$var": "@user.team"}}}]},
        {
            "uri": "rf",
            "stages": [{"_$match": {"fullDocument::f": {"_$var": "@mongoPermissions.readFilter"}}}],
        },
        {"uri": "opt", "stages": [{"_$ifvar": ["@user.team", {"_$match": {"fullDocument::team": "x"}}]}]},
        {"uri": "tn", "stages": [], "notify_when": {"fullDocument::tenant": {"_$var": "@user.tenant"}}},
    ]
}
SPOOFS = [
    "avars=" + '{"@user":{"team":"blue"}}',
    "avars=" + '{"@user.team":"blue"}',
    "avars=" + '{"@mongoPermissions":{"readFilter":{}}}',
    "avars=" + '{"@mongoPermissions.readFilter":{}}',
    "avars=" + '"@user.tenant":"acme"',  # the brace-less form curl sends
    "@user.team=blue",
    "@user=x",
    "@user.tenant=acme",
    "@mongoPermissions.readFilter=%7B%7D",
    "%40user.team=blue",  # percent-encoded @
]


@pytest.mark.parametrize("query", SPOOFS)
def test_no_client_input_can_set_a_server_variable(client, query):
    """Every `@` variable, through avars (both forms) and plain or percent-encoded query
    parameters: a 400 naming the reserved name, before any stream (the WebSocket leg is
    live: tests/test_live_streams.py)."""
    assert client.put("/s", json=SCOPED).status_code == 201
    for uri in ("team", "rf", "opt", "tn"):
        r = client.get(f"/s/_streams/{uri}?{query}", headers=SSE)
        assert r.status_code == 400, (uri, r.get_data(as_text=True))
        assert "reserved for server-side variables" in r.json["message"]
