"""Access control over real sockets against gunicorn: step 6 of RESTHeart's tutorial (the ACL rule),
401/403 on every transport, revocation and token expiry mid-stream, tokens, CORS,
streams that must not leak, and hostile raw requests no client library would send.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time

import jwt
import pytest
import requests
import websocket

from .conftest import ADMIN
from .sseclient import SSEClient
from .test_live_streams import _ws_close_code, open_sse, open_ws, post, put_streams, wait_for, ws_url

pytestmark = pytest.mark.live

STREAMS = {
    "streams": [
        {
            "uri": "all",
            "stages": [{"_$match": {"_$or": [{"operationType": "insert"}, {"operationType": "update"}]}}],
        },
        {"uri": "secret", "stages": []},
    ]
}
TUTORIAL_RULE = {
    "_id": "unauthenticatedCanConnectToMessagesStream",
    "predicate": "path-prefix(/messages/_streams/all)",
    "priority": 0,
    "roles": ["$unauthenticated"],
}
READER_RULE = {
    "_id": "readerReads",
    "predicate": "path-prefix(/messages) and method(GET)",
    "priority": 1,
    "roles": ["reader"],
}
CHALLENGE = 'Basic realm="changefeed"'
NOT_NORMAL = "the request path is not in normal form (encoded '/', '..', '//' or control characters)"
WS_KEY = base64.b64encode(b"0123456789abcdef").decode()


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def raw(
    port: int, target: str, headers: dict | None = None, method: str = "GET", timeout: float = 5.0
) -> tuple[int, bytes, bytes]:
    """Send a hand-written request line (nothing normalises `target`); return
    (status, head, whatever of the body arrived with it)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def recv() -> bytes:
        try:
            return s.recv(65536)
        except ConnectionResetError:  # the server answered and closed before reading it all
            return b""

    try:
        try:
            s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        except (ConnectionResetError, BrokenPipeError):
            pass
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = recv()
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status not in (101, 200):  # an error body has a Content-Length and the socket closes
            while chunk := recv():
                body += chunk
    finally:
        s.close()
    return status, head, body


def raw_ws(port: int, target: str, headers: dict | None = None) -> tuple[int, bytes, bytes]:
    return raw(
        port,
        target,
        {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": WS_KEY,
            **(headers or {}),
        },
    )


def anon_sse(base: str, path: str, headers: dict | None = None) -> SSEClient:
    """An SSE client with no credentials (open_sse adds the admin's)."""
    c = SSEClient(base + path, headers=headers)
    if c.status == 200:
        first = c.next(5)
        assert first.retry == 3000 and "connected" in first.comments
    return c


def sse_status(base: str, path: str, headers: dict | None = None) -> tuple[int, dict, dict]:
    c = SSEClient(base + path, headers=headers)
    try:
        body = json.loads(c.body()) if c.status != 200 else {}
        return c.status, c.headers, body
    finally:
        c.close()


def ws_status(base: str, path: str, headers: list | None = None) -> int:
    """101 (then closed) or the HTTP status of the refused handshake."""
    try:
        ws = websocket.create_connection(ws_url(base, path), header=headers or [], timeout=5)
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code
    ws.close()
    return 101


def make_reader(base: str, roles=("reader",)) -> None:
    r = requests.post(
        f"{base}/users",
        auth=ADMIN,
        json={"_id": "reader", "password": "pw-reader", "roles": list(roles)},
        timeout=10,
    )
    assert r.status_code == 201, r.text


def next_terminal(sse: SSEClient, timeout: float):
    """The next event that is not a heartbeat, within `timeout` seconds overall (heartbeats do
    not extend it): returns (event or None, seconds it took)."""
    t0 = time.time()
    while (left := timeout - (time.time() - t0)) > 0:
        try:
            ev = sse.next(left)
        except TimeoutError:
            break
        if ev is None or ev.event in ("change", "end", "revoked", "expired", "error", "reset"):
            return ev, time.time() - t0
    raise AssertionError(f"no event within {timeout} s")


def ev_of(sse: SSEClient, timeout: float = 5):
    return next_terminal(sse, timeout)[0]


# ----------------------------------------------------------------------------- step 6


