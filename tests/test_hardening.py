"""Odd requests and limits, in-process: HEAD and write methods on stream URLs, reserved and
unusual document ids, Location headers, text that is not Unicode, login throttling, client
addresses behind proxies, tokens minted from tokens, stream limits, relative links.
The same attacks over real sockets against gunicorn are in test_live_attacks.py.
"""

from __future__ import annotations

import base64
import itertools
import json
import time

import pytest
from werkzeug.http import HTTP_STATUS_CODES

from services.throttle import FailureThrottle

from .test_security import basic, bearer, get_token

SSE = {"Accept": "text/event-stream"}
STREAMS = {"streams": [{"uri": "all", "stages": []}]}
PUBLIC = {
    "_id": "pub",
    "roles": ["$unauthenticated"],
    "predicate": "path-prefix(/pub/_streams)",
    "priority": 0,
}


def assert_error(r, status: int, message: str | None = None) -> str:
    """The error format with exactly this status; returns the message."""
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True))
    body = r.get_json()
    assert list(body) == ["http status code", "http status description", "message"]
    assert body["http status code"] == status
    assert body["http status description"] == HTTP_STATUS_CODES[status]
    if message is not None:
        assert body["message"] == message
    return body["message"]


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch):
    monkeypatch.setattr("services.auth.BCRYPT_ROUNDS", 4)


@pytest.fixture
def pub(client):
    assert client.put("/pub", json=STREAMS).status_code == 201
    assert client.post("/acl", json=PUBLIC).status_code == 201


# --------------------------------------------------------------------------- stream URLs


def test_head_on_a_stream_answers_the_headers_and_subscribes_nothing(anon, app, pub):
    r = anon.head("/pub/_streams/all", headers=SSE)
    assert r.status_code == 200
    assert r.mimetype == "text/event-stream" and r.headers["Cache-Control"] == "no-cache"
    assert r.get_data() == b""
    assert app.extensions["changefeed.hub"].status()["clients"] == 0
    assert app.extensions["changefeed.hub"].status()["watchers"] == 0
    assert anon.head("/pub/_streams/nope", headers=SSE).status_code == 404  # HEAD: no body
    assert anon.head("/pub/_streams/all", headers=SSE, query_string={"avars": "[1]"}).status_code == 400
    assert app.extensions["changefeed.hub"].status()["watchers"] == 0


