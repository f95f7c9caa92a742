"""Streams over real sockets against gunicorn with the real gunicorn.conf.py."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import struct
import threading
import time
import urllib.parse

import pytest
import requests
import websocket

from .conftest import ADMIN, ADMIN_HEADER
from .sseclient import SSEClient

pytestmark = pytest.mark.live

TUTORIAL_STREAMS = {
    "streams": [
        {
            "uri": "all",
            "stages": [{"_$match": {"_$or": [{"operationType": "insert"}, {"operationType": "update"}]}}],
        },
        {"uri": "mine", "stages": [{"_$match": {"fullDocument::name": {"_$var": "n"}}}]},
    ]
}
AUTH = {"Authorization": ADMIN_HEADER}


def put_streams(base: str, coll: str = "messages", body: dict = TUTORIAL_STREAMS) -> int:
    return requests.put(f"{base}/{coll}", auth=ADMIN, json=body, timeout=10).status_code


def post(base: str, doc, coll: str = "messages") -> requests.Response:
    r = requests.post(f"{base}/{coll}", auth=ADMIN, json=doc, timeout=10)
    assert r.status_code == 201, r.text
    return r


def open_sse(base: str, path: str, headers: dict | None = None, **kw) -> SSEClient:
    client = SSEClient(base + path, headers={**AUTH, **(headers or {})}, **kw)
    if client.status == 200:
        first = client.next(10)
        assert first.retry == 3000 and "connected" in first.comments
    return client


def ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://") + path


def open_ws(base: str, path: str, timeout: float = 10) -> websocket.WebSocket:
    return websocket.create_connection(
        ws_url(base, path), header=[f"Authorization: {ADMIN_HEADER}"], timeout=timeout
    )


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def add_member(base: str, user: str, **fields) -> None:
    """A user with password "pw" and the role "member"."""
    doc = {"_id": user, "password": "pw", "roles": ["member"], **fields}
    r = requests.post(f"{base}/users", auth=ADMIN, json=doc, timeout=10)
    assert r.status_code == 201, r.text


def member(user: str) -> dict:
    """The Authorization header of a user made by add_member."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()}


def test_seed_tutorial_sse_and_websocket(live):
    base = live.url
    assert put_streams(base) == 201
    sse = open_sse(base, "/messages/_streams/all")
    assert sse.headers["Content-Type"].startswith("text/event-stream")
    assert sse.headers["Cache-Control"] == "no-cache"
    assert sse.headers["X-Accel-Buffering"] == "no"
    ws = open_ws(base, "/messages/_streams/all")

    # SSE and WebSocket clients of one stream share one watcher.
    status = wait_for(lambda: (s := live.status())["clients"] == 2 and s)
    assert status["watchers"] == 1
    assert status["streams"][0]["sse"] == 1 and status["streams"][0]["websocket"] == 1

    r = post(base, {"message": "Hello SSE!", "name": "uji"})
    doc_id = r.json()["_id"]["$oid"]
    ev = sse.next_event()
    assert ev.event == "change"
    token = json.loads(ev.id)
    assert set(token) == {"_data"}
    data = ev.json()
    assert data["operationType"] == "insert"
    assert data["fullDocument"]["message"] == "Hello SSE!" and data["fullDocument"]["name"] == "uji"
    assert data["fullDocument"]["_id"] == {"$oid": doc_id}
    assert data["documentKey"] == {"_id": {"$oid": doc_id}}
    assert "$date" in data["wallTime"]
    for internal in ("_id", "ns", "clusterTime"):
        assert internal not in data
    # the same JSON on both transports, and on WebSocket the token as `_id` (the SSE `id:`)
    assert json.loads(ws.recv()) == {"_id": token, **data}

    r = requests.patch(f"{base}/messages/{doc_id}", auth=ADMIN, json={"message": "Hello SSE! (edited)"})
    assert r.status_code == 200
    upd_event = sse.next_event()
    upd = upd_event.json()
    assert upd["operationType"] == "update"
    assert upd["fullDocument"]["message"] == "Hello SSE! (edited)"
    assert upd["updateDescription"]["updatedFields"]["message"] == "Hello SSE! (edited)"
    assert upd["updateDescription"]["removedFields"] == []
    assert json.loads(ws.recv()) == {"_id": json.loads(upd_event.id), **upd}

    # deletes are filtered out by the tutorial's $match; nothing arrives for them
    requests.delete(f"{base}/messages/{doc_id}", auth=ADMIN)
    post(base, {"message": "after delete"})
    assert sse.next_event().json()["fullDocument"]["message"] == "after delete"
    sse.close()
    ws.close()


def test_heartbeat_comments_keep_an_idle_stream_alive(live):
    put_streams(live.url)
    sse = open_sse(live.url, "/messages/_streams/all")
    block = sse.next(5)  # SSE_HEARTBEAT_SECONDS=1 in the live fixture
    assert block.comments == ["hb"] and block.data == ""
    sse.close()


