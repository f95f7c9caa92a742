"""Access control in-process: ACL writes, the 401/403/200 decision, tokens, CORS.

Everything here runs through Flask's test client; the same rules over real sockets
(streams, revocation, expiry, raw-path tricks, the access log) are in test_live_security.py.
"""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import quote

import jwt
import pytest

ERROR_KEYS = ["http status code", "http status description", "message"]
SSE = {"Accept": "text/event-stream"}
WS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
}
STREAMS = {"streams": [{"uri": "all", "stages": []}, {"uri": "secret", "stages": []}]}
CHALLENGE = 'Basic realm="changefeed"'
NOT_NORMAL = "the request path is not in normal form (encoded '/', '..', '//' or control characters)"
QUERY_TOKEN = (
    "access_token in the query string is accepted on stream URLs only; send 'Authorization: Bearer <token>'"
)
ANON_401 = (
    "authentication required: send credentials, or ask for an ACL rule for $unauthenticated on this URL"
)
DESCRIPTIONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch):
    """bcrypt at cost 4 here (12 in production): the rules under test do not depend on the cost."""
    monkeypatch.setattr("services.auth.BCRYPT_ROUNDS", 4)


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_error(r, status: int, message: str | None = None) -> str:
    """RESTHeart's error body with exactly this status; returns the message."""
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True))
    body = r.get_json()
    assert list(body) == ERROR_KEYS
    assert body["http status code"] == status
    assert body["http status description"] == DESCRIPTIONS[status]
    if message is not None:
        assert body["message"] == message
    return body["message"]


def forbidden(user: str, method: str, path: str) -> str:
    return f"user '{user}' is not permitted to {method} {path}"


def acl_docs(client) -> list:
    r = client.get("/acl")
    assert r.status_code == 200
    return r.get_json()


def signing_key(app) -> bytes:
    return app.extensions["changefeed.tokens"].key


def get_token(anon, user="admin", password="secret") -> str:
    r = anon.post("/token", headers=basic(user, password))
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()["access_token"]


@pytest.fixture
def reader(client):
    """A user with role `reader` and no permission yet."""
    r = client.post("/users", json={"_id": "reader", "password": "pw-reader", "roles": ["reader"]})
    assert r.status_code == 201
    return basic("reader", "pw-reader")


@pytest.fixture
def messages(client):
    assert client.put("/messages", json=STREAMS).status_code == 201
    return "/messages"


RULE = {
    "_id": "readerReads",
    "predicate": "path-prefix(/messages) and method(GET)",
    "priority": 1,
    "roles": ["reader"],
}
TUTORIAL_RULE = {
    "_id": "unauthenticatedCanConnectToMessagesStream",
    "predicate": "path-prefix(/messages/_streams/all)",
    "priority": 0,
    "roles": ["$unauthenticated"],
}


# ----------------------------------------------------------------------------- ACL documents


def test_acl_post_valid_document_is_stored_and_used(client):
    r = client.post("/acl", json=TUTORIAL_RULE)
    assert r.status_code == 201
    assert r.get_json() == {"_id": TUTORIAL_RULE["_id"]}
    assert r.headers["Location"] == f"/acl/{TUTORIAL_RULE['_id']}"
    stored = client.get(f"/acl/{TUTORIAL_RULE['_id']}").get_json()
    assert {k: v for k, v in stored.items() if k != "_etag"} == TUTORIAL_RULE


BAD_ACL = [
    ({"_id": "a", "predicate": "path(/x)"}, "roles: missing (a non-empty array of role names is required)"),
    ({"_id": "a", "predicate": "path(/x)", "roles": []}, "roles: must be a non-empty array of strings"),
    ({"_id": "a", "predicate": "path(/x)", "roles": "reader"}, "roles: must be a non-empty array of strings"),
    ({"_id": "a", "predicate": "path(/x)", "roles": [""]}, "roles: every role must be a non-empty string"),
    ({"_id": "a", "predicate": "path(/x)", "roles": [5]}, "roles: every role must be a non-empty string"),
    ({"_id": "a", "roles": ["r"]}, "predicate: missing"),
    ({"_id": "a", "predicate": 5, "roles": ["r"]}, "predicate: must be a string"),
    (
        {"_id": "a", "predicate": "path-prefix(/a", "roles": ["r"]},
        "predicate: unexpected end of input, expected ',' or ')' at 14",
    ),
    ({"_id": "a", "predicate": "path(/x)", "roles": ["r"], "priority": "1"}, "priority: must be a number"),
    ({"_id": "a", "predicate": "path(/x)", "roles": ["r"], "priority": True}, "priority: must be a number"),
    ({"_id": "a", "predicate": "path(/x)", "roles": ["r"], "priority": None}, "priority: must be a number"),
    (
        {"_id": "a", "predicate": "path(/x)", "roles": ["r"], "mongo": {"nope": 1}},
        "mongo: unknown key 'nope'; the supported keys are allowManagementRequests, allowBulkPatch, "
        "allowBulkDelete, allowWriteMode, readFilter, writeFilter, mergeRequest, projectResponse",
    ),
    ({"_id": "a", "predicate": "path(/x)", "roles": ["r"], "mongo": []}, "mongo: must be an object"),
]