@pytest.mark.parametrize("path", ["/pub/_streams", "/pub/_streams/all", "/pub/_meta", "/pub/_size"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_only_reads_exist_on_reserved_urls(anon, client, pub, method, path):
    for c in (anon, client):
        r = c.open(path, method=method, json={"x": 1}, query_string={"wm": "upsert"})
        if c is anon and not path.startswith("/pub/_streams"):
            assert r.status_code == 401  # the public rule does not reach these
            continue
        assert_error(r, 405)
        assert r.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert client.get("/pub").get_json() == []


def test_the_anonymous_upsert_attack_is_a_405(anon, client, pub):
    r = anon.put("/pub/_streams", json={"planted": True}, query_string={"wm": "upsert"})
    assert_error(r, 405)
    assert client.get("/pub").get_json() == []


@pytest.mark.parametrize("doc_id", ["_streams", "_meta", "_size", "_indexes", "_aggrs", "*"])
def test_reserved_names_are_never_document_ids(client, pub, doc_id):
    msg = f"'{doc_id}' is a reserved name and cannot be used as a document id"
    assert_error(client.post("/pub", json={"_id": doc_id}), 400, msg)
    assert_error(client.post("/pub", json=[{"_id": "ok"}, {"_id": doc_id}]), 400, msg)
    assert client.get("/pub").get_json() == []
    if doc_id not in ("_streams", "_meta", "_size", "*"):  # those URLs are routes of their own
        assert_error(client.put(f"/pub/{doc_id}", json={}, query_string={"wm": "upsert"}), 400, msg)
        assert_error(client.patch(f"/pub/{doc_id}", json={"a": 1}, query_string={"wm": "upsert"}), 400, msg)


def test_stream_links_are_relative_unless_public_url_is_set(client, app, pub):
    r = client.get("/pub/_streams", headers={"Host": "evil.example"})
    assert r.get_json()[0]["url"] == "/pub/_streams/all"
    app.config["PUBLIC_URL"] = "https://feeds.example.com"
    assert (
        client.get("/pub/_streams", headers={"Host": "evil.example"}).get_json()[0]["url"]
        == "https://feeds.example.com/pub/_streams/all"
    )


# --------------------------------------------------------------------------- ids and text

ODD_IDS = [
    "0123456789abcdef01234567",
    "a\nb",
    "a/b",
    "../x",
    ".",
    "..",
    "100%",
    "%41",
    "a b?c#d",
    "tab\there",
    "nul\0x",
    "café",
    "😀",
    "a;b=c",
    "x" * 300,
    "\u2028",
    " lead",
    "trail ",
]


@pytest.mark.parametrize("doc_id", ODD_IDS)
def test_any_string_id_round_trips(client, doc_id):
    client.put("/things", json={})
    r = client.post("/things", json={"_id": doc_id, "v": 1})
    assert r.status_code == 201, r.get_data(as_text=True)
    location = r.headers["Location"]
    assert location.isascii() and "\n" not in location
    got = client.get(location)
    assert got.status_code == 200, (location, got.get_data(as_text=True))
    assert got.get_json()["_id"] == doc_id
    assert client.patch(location, json={"v": 2}).status_code == 200
    assert client.get(location).get_json()["v"] == 2
    assert client.delete(location).status_code == 204
    assert_error(client.get(location), 404)


def test_id_type(client):
    client.put("/things", json={})
    oid = "0123456789abcdef01234567"
    client.post("/things", json={"_id": {"$oid": oid}, "kind": "oid"})
    r = client.post("/things", json={"_id": oid, "kind": "string"})
    assert r.headers["Location"] == f"/things/{oid}?id_type=STRING"
    assert client.get(f"/things/{oid}").get_json()["kind"] == "oid"
    assert client.get(f"/things/{oid}", query_string={"id_type": "oid"}).get_json()["kind"] == "oid"
    assert client.get(f"/things/{oid}", query_string={"id_type": "STRING"}).get_json()["kind"] == "string"
    assert_error(client.get("/things/xyz", query_string={"id_type": "OID"}), 400)
    assert_error(client.get("/things/xyz", query_string={"id_type": "NUMBER"}), 400)


@pytest.mark.parametrize(
    "doc_id",
    [{"$minKey": 1}, {"$maxKey": 1}, None, True, 1.5, {"a": 1}, [1], {"$date": "2020-01-01T00:00:00Z"}],
)
def test_ids_a_url_cannot_name_are_refused(client, doc_id):
    client.put("/things", json={})
    assert "could not be addressed" in assert_error(client.post("/things", json={"_id": doc_id}), 400)
    assert client.get("/things").get_json() == []


def test_integer_ids_round_trip_with_id_type_number(client):
    client.put("/things", json={})
    r = client.post("/things", json={"_id": 42, "v": 1})
    assert r.headers["Location"] == "/things/42?id_type=NUMBER"
    assert client.get(r.headers["Location"]).get_json()["_id"] == 42
    assert_error(client.get("/things/42"), 404)  # the string "42"
    assert_error(client.post("/things", json={"_id": {"$numberLong": "42"}}), 409)  # the same _id
    assert_error(client.get("/things/x", query_string={"id_type": "NUMBER"}), 400)


def test_min_and_max_keys_in_values_sort_in_bson_order(client):
    client.put("/things", json={})
    client.post(
        "/things",
        json=[{"_id": "a", "v": {"$maxKey": 1}}, {"_id": "b", "v": 1}, {"_id": "c", "v": {"$minKey": 1}}],
    )
    r = client.get("/things", query_string={"sort": "v"})
    assert r.status_code == 200 and [d["_id"] for d in r.get_json()] == ["c", "b", "a"]


def test_empty_string_id_is_refused(client):
    client.put("/things", json={})
    assert_error(client.post("/things", json={"_id": ""}), 400)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": "\\ud800"}',
        b'{"\\udfff": 1}',
        b'{"a": ["x", {"b": "\\udc00y"}]}',
        b'{"a": "\xff"}',
        b'{"a": "\xed\xa0\x80"}',
    ],
)
def test_text_that_is_not_unicode_is_a_400_and_writes_nothing(client, app, body):
    client.put("/things", json={})
    r = client.post("/things", data=body, content_type="application/json")
    assert_error(r, 400)
    assert client.get("/things").get_json() == []