def test_avars_filter_and_variable_errors(live):
    base = live.url
    put_streams(base)
    mine = open_sse(base, '/messages/_streams/mine?avars={"n":"uji"}')
    post(base, {"name": "someone else"})
    post(base, {"name": "uji", "message": "for uji"})
    ev = mine.next_event()
    assert ev.json()["fullDocument"]["name"] == "uji"
    mine.close()

    missing = SSEClient(base + "/messages/_streams/mine", headers=AUTH)
    assert missing.status == 400
    assert json.loads(missing.body())["message"] == "variable n not bound"

    for avars in ("not-json", "[1]", '{"$where":1}', '{"a":{"$ne":null}}', '""'):
        bad = SSEClient(base + "/messages/_streams/mine?avars=" + requests.utils.quote(avars), headers=AUTH)
        assert bad.status == 400, avars
        body = json.loads(bad.body())
        assert set(body) == {"http status code", "http status description", "message"}
        assert "avars" in body["message"]


def test_injection_through_avars_stays_a_value(live):
    base = live.url
    put_streams(base)
    secret_stream = open_sse(base, '/messages/_streams/mine?avars={"n":"$fullDocument.name"}')
    post(base, {"name": "uji"})  # would match if the string became a field path
    post(base, {"name": "$fullDocument.name", "marker": 1})
    ev = secret_stream.next_event()
    assert ev.json()["fullDocument"]["marker"] == 1
    secret_stream.close()


def test_bad_requests_are_4xx_before_any_stream(live):
    base = live.url
    put_streams(base)
    r = requests.get(f"{base}/messages/_streams/all", auth=ADMIN)
    assert r.status_code == 400 and "text/event-stream" in r.json()["message"]
    assert requests.get(f"{base}/messages/_streams/nope", auth=ADMIN).status_code == 404
    assert (
        requests.get(
            f"{base}/nocoll/_streams/all", auth=ADMIN, headers={"Accept": "text/event-stream"}
        ).status_code
        == 404
    )
    for bad in ("garbage", '{"_data": "xyz"}', "[1,2]", '{"_data": 5}'):
        c = SSEClient(base + "/messages/_streams/all", headers={**AUTH, "Last-Event-ID": bad})
        assert c.status == 400, bad
        assert "Last-Event-ID" in json.loads(c.body())["message"]
    assert (
        requests.get(f"{base}/messages/_streams/all", headers={"Accept": "text/event-stream"}).status_code
        == 401
    )
    # a refused WebSocket handshake is an HTTP error, never a 101
    with pytest.raises(websocket.WebSocketBadStatusException) as exc:
        websocket.create_connection(
            ws_url(base, "/messages/_streams/all"), header=["Authorization: Basic YWRtaW46d3Jvbmc="]
        )
    assert exc.value.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as exc:
        open_ws(base, "/messages/_streams/all?lastEventId=nonsense")
    assert exc.value.status_code == 400
    # a handshake with a broken key
    s = socket.create_connection(("127.0.0.1", live.port))
    s.sendall(
        b"GET /messages/_streams/all HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\nAuthorization: "
        + ADMIN_HEADER.encode()
        + b"\r\n\r\n"
    )
    assert s.recv(100).startswith(b"HTTP/1.1 400")
    s.close()
    # bad stream definitions are refused when written, naming the stream
    r = requests.put(
        f"{base}/other", auth=ADMIN, json={"streams": [{"uri": "x", "stages": [{"$group": {}}]}]}
    )
    assert r.status_code == 400 and "'x'" in r.json()["message"]


def _seq_of(ev) -> int:
    return ev.json()["fullDocument"]["seq"]


def test_resume_under_concurrent_writes_loses_and_repeats_nothing(live):
    base = live.url
    put_streams(base, body={"streams": [{"uri": "all", "stages": []}]})
    total = 200
    received: list[int] = []
    rng = random.Random(7)

    def writer():
        for i in range(total):
            post(base, {"seq": i})
            if i % 10 == 0:
                time.sleep(0.01)

    sse = open_sse(base, "/messages/_streams/all")
    t = threading.Thread(target=writer)
    t.start()
    last_id = None
    reconnects = 0
    deadline = time.time() + 60
    while len(received) < total and time.time() < deadline:
        ev = sse.next_event(timeout=10)
        assert ev is not None and ev.event == "change", ev
        received.append(_seq_of(ev))
        last_id = ev.id
        if rng.random() < 0.05:  # drop the connection at a random point, resume
            sse.close()
            reconnects += 1
            sse = open_sse(base, "/messages/_streams/all", headers={"Last-Event-ID": last_id})
    t.join()
    sse.close()
    assert reconnects >= 3
    assert received == list(range(total))