def test_tutorial_step6_end_to_end(live):
    base, port = live.url, live.port
    assert put_streams(base, body=STREAMS) == 201
    # before the rule, the public stream is as closed as the rest
    status, headers, body = sse_status(base, "/messages/_streams/all")
    assert status == 401 and headers["WWW-Authenticate"] == CHALLENGE
    r = requests.post(f"{base}/acl", auth=ADMIN, json=TUTORIAL_RULE, timeout=10)
    assert r.status_code == 201 and r.json() == {"_id": TUTORIAL_RULE["_id"]}

    sse = anon_sse(base, "/messages/_streams/all")
    assert sse.status == 200
    assert sse.headers["Content-Type"].startswith("text/event-stream")
    post(base, {"message": "Hello SSE!", "name": "uji"})
    ev = ev_of(sse)
    assert ev.event == "change"
    assert ev.json()["fullDocument"]["message"] == "Hello SSE!"
    # a browser WebSocket without credentials is let in on the same URL
    ws = websocket.create_connection(ws_url(base, "/messages/_streams/all"), timeout=5)
    post(base, {"message": "second"})
    assert ev_of(sse).json()["fullDocument"]["message"] == "second"
    assert json.loads(ws.recv())["fullDocument"]["message"] == "second"
    ws.close()
    sse.close()

    # everything else stays closed to anonymous callers
    status, headers, body = sse_status(base, "/messages/_streams/secret")
    assert status == 401 and headers["WWW-Authenticate"] == CHALLENGE
    assert body["message"].startswith("authentication required")
    assert ws_status(base, "/messages/_streams/secret") == 401
    r = requests.get(f"{base}/messages", timeout=5)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == CHALLENGE
    r = requests.post(f"{base}/messages", json={"x": 1}, timeout=5)
    assert r.status_code == 401
    assert requests.get(f"{base}/messages/_streams", timeout=5).status_code == 401
    assert requests.put(f"{base}/messages", json={"streams": []}, timeout=5).status_code == 401
    assert requests.get(f"{base}/acl", timeout=5).status_code == 401
    assert len(requests.get(f"{base}/messages", auth=ADMIN, timeout=5).json()) == 2  # nothing was written

    # path tricks, sent byte for byte: refused, never the secret stream
    sse_h = {"Accept": "text/event-stream"}
    expected = {
        "/messages/_streams/allx": 401,
        "//messages/_streams/secret": 401,  # a leading '//' is '/' for the ACL and the router alike
        "/Messages/_streams/all": 401,
        "/messages/_streams/all/../secret": 400,
        "/messages/_streams/all/%2e%2e/secret": 400,
        "/messages/_streams/all/%2E%2E/secret": 400,
        "/messages//_streams/secret": 400,
        # the document '_streams/secret' of messages (an id may hold '/'): no rule opens it
        "/messages/_streams%2fsecret": 401,
        "/messages/_streams%2Fsecret": 401,
        "/messages/_streams/all%2f..%2fsecret": 400,
        "/messages/%2e%2e/acl": 400,
        "/messages/_streams/all/..%2fsecret": 400,
        "/messages/_streams/all%5c..%5csecret": 400,
        "/messages/_streams/all/%252e%252e/secret": 400,
        "/messages/_streams/all%00": 400,
        "/messages/_streams/./secret": 400,
        "/./messages/_streams/secret": 400,
    }
    for target, want in expected.items():
        for transport in ("sse", "ws"):
            if transport == "sse":
                status, head, rest = raw(port, target, sse_h)
            else:
                status, head, rest = raw_ws(port, target)
            assert status == want, (target, transport, head)
            if want == 400:
                assert json.loads(rest)["message"] == NOT_NORMAL, (target, rest)
    # the same tricks do not reach the REST API either
    for target, want in (
        ("/messages/_streams/all/../../acl", 400),
        ("/messages/_streams/all/%2e%2e/%2e%2e/users", 400),
        ("//acl", 401),
        ("/messages/..%2f..%2facl", 401),  # the document '../../acl' of messages
        ("http://127.0.0.1/acl", 400),
    ):
        status, head, _ = raw(port, target)
        assert status == want, (target, head)
    # and the server still serves the stream afterwards
    sse = anon_sse(base, "/messages/_streams/all")
    assert sse.status == 200
    sse.close()


# ----------------------------------------------------------------------------- decision on every transport