def test_surrogates_in_query_parameters_and_patches(client):
    client.put("/things", json={})
    client.post("/things", json={"_id": "t"})
    assert_error(client.get("/things", query_string={"filter": '{"a": "\\ud800"}'}), 400)
    assert_error(
        client.patch("/things/t", data=b'{"$set": {"a": "\\ud83d"}}', content_type="application/json"), 400
    )
    assert_error(client.put("/things/t", data=b'{"\\ud83d": 1}', content_type="application/json"), 400)


# --------------------------------------------------------------------------- logins


def test_failed_logins_are_throttled_per_address_and_user(client, anon, app):
    app.config["AUTH_MAX_FAILURES"] = 3
    app.extensions["changefeed.login_throttle"] = FailureThrottle(3, 60)
    client.post("/users", json={"_id": "alice", "password": "right", "roles": []})
    for _ in range(3):
        assert_error(anon.get("/", headers=basic("alice", "wrong")), 401)
    for password in ("wrong", "right"):  # now even the right password waits: no check is made
        r = anon.get("/", headers=basic("alice", password))
        assert_error(r, 429)
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    # another address, another user: unaffected
    other = {"REMOTE_ADDR": "10.9.9.9"}
    assert anon.get("/", headers=basic("alice", "right"), environ_base=other).status_code == 403
    assert anon.get("/", headers=basic("admin", "secret")).status_code == 200


def test_throttled_attempts_run_no_bcrypt(client, anon, app, monkeypatch):
    app.extensions["changefeed.login_throttle"] = FailureThrottle(2, 60)
    for _ in range(2):
        anon.get("/", headers=basic("ghost", "x"))
    calls = []
    monkeypatch.setattr("services.auth._checkpw", lambda *a: calls.append(a) or False)
    for _ in range(5):
        assert_error(anon.get("/", headers=basic("ghost", "x")), 429)
    assert calls == []


def test_a_trusted_proxy_names_the_client(client, anon, app):
    app.extensions["changefeed.login_throttle"] = FailureThrottle(1, 60)
    app.config["TRUSTED_PROXIES"] = ()  # none trusted
    hop = {"X-Forwarded-For": "203.0.113.7"}
    assert_error(anon.get("/", headers={**basic("admin", "bad"), **hop}), 401)
    # untrusted peer: the header is ignored, the peer (127.0.0.1 here) is throttled
    assert_error(anon.get("/", headers={**basic("admin", "bad"), "X-Forwarded-For": "198.51.100.1"}), 429)
    from services.config import load

    app.config["TRUSTED_PROXIES"] = load(overrides={"TRUSTED_PROXIES": "127.0.0.0/8"})["TRUSTED_PROXIES"]
    # trusted peer: the last hop is the client; an earlier (client-written) entry is not
    assert_error(
        anon.get("/", headers={**basic("admin", "bad"), "X-Forwarded-For": "1.2.3.4, 198.51.100.2"}), 401
    )
    assert_error(anon.get("/", headers={**basic("admin", "bad"), "X-Forwarded-For": "198.51.100.2"}), 429)
    assert_error(
        anon.get("/", headers={**basic("admin", "bad"), "X-Forwarded-For": "198.51.100.2, 1.2.3.4"}), 401
    )


def test_unknown_users_cost_a_bcrypt_check_like_wrong_passwords(client, anon, monkeypatch):
    client.post("/users", json={"_id": "alice", "password": "right", "roles": []})
    assert anon.get("/", headers=basic("alice", "right")).status_code == 403  # remembered now
    calls = []
    import services.auth as auth

    real = auth._checkpw
    monkeypatch.setattr("services.auth._checkpw", lambda *a: calls.append(a) or real(*a))
    for user, password in (("nobody", "x"), ("alice", "wrong"), ("alice", "p" * 100)):
        assert_error(anon.get("/", headers=basic(user, password)), 401)
    assert len(calls) == 3  # one bcrypt check each, remembered user or not
    assert anon.get("/", headers=basic("alice", "right")).status_code == 403
    assert len(calls) == 3  # the remembered right password needs none