def test_resume_from_engine_after_watcher_is_gone_and_across_restart(live_factory, tmp_path):
    data_dir = str(tmp_path / "data")
    server = live_factory(data_dir, STREAM_LINGER_SECONDS=0, STREAM_REPLAY_BUFFER=0)
    base = server.url
    put_streams(base, body={"streams": [{"uri": "all", "stages": [{"$match": {"operationType": "insert"}}]}]})
    sse = open_sse(base, "/messages/_streams/all")
    post(base, {"seq": 0})
    first = sse.next_event()
    sse.close()
    for i in range(1, 6):
        post(base, {"seq": i})
    server.stop()
    server2 = live_factory(data_dir)
    for i in range(6, 9):
        post(server2.url, {"seq": i})
    sse = open_sse(server2.url, "/messages/_streams/all", headers={"Last-Event-ID": first.id})
    got = [_seq_of(sse.next_event()) for _ in range(8)]
    assert got == list(range(1, 9))
    post(server2.url, {"seq": 9})
    assert _seq_of(sse.next_event()) == 9
    sse.close()


def test_history_lost_gets_reset_then_live(live_factory):
    server = live_factory(CHANGE_LOG_MAX_EVENTS=100, STREAM_LINGER_SECONDS=0)
    base = server.url
    put_streams(base, body={"streams": [{"uri": "all", "stages": []}]})
    sse = open_sse(base, "/messages/_streams/all")
    post(base, {"seq": 0})
    old = sse.next_event().id
    sse.close()
    r = requests.post(f"{base}/messages", auth=ADMIN, json=[{"seq": i} for i in range(1, 400)])
    assert r.status_code == 201
    post(base, {"seq": 400})  # the retention cap drops the oldest events
    sse = open_sse(base, "/messages/_streams/all", headers={"Last-Event-ID": old})
    reset = sse.next_event()
    assert reset.event == "reset"
    assert "history" in reset.json()["reason"]
    assert reset.id and json.loads(reset.id)["_data"]
    post(base, {"seq": "live"})
    # the stream goes on from the store's latest change: nothing committed before the
    # request follows the reset, even if this worker's watcher had not read it yet
    assert sse.next_event().json()["fullDocument"]["seq"] == "live"
    sse.close()
    # the reset's id is a valid position: reconnecting with it does not loop
    sse = open_sse(base, "/messages/_streams/all", headers={"Last-Event-ID": reset.id})
    ev = sse.next_event()
    assert ev.event == "change" and ev.json()["fullDocument"]["seq"] == "live"
    sse.close()
    # a token from another data store is reset too, never silently skipped
    foreign = json.dumps({"_data": "0" * 32})
    sse = open_sse(base, "/messages/_streams/all", headers={"Last-Event-ID": foreign})
    assert sse.next_event().event == "reset"
    sse.close()


def test_disconnected_client_is_cleaned_up_within_two_seconds(live):
    put_streams(live.url)
    clients = [open_sse(live.url, "/messages/_streams/all") for _ in range(3)]
    assert wait_for(lambda: live.status()["clients"] == 3)
    for c in clients:
        c.close()
    t0 = time.time()
    assert wait_for(lambda: live.status()["clients"] == 0, timeout=2.0)
    assert time.time() - t0 < 2.0
    # the watcher itself stops after its linger (0.5 s in the fixture)
    assert wait_for(lambda: live.status()["watchers"] == 0, timeout=3.0)


def test_slow_client_is_dropped_and_resumes_without_loss(live_factory):
    server = live_factory(STREAM_CLIENT_QUEUE=5, STREAM_REPLAY_BUFFER=0)
    base = server.url
    put_streams(base, body={"streams": [{"uri": "all", "stages": []}]})
    slow = open_sse(base, "/messages/_streams/all")  # never read until the end: it falls behind
    fast = open_sse(base, "/messages/_streams/all")
    blob = "x" * 60_000
    n = 300  # 18 MB: more than the kernel's socket buffers absorb for the stalled reader
    got_fast: list[int] = []
    reader = threading.Thread(target=lambda: got_fast.extend(_seq_of(fast.next_event()) for _ in range(n)))
    reader.start()
    for i in range(0, n, 5):
        requests.post(
            f"{base}/messages", auth=ADMIN, json=[{"seq": j, "blob": blob} for j in range(i, i + 5)]
        )
        time.sleep(0.02)
    reader.join(30)
    assert got_fast == list(range(n))  # the slow one never held the others back
    # the slow client was ended (overflow) after some events; it resumes from its last id
    seen, last_id = [], None
    while True:
        ev = slow.next_event(timeout=10)
        if ev is None or ev.event == "end":
            break
        seen.append(_seq_of(ev))
        last_id = ev.id
    assert len(seen) < n
    assert seen == list(range(len(seen)))
    resumed = open_sse(base, "/messages/_streams/all", headers={"Last-Event-ID": last_id})
    rest = [_seq_of(resumed.next_event()) for _ in range(n - len(seen))]
    assert seen + rest == list(range(n))
    resumed.close()
    fast.close()