def test_401_403_200_on_rest_sse_and_websocket_then_revocation(live):
    base = live.url
    assert put_streams(base, body=STREAMS) == 201
    make_reader(base)
    reader = basic_header("reader", "pw-reader")
    wrong = basic_header("reader", "wrong")
    admin = basic_header(*ADMIN)

    cases = [(None, 401), (wrong, 401), (reader, 403), (admin, 200)]
    for auth, want in cases:
        h = {"Authorization": auth} if auth else {}
        r = requests.get(f"{base}/messages", headers=h, timeout=5)
        assert r.status_code == want, (auth, r.text)
        status, headers, body = sse_status(base, "/messages/_streams/all", h)
        assert status == want, (auth, body)
        assert ws_status(base, "/messages/_streams/all", [f"{k}: {v}" for k, v in h.items()]) == (
            101 if want == 200 else want
        )
        # a refused handshake is a plain HTTP answer, never a 101
        status, head, rest = raw_ws(live.port, "/messages/_streams/all", h)
        assert status == (101 if want == 200 else want), head
        if want == 401:
            assert f"WWW-Authenticate: {CHALLENGE}".encode() in head
            status, head, _ = raw_ws(live.port, "/messages/_streams/all", {**h, "No-Auth-Challenge": "1"})
            assert status == 401 and b"WWW-Authenticate" not in head
        if want == 403:
            assert (
                json.loads(rest)["message"] == "user 'reader' is not permitted to GET /messages/_streams/all"
            )
            assert b"WWW-Authenticate" not in head

    # a rule for `reader`: GET (streams included) yes, writes no
    assert requests.post(f"{base}/acl", auth=ADMIN, json=READER_RULE, timeout=5).status_code == 201
    assert requests.get(f"{base}/messages", headers={"Authorization": reader}, timeout=5).status_code == 200
    r = requests.post(f"{base}/messages", headers={"Authorization": reader}, json={"x": 1}, timeout=5)
    assert r.status_code == 403 and r.json()["message"] == "user 'reader' is not permitted to POST /messages"
    assert requests.options(f"{base}/messages", timeout=5).status_code == 204  # preflight passes

    # revocation of a role mid-stream: the reader's WebSocket closes with 1008 within a second
    ws = websocket.create_connection(
        ws_url(base, "/messages/_streams/all"), header=[f"Authorization: {reader}"], timeout=5
    )
    rsse = open_sse(base, "/messages/_streams/all", headers={"Authorization": reader})
    post(base, {"n": 1})
    assert json.loads(ws.recv())["fullDocument"]["n"] == 1
    assert ev_of(rsse).json()["fullDocument"]["n"] == 1
    t0 = time.time()
    assert (
        requests.patch(f"{base}/users/reader", auth=ADMIN, json={"roles": []}, timeout=5).status_code == 200
    )
    assert _ws_close_code(ws) == 1008
    ev, _ = next_terminal(rsse, 5)
    assert ev.event == "revoked" and ev.json()["reason"] == "revoked"
    assert time.time() - t0 < 1.0
    assert rsse.next(5) is None  # the response ended
    ws.close()
    rsse.close()
    r = requests.get(f"{base}/messages", headers={"Authorization": reader}, timeout=5)
    assert r.status_code == 403

    # an ACL change applies to the very next request: delete the rule, the next GET is 403
    requests.patch(f"{base}/users/reader", auth=ADMIN, json={"roles": ["reader"]}, timeout=5)
    assert requests.get(f"{base}/messages", headers={"Authorization": reader}, timeout=5).status_code == 200
    assert requests.delete(f"{base}/acl/readerReads", auth=ADMIN, timeout=5).status_code == 204
    r = requests.get(f"{base}/messages", headers={"Authorization": reader}, timeout=5)
    assert r.status_code == 403


def test_deleting_the_public_rule_revokes_anonymous_streams_in_every_worker(live_factory):
    server = live_factory(WORKERS=2, SSE_HEARTBEAT_SECONDS=1, STREAM_LINGER_SECONDS=0.5)
    base = server.url
    assert put_streams(base, body=STREAMS) == 201
    assert requests.post(f"{base}/acl", auth=ADMIN, json=TUTORIAL_RULE, timeout=5).status_code == 201
    clients = [anon_sse(base, "/messages/_streams/all") for _ in range(6)]
    wss = [websocket.create_connection(ws_url(base, "/messages/_streams/all"), timeout=5) for _ in range(2)]
    assert all(c.status == 200 for c in clients)
    pids = {requests.get(f"{base}/_status", auth=ADMIN, timeout=5).json()["pid"] for _ in range(20)}
    assert len(pids) == 2
    # an admin stream on the same URL is not affected
    admin_sse = open_sse(base, "/messages/_streams/all")
    post(base, {"n": 1})
    for c in clients + [admin_sse]:
        assert ev_of(c).json()["fullDocument"]["n"] == 1
    for ws in wss:
        assert json.loads(ws.recv())["fullDocument"]["n"] == 1
    t0 = time.time()
    assert requests.delete(f"{base}/acl/{TUTORIAL_RULE['_id']}", auth=ADMIN, timeout=5).status_code == 204
    for c in clients:
        ev, _ = next_terminal(c, 5)
        assert ev is not None and ev.event == "revoked", ev
        assert ev.json() == {"reason": "revoked", "message": "access to this stream was withdrawn"}
        assert c.next(5) is None
        c.close()
    for ws in wss:
        assert _ws_close_code(ws) == 1008
        ws.close()
    assert time.time() - t0 < 1.0
    for _ in range(4):  # both workers refuse the next attempt
        assert sse_status(base, "/messages/_streams/all")[0] == 401
    post(base, {"n": 2})
    assert ev_of(admin_sse).json()["fullDocument"]["n"] == 2
    admin_sse.close()