@pytest.mark.parametrize("doc,fault", BAD_ACL)
def test_acl_post_invalid_is_400_naming_the_fault(client, doc, fault):
    assert_error(client.post("/acl", json=doc), 400, f"invalid ACL document: {fault}")
    assert acl_docs(client) == []


@pytest.mark.parametrize(
    "predicate,where",
    [
        ("nosuchfn(/x)", "predicate: "),
        ("path(/x) and", "predicate: "),
        ("path(/x) or or path(/y)", "predicate: "),
        ("(path(/x)", "predicate: "),
        ("method(GET) path(/x)", "predicate: "),
        ("", "predicate: "),
    ],
)
def test_acl_unparsable_predicates_are_400(client, predicate, where):
    msg = assert_error(client.post("/acl", json={"_id": "p", "predicate": predicate, "roles": ["r"]}), 400)
    assert msg.startswith("invalid ACL document: " + where)
    assert acl_docs(client) == []


def test_acl_put_patch_delete_validate_the_result(client):
    good = {"predicate": "path(/x)", "roles": ["r"], "priority": 1}
    # PUT, every write mode
    assert_error(
        client.put("/acl/a", json={**good, "roles": []}),
        400,
        "invalid ACL document: roles: must be a non-empty array of strings",
    )
    assert_error(
        client.put("/acl/a?wm=upsert", json={**good, "priority": "x"}),
        400,
        "invalid ACL document: priority: must be a number",
    )
    assert_error(client.put("/acl/a?wm=insert", json={**good, "predicate": "path(/x"}), 400)
    assert acl_docs(client) == []
    assert client.put("/acl/a?wm=upsert", json=good).status_code == 201
    assert client.put("/acl/a", json={**good, "priority": 2}).status_code == 200

    # PATCH: the document after the update is what is checked
    for body, fault in [
        ({"roles": []}, "roles: must be a non-empty array of strings"),
        ({"$unset": {"roles": 1}}, "roles: missing (a non-empty array of role names is required)"),
        ({"$pull": {"roles": "r"}}, "roles: must be a non-empty array of strings"),
        ({"priority": "high"}, "priority: must be a number"),
        ({"$unset": {"predicate": 1}}, "predicate: missing"),
        ({"predicate": "path(/x) and"}, None),
        ({"$rename": {"roles": "who"}}, "roles: missing (a non-empty array of role names is required)"),
    ]:
        msg = assert_error(client.patch("/acl/a", json=body), 400)
        if fault:
            assert msg == f"invalid ACL document: {fault}", body
        else:
            assert msg.startswith("invalid ACL document: predicate: "), msg
    stored = client.get("/acl/a").get_json()
    assert {k: v for k, v in stored.items() if k != "_etag"} == {"_id": "a", **good, "priority": 2}

    # a PATCH that yields a valid document is written
    r = client.patch("/acl/a", json={"$push": {"roles": "s"}, "priority": 5})
    assert r.status_code == 200
    stored = client.get("/acl/a").get_json()
    assert stored["roles"] == ["r", "s"] and stored["priority"] == 5
    # upsert by PATCH: the inserted document is validated too
    assert_error(
        client.patch("/acl/b?wm=upsert", json={"predicate": "path(/y)"}),
        400,
        "invalid ACL document: roles: missing (a non-empty array of role names is required)",
    )
    assert client.patch("/acl/b?wm=upsert", json={"predicate": "path(/y)", "roles": ["r"]}).status_code == 201
    assert_error(
        client.patch("/acl/nope", json={"priority": 1}),
        404,
        "Document 'nope' does not exist in collection 'acl'",
    )
    # bulk POST: one bad document refuses the whole batch
    r = client.post("/acl", json=[{"_id": "c", **good}, {"_id": "d", **good, "roles": []}])
    assert_error(r, 400, "invalid ACL document: roles: must be a non-empty array of strings")
    assert sorted(d["_id"] for d in acl_docs(client)) == ["a", "b"]
    assert client.delete("/acl/a").status_code == 204
    assert client.delete("/acl/b").status_code == 204
    assert acl_docs(client) == []
    # the collection itself cannot be dropped (rules would outlive it in the cache and streams)
    etag = client.get("/acl/_meta").headers["ETag"]
    assert_error(
        client.delete("/acl", headers={"If-Match": etag}),
        400,
        "the 'acl' collection holds security data and cannot be dropped",
    )


