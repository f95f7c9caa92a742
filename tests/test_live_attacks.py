"""Attacks on access control and on the server's limits, over real sockets against gunicorn
with the real gunicorn.conf.py. Each test asserts the refusal and that the worker that
served it is the same process afterwards (`/_status` pid), i.e. that no request crashed or
replaced it. Limits are set low through the environment so that the floods stay small here; the same
floods at the default limits are measured by `python -m bench.attacks` (bench/RESULTS.md).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time

import pytest
import requests

from bench.loadgen import client_frame

from .conftest import ADMIN
from .sseclient import SSEClient
from .test_live_streams import open_sse, put_streams, wait_for

pytestmark = pytest.mark.live

TUTORIAL_RULE = {
    "_id": "unauthenticatedCanConnectToMessagesStream",
    "priority": 0,
    "predicate": "path-prefix(/messages/_streams/all)",
    "roles": ["$unauthenticated"],
}
SSE = {"Accept": "text/event-stream"}


def pid(server) -> int:
    return server.status()["pid"]


def setup_tutorial(base: str) -> None:
    assert put_streams(base) == 201
    assert requests.post(f"{base}/acl", auth=ADMIN, json=TUTORIAL_RULE, timeout=10).status_code == 201


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 5.0) -> tuple[int, bytes]:
    """Send bytes as written; return (status, everything read until the server closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(head.encode("latin-1") + body)
        data = b""
        while True:
            try:
                part = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not part:
                break
            data += part
    finally:
        s.close()
    return int(data.split(b" ", 2)[1]), data


# --------------------------------------------------------------------------- 1. no request kills a worker


def test_head_on_a_public_stream_no_longer_kills_the_worker(live):
    base = live.url
    setup_tutorial(base)
    before = pid(live)
    for _ in range(30):
        r = requests.head(f"{base}/messages/_streams/all", headers=SSE, timeout=5)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert pid(live) == before
    assert live.status()["clients"] == 0
    # streams still work, for the anonymous client too
    sse = SSEClient(f"{base}/messages/_streams/all")
    assert sse.status == 200
    sse.close()
    assert pid(live) == before
    assert "Assertion" not in live.read_log() and "epoll" not in live.read_log()


def test_writes_on_stream_urls_are_405_even_where_anonymous_may_read(live):
    base = live.url
    assert put_streams(base, "pub", {"streams": [{"uri": "s", "stages": []}]}) == 201
    rule = {
        "_id": "pub",
        "roles": ["$unauthenticated"],
        "predicate": "path-prefix(/pub/_streams)",
        "priority": 0,
    }
    assert requests.post(f"{base}/acl", auth=ADMIN, json=rule, timeout=10).status_code == 201
    before = pid(live)
    for method in ("PUT", "POST", "PATCH", "DELETE"):
        for path in ("/pub/_streams", "/pub/_streams/s"):
            r = requests.request(method, f"{base}{path}?wm=upsert", json={"x": 1}, timeout=5)
            assert r.status_code == 405, (method, path, r.text)
            assert r.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert requests.get(f"{base}/pub", auth=ADMIN, timeout=5).json() == []
    assert pid(live) == before


def ws_handshake(port: int, path: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    assert data.startswith(b"HTTP/1.1 101"), data
    return s


def close_code(s: socket.socket, timeout: float = 5.0) -> int | None:
    """Read server frames until a close frame; its status code."""
    s.settimeout(timeout)
    data = b""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            part = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not part:
            break
        data += part
        while len(data) >= 2:
            opcode, n = data[0] & 0x0F, data[1] & 0x7F
            offset = 2 + (2 if n == 126 else 8 if n == 127 else 0)
            if n == 126 and len(data) >= 4:
                n = struct.unpack("!H", data[2:4])[0]
            elif n == 127 and len(data) >= 10:
                n = struct.unpack("!Q", data[2:10])[0]
            if len(data) < offset + n:
                break
            if opcode == 0x8:
                return struct.unpack("!H", data[offset : offset + 2])[0]
            data = data[offset + n :]
    return None


@pytest.mark.parametrize("shape", ["one-huge-frame", "continuation-frames", "many-small-then-huge"])
def test_websocket_messages_over_the_limit_get_1009(live_factory, shape):
    server = live_factory(WS_MAX_MESSAGE_BYTES=65536)
    setup_tutorial(server.url)
    before = pid(server)
    s = ws_handshake(server.port, "/messages/_streams/all")
    mib = b"a" * (1 << 20)
    try:
        if shape == "one-huge-frame":
            s.sendall(client_frame(0x1, mib * 8))
        elif shape == "continuation-frames":
            for i in range(60):
                s.sendall(client_frame(0x1 if i == 0 else 0x0, mib, fin=i == 59))
        else:
            small = client_frame(0x2, b"b" * 65535)
            for _ in range(200):
                s.sendall(small)  # under the limit: read and dropped, the connection stays
            s.sendall(client_frame(0x1, b"c" * 70000))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed while we were still sending: expected
    assert close_code(s) == 1009
    s.close()
    assert pid(server) == before
    assert requests.get(f"{server.url}/_health", timeout=5).status_code == 200
    assert wait_for(lambda: server.status()["clients"] == 0)


def test_websocket_protocol_errors_get_1002_and_pings_get_pongs(live):
    setup_tutorial(live.url)
    s = ws_handshake(live.port, "/messages/_streams/all")
    s.sendall(client_frame(0x9, b"hello"))
    s.settimeout(5)
    reply = s.recv(100)
    assert reply[0] & 0x0F == 0xA and reply[2:] == b"hello"  # pong, same payload
    s.sendall(bytes([0x81, 0x05]) + b"plain")  # not masked: a protocol error for a client
    assert close_code(s) == 1002
    s.close()
    s = ws_handshake(live.port, "/messages/_streams/all")
    s.sendall(client_frame(0x8, struct.pack("!H", 1000) + b"\xff\xfe"))  # a close reason that is not UTF-8
    assert close_code(s) == 1007
    s.close()


def test_anonymous_connections_per_address_are_bounded(live_factory):
    server = live_factory(STREAM_MAX_PER_ADDRESS=20, SSE_HEARTBEAT_SECONDS=5)
    setup_tutorial(server.url)
    before = pid(server)
    opened = [SSEClient(f"{server.url}/messages/_streams/all") for _ in range(20)]
    assert all(c.status == 200 for c in opened)
    refused = [SSEClient(f"{server.url}/messages/_streams/all") for _ in range(5)]
    assert [c.status for c in refused] == [429] * 5
    body = json.loads(refused[0].body())
    assert "STREAM_MAX_PER_ADDRESS" in body["message"]
    for c in refused + opened[:5]:
        c.close()
    assert wait_for(lambda: server.status()["clients"] == 15)
    again = SSEClient(f"{server.url}/messages/_streams/all")
    assert again.status == 200  # room again once some left
    # an authenticated user counts against its own limit, not the address's
    admin = open_sse(server.url, "/messages/_streams/all")
    assert admin.status == 200
    for c in opened[5:] + [again, admin]:
        c.close()
    assert pid(server) == before


def test_distinct_bindings_are_bounded_by_stream_max_bindings(live_factory):
    server = live_factory(STREAM_MAX_BINDINGS=10)
    assert put_streams(server.url) == 201
    before = pid(server)
    clients = [open_sse(server.url, f'/messages/_streams/mine?avars={{"n":"u{i}"}}') for i in range(10)]
    assert all(c.status == 200 for c in clients)
    extra = open_sse(server.url, '/messages/_streams/mine?avars={"n":"u99"}')
    assert extra.status == 429 and "STREAM_MAX_BINDINGS" in json.loads(extra.body())["message"]
    shared = open_sse(server.url, '/messages/_streams/mine?avars={"n":"u3"}')
    assert shared.status == 200  # an existing binding is shared
    assert json.loads(requests.get(f"{server.url}/_status", auth=ADMIN, timeout=10).text)["watchers"] == 1
    for c in clients + [shared, extra]:
        c.close()
    assert pid(server) == before


# --------------------------------------------------------------------------- 2. the permission model


def test_bob_against_alice_over_http(live):
    base = live.url
    for user in ("alice", "bob"):
        r = requests.post(
            f"{base}/users",
            auth=ADMIN,
            json={"_id": user, "password": f"pw-{user}", "roles": ["user"]},
            timeout=10,
        )
        assert r.status_code == 201
    assert put_streams(base, "notes", {"streams": [{"uri": "all", "stages": []}]}) == 201
    rule = {
        "_id": "notes",
        "roles": ["user"],
        "priority": 1,
        "predicate": "path-prefix(/notes)",
        "mongo": {
            "readFilter": {"owner": "@user._id"},
            "writeFilter": {"owner": "@user._id"},
            "mergeRequest": {"owner": "@user._id"},
            "projectResponse": {"secret": 0},
            "allowManagementRequests": False,
        },
    }
    assert requests.post(f"{base}/acl", auth=ADMIN, json=rule, timeout=10).status_code == 201
    alice, bob = ("alice", "pw-alice"), ("bob", "pw-bob")
    r = requests.post(
        f"{base}/notes", auth=alice, json={"_id": "a1", "title": "mine", "secret": "s3cr3t"}, timeout=10
    )
    assert r.status_code == 201
    before = pid(live)
    sse_bob = open_sse(
        base,
        "/notes/_streams/all",
        headers={"Authorization": "Basic " + base64.b64encode(b"bob:pw-bob").decode()},
    )
    sse_alice = open_sse(
        base,
        "/notes/_streams/all",
        headers={"Authorization": "Basic " + base64.b64encode(b"alice:pw-alice").decode()},
    )
    statuses = {
        "replace": requests.put(
            f"{base}/notes/a1", auth=bob, json={"title": "bob's now"}, timeout=10
        ).status_code,
        "take over": requests.put(
            f"{base}/notes/a1", auth=bob, json={"owner": "bob"}, timeout=10
        ).status_code,
        "patch": requests.patch(f"{base}/notes/a1", auth=bob, json={"title": "x"}, timeout=10).status_code,
        "delete": requests.delete(f"{base}/notes/a1", auth=bob, timeout=10).status_code,
        "read": requests.get(f"{base}/notes/a1", auth=bob, timeout=10).status_code,
        "redefine streams": requests.put(
            f"{base}/notes", auth=bob, json={"streams": []}, timeout=10
        ).status_code,
        "drop": requests.delete(f"{base}/notes", auth=bob, headers={"If-Match": "*"}, timeout=10).status_code,
        "query secret": requests.get(
            f"{base}/notes", auth=alice, params={"filter": '{"secret": "s3cr3t"}'}, timeout=10
        ).status_code,
        "upsert": requests.put(
            f"{base}/notes/a2", auth=bob, params={"wm": "upsert"}, json={}, timeout=10
        ).status_code,
    }
    # alice's document is outside bob's readFilter: for him it does not exist (404)
    assert statuses == {
        "replace": 404,
        "take over": 404,
        "patch": 404,
        "delete": 404,
        "read": 404,
        "redefine streams": 403,
        "drop": 403,
        "query secret": 403,
        "upsert": 403,
    }
    r = requests.post(
        f"{base}/notes", auth=bob, json={"_id": "b1", "owner": "alice", "title": "planted"}, timeout=10
    )
    assert r.status_code == 201
    assert requests.get(f"{base}/notes/b1", auth=ADMIN, timeout=10).json()["owner"] == "bob"
    assert [d["_id"] for d in requests.get(f"{base}/notes", auth=alice, timeout=10).json()] == ["a1"]
    assert "secret" not in requests.get(f"{base}/notes/a1", auth=alice, timeout=10).json()
    requests.patch(f"{base}/notes/a1", auth=alice, json={"secret": "changed", "title": "edited"}, timeout=10)
    # each stream gets its owner's events only, and never the secret
    ev_bob, ev_alice = sse_bob.next(10), sse_alice.next(10)
    assert ev_bob.json()["documentKey"]["_id"] == "b1"
    assert ev_alice.json()["documentKey"]["_id"] == "a1"
    assert ev_alice.json()["updateDescription"]["updatedFields"].keys() == {"title", "_etag"}
    assert "changed" not in ev_alice.data and "s3cr3t" not in ev_alice.data
    sse_bob.close()
    sse_alice.close()
    assert pid(live) == before


def test_self_promotion_and_the_hash_probe(live):
    base = live.url
    requests.post(
        f"{base}/users",
        auth=ADMIN,
        json={"_id": "alice", "password": "pw-alice", "roles": ["user"]},
        timeout=10,
    )
    lax = {"_id": "lax", "roles": ["user"], "priority": 0, "predicate": "path-prefix(/users)"}
    assert requests.post(f"{base}/acl", auth=ADMIN, json=lax, timeout=10).status_code == 201
    alice = ("alice", "pw-alice")
    before = pid(live)
    r = requests.patch(f"{base}/users/alice", auth=alice, json={"$set": {"roles": ["admin"]}}, timeout=10)
    assert r.status_code == 403
    assert requests.get(f"{base}/users/alice", auth=ADMIN, timeout=10).json()["roles"] == ["user"]
    probe = {
        "_id": "admin",
        "$expr": {
            "$gte": [
                {"$let": {"vars": {"e": {"$arrayElemAt": [{"$objectToArray": "$$ROOT"}, 1]}}, "in": "$$e.v"}},
                {"$literal": "$2b$"},
            ]
        },
    }
    r = requests.get(f"{base}/users", auth=alice, params={"filter": json.dumps(probe)}, timeout=10)
    assert r.status_code == 403, r.text  # at the first request
    assert (
        requests.get(f"{base}/users", auth=alice, params={"sort": "password"}, timeout=10).status_code == 403
    )
    assert "$2b$" not in requests.get(f"{base}/users", auth=alice, timeout=10).text
    assert pid(live) == before


# --------------------------------------------------------------------------- logins


def test_password_guessing_is_throttled_and_other_users_are_not(live_factory):
    server = live_factory(AUTH_MAX_FAILURES=5, AUTH_FAILURE_WINDOW_SECONDS=60)
    base = server.url
    requests.post(f"{base}/users", auth=ADMIN, json={"_id": "alice", "password": "pw-alice"}, timeout=10)
    before = pid(server)
    codes = [requests.get(f"{base}/", auth=("alice", f"guess{i}"), timeout=10).status_code for i in range(8)]
    assert codes == [401] * 5 + [429] * 3
    r = requests.get(f"{base}/", auth=("alice", "pw-alice"), timeout=10)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert requests.get(f"{base}/", auth=ADMIN, timeout=10).status_code == 200  # another user: fine
    assert pid(server) == before


# --------------------------------------------------------------------------- no 500


def test_odd_input_is_never_a_500(live):
    base = live.url
    assert requests.put(f"{base}/things", auth=ADMIN, json={}, timeout=10).status_code == 201
    before = pid(live)
    long_password = requests.post(
        f"{base}/users", auth=ADMIN, json={"_id": "long", "password": "x" * 73}, timeout=10
    )
    assert long_password.status_code == 400 and "72 bytes" in long_password.json()["message"]
    surrogate = requests.post(
        f"{base}/things",
        auth=ADMIN,
        data=b'{"a": "\\ud800"}',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert surrogate.status_code == 400
    bad_utf8 = requests.post(
        f"{base}/things",
        auth=ADMIN,
        data=b'{"a": "\xc3\x28"}',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert bad_utf8.status_code == 400
    newline = requests.post(f"{base}/things", auth=ADMIN, json={"_id": "line1\nline2"}, timeout=10)
    assert newline.status_code == 201
    assert newline.headers["Location"] == "/things/line1%0Aline2"
    assert (
        requests.get(base + newline.headers["Location"], auth=ADMIN, timeout=10).json()["_id"]
        == "line1\nline2"
    )
    status, data = raw_request(
        live.port, "GET /things/a%2Fb%25c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 401  # well-formed, just not authenticated
    assert requests.get(f"{base}/things", auth=ADMIN, timeout=10).json()[0]["_id"] == "line1\nline2"
    assert pid(live) == before
    assert "Traceback" not in live.read_log()


def test_parallel_guesses_cannot_outrun_the_throttle(live_factory):
    import concurrent.futures

    server = live_factory(AUTH_MAX_FAILURES=5)
    base = server.url
    requests.post(f"{base}/users", auth=ADMIN, json={"_id": "bob", "password": "pw-bob"}, timeout=10)
    before = pid(server)

    def guess(i: int) -> int:
        return requests.get(f"{base}/", auth=("bob", f"guess{i}"), timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(guess, range(40)))
    assert codes.count(401) <= 5 and codes.count(429) >= 35, codes  # at most 5 passwords were checked
    # unknown user names are not throttled per name, but checks in flight per address are bounded
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        codes = list(
            pool.map(
                lambda i: requests.get(f"{base}/", auth=(f"nobody{i}", "x"), timeout=60).status_code,
                range(30),
            )
        )
    assert set(codes) <= {401, 429} and codes.count(429) > 0
    assert requests.get(f"{base}/", auth=ADMIN, timeout=10).status_code == 200
    assert pid(server) == before


def test_a_websocket_client_that_pings_and_never_reads_is_dropped(live_factory):
    server = live_factory(STREAM_CLIENT_QUEUE=5)
    setup_tutorial(server.url)
    before = pid(server)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /messages/_streams/all HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    s.settimeout(5)
    assert s.recv(4096).startswith(b"HTTP/1.1 101")
    assert wait_for(lambda: server.status()["clients"] == 1)
    ping = client_frame(0x9, b"p" * 125)
    s.settimeout(0.2)
    sent = 0
    deadline = time.time() + 15
    try:
        while sent < 200_000 and time.time() < deadline:
            s.sendall(ping * 100)  # never read a pong
            sent += 100
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading, or closed: both are the point
    # the pongs it could not send count against the queue: the client is ended, its socket
    # shut down within the grace period, and nothing of it is left
    assert wait_for(lambda: server.status()["clients"] == 0, timeout=20)
    s.close()
    assert pid(server) == before


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ],
)
def test_ambiguous_body_framing_is_refused(live, framing):
    before = pid(live)
    head = (
        "POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{framing}Connection: close\r\n\r\n"
    )
    status, _ = raw_request(live.port, head, b"0\r\n\r\n")
    assert status == 400
    assert pid(live) == before


def test_a_request_head_sent_byte_by_byte_is_cut_off(live):
    s = socket.create_connection(("127.0.0.1", live.port), timeout=5)
    s.sendall(b"GET /_health HTTP/1.1\r\nHost: x\r\n")
    started = time.time()
    closed = False
    while time.time() - started < 30:
        try:
            s.sendall(b"X")  # one byte of a header every 2 s: never a complete head
            s.settimeout(2)
            if s.recv(100) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
    s.close()
    assert closed  # within the head deadline (plus a read timeout), not held for good
    assert requests.get(f"{live.url}/_health", timeout=5).status_code == 200


@pytest.mark.parametrize(
    "head",
    [
        "Content-Length : 5\r\n",  # no Content-Length to us, perhaps one to a proxy
        "Content-Length: +5\r\n",
        "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n",
    ],
)
def test_header_names_and_lengths_a_proxy_could_read_otherwise_are_refused(live, head):
    status, _ = raw_request(
        live.port, f"POST /messages HTTP/1.1\r\nHost: x\r\n{head}Connection: close\r\n\r\n", b"{}\r\n\r\n"
    )
    assert status == 400


def test_a_body_sent_byte_by_byte_is_cut_off(live_factory):
    server = live_factory(REQUEST_BODY_SECONDS=2)
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    auth = base64.b64encode(b"admin:secret")
    s.sendall(
        b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Basic "
        + auth
        + b"\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{"
    )
    answer = b""
    for _ in range(20):
        try:
            s.sendall(b" ")
            s.settimeout(1)
            part = s.recv(4096)
            if not part:
                break
            answer += part
            if b"\r\n\r\n" in answer:
                break
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    s.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