def test_pipeline_error_is_reported_in_band_and_the_stream_goes_on(live):
    base = live.url
    body = {
        "streams": [
            {
                "uri": "div",
                "stages": [
                    {"_$match": {"operationType": "insert"}},
                    {"_$addFields": {"fullDocument::div": {"_$divide": [1, "$fullDocument.n"]}}},
                ],
            }
        ]
    }
    assert put_streams(base, body=body) == 201
    sse = open_sse(base, "/messages/_streams/div")
    post(base, {"n": 1})
    assert sse.next_event().json()["fullDocument"]["div"] == 1
    post(base, {"n": "string"})
    err = sse.next_event()
    assert err.event == "error" and err.json()["error"]
    assert err.id  # the failed event's position, so a reconnect does not replay it forever
    post(base, {"n": 2})
    assert sse.next_event().json()["fullDocument"]["div"] == 0.5
    sse.close()


def _ws_close_code(ws) -> int:
    op, data = ws.recv_data(control_frame=True)
    while op != websocket.ABNF.OPCODE_CLOSE:
        op, data = ws.recv_data(control_frame=True)
    return struct.unpack("!H", data[:2])[0]


def test_redefining_a_stream_closes_only_its_clients_in_every_worker(live_factory):
    server = live_factory(WORKERS=4, STREAM_LINGER_SECONDS=0.5)
    base = server.url
    body = {"streams": [{"uri": "a", "stages": []}, {"uri": "b", "stages": []}]}
    assert put_streams(base, body=body) == 201
    a_clients = [open_sse(base, "/messages/_streams/a") for _ in range(8)]
    b_clients = [open_sse(base, "/messages/_streams/b") for _ in range(8)]
    a_ws = open_ws(base, "/messages/_streams/a")
    pids = set()
    for _ in range(40):
        pids.add(requests.get(base + "/_status", auth=ADMIN).json()["pid"])
    assert len(pids) >= 2  # the clients are spread over several processes
    body2 = {
        "streams": [
            {"uri": "a", "stages": [{"$match": {"operationType": "delete"}}]},
            {"uri": "b", "stages": []},
        ]
    }
    assert put_streams(base, body=body2) == 200
    for c in a_clients:
        ev = c.next_event(timeout=5)
        assert ev is not None and ev.event == "end"
        assert c.next(5) is None  # the response ended
    assert _ws_close_code(a_ws) == 4404
    post(base, {"still": "open"})
    for c in b_clients:
        assert c.next_event(timeout=5).json()["fullDocument"]["still"] == "open"
        c.close()


def test_dropping_the_collection_closes_its_streams(live):
    base = live.url
    put_streams(base)
    sse = open_sse(base, "/messages/_streams/all")
    etag = requests.get(f"{base}/messages/_meta", auth=ADMIN).headers["ETag"]
    assert requests.delete(f"{base}/messages", auth=ADMIN).status_code == 409
    assert requests.delete(f"{base}/messages", auth=ADMIN, headers={"If-Match": etag}).status_code == 204
    ev = sse.next_event(timeout=5)
    assert ev.event == "end" and "dropped" in ev.json()["message"]
    sse.close()


def test_sigterm_ends_streams_cleanly(live_factory):
    server = live_factory()
    put_streams(server.url)
    sse = open_sse(server.url, "/messages/_streams/all")
    ws = open_ws(server.url, "/messages/_streams/all")
    assert wait_for(lambda: server.status()["clients"] == 2)
    t0 = time.time()
    server.proc.send_signal(15)
    ev = sse.next_event(timeout=10)
    assert ev is not None and ev.event == "end" and ev.json()["reason"] == "shutdown"
    assert sse.next(10) is None  # a clean end of the chunked body, no truncation error
    assert _ws_close_code(ws) == 1001
    assert server.proc.wait(15) == 0
    assert time.time() - t0 < 8


def test_websocket_pings_ignores_client_messages_and_is_cleaned_up(live_factory):
    server = live_factory(WS_PING_SECONDS=0.3, STREAM_LINGER_SECONDS=0.5)
    base = server.url
    put_streams(base)
    ws = open_ws(base, "/messages/_streams/all")
    ws.send("hello, server")  # client messages are ignored, the stream goes on
    op, _ = ws.recv_data(control_frame=True)
    assert op == websocket.ABNF.OPCODE_PING
    post(base, {"message": "after ping"})
    op, data = ws.recv_data(control_frame=True)
    while op != websocket.ABNF.OPCODE_TEXT:
        op, data = ws.recv_data(control_frame=True)
    assert json.loads(data)["fullDocument"]["message"] == "after ping"
    assert wait_for(lambda: server.status()["clients"] == 1)
    ws.sock.shutdown(socket.SHUT_RDWR)  # vanish without a close frame
    ws.sock.close()
    t0 = time.time()
    assert wait_for(lambda: server.status()["clients"] == 0, timeout=2.0)
    assert time.time() - t0 < 2.0


# A stream request that reaches a draining worker (200 + `end`, which an EventSource retries;
# 503 for a WebSocket handshake) is tests/test_faults_shutdown.py's
# test_a_request_arriving_while_draining_is_answered_then_the_connection_closes: an idle
# kept-alive socket is now closed as soon as the drain starts, so it can no longer carry one.