# ----------------------------------------------------------------------------- the decision


def test_rest_decision_401_403_200(client, anon, reader, messages):
    client.post("/messages", json={"_id": "m1", "text": "hi"})
    # anonymous: 401 with the Basic challenge, or without it when asked
    r = anon.get("/messages")
    assert_error(r, 401, ANON_401)
    assert r.headers["WWW-Authenticate"] == CHALLENGE
    r = anon.get("/messages", headers={"No-Auth-Challenge": "true"})
    assert_error(r, 401, ANON_401)
    assert "WWW-Authenticate" not in r.headers
    # wrong password: 401
    r = anon.get("/messages", headers=basic("reader", "nope"))
    assert_error(r, 401, "wrong username or password")
    assert r.headers["WWW-Authenticate"] == CHALLENGE
    r = anon.get("/messages", headers=basic("ghost", "pw"))
    assert_error(r, 401, "wrong username or password")
    # authenticated, no rule: 403 without a challenge
    r = anon.get("/messages", headers=reader)
    assert_error(r, 403, forbidden("reader", "GET", "/messages"))
    assert "WWW-Authenticate" not in r.headers
    # admin passes
    r = anon.get("/messages", headers=basic("admin", "secret"))
    assert r.status_code == 200 and r.get_json()[0]["_id"] == "m1"


def test_method_rule_lets_reader_get_but_not_write(client, anon, reader, messages):
    assert client.post("/acl", json=RULE).status_code == 201
    assert anon.get("/messages", headers=reader).status_code == 200
    assert anon.get("/messages/_meta", headers=reader).status_code == 200
    assert_error(
        anon.post("/messages", json={"x": 1}, headers=reader), 403, forbidden("reader", "POST", "/messages")
    )
    assert_error(
        anon.put("/messages/x", json={"x": 1}, headers=reader), 403, forbidden("reader", "PUT", "/messages/x")
    )
    assert_error(anon.delete("/messages", headers=reader), 403, forbidden("reader", "DELETE", "/messages"))
    # segment-aware prefix: /messagesX is another collection
    assert_error(anon.get("/messagesX", headers=reader), 403, forbidden("reader", "GET", "/messagesX"))
    assert_error(anon.get("/acl", headers=reader), 403, forbidden("reader", "GET", "/acl"))
    assert_error(anon.get("/users", headers=reader), 403, forbidden("reader", "GET", "/users"))
    # the rule is not the anonymous caller's
    assert_error(anon.get("/messages"), 401, ANON_401)
    assert client.get("/messages").status_code == 200


def test_acl_changes_apply_to_the_next_request(client, anon, reader, messages):
    assert_error(anon.get("/messages", headers=reader), 403)
    assert client.post("/acl", json=RULE).status_code == 201
    assert anon.get("/messages", headers=reader).status_code == 200
    # narrowing the rule by PATCH takes effect at once
    assert client.patch("/acl/readerReads", json={"predicate": "path-prefix(/other)"}).status_code == 200
    assert_error(anon.get("/messages", headers=reader), 403, forbidden("reader", "GET", "/messages"))
    assert client.patch("/acl/readerReads", json={"predicate": RULE["predicate"]}).status_code == 200
    assert anon.get("/messages", headers=reader).status_code == 200
    # a role change on the user takes effect at once too
    assert client.patch("/users/reader", json={"roles": []}).status_code == 200
    assert_error(anon.get("/messages", headers=reader), 403)
    assert client.patch("/users/reader", json={"roles": ["reader"]}).status_code == 200
    assert anon.get("/messages", headers=reader).status_code == 200
    # deleting the rule: the very next request is refused
    assert client.delete("/acl/readerReads").status_code == 204
    assert_error(anon.get("/messages", headers=reader), 403, forbidden("reader", "GET", "/messages"))