# ----------------------------------------------------------------------------- tokens


def test_tokens_over_real_sockets_and_expiry(live_factory):
    server = live_factory(TOKEN_TTL_SECONDS=2, SSE_HEARTBEAT_SECONDS=1, STREAM_LINGER_SECONDS=0.5)
    base = server.url
    assert put_streams(base, body=STREAMS) == 201
    t_requested = time.time()
    r = requests.post(f"{base}/token", auth=ADMIN, timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["access_token", "token_type", "expires_in"]
    assert body["token_type"] == "Bearer" and body["expires_in"] == 2
    token = body["access_token"]

    # Bearer everywhere, ?access_token= on streams only
    assert (
        requests.get(f"{base}/messages", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code
        == 200
    )
    r = requests.get(f"{base}/messages", params={"access_token": token}, timeout=5)
    assert r.status_code == 400 and "stream URLs only" in r.json()["message"]
    by_header = open_sse(base, "/messages/_streams/all", headers={"Authorization": f"Bearer {token}"})
    assert by_header.status == 200
    by_query = anon_sse(base, f"/messages/_streams/all?access_token={token}")
    assert by_query.status == 200
    ws = websocket.create_connection(ws_url(base, f"/messages/_streams/all?access_token={token}"), timeout=5)
    post(base, {"n": 1})
    assert ev_of(by_query).json()["fullDocument"]["n"] == 1
    assert ev_of(by_header).json()["fullDocument"]["n"] == 1
    assert json.loads(ws.recv())["fullDocument"]["n"] == 1

    # the token expires at 2 s: event:expired, then the response ends; the WebSocket gets 1008
    for c in (by_query, by_header):
        ev, _ = next_terminal(c, 5)
        assert ev.event == "expired" and ev.json()["reason"] == "expired"
        assert c.next(5) is None
        c.close()
    assert 2.0 <= time.time() - t_requested < 3.3  # never before expires_in
    assert _ws_close_code(ws) == 1008
    ws.close()
    r = requests.get(f"{base}/messages", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert r.status_code == 401 and r.json()["message"] == "the token has expired"
    assert sse_status(base, f"/messages/_streams/all?access_token={token}")[0] == 401

    # the cookie: HttpOnly, SameSite; a stream accepts it, a REST URL ignores it
    r = requests.post(f"{base}/token/cookie", auth=ADMIN, timeout=5)
    assert r.status_code == 200
    set_cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/" in set_cookie
    cookie = set_cookie.split(";", 1)[0]
    sse = anon_sse(base, "/messages/_streams/all", headers={"Cookie": cookie})
    assert sse.status == 200
    sse.close()
    assert ws_status(base, "/messages/_streams/all", [f"Cookie: {cookie}"]) == 101
    r = requests.get(f"{base}/messages", headers={"Cookie": cookie}, timeout=5)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == CHALLENGE
    assert (
        requests.post(f"{base}/messages", headers={"Cookie": cookie}, json={}, timeout=5).status_code == 401
    )

    # tokens never reach the access log, wherever they were sent
    fresh = requests.post(f"{base}/token", auth=ADMIN, timeout=5).json()["access_token"]
    status, _, _ = raw(
        server.port,
        f"/messages/_streams/all?access_token={fresh}&x=1",
        {"Accept": "text/event-stream"},
        timeout=2,
    )
    assert status == 200
    requests.get(f"{base}/messages", params={"access_token": fresh}, timeout=5)
    requests.get(f"{base}/messages", params={"ACCESS_TOKEN": fresh}, timeout=5)
    requests.get(f"{base}/nope/{fresh}", headers={"Authorization": f"Bearer {fresh}"}, timeout=5)
    log = wait_for(lambda: (t := server.read_log()).count("GET /messages ") >= 4 and t, timeout=5)
    assert log
    for t in (token, fresh, cookie.split("=", 1)[1]):
        assert t not in log
        assert t.split(".")[2] not in log  # not even the signature part


def test_tokens_revoked_by_password_change_and_deletion_live(live):
    base = live.url
    assert put_streams(base, body=STREAMS) == 201
    requests.post(
        f"{base}/users", auth=ADMIN, json={"_id": "eve", "password": "one", "roles": ["admin"]}, timeout=10
    )
    token = requests.post(f"{base}/token", auth=("eve", "one"), timeout=10).json()["access_token"]
    sse = anon_sse(base, f"/messages/_streams/all?access_token={token}")
    assert sse.status == 200
    t0 = time.time()
    assert (
        requests.patch(f"{base}/users/eve", auth=ADMIN, json={"password": "two"}, timeout=10).status_code
        == 200
    )
    ev, _ = next_terminal(sse, 5)
    assert ev.event == "revoked"
    assert time.time() - t0 < 1.5  # bcrypt of the new password is in there
    sse.close()
    r = requests.get(f"{base}/messages", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert r.status_code == 401 and r.json()["message"] == "the token was revoked by a password change"

    token = requests.post(f"{base}/token", auth=("eve", "two"), timeout=10).json()["access_token"]
    ws = websocket.create_connection(ws_url(base, f"/messages/_streams/all?access_token={token}"), timeout=5)
    t0 = time.time()
    assert requests.delete(f"{base}/users/eve", auth=ADMIN, timeout=5).status_code == 204
    assert _ws_close_code(ws) == 1008
    assert time.time() - t0 < 1.0
    ws.close()
    r = requests.get(f"{base}/messages", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert r.status_code == 401 and r.json()["message"] == "the token's user no longer exists"


def test_jwt_secret_is_shared_between_servers(live_factory, tmp_path):
    secret = "a-shared-secret-for-two-servers-0123456789"
    data_dir = str(tmp_path / "shared")
    a = live_factory(data_dir, JWT_SECRET=secret)
    b = live_factory(data_dir, JWT_SECRET=secret)
    put_streams(a.url, body=STREAMS)
    token = requests.post(f"{a.url}/token", auth=ADMIN, timeout=10).json()["access_token"]
    claims = jwt.decode(token, secret, algorithms=["HS256"])  # signed with JWT_SECRET itself
    assert claims["sub"] == "admin"
    assert (
        requests.get(f"{b.url}/messages", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code
        == 200
    )
    token_b = requests.post(f"{b.url}/token", auth=ADMIN, timeout=10).json()["access_token"]
    assert (
        requests.get(
            f"{a.url}/messages", headers={"Authorization": f"Bearer {token_b}"}, timeout=5
        ).status_code
        == 200
    )
    sse = anon_sse(b.url, f"/messages/_streams/all?access_token={token}")
    assert sse.status == 200
    sse.close()
    # the same claims signed with another key, or with none, are refused by both
    forged = jwt.encode(claims, "not-the-secret-but-long-enough-0123456789", algorithm="HS256")
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    none_alg = header + "." + token.split(".")[1] + "."
    expired = jwt.encode(
        {**claims, "iat": claims["iat"] - 3600, "exp": int(time.time()) - 10}, secret, algorithm="HS256"
    )
    for server in (a, b):
        for bad in (forged, none_alg, none_alg[:-1], expired, "x.y.z", token[:-4]):
            r = requests.get(f"{server.url}/messages", headers={"Authorization": f"Bearer {bad}"}, timeout=5)
            assert r.status_code == 401, bad
            assert r.headers["WWW-Authenticate"] == CHALLENGE
            assert sse_status(server.url, f"/messages/_streams/all?access_token={bad}")[0] == 401
            assert ws_status(server.url, f"/messages/_streams/all?access_token={bad}") == 401
    # a key file was not needed
    import os

    assert not os.path.exists(os.path.join(data_dir, "jwt.key"))


# ----------------------------------------------------------------------------- CORS


def test_cors_for_sse_and_websocket_origin_checks(live_factory):
    server = live_factory(CORS_ORIGINS="http://app.example", SSE_HEARTBEAT_SECONDS=1)
    base = server.url
    assert put_streams(base, body=STREAMS) == 201
    pre = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, last-event-id",
    }
    r = requests.options(f"{base}/messages/_streams/all", headers=pre, timeout=5)
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert r.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Last-Event-ID" in [h.strip() for h in r.headers["Access-Control-Allow-Headers"].split(",")]
    r = requests.options(
        f"{base}/messages/_streams/all", headers={**pre, "Origin": "http://evil.example"}, timeout=5
    )
    assert r.status_code == 204
    assert "Access-Control-Allow-Origin" not in r.headers
    assert "Access-Control-Allow-Credentials" not in r.headers

    sse = open_sse(base, "/messages/_streams/all", headers={"Origin": "http://app.example"})
    assert sse.status == 200
    assert sse.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert sse.headers["Access-Control-Allow-Credentials"] == "true"
    sse.close()
    sse = open_sse(base, "/messages/_streams/all", headers={"Origin": "http://evil.example"})
    assert sse.status == 200  # not a browser concern of ours: but no CORS headers
    assert sse.headers.get("Access-Control-Allow-Origin") is None
    sse.close()

    admin = basic_header(*ADMIN)
    status, head, rest = raw_ws(
        server.port, "/messages/_streams/all", {"Authorization": admin, "Origin": "http://evil.example"}
    )
    assert status == 403, head
    assert json.loads(rest)["message"] == (
        "WebSocket connections from origin 'http://evil.example' are not allowed; list it in CORS_ORIGINS"
    )
    # the origin check comes before credentials: an anonymous evil page learns nothing more
    status, head, _ = raw_ws(server.port, "/messages/_streams/all", {"Origin": "http://evil.example"})
    assert status == 403
    for origin in ("http://app.example", f"http://127.0.0.1:{server.port}"):
        status, head, _ = raw_ws(
            server.port, "/messages/_streams/all", {"Authorization": admin, "Origin": origin}
        )
        assert status == 101, (origin, head)
        assert b"Sec-WebSocket-Accept:" in head
    # websocket-client sends its own Origin for the target host: same origin, allowed
    ws = open_ws(base, "/messages/_streams/all")
    post(base, {"n": 1})
    assert json.loads(ws.recv())["fullDocument"]["n"] == 1
    ws.close()


# ----------------------------------------------------------------------------- no leaks


def test_users_stream_never_carries_passwords(live):
    base = live.url
    body = {
        "streams": [
            {"uri": "all", "stages": []},
            {
                "uri": "copy",
                "stages": [
                    {
                        "_$addFields": {
                            "fullDocument::pw": "$fullDocument.password",
                            "fullDocument::again": "$updateDescription",
                        }
                    }
                ],
            },
        ]
    }
    assert put_streams(base, "users", body) == 200  # users exists from the start
    sse = open_sse(base, "/users/_streams/all")
    copy = open_sse(base, "/users/_streams/copy")
    ws = open_ws(base, "/users/_streams/all")
    r = requests.post(
        f"{base}/users", auth=ADMIN, json={"_id": "newbie", "password": "pw-1", "roles": []}, timeout=10
    )
    assert r.status_code == 201
    assert (
        requests.patch(f"{base}/users/newbie", auth=ADMIN, json={"password": "pw-2"}, timeout=10).status_code
        == 200
    )
    assert (
        requests.patch(
            f"{base}/users/newbie", auth=ADMIN, json={"$set": {"password": "pw-3", "tag": 1}}, timeout=10
        ).status_code
        == 200
    )
    assert (
        requests.put(
            f"{base}/users/newbie", auth=ADMIN, json={"password": "pw-4", "roles": ["x"]}, timeout=10
        ).status_code
        == 200
    )
    events = []
    for client in (sse, copy):
        for _ in range(4):
            ev = ev_of(client)
            assert ev is not None and ev.event == "change", ev
            events.append(ev.data)
    for _ in range(4):
        events.append(ws.recv())
    ops = [json.loads(e)["operationType"] for e in events[:4]]
    assert ops == ["insert", "update", "update", "replace"]
    assert set(json.loads(events[2])["updateDescription"]["updatedFields"]) == {"tag", "_etag"}
    for text in events:
        assert "password" not in text
        assert "$2b$" not in text and "pw-" not in text
    for text in events[4:8]:
        assert json.loads(text)["fullDocument"].get("pw") is None
    sse.close()
    copy.close()
    ws.close()


def test_read_filter_applies_to_streams_as_to_gets(live):
    base = live.url
    assert put_streams(base, body=STREAMS) == 201
    make_reader(base)
    rule = {
        "_id": "own",
        "predicate": "path-prefix(/messages)",
        "priority": 1,
        "roles": ["reader"],
        "mongo": {"readFilter": {"owner": "@user._id"}},
    }
    assert requests.post(f"{base}/acl", auth=ADMIN, json=rule, timeout=5).status_code == 201
    reader = {"Authorization": basic_header("reader", "pw-reader")}
    sse = open_sse(base, "/messages/_streams/secret", headers=reader)
    ws = websocket.create_connection(
        ws_url(base, "/messages/_streams/secret"),
        header=[f"Authorization: {reader['Authorization']}"],
        timeout=5,
    )
    # avars cannot bind the @user the filter depends on
    status, _, body = sse_status(base, '/messages/_streams/secret?avars={"@user._id":"admin"}', reader)
    assert status == 400 and "reserved" in body["message"]
    assert "@user._id" in body["message"]
    for doc in (
        {"_id": "a1", "owner": "admin", "n": 1},
        {"_id": "r1", "owner": "reader", "n": 2},
        {"_id": "x1", "n": 3},
        {"_id": "r2", "owner": "reader", "n": 4},
    ):
        post(base, doc)
    requests.patch(f"{base}/messages/a1", auth=ADMIN, json={"n": 10}, timeout=5)
    requests.patch(f"{base}/messages/r1", auth=ADMIN, json={"owner": "admin"}, timeout=5)  # leaves the reader
    requests.delete(f"{base}/messages/r2", auth=ADMIN, timeout=5)
    post(base, {"_id": "r3", "owner": "reader", "n": 5})
    got = []
    while True:
        ev = ev_of(sse)
        got.append((ev.json()["operationType"], ev.json()["documentKey"]["_id"]))
        if got[-1] == ("insert", "r3"):
            break
    # r1 leaving the reader's filter and r2's delete reach it (from the pre-images), without
    # r1's new content; a1 and x1, never the reader's, do not
    assert got == [("insert", "r1"), ("insert", "r2"), ("update", "r1"), ("delete", "r2"), ("insert", "r3")]
    ws_got = []
    while len(ws_got) < 5:
        ev = json.loads(ws.recv())
        ws_got.append((ev["operationType"], ev["documentKey"]["_id"]))
        if ev["operationType"] == "insert":
            assert ev["fullDocument"]["owner"] == "reader"
        else:
            assert "fullDocument" not in ev and "updateDescription" not in ev
    assert ws_got == got
    r = requests.get(f"{base}/messages", headers=reader, timeout=5)
    assert [d["_id"] for d in r.json()] == ["r3"]
    assert requests.get(f"{base}/messages/a1", headers=reader, timeout=5).status_code == 404

    # an unrelated change to the user leaves the stream open
    assert requests.patch(f"{base}/users/reader", auth=ADMIN, json={"tag": 1}, timeout=5).status_code == 200
    post(base, {"_id": "r4", "owner": "reader"})
    assert ev_of(sse).json()["documentKey"]["_id"] == "r4"
    assert json.loads(ws.recv())["documentKey"]["_id"] == "r4"
    # the rule's readFilter changes: the open streams were built with the old one, they end
    t0 = time.time()
    r = requests.patch(
        f"{base}/acl/own", auth=ADMIN, json={"mongo": {"readFilter": {"owner": "@user.nick"}}}, timeout=5
    )
    assert r.status_code == 200
    ev, _ = next_terminal(sse, 5)
    assert ev.event == "revoked"
    assert _ws_close_code(ws) == 1008
    assert time.time() - t0 < 1.0
    sse.close()
    ws.close()
    # the reader has no `nick`: the filter cannot be filled, so no stream (not an unfiltered one)
    status, _, body = sse_status(base, "/messages/_streams/secret", reader)
    assert status == 403
    assert body["message"] == "this permission's readFilter needs @user.nick, which the user does not have"
    assert requests.get(f"{base}/messages", headers=reader, timeout=5).status_code == 403
    requests.patch(f"{base}/users/reader", auth=ADMIN, json={"nick": "admin"}, timeout=5)
    sse = open_sse(base, "/messages/_streams/secret", headers=reader)
    post(base, {"_id": "r5", "owner": "reader"})
    post(base, {"_id": "a5", "owner": "admin"})
    assert ev_of(sse).json()["documentKey"]["_id"] == "a5"
    # a change of the user property the filter reads ends the stream too
    t0 = time.time()
    requests.patch(f"{base}/users/reader", auth=ADMIN, json={"nick": "reader"}, timeout=5)
    ev, _ = next_terminal(sse, 5)
    assert ev.event == "revoked" and time.time() - t0 < 1.0
    sse.close()


# ----------------------------------------------------------------------------- hostile input


def test_oversized_headers_are_refused_and_the_server_keeps_serving(live):
    base = live.url
    for name, value in (
        ("X-Big", "a" * 100_000),
        ("Authorization", "Basic " + "A" * 100_000),
        ("Authorization", "Bearer " + "e" * 100_000),
    ):
        s = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        try:
            try:  # the server may answer and close before it has read all of it
                s.sendall(
                    b"GET /messages HTTP/1.1\r\nHost: x\r\n" + f"{name}: {value}".encode() + b"\r\n\r\n"
                )
            except (ConnectionResetError, BrokenPipeError):
                pass
            data = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        status = int(data.split(b" ", 2)[1])
        assert 400 <= status < 500, (name, data[:200])
    # a 100 KB request line, and more headers than the parser takes
    status, head, _ = raw(live.port, "/messages?x=" + "a" * 100_000)
    assert status == 414, head
    status, head, _ = raw(live.port, "/messages", {f"X-{i}": "y" for i in range(500)})
    assert status == 400, head
    assert requests.get(f"{base}/_health", timeout=5).status_code == 200
    assert requests.get(f"{base}/messages", auth=ADMIN, timeout=5).status_code in (200, 404)


def test_tokens_stay_out_of_the_log_even_in_invalid_requests(live):
    assert put_streams(live.url, body=STREAMS) == 201
    token = requests.post(f"{live.url}/token", auth=ADMIN, timeout=5).json()["access_token"]
    sig = token.split(".")[2]
    for line in (
        f"GET /messages/_streams/all?access_token={token} HTTP/9.9",
        f"GET /messages/_streams/all?access_token={token} HTTP/1.1 extra",
        f"POST /messages/_streams/all?access_token={token}",
        f"GET /messages/_streams/all?access%5Ftoken={token} HTTP/2.0",
    ):
        s = socket.create_connection(("127.0.0.1", live.port), timeout=5)
        s.sendall(line.encode() + b"\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        assert data.startswith(b"HTTP/1.1 400"), (line, data)
    # a header that is too long, carrying the token in a Bearer credential
    status, _, _ = raw(live.port, "/messages", {"Authorization": f"Bearer {token}", "X-Big": "a" * 70_000})
    assert status == 400
    # the percent-encoded parameter name is still a credential on a stream, and still hidden
    status, _, _ = raw(
        live.port,
        f"/messages/_streams/all?access%5Ftoken={token}",
        {"Accept": "text/event-stream"},
        timeout=2,
    )
    assert status == 200
    assert requests.get(f"{live.url}/_health", timeout=5).status_code == 200
    log = wait_for(lambda: (t := live.read_log()).count("HTTP/9.9") + t.count("extra") >= 2 and t, timeout=5)
    assert log, live.read_log()[-2000:]
    assert token not in log and sig not in log
    assert "Traceback" not in log


def test_the_access_log_line_is_the_configured_format(live):
    """worker.Handler.log_request writes gunicorn's access line itself (cheaply); its fields
    are those of gunicorn.conf.py's access_log_format: address, method, path without the
    query, protocol, status, bytes, seconds and user agent."""
    r = requests.get(f"{live.url}/_health?x=1", headers={"User-Agent": "probe/1.0"}, timeout=5)
    assert r.status_code == 200
    pattern = re.compile(
        r'^127\.0\.0\.1 "GET /_health HTTP/1\.1" 200 (\d+) (\d+\.\d{6})s "probe/1\.0"$', re.M
    )
    found = wait_for(lambda: pattern.search(live.read_log()), timeout=5)
    assert found, live.read_log()[-2000:]
    assert int(found.group(1)) > len(r.content)  # pywsgi counts the head too, as before
    # a quote in a field cannot end it and forge the rest of the line
    requests.get(f"{live.url}/_health", headers={"User-Agent": 'x" 500 0 0.0s "forged'}, timeout=5)
    assert wait_for(lambda: 'x\\" 500 0 0.0s \\"forged"' in live.read_log(), timeout=5), live.read_log()[
        -500:
    ]