def test_an_http_1_0_client_gets_plain_sse_bytes_until_the_stream_ends(live):
    """The SSE plain wire form on the wire: no chunk framing, the change, then `end` and EOF."""
    put_streams(live.url)
    s = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    s.sendall(
        b"GET /messages/_streams/all HTTP/1.0\r\nAccept: text/event-stream\r\n"
        b"Authorization: " + ADMIN_HEADER.encode() + b"\r\n\r\n"
    )
    got = b""
    while b": connected\n\n" not in got:
        got += s.recv(65536)
    assert got.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in got.lower()
    assert post(live.url, {"n": 1}).status_code == 201
    while b"event:change" not in got:
        got += s.recv(65536)
    put_streams(live.url, body={"streams": [{"uri": "all", "stages": [{"$match": {"x": 1}}]}]})
    while True:  # redefined: `end`, then the server closes the connection
        part = s.recv(65536)
        if not part:
            break
        got += part
    body = got.split(b"\r\n\r\n", 1)[1]
    assert body.startswith(b"retry:3000\n: connected\n\n") and b"\r\n" not in body  # no chunk framing
    assert b'"n": 1' in body and body.endswith(b"\n\n") and b"event:end\n" in body
    s.close()


def test_tutorial_step_7_works_with_curl_exactly_as_printed(live):
    """curl's URL globbing sends `avars="n":"uji"` for the tutorial's `avars={"n":"uji"}`."""
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("the curl binary is not installed")
    put_streams(live.url)
    command = [
        "curl", "-N", "--max-time", "6",
        "-H", "Accept: text/event-stream",
        "-H", "Authorization: Basic YWRtaW46c2VjcmV0",
        f'http://127.0.0.1:{live.port}/messages/_streams/mine?avars={{"n":"uji"}}',
    ]  # fmt: skip
    curl = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: live.status()["clients"] == 1)
    for name in ("other", "uji", "someone"):
        assert post(live.url, {"message": "Hello SSE!", "name": name}).status_code == 201
    out, _ = curl.communicate(timeout=15)
    events = [json.loads(line[5:]) for line in out.decode().splitlines() if line.startswith("data:")]
    assert [e["fullDocument"]["name"] for e in events] == ["uji"]