def test_wrong_credentials_401_even_where_anonymous_is_allowed(client, anon, messages):
    assert (
        client.post(
            "/acl",
            json={"_id": "anonReads", "predicate": "path-prefix(/messages)", "roles": ["$unauthenticated"]},
        ).status_code
        == 201
    )
    assert anon.get("/messages").status_code == 200
    for headers in (
        basic("admin", "wrong"),
        basic("ghost", "x"),
        bearer("not.a.token"),
        {"Authorization": "Basic !!!"},
        {"Authorization": "Digest x"},
    ):
        r = anon.get("/messages", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["WWW-Authenticate"] == CHALLENGE
        r = anon.get("/messages/_streams/all", headers={**headers, **SSE})
        assert r.status_code == 401, headers
        r = anon.get("/messages/_streams/all", headers={**headers, **WS})
        assert r.status_code == 401, headers
    # the anonymous rule is for anonymous callers: an authenticated user without it is 403
    client.post("/users", json={"_id": "norole", "password": "pw", "roles": []})
    assert_error(
        anon.get("/messages", headers=basic("norole", "pw")), 403, forbidden("norole", "GET", "/messages")
    )


def test_stream_handshakes_are_decided_before_the_stream(client, anon, reader, messages):
    for extra in (SSE, WS):
        r = anon.get("/messages/_streams/all", headers=extra)
        assert_error(r, 401, ANON_401)
        assert r.headers["WWW-Authenticate"] == CHALLENGE
        r = anon.get("/messages/_streams/all", headers={**extra, "No-Auth-Challenge": "1"})
        assert_error(r, 401)
        assert "WWW-Authenticate" not in r.headers
        assert_error(
            anon.get("/messages/_streams/all", headers={**extra, **basic("reader", "bad")}),
            401,
            "wrong username or password",
        )
        assert_error(
            anon.get("/messages/_streams/all", headers={**extra, **reader}),
            403,
            forbidden("reader", "GET", "/messages/_streams/all"),
        )
    # the reader's GET rule covers the stream: the WebSocket handshake gets past the ACL
    # (and only then fails: the test client cannot upgrade)
    client.post("/acl", json=RULE)
    r = anon.get("/messages/_streams/all", headers={**WS, **reader})
    assert_error(r, 400, "this server cannot upgrade to WebSocket here (run it with gunicorn.conf.py)")


def test_options_preflight_passes_without_credentials(anon, messages):
    for path in ("/messages", "/messages/_streams/secret", "/acl", "/users/admin"):
        r = anon.open(path, method="OPTIONS")
        assert r.status_code == 204, path
        assert r.get_data() == b""
        assert r.headers["Allow"] == "GET, POST, PUT, PATCH, DELETE, OPTIONS"


def test_tutorial_rule_opens_one_stream_only(client, anon, messages):
    assert client.post("/acl", json=TUTORIAL_RULE).status_code == 201
    for path in (
        "/messages",
        "/messages/_streams/secret",
        "/messages/_streams",
        "/messages/_streams/allx",
        "/messages/_meta",
        "/acl",
        "/users",
    ):
        assert_error(anon.get(path, headers=SSE), 401, ANON_401)
    assert_error(anon.post("/messages", json={"x": 1}), 401)
    assert_error(anon.get("/messages/_streams/secret", headers=WS), 401)
    # '_streams%2fsecret' is the document '_streams/secret', which no rule opens
    assert_error(anon.get("/messages/_streams%2fsecret", headers=SSE), 401, ANON_401)
    for path in (
        "/messages/_streams/all/../secret",
        "/messages//_streams/secret",
        "/messages/%2e%2e/acl",
        "/messages/_streams/all/%2e%2e/secret",
        "/messages/_streams/./secret",
    ):
        assert_error(anon.get(path, headers=SSE), 400, NOT_NORMAL)
    # the public stream itself is past the ACL: a plain GET gets the stream's own 400
    assert_error(
        anon.get("/messages/_streams/all"),
        400,
        "Change Stream requires WebSocket or SSE: send either 'Upgrade: websocket' "
        "or 'Accept: text/event-stream'",
    )


def test_avars_cannot_bind_user_variables(client, anon, messages):
    client.put(
        "/messages",
        json={
            "streams": [
                {"uri": "mine", "stages": [{"_$match": {"fullDocument::owner": {"_$var": "@user._id"}}}]}
            ]
        },
    )
    for avars in ({"@user._id": "admin"}, {"@user": {"_id": "admin"}}, {"@request": 1}):
        r = client.get("/messages/_streams/mine?avars=" + quote(json.dumps(avars)), headers=SSE)
        msg = assert_error(r, 400)
        assert "variable names starting with '@' are reserved" in msg
        assert next(iter(avars)) in msg


# ----------------------------------------------------------------------------- readFilter


def test_read_filter_limits_rest_reads_to_own_documents(client, anon, reader, messages):
    client.post(
        "/acl",
        json={
            "_id": "own",
            "predicate": "path-prefix(/messages)",
            "roles": ["reader"],
            "mongo": {"readFilter": {"owner": "@user._id"}},
        },
    )
    client.post(
        "/messages",
        json=[
            {"_id": "r1", "owner": "reader"},
            {"_id": "a1", "owner": "admin"},
            {"_id": "n1"},
            {"_id": "r2", "owner": "reader"},
        ],
    )
    r = anon.get("/messages", headers=reader)
    assert r.status_code == 200
    assert [d["_id"] for d in r.get_json()] == ["r2", "r1"]
    # the caller's own filter cannot widen it
    for flt in ({"owner": "admin"}, {"$or": [{"owner": "admin"}, {"owner": {"$exists": True}}]}):
        r = anon.get("/messages?filter=" + quote(json.dumps(flt)), headers=reader)
        assert r.status_code == 200
        assert all(d["owner"] == "reader" for d in r.get_json())
    # a document the filter hides is not readable by its id either
    assert anon.get("/messages/r1", headers=reader).status_code == 200
    assert_error(
        anon.get("/messages/a1", headers=reader), 404, "Document 'a1' does not exist in collection 'messages'"
    )
    assert_error(
        anon.get("/messages/n1", headers=reader), 404, "Document 'n1' does not exist in collection 'messages'"
    )
    assert client.get("/messages/a1").status_code == 200
    assert [d["_id"] for d in client.get("/messages").get_json()] == ["r2", "r1", "n1", "a1"]


# ----------------------------------------------------------------------------- tokens


def test_token_issue_and_bearer(app, client, anon, reader, messages):
    r = anon.post("/token", headers=basic("reader", "pw-reader"))
    assert r.status_code == 200
    body = r.get_json()
    assert list(body) == ["access_token", "token_type", "expires_in"]
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    claims = jwt.decode(body["access_token"], signing_key(app), algorithms=["HS256"])
    assert claims["sub"] == "reader"
    assert claims["exp"] - claims["iat"] in (900, 901)
    assert "password" not in claims and "roles" not in claims
    assert "$2b$" not in json.dumps(claims)
    token = body["access_token"]
    # the token carries the user's own rights, no more
    assert_error(anon.get("/messages", headers=bearer(token)), 403, forbidden("reader", "GET", "/messages"))
    client.post("/acl", json=RULE)
    assert anon.get("/messages", headers=bearer(token)).status_code == 200
    assert anon.get("/messages", headers={"Authorization": f"bearer   {token}"}).status_code == 200
    assert_error(anon.post("/messages", json={}, headers=bearer(token)), 403)
    # on a stream the bearer token gets past the ACL (and the test client's missing upgrade is next)
    assert_error(anon.get("/messages/_streams/all", headers={**WS, **bearer(token)}), 400)
    # POST /token needs credentials
    r = anon.post("/token")
    assert_error(r, 401, "authentication required: send Basic credentials")
    assert r.headers["WWW-Authenticate"] == CHALLENGE
    assert_error(anon.post("/token", headers=basic("reader", "wrong")), 401, "wrong username or password")
    assert_error(anon.post("/token/cookie"), 401)


def test_query_token_only_on_stream_urls(client, anon, messages):
    token = get_token(anon)
    for path in ("/messages", "/messages/_meta", "/", "/acl", "/token", "/messages/_streams"):
        assert_error(anon.get(f"{path}?access_token={token}"), 400, QUERY_TOKEN)
    assert_error(anon.post(f"/messages?access_token={token}", json={}), 400, QUERY_TOKEN)
    # even with valid Basic credentials alongside: the token must not sit in URLs
    assert_error(client.get(f"/messages?access_token={token}"), 400, QUERY_TOKEN)
    # on a stream URL it is a credential: past the ACL, to the stream's own checks
    assert_error(
        anon.get(f"/messages/_streams/all?access_token={token}", headers=WS),
        400,
        "this server cannot upgrade to WebSocket here (run it with gunicorn.conf.py)",
    )
    assert_error(anon.get("/messages/_streams/all?access_token=garbage", headers=SSE), 401)
    assert_error(anon.get("/messages/_streams/all?access_token=", headers=SSE), 401)


def test_cookie_is_httponly_samesite_and_for_streams_only(app, anon, messages):
    r = anon.post("/token/cookie", headers=basic("admin", "secret"))
    assert r.status_code == 200
    assert r.get_json() == {"token_type": "cookie", "expires_in": 900}
    cookie = r.headers["Set-Cookie"]
    name_value, *attrs = [p.strip() for p in cookie.split(";")]
    name, _, value = name_value.partition("=")
    assert name == "changefeed_token"
    assert jwt.decode(value, signing_key(app), algorithms=["HS256"])["sub"] == "admin"
    assert "HttpOnly" in attrs and "SameSite=Strict" in attrs and "Path=/" in attrs
    assert "Max-Age=900" in attrs
    # the test client now holds the cookie: a stream accepts it, a REST URL does not
    assert anon.get_cookie("changefeed_token").value == value
    assert_error(
        anon.get("/messages/_streams/all", headers=WS),
        400,
        "this server cannot upgrade to WebSocket here (run it with gunicorn.conf.py)",
    )
    r = anon.get("/messages")
    assert_error(r, 401, ANON_401)
    assert_error(anon.post("/messages", json={"x": 1}), 401)
    assert_error(anon.delete("/messages"), 401)
    # DELETE /token/cookie clears it (and needs credentials)
    r = anon.delete("/token/cookie", headers=basic("admin", "secret"))
    assert r.status_code == 200
    assert "changefeed_token=;" in r.headers["Set-Cookie"]
    assert_error(anon.get("/messages/_streams/all", headers=WS), 401)


def _sign(claims: dict, key, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


def test_forged_expired_malformed_and_none_tokens_401(app, anon, messages):
    key = signing_key(app)
    stored = app.extensions["changefeed.engine"].get_document("users", "admin")
    from services.tokens import password_fingerprint

    now = int(time.time())
    good = {"sub": "admin", "iat": now, "exp": now + 60, "jti": "x", "pwf": password_fingerprint(stored)}
    assert anon.get("/messages", headers=bearer(_sign(good, key))).status_code == 200  # the control

    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(json.dumps(good).encode()).rstrip(b"=").decode()
    cases = {
        "the token's signature is not valid": _sign(good, "another-secret-of-32-bytes-length!"),
        "the token has expired": _sign({**good, "iat": now - 120, "exp": now - 60}, key),
        "the token was revoked by a password change": _sign({**good, "pwf": "0" * 16}, key),
        "the token's user no longer exists": _sign({**good, "sub": "ghost"}, key),
    }
    for message, token in cases.items():
        for path, extra in (
            ("/messages", {}),
            ("/messages/_streams/all", SSE),
            ("/messages/_streams/all", WS),
        ):
            r = anon.get(path, headers={**extra, **bearer(token)})
            assert_error(r, 401, message)
            assert r.headers["WWW-Authenticate"] == CHALLENGE
        assert_error(anon.get(f"/messages/_streams/all?access_token={token}", headers=SSE), 401, message)
    for token in (
        f"{header}.{payload}.",
        f"{header}.{payload}",
        "abc",
        "a.b.c",
        "....",
        _sign({k: v for k, v in good.items() if k != "pwf"}, key),
        _sign({k: v for k, v in good.items() if k != "exp"}, key),
        _sign({**good, "sub": 5}, key),
        _sign(good, key, "HS512"),
    ):
        msg = assert_error(anon.get("/messages", headers=bearer(token)), 401)
        assert msg.startswith("the token is not valid") or msg == "the token's signature is not valid", msg
        assert_error(anon.get(f"/messages/_streams/all?access_token={token}", headers=SSE), 401)


def test_token_dies_with_password_change_or_user_deletion(client, anon, messages):
    client.post("/users", json={"_id": "eve", "password": "one", "roles": ["admin"]})
    token = get_token(anon, "eve", "one")
    assert anon.get("/messages", headers=bearer(token)).status_code == 200
    # a change to something else (roles) does not revoke it
    assert client.patch("/users/eve", json={"tag": 1}).status_code == 200
    assert anon.get("/messages", headers=bearer(token)).status_code == 200
    assert client.patch("/users/eve", json={"password": "two"}).status_code == 200
    assert_error(
        anon.get("/messages", headers=bearer(token)), 401, "the token was revoked by a password change"
    )
    assert_error(anon.get(f"/messages/_streams/all?access_token={token}", headers=SSE), 401)
    # changing it back to the same text gives a new hash: the old token stays dead
    assert client.patch("/users/eve", json={"password": "one"}).status_code == 200
    assert_error(anon.get("/messages", headers=bearer(token)), 401)
    token2 = get_token(anon, "eve", "one")
    assert anon.get("/messages", headers=bearer(token2)).status_code == 200
    assert client.delete("/users/eve").status_code == 204
    assert_error(anon.get("/messages", headers=bearer(token2)), 401, "the token's user no longer exists")
    # a user of the same name created later does not inherit the token
    client.post("/users", json={"_id": "eve", "password": "one", "roles": ["admin"]})
    assert_error(anon.get("/messages", headers=bearer(token2)), 401)


def test_jwt_secret_setting_is_the_signing_key(tmp_path):
    from app import create_app

    apps = [
        create_app({"DATA_DIR": str(tmp_path / name), "JWT_SECRET": "shared-secret-for-tests-0123456789"})
        for name in ("a", "b")
    ]
    try:
        token = get_token(apps[0].test_client())
        assert jwt.decode(token, "shared-secret-for-tests-0123456789", algorithms=["HS256"])["sub"] == "admin"
        # the other data dir has another admin (another hash): the token names a fingerprint it lacks
        r = apps[1].test_client().get("/acl", headers=bearer(token))
        assert r.status_code == 401
        assert r.get_json()["message"] == "the token was revoked by a password change"
    finally:
        for a in apps:
            a.extensions["changefeed.hub"].close_all()
            a.extensions["changefeed.engine"].close()


def test_generated_key_is_kept_in_the_data_dir(app, data_dir):
    import os

    from app import create_app

    path = os.path.join(data_dir, "jwt.key")
    assert os.stat(path).st_mode & 0o777 == 0o600
    with open(path, "rb") as f:
        assert f.read().strip() == signing_key(app)
    token = get_token(app.test_client())
    again = create_app({"DATA_DIR": data_dir})  # a second worker, or a restart
    try:
        assert signing_key(again) == signing_key(app)
        assert again.test_client().get("/acl", headers=bearer(token)).status_code == 200
    finally:
        again.extensions["changefeed.hub"].close_all()


# ----------------------------------------------------------------------------- CORS


@pytest.fixture
def cors_app(tmp_path):
    from app import create_app

    app = create_app({"DATA_DIR": str(tmp_path / "cors"), "CORS_ORIGINS": "http://app.example"})
    app.testing = True
    yield app
    app.extensions["changefeed.hub"].close_all()
    app.extensions["changefeed.engine"].close()


def test_cors_preflight_and_headers_for_listed_origin_only(cors_app):
    c = cors_app.test_client()
    pre = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "last-event-id, authorization",
    }
    r = c.open("/messages/_streams/all", method="OPTIONS", headers={**pre, "Origin": "http://app.example"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert r.headers["Access-Control-Allow-Credentials"] == "true"
    allowed = [h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")]
    assert {"last-event-id", "authorization", "content-type"} <= set(allowed)
    assert "GET" in r.headers["Access-Control-Allow-Methods"]
    assert "Origin" in r.headers["Vary"]

    for other in ("http://evil.example", "http://app.example.evil.com", "https://app.example", "null"):
        r = c.open("/messages/_streams/all", method="OPTIONS", headers={**pre, "Origin": other})
        assert r.status_code == 204
        for h in (
            "Access-Control-Allow-Origin",
            "Access-Control-Allow-Credentials",
            "Access-Control-Allow-Headers",
        ):
            assert h not in r.headers, (other, h)

    # actual responses (the 401 of an SSE request included) carry the headers for the listed origin
    admin = basic("admin", "secret")
    c.put("/messages", json=STREAMS, headers=admin)
    r = c.get("/messages", headers={**admin, "Origin": "http://app.example"})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert r.headers["Access-Control-Allow-Credentials"] == "true"
    r = c.get("/messages/_streams/all", headers={**SSE, "Origin": "http://app.example"})
    assert r.status_code == 401
    assert r.headers["Access-Control-Allow-Origin"] == "http://app.example"
    r = c.get("/messages", headers={**admin, "Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    assert "Access-Control-Allow-Credentials" not in r.headers


def test_cors_default_is_no_origin(app, anon):
    r = anon.open(
        "/messages",
        method="OPTIONS",
        headers={"Origin": "http://app.example", "Access-Control-Request-Method": "GET"},
    )
    assert r.status_code == 204
    assert "Access-Control-Allow-Origin" not in r.headers


def test_cors_star_never_grants_credentials(tmp_path):
    from app import create_app

    app = create_app({"DATA_DIR": str(tmp_path / "star"), "CORS_ORIGINS": "*"})
    try:
        c = app.test_client()
        r = c.open(
            "/messages",
            method="OPTIONS",
            headers={"Origin": "http://any.example", "Access-Control-Request-Method": "GET"},
        )
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in r.headers
    finally:
        app.extensions["changefeed.hub"].close_all()
        app.extensions["changefeed.engine"].close()


def test_websocket_origin_check(cors_app):
    c = cors_app.test_client()
    admin = basic("admin", "secret")
    c.put("/messages", json=STREAMS, headers=admin)
    for origin in ("http://evil.example", "http://localhost.evil.example", "null"):
        r = c.get("/messages/_streams/all", headers={**WS, **admin, "Origin": origin})
        assert_error(
            r, 403, f"WebSocket connections from origin '{origin}' are not allowed; list it in CORS_ORIGINS"
        )
    # listed and same-origin handshakes get past the check (the test client cannot upgrade)
    for origin in ("http://app.example", "http://localhost"):
        r = c.get("/messages/_streams/all", headers={**WS, **admin, "Origin": origin})
        assert_error(r, 400, "this server cannot upgrade to WebSocket here (run it with gunicorn.conf.py)")


def test_roles_that_are_not_an_array_of_strings_grant_nothing(client, anon, messages, app):
    client.post("/users", json={"_id": "mallory", "password": "pw", "roles": []})
    # every write path validates roles, PATCH included
    for roles in ({"admin": 1}, "admin", [["admin"]], {"0": "admin"}):
        assert_error(
            client.patch("/users/mallory", json={"roles": roles}),
            400,
            "a user's roles must be an array of non-empty strings",
        )
        assert_error(client.patch("/users/mallory", json={"$set": {"roles.0": {"a": 1}}}), 400)
        assert_error(
            anon.get("/messages", headers=basic("mallory", "pw")),
            403,
            forbidden("mallory", "GET", "/messages"),
        )
    # and a document that got a bad shape some other way (an older store) still grants nothing
    app.extensions["changefeed.engine"].update_document("users", "mallory", {"$set": {"roles": {"admin": 1}}})
    assert_error(
        anon.get("/messages", headers=basic("mallory", "pw")), 403, forbidden("mallory", "GET", "/messages")
    )


def test_status_detail_and_sweep_are_for_admins_even_where_a_rule_allows_status(client, anon, reader):
    """`/_status?detail=1` walks every object and `?sweep=1` runs a full collection (a pause
    of the whole worker under load): a rule that lets a role read /_status does not let it
    ask for those."""
    rule = {"_id": "status", "predicate": "path-prefix(/_status)", "roles": ["reader"], "priority": 1}
    assert client.post("/acl", json=rule).status_code == 201
    assert anon.get("/_status", headers=reader).status_code == 200
    for query in ("detail=1", "sweep=1"):
        assert_error(anon.get(f"/_status?{query}", headers=reader), 403)
        assert client.get(f"/_status?{query}").status_code == 200
    # a value that is neither 1 nor 0 is refused, not read as "no"
    for query, message in (
        ("detail=2", "detail must be 1 or 0, found 2"),
        ("sweep=yes", "sweep must be 1 or 0, found yes"),
        ("detail=1&detail=0", "detail must be given once"),
    ):
        assert_error(client.get(f"/_status?{query}"), 400, message)