def test_a_token_cannot_mint_a_token_that_outlives_it(anon, app):
    app.extensions["changefeed.tokens"].ttl = 1  # expires at the next whole second after 1 s: < 2 s
    first = get_token(anon)
    app.extensions["changefeed.tokens"].ttl = 3600
    r = anon.post("/token", headers=bearer(first))
    assert r.status_code == 200
    assert r.get_json()["expires_in"] <= 2
    time.sleep(2.1)
    assert_error(anon.get("/", headers=bearer(r.get_json()["access_token"])), 401)
    # Basic credentials still get the full lifetime
    r = anon.post("/token", headers=basic("admin", "secret"))
    assert r.get_json()["expires_in"] == 3600


def test_malformed_basic_credentials(anon):
    for value in (
        "Basic",
        "Basic !!!",
        "Basic " + base64.b64encode(b"nocolon").decode(),
        "Basic " + base64.b64encode(b":pw").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
    ):
        assert_error(anon.get("/", headers={"Authorization": value}), 401)


# --------------------------------------------------------------------------- stream limits


def test_open_streams_are_bounded_per_owner_and_watchers_per_worker(app, client):
    hub = app.extensions["changefeed.hub"]
    client.put(
        "/pub",
        json={
            "streams": [
                {"uri": "v", "stages": [{"$match": {"fullDocument.v": {"$var": "v"}}}]},
                {"uri": "all", "stages": []},
            ]
        },
    )
    hub.max_per_address, hub.max_per_user, hub.max_watchers, hub.max_bindings = 2, 3, 1, 4
    subs = [
        hub.subscribe("pub", "v", '{"v": 1}', None, "sse", owner=("address", "1.1.1.1")) for _ in range(2)
    ]
    with pytest.raises(Exception) as info:
        hub.subscribe("pub", "v", '{"v": 1}', None, "sse", owner=("address", "1.1.1.1"))
    assert info.value.status == 429 and "STREAM_MAX_PER_ADDRESS" in info.value.message
    subs.append(hub.subscribe("pub", "v", '{"v": 1}', None, "sse", owner=("address", "2.2.2.2")))
    subs += [
        hub.subscribe("pub", "v", json.dumps({"v": i}), None, "sse", owner=("user", "u")) for i in range(2, 5)
    ]
    assert hub.status()["watchers"] == 1 and hub.status()["streams"][0]["bindings"] == 4
    with pytest.raises(Exception) as info:
        hub.subscribe("pub", "v", '{"v": 9}', None, "sse", owner=("user", "other"))
    assert info.value.status == 429 and "STREAM_MAX_BINDINGS" in info.value.message
    with pytest.raises(Exception) as info:
        hub.subscribe("pub", "all", None, None, "sse", owner=("user", "other"))
    assert info.value.status == 429 and "STREAM_MAX_WATCHERS" in info.value.message
    with pytest.raises(Exception) as info:
        hub.subscribe("pub", "v", '{"v": 1}', None, "sse", owner=("user", "u"))
    assert "STREAM_MAX_PER_USER" in info.value.message
    for sub in subs:
        sub.close()
        sub.close()  # a second close changes nothing
    assert hub.open_by_owner == {}
    hub.subscribe("pub", "v", '{"v": 1}', None, "sse", owner=("address", "1.1.1.1")).close()


def test_limits_answer_429_over_http(client, anon, app, pub):
    app.extensions["changefeed.hub"].max_per_address = 1
    app.extensions["changefeed.hub"].open_by_owner[("address", "127.0.0.1")] = 1
    r = anon.get("/pub/_streams/all", headers=SSE)
    assert "STREAM_MAX_PER_ADDRESS" in assert_error(r, 429)


