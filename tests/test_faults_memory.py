"""Memory that closed connections and large documents leave behind (issue 12, item 3), live.

gunicorn.conf.py tunes the GC so that full collections practically never run on their own
(they paused 10,000 connections for 150-450 ms). Whatever a closed connection leaves in a
reference cycle then stays: the WebSocket handler's cycles kept ~10 KB per connection.
These tests count the cycles a full collection finds (`/_status?sweep=1`) after many
connections came and went, and the memory the worker keeps after large documents passed.
The byte bounds themselves are tested in-process (tests/test_hub.py, tests/test_engine.py);
RSS figures for 10,000 connections are bench/robustness.py's.
"""

from __future__ import annotations

import base64
import os
import socket
import time

import requests
from gevent.pool import Pool

from bench import loadgen

from .conftest import ADMIN

STREAMS = {"streams": [{"uri": "all", "stages": []}]}


def _wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _open(port: int, kind: str) -> socket.socket:
    """A stream client whose stream is open (the SSE opening or the 101 has arrived)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(loadgen._request("/feed/_streams/all", kind, f"127.0.0.1:{port}"))
    data = b""
    while b"connected" not in data and b" 101 " not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return sock


def test_closed_connections_leave_no_reference_cycles(live_factory):
    """400 SSE and WebSocket clients open a stream and hang up: their connection handlers
    are freed at once, by reference counting. Before the fix each WebSocket handler stayed
    in a reference cycle (with its socket, buffers and WebSocket) until a full collection,
    which the GC tuning makes practically never happen."""
    server = live_factory(STREAM_MAX_PER_USER=5000, STREAM_MAX_PER_ADDRESS=5000)
    assert requests.put(f"{server.url}/feed", auth=ADMIN, json=STREAMS, timeout=10).status_code == 201
    socks = Pool(100).map(lambda i: _open(server.port, "ws" if i % 2 else "sse"), range(400))
    try:
        assert _wait_for(lambda: server.status()["clients"] == 400)
        during = requests.get(f"{server.url}/_status?detail=1", auth=ADMIN, timeout=30).json()
        assert during["handlers"] >= 400  # what the count counts
    finally:
        for sock in socks:
            sock.close()
    assert _wait_for(lambda: server.status()["clients"] == 0)
    after = requests.get(f"{server.url}/_status?detail=1", auth=ADMIN, timeout=30).json()
    assert after["handlers"] <= 2, f"{after['handlers']} connection handlers left after 400 closed"
    swept = requests.get(f"{server.url}/_status?sweep=1", auth=ADMIN, timeout=30).json()
    assert swept["collected"] < 20 * 400  # werkzeug's router leaves a small cycle per request


def test_large_documents_are_not_kept_after_their_client_left(live_factory):
    """Twenty 2 MB documents through one SSE client: the replay buffer keeps at most
    STREAM_REPLAY_BYTES of them, the process feed its own bound, and after the client left
    (the watcher lingers 0.5 s) the worker gives the rest back. Before the byte bounds all
    twenty stayed in the buffer, the feed and their caches: several hundred MB."""
    server = live_factory(STREAM_LINGER_SECONDS=0.5, STREAM_REPLAY_BYTES=4 << 20)
    assert requests.put(f"{server.url}/feed", auth=ADMIN, json=STREAMS, timeout=10).status_code == 201
    pid = server.status()["pid"]
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    auth = "Basic " + base64.b64encode(b"admin:secret").decode()
    sock.sendall(
        f"GET /feed/_streams/all HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
        f"Authorization: {auth}\r\n\r\n".encode()
    )
    requests.get(f"{server.url}/_status?sweep=1", auth=ADMIN, timeout=30)
    before = _rss_kb(pid)
    blob = "z" * (2 << 20)
    received = 0
    with requests.Session() as s:
        for i in range(20):
            r = s.post(f"{server.url}/feed", auth=ADMIN, json={"i": i, "blob": blob}, timeout=30)
            assert r.status_code == 201
            while received < (i + 1) * len(blob):  # read as we go: the client keeps up
                data = sock.recv(1 << 20)
                assert data, "the stream ended"
                received += len(data)
    sock.close()
    assert _wait_for(lambda: server.status()["watchers"] == 0)
    requests.get(f"{server.url}/_status?sweep=1", auth=ADMIN, timeout=30)
    kept_mb = (_rss_kb(pid) - before) / 1024
    # the feed (16 MiB of row text at most) and allocator slack; not 20 x 2 MB x encodings
    assert kept_mb < 40, f"{kept_mb:.0f} MB kept after the client left"
    assert os.path.exists(f"/proc/{pid}")


def test_stalled_clients_are_dropped_with_one_log_line_each(live_factory):
    """Clients that stop reading (SSE and WebSocket) fall behind, are ended (`overflow`)
    and, after the grace period for their end frame, disconnected. Each leaves its access
    line and nothing else: no traceback."""
    server = live_factory(STREAM_CLIENT_QUEUE=5, LOG_LEVEL="info")
    assert requests.put(f"{server.url}/feed", auth=ADMIN, json=STREAMS, timeout=10).status_code == 201
    auth = "Basic " + base64.b64encode(b"admin:secret").decode()
    stalled = []
    for i in range(10):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
        sock.connect(("127.0.0.1", server.port))
        upgrade = (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            if i % 2
            else "Accept: text/event-stream\r\n"
        )
        sock.sendall(
            f"GET /feed/_streams/all HTTP/1.1\r\nHost: x\r\n{upgrade}Authorization: {auth}\r\n\r\n".encode()
        )
        stalled.append(sock)
    try:
        assert _wait_for(lambda: server.status()["clients"] == 10)
        blob = "x" * 100_000
        with requests.Session() as s:
            for i in range(40):
                assert s.post(f"{server.url}/feed", auth=ADMIN, json={"i": i, "blob": blob}, timeout=10).ok
        assert _wait_for(lambda: server.status()["clients"] == 0, timeout=30)  # grace: 10 s
    finally:
        for sock in stalled:
            sock.close()
    log = server.read_log()
    assert "Traceback" not in log and "Error" not in log, log[-3000:]
    assert log.count("/feed/_streams/all") == 10, log[-3000:]