def test_tutorial_step_7_works_with_httpie(live):
    """HTTPie (the README's other client): `http --stream` with `avars=={"n":"uji"}` (HTTPie's
    query-parameter syntax) and `n==uji` both give uji's events and no others."""
    import os
    import subprocess
    import sys

    http = os.path.join(os.path.dirname(sys.executable), "http")
    if not os.path.exists(http):
        pytest.skip("HTTPie is not installed (requirements-dev.txt)")
    put_streams(live.url)
    url = f"http://127.0.0.1:{live.port}/messages/_streams/mine"
    clients = [
        subprocess.Popen(
            [
                http,
                "--stream",
                "--ignore-stdin",
                "--timeout",
                "6",
                "-a",
                "admin:secret",
                "GET",
                url,
                query,
                "Accept:text/event-stream",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for query in ('avars=={"n":"uji"}', "n==uji")
    ]
    assert wait_for(lambda: live.status()["clients"] == 2)
    for name in ("other", "uji", "someone"):
        assert post(live.url, {"message": "Hello SSE!", "name": name}).status_code == 201
    time.sleep(0.5)
    for client in clients:
        client.terminate()  # (a stream does not end by itself)
        out, _ = client.communicate(timeout=15)
        events = [json.loads(line[5:]) for line in out.decode().splitlines() if line.startswith("data:")]
        assert [e["fullDocument"]["name"] for e in events] == ["uji"]


def test_query_parameters_are_variables_and_avars_wins(live):
    """RESTHeart 9.9: `mine?n=uji` binds n; over SSE and WebSocket; avars wins."""
    put_streams(live.url)
    by_query = open_sse(live.url, "/messages/_streams/mine?n=uji")
    ws = open_ws(live.url, "/messages/_streams/mine?n=uji")
    overridden = open_sse(live.url, '/messages/_streams/mine?n=uji&avars={"n":"bob"}')
    assert wait_for(lambda: live.status()["clients"] == 3)
    for name in ("bob", "uji"):
        assert post(live.url, {"name": name}).status_code == 201
    assert by_query.next_event().json()["fullDocument"]["name"] == "uji"
    assert json.loads(ws.recv())["fullDocument"]["name"] == "uji"
    assert overridden.next_event().json()["fullDocument"]["name"] == "bob"
    spoof = SSEClient(live.url + "/messages/_streams/mine?n=uji&@user=x", headers=AUTH)
    assert spoof.status == 400 and "reserved for server-side variables" in json.loads(spoof.body())["message"]
    for client in (by_query, overridden, spoof):
        client.close()
    ws.close()


def test_an_ifvar_stage_filters_only_when_its_variable_is_bound(live):
    body = {
        "streams": [
            {
                "uri": "opt",
                "stages": [{"_$ifvar": ["n", {"_$match": {"fullDocument::name": {"_$var": "n"}}}]}],
            }
        ]
    }
    assert put_streams(live.url, body=body) == 201
    everything = open_sse(live.url, "/messages/_streams/opt")
    only_uji = open_sse(live.url, "/messages/_streams/opt?n=uji")
    assert wait_for(lambda: live.status()["clients"] == 2 and live.status()["watchers"] == 1)
    for name in ("bob", "uji"):
        assert post(live.url, {"name": name}).status_code == 201
    assert [everything.next_event().json()["fullDocument"]["name"] for _ in range(2)] == ["bob", "uji"]
    assert only_uji.next_event().json()["fullDocument"]["name"] == "uji"
    everything.close()
    only_uji.close()


TEAM_STREAM = {
    "streams": [
        {"uri": "team", "stages": [{"_$match": {"fullDocument::team": {"_$var": "@user.team"}}}]},
    ]
}


def test_a_stream_scoped_with_user_variables_follows_the_account(live):
    """@user.<path> comes from the account only; anonymous callers get 401; a change to the
    account ends its scoped streams with `revoked`, and the reconnect binds the new value."""
    assert put_streams(live.url, body=TEAM_STREAM) == 201
    for user, team in (("ann", "red"), ("ben", "blue")):
        add_member(live.url, user, team=team)
    rule = {
        "_id": "members",
        "predicate": "path-prefix(/messages/_streams/team)",
        "roles": ["member"],
        "priority": 1,
    }
    assert requests.post(f"{live.url}/acl", auth=ADMIN, json=rule, timeout=10).status_code == 201

    def open_as(user, query=""):
        return SSEClient(f"{live.url}/messages/_streams/team{query}", headers=member(user))

    ann, ben = open_as("ann"), open_as("ben")
    assert ann.status == 200 and ben.status == 200
    # a client cannot bind or shadow @user through avars or a query parameter
    for query in (
        '?avars={"@user":{"team":"blue"}}',
        '?avars={"@user.team":"blue"}',
        "?@user.team=blue",
        "?@user=x",
    ):
        spoof = open_as("ann", query)
        assert (
            spoof.status == 400
            and "reserved for server-side variables" in json.loads(spoof.body())["message"]
        )
        spoof.close()
    anonymous = SSEClient(f"{live.url}/messages/_streams/team")
    assert anonymous.status == 401
    anonymous.close()
    assert wait_for(lambda: live.status()["clients"] == 2)
    for team in ("blue", "red"):
        assert post(live.url, {"team": team}).status_code == 201
    assert ann.next_event().json()["fullDocument"]["team"] == "red"
    assert ben.next_event().json()["fullDocument"]["team"] == "blue"
    # ann moves to blue: her stream ends, the reconnect is bound to blue
    r = requests.patch(f"{live.url}/users/ann", auth=ADMIN, json={"$set": {"team": "blue"}}, timeout=10)
    assert r.status_code == 200, r.text
    assert ann.next_event(timeout=10, kinds=("change", "revoked")).event == "revoked"
    ann.close()
    again = open_as("ann")
    assert wait_for(lambda: live.status()["clients"] == 2)
    assert post(live.url, {"team": "blue", "n": 2}).status_code == 201
    assert again.next_event().json()["fullDocument"]["team"] == "blue"
    assert ben.next_event().json()["fullDocument"]["n"] == 2  # ben's stream was not touched
    again.close()
    ben.close()


def test_notify_when_gives_each_tenant_its_events_from_one_watcher(live):
    body = {
        "streams": [{"uri": "t", "stages": [], "notify_when": {"fullDocument::tenantId": {"_$var": "tid"}}}]
    }
    assert put_streams(live.url, body=body) == 201
    acme = open_sse(live.url, "/messages/_streams/t?tid=acme")
    acme_ws = open_ws(live.url, '/messages/_streams/t?avars={"tid":"acme"}')
    numeric = open_sse(live.url, "/messages/_streams/t?tid=7")
    everyone = open_sse(live.url, "/messages/_streams/t")
    assert wait_for(lambda: live.status()["clients"] == 4)
    assert live.status()["watchers"] == 1  # one watcher for every tenant
    for tenant in ("other", "acme", 7, ["acme", "x"]):
        assert post(live.url, {"tenantId": tenant}).status_code == 201
    seen = [acme.next_event() for _ in range(2)]
    assert [e.json()["fullDocument"]["tenantId"] for e in seen] == ["acme", ["acme", "x"]]
    assert [json.loads(acme_ws.recv())["fullDocument"]["tenantId"] for _ in range(2)] == [
        "acme",
        ["acme", "x"],
    ]
    assert numeric.next_event().json()["fullDocument"]["tenantId"] == 7  # BSON equality, not strings only
    assert [everyone.next_event().json()["fullDocument"]["tenantId"] for _ in range(4)] == [
        "other", "acme", 7, ["acme", "x"],
    ]  # fmt: skip
    # acme disconnects, misses two of its events among others, and resumes exactly
    acme.close()
    for n, tenant in enumerate(("acme", "other", "acme")):
        assert post(live.url, {"tenantId": tenant, "n": n}).status_code == 201
    resumed = open_sse(live.url, "/messages/_streams/t?tid=acme", headers={"Last-Event-ID": seen[-1].id})
    assert [resumed.next_event().json()["fullDocument"]["n"] for _ in range(2)] == [0, 2]
    for client in (resumed, numeric, everyone):
        client.close()
    acme_ws.close()


def test_per_user_read_filters_share_one_watcher_and_deletes_reach_who_had_the_document(live):
    """Item 6 and 7 of issue 11, live over SSE and WebSocket: users with per-user readFilters
    on one stream hold one watcher (one cursor); an update that moves a document out of a
    user's filter tells that user without showing the new content; a delete reaches the
    users who had the document; the pre-image comes only on request, under projectResponse."""
    body = {
        "streams": [
            {"uri": "notes", "stages": []},
            {"uri": "byname", "stages": [{"_$match": {"fullDocument::name": {"_$var": "n"}}}]},
        ]
    }
    assert put_streams(live.url, body=body) == 201
    for user in ("ann", "ben"):
        add_member(live.url, user)
    rule = {
        "_id": "own-notes",
        "predicate": "path-prefix(/messages/_streams)",
        "roles": ["member"],
        "priority": 1,
        "mongo": {"readFilter": {"owner": "@user._id"}, "projectResponse": {"secret": 0}},
    }
    assert requests.post(f"{live.url}/acl", auth=ADMIN, json=rule, timeout=10).status_code == 201

    ann = open_sse(live.url, "/messages/_streams/notes", headers=member("ann"))
    ann_before = open_sse(
        live.url, "/messages/_streams/notes?fullDocumentBeforeChange=true", headers=member("ann")
    )
    ben_ws = websocket.create_connection(
        ws_url(live.url, "/messages/_streams/notes"),
        header=[f"Authorization: {member('ben')['Authorization']}"],
        timeout=10,
    )
    admin = open_sse(live.url, "/messages/_streams/byname?n=x")
    assert wait_for(lambda: live.status()["clients"] == 4)
    status = live.status()
    assert status["watchers"] == 2 and status["cursors"] == 2  # one per stream, not per user
    bad = requests.get(
        f"{live.url}/messages/_streams/notes?fullDocumentBeforeChange=yes",
        headers={**member("ann"), "Accept": "text/event-stream"},
        timeout=10,
    )
    assert (
        bad.status_code == 400 and "fullDocumentBeforeChange must be true or false" in bad.json()["message"]
    )

    post(live.url, {"_id": "d1", "owner": "ann", "name": "x", "secret": "s1"})
    assert ann.next_event().json()["operationType"] == "insert"
    assert ann_before.next_event().json()["operationType"] == "insert"
    assert admin.next_event().json()["documentKey"] == {"_id": "d1"}
    # ann gives d1 to ben: ann learns it left (no new content), ben that it arrived (no pre-image)
    r = requests.patch(
        f"{live.url}/messages/d1", auth=ADMIN, json={"$set": {"owner": "ben", "name": "y"}}, timeout=10
    )
    assert r.status_code == 200, r.text
    left = ann.next_event().json()
    assert left["operationType"] == "update" and left["documentKey"] == {"_id": "d1"}
    assert (
        "fullDocument" not in left
        and "updateDescription" not in left
        and "fullDocumentBeforeChange" not in left
    )
    left_before = ann_before.next_event().json()
    prior = left_before["fullDocumentBeforeChange"]  # the document as ann had it, secret hidden
    assert {k: v for k, v in prior.items() if k != "_etag"} == {"_id": "d1", "owner": "ann", "name": "x"}
    arrived = json.loads(ben_ws.recv())
    assert arrived["fullDocument"]["owner"] == "ben" and "secret" not in arrived["fullDocument"]
    assert "fullDocumentBeforeChange" not in arrived
    # the admin's bound $match on name "x": the rename moves d1 out, and it is told
    moved = admin.next_event().json()
    assert moved["operationType"] == "update" and moved["fullDocument"]["name"] == "y"
    # a delete reaches the one who had the document (ben), not ann
    assert requests.delete(f"{live.url}/messages/d1", auth=ADMIN, timeout=10).status_code == 204
    gone = json.loads(ben_ws.recv())
    assert gone["operationType"] == "delete" and gone["documentKey"] == {"_id": "d1"}
    post(live.url, {"_id": "d2", "owner": "ann", "name": "z"})
    assert ann.next_event().json()["documentKey"] == {"_id": "d2"}  # not the delete of ben's d1
    assert ann_before.next_event().json()["documentKey"] == {"_id": "d2"}
    for client in (ann, ann_before, admin):
        client.close()
    ben_ws.close()


def test_notify_when_on_a_server_variable_scopes_each_account_and_never_falls_open(live):
    """notify_when `@user.tenant`: each account gets its tenant's events from one watcher; an
    anonymous caller gets 401 and an account without a tenant 400, never every event."""
    body = {
        "streams": [
            {"uri": "t", "stages": [], "notify_when": {"fullDocument::tenant": {"_$var": "@user.tenant"}}}
        ]
    }
    assert put_streams(live.url, body=body) == 201
    for user, tenant in (("ann", "acme"), ("ben", "initech"), ("cat", None)):
        add_member(live.url, user, **({"tenant": tenant} if tenant else {}))
    rule = {
        "_id": "m",
        "predicate": "path-prefix(/messages/_streams/t)",
        "roles": ["member", "$unauthenticated"],
        "priority": 1,
    }
    assert requests.post(f"{live.url}/acl", auth=ADMIN, json=rule, timeout=10).status_code == 201

    sse = {"Accept": "text/event-stream"}
    url = f"{live.url}/messages/_streams/t"
    assert requests.get(url, headers=sse, timeout=10).status_code == 401
    no_tenant = requests.get(url, headers={**sse, **member("cat")}, timeout=10)
    assert no_tenant.status_code == 400 and "@user.tenant" in no_tenant.json()["message"]
    ann = open_sse(live.url, "/messages/_streams/t", headers=member("ann"))
    ben = open_sse(live.url, "/messages/_streams/t?tenant=acme", headers=member("ben"))  # not a way in
    assert wait_for(lambda: live.status()["clients"] == 2) and live.status()["watchers"] == 1
    for tenant in ("initech", "acme"):
        post(live.url, {"tenant": tenant})
    assert ann.next_event().json()["fullDocument"]["tenant"] == "acme"
    assert ben.next_event().json()["fullDocument"]["tenant"] == "initech"
    ann.close()
    ben.close()


def test_no_websocket_handshake_can_set_a_server_variable(live):
    from .test_stream_requests import SCOPED, SPOOFS

    assert put_streams(live.url, coll="s", body=SCOPED) == 201
    for query in SPOOFS:
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            open_ws(live.url, f"/s/_streams/team?{query}")
        assert info.value.status_code == 400, query
        assert b"reserved for server-side variables" in (info.value.resp_body or b""), query


def test_a_resume_token_from_the_future_or_another_store_is_never_silent(live):
    """Issue 12, item 1: a Last-Event-ID ahead of the store (a wiped or restored data
    directory) or from another store gets `reset` with the reason, then every new event;
    over SSE and WebSocket."""
    assert put_streams(live.url) == 201
    first = open_sse(live.url, "/messages/_streams/all")
    post(live.url, {"n": 0})
    real = json.loads(first.next_event().id)["_data"]
    first.close()
    future = json.dumps({"_data": real[:16] + f"{int(real[16:], 16) + 1000:016X}"})
    foreign = json.dumps({"_data": "0" * 16 + f"{int(real[16:], 16) + 1000:016X}"})
    for token, reason in ((future, "ahead of every change"), (foreign, "another data store")):
        sse = open_sse(live.url, "/messages/_streams/all", headers={"Last-Event-ID": token})
        ws = open_ws(live.url, "/messages/_streams/all?lastEventId=" + urllib.parse.quote(token))
        assert wait_for(lambda: live.status()["clients"] == 2)
        reset = sse.next_event(timeout=5)
        assert reset is not None and reset.event == "reset", "a silent stream"
        assert reason in reset.json()["reason"]
        assert json.loads(ws.recv())["reason"].find(reason) >= 0
        post(live.url, {"n": 1})
        assert sse.next_event().json()["fullDocument"]["n"] == 1
        assert json.loads(ws.recv())["fullDocument"]["n"] == 1
        sse.close()
        ws.close()
        assert wait_for(lambda: live.status()["clients"] == 0)


def test_a_websocket_client_resumes_from_the_last_id_across_a_worker_kill(live):
    """Issue 12, item 2: every WebSocket event carries its token as `_id`; a client that
    reconnects with the last one as ?lastEventId= after its worker was killed (kill -9)
    loses nothing and repeats nothing."""
    import signal

    assert put_streams(live.url) == 201
    ws = open_ws(live.url, "/messages/_streams/all")
    assert wait_for(lambda: live.status()["clients"] == 1)
    worker = live.status()["pid"]
    for n in range(2):
        post(live.url, {"n": n})
    seen = [json.loads(ws.recv()) for _ in range(2)]
    assert [e["fullDocument"]["n"] for e in seen] == [0, 1] and all("_data" in e["_id"] for e in seen)
    os.kill(worker, signal.SIGKILL)
    ws.close()
    assert wait_for(lambda: _status_or_none(live) is not None and _status_or_none(live)["pid"] != worker, 30)
    for n in range(2, 5):
        post(live.url, {"n": n})
    last = urllib.parse.quote(json.dumps(seen[-1]["_id"], separators=(",", ":")))
    again = open_ws(live.url, f"/messages/_streams/all?lastEventId={last}")
    assert [json.loads(again.recv())["fullDocument"]["n"] for _ in range(3)] == [2, 3, 4]
    post(live.url, {"n": 5})
    assert json.loads(again.recv())["fullDocument"]["n"] == 5
    again.close()


def _status_or_none(live):
    try:
        return live.status()
    except (requests.RequestException, ValueError):
        return None