def test_a_resume_from_far_back_yields_between_batches(data_dir):
    """Catch-up from the engine goes out in batches, and other greenlets run between them."""
    import gevent

    from app import create_app

    app = create_app({"DATA_DIR": data_dir, "STREAM_REPLAY_BUFFER": 0})
    engine, hub = app.extensions["changefeed.engine"], app.extensions["changefeed.hub"]
    try:
        engine.put_collection("far", {"streams": [{"uri": "all", "stages": []}]})
        start = engine.current_token()
        for i in range(12):
            engine.insert_documents("far", [{"i": i * 100 + j} for j in range(100)])
        engine.tail_once()
        sub = hub.subscribe("far", "all", None, start, "sse")
        ticks = [0]

        def ticker():
            while True:
                gevent.sleep(0)
                ticks[0] += 1

        other = gevent.spawn(ticker)
        gevent.sleep(0)
        batches, seen, between = 0, 0, []
        for batch in sub.catch_up():
            before = ticks[0]
            batches += 1
            seen += len(batch)
            between.append(before)
            if seen >= 1200:
                break
        other.kill()
        sub.close()
        assert seen == 1200 and batches >= 3  # 500 events per batch at most
        # the ticker ran between every two batches: the catch-up never held the loop throughout
        assert all(b > a for a, b in itertools.pairwise(between))
    finally:
        hub.close_all()
        engine.close()


def test_checks_in_progress_count_against_the_throttle():
    from services.errors import TooManyRequests

    throttle = FailureThrottle(3, 60, max_checks_per_address=10, max_checks=100)
    key = ("1.1.1.1", "alice")
    with throttle.checking(key), throttle.checking(key), throttle.checking(key):
        with pytest.raises(TooManyRequests):  # three in flight may all fail: no fourth
            with throttle.checking(key):
                pass
        assert throttle.retry_after(key) == 1.0
        with throttle.checking(("1.1.1.1", "bob")):  # another user is unaffected
            pass
    assert throttle.retry_after(key) is None  # all succeeded (nothing recorded)


def test_password_checks_are_bounded_per_address_and_in_all():
    from services.errors import TooManyRequests

    throttle = FailureThrottle(10, 60, max_checks_per_address=2, max_checks=3)
    with throttle.checking(("a", "u1")), throttle.checking(("a", "u2")):
        with pytest.raises(TooManyRequests):
            with throttle.checking(("a", "u3")):
                pass
        with throttle.checking(("b", "u1")):
            with pytest.raises(TooManyRequests):
                with throttle.checking(("c", "u1")):
                    pass
    with throttle.checking(("a", "u3")):
        pass


@pytest.mark.parametrize(
    "keys, status",
    [
        ({"arr.$": 1}, 400),
        ({"arr.0": 1}, 400),
        ({"arr": 1, "arr.0": 1}, 400),
        ({"text": 1, "text.a": 1}, 400),
        ({"_id": 1}, 200),
        ({"arr.x": 1}, 200),
    ],
)
def test_keys_projections_never_500(client, keys, status):
    client.put("/things", json={})
    client.post("/things", json={"_id": "t", "arr": [1, {"x": 2}], "text": "a"})
    r = client.get("/things", query_string={"keys": json.dumps(keys)})
    assert r.status_code == status, r.get_data(as_text=True)
    if keys == {"_id": 1}:
        assert r.get_json() == [{"_id": "t"}]


def test_the_same_credentials_arriving_together_cost_one_bcrypt_check(client, anon, app, monkeypatch):
    """After a restart nothing is remembered: twenty clients reconnecting at once with the
    same Basic credentials share one check instead of each needing one (and most getting
    the per-address throttle's 429). A wrong password arriving with them still fails."""
    import gevent

    import services.auth as auth

    client.post("/users", json={"_id": "alice", "password": "right", "roles": []})
    app.extensions["changefeed.users"]._verified.clear()  # as after a restart
    real, calls = auth._checkpw, []

    def slow_check(*args):
        calls.append(args[0])
        gevent.sleep(0.2)  # bcrypt's time, during which the others arrive
        return real(*args)

    monkeypatch.setattr("services.auth._checkpw", slow_check)
    requests = [gevent.spawn(anon.get, "/", headers=basic("alice", "right")) for _ in range(20)]
    wrong = gevent.spawn(anon.get, "/", headers=basic("alice", "wrong"))
    gevent.joinall([*requests, wrong], timeout=10)
    assert [g.value.status_code for g in requests] == [403] * 20  # authenticated; no rule allows /
    assert wrong.value.status_code == 401
    assert sorted(calls) == [b"right", b"wrong"]
