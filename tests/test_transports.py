"""The transport layer in-process, over socket pairs: wire forms, direct writes, a peer that
stops reading, pongs between frames, heartbeats, ends and the overflow grace."""

from __future__ import annotations

import json
import socket
import struct
import time

import gevent

from blueprints import transports
from blueprints.transports import SSE_CHUNKED, SSE_PLAIN, WEBSOCKET, SocketSink, encode, encode_batch
from services.hub import Batch, Message, end_message, reset_message
from tests.test_hub import engine, hub, wait_for  # noqa: F401 - the fixtures


def change(n: int) -> Message:
    return Message("change", json.dumps({"n": n}), n, f'{{"_data":"{n:032X}"}}')


def ws_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Parse unmasked server frames; every byte must belong to a whole frame."""
    out, i = [], 0
    while i < len(data):
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n = struct.unpack("!H", data[i : i + 2])[0]
            i += 2
        elif n == 127:
            n = struct.unpack("!Q", data[i : i + 8])[0]
            i += 8
        assert i + n <= len(data), "a partial frame"
        out.append((opcode, data[i : i + n]))
        i += n
    return out


def sse_events(data: bytes) -> list[dict]:
    events = []
    for block in data.decode().split("\n\n"):
        if block and not block.startswith(":"):
            fields = dict(line.split(":", 1) for line in block.splitlines())
            events.append(fields)
    return events


def read_all(sock: socket.socket, until: bytes | None = None, timeout: float = 5.0) -> bytes:
    sock.settimeout(0.3)
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            part = sock.recv(1 << 20)
        except TimeoutError:
            if until is None:
                break
            continue
        if not part:
            break
        got += part
        if until is not None and got.endswith(until):
            break
    return got


# ----------------------------------------------------------------------------- wire forms


def test_each_wire_form_of_a_change_and_of_the_end():
    message = change(7)
    sse = b'id:{"_data":"%032X"}\nevent:change\ndata:{"n": 7}\n\n' % 7
    assert encode(message, SSE_PLAIN) == sse
    assert encode(message, SSE_CHUNKED) == b"%X\r\n%s\r\n" % (len(sse), sse)
    # the WebSocket frame carries the resume token first, as `_id`
    assert ws_frames(encode(message, WEBSOCKET)) == [(0x1, b'{"_id":{"_data":"%032X"},"n": 7}' % 7)]
    assert encode(message, SSE_PLAIN) is encode(message, SSE_PLAIN)  # encoded once, then cached

    removed = end_message("removed", "stream 'all' of 'c' was removed or redefined")
    assert encode(removed, SSE_PLAIN) == (
        b'event:end\ndata:{"reason": "removed", "message": '
        b"\"stream 'all' of 'c' was removed or redefined\"}\n\n"
    )
    [(opcode, body)] = ws_frames(encode(removed, WEBSOCKET))
    assert opcode == 0x8 and struct.unpack("!H", body[:2])[0] == 4404 and b"redefined" in body
    # the reasons a client must act on are their own SSE events
    assert encode(end_message("revoked"), SSE_PLAIN).startswith(b"event:revoked\n")
    assert encode(end_message("expired"), SSE_PLAIN).startswith(b"event:expired\n")
    for reason, code in transports.CLOSE_CODES.items():
        assert ws_frames(encode(end_message(reason), WEBSOCKET))[0][1][:2] == struct.pack("!H", code)

    reset = reset_message("history lost", {"_data": f"{9:032X}"})
    assert encode(reset, SSE_PLAIN).startswith(b'id:{"_data":"%032X"}\nevent:reset\n' % 9)


def test_a_batch_is_joined_once_per_form():
    batch = Batch([change(1), change(2)])
    joined = encode_batch(batch, SSE_CHUNKED)
    assert joined == encode(batch.items[0], SSE_CHUNKED) + encode(batch.items[1], SSE_CHUNKED)
    assert encode_batch(batch, SSE_CHUNKED) is joined
    single = Batch([change(3)])
    assert encode_batch(single, WEBSOCKET) is encode(single.items[0], WEBSOCKET)


# ----------------------------------------------------------------------------- the sink on a socket


def serve(sub, form=SSE_PLAIN, heartbeat=b": hb\n\n", interval=30.0):
    ours, peer = socket.socketpair()
    sink = SocketSink(sub, ours, form, heartbeat, interval)
    greenlet = gevent.spawn(sink.serve)
    return sink, greenlet, ours, peer


def test_live_changes_are_written_directly_and_the_end_closes(hub, engine):
    sub = hub.subscribe("c", "all", None, None, "sse")
    sink, greenlet, ours, peer = serve(sub)
    wait_for(lambda: sub.sink is sink)  # idle: attached
    engine.insert(1, 2, 3)
    got = read_all(
        peer,
        until=b'data:{"operationType": "insert", "fullDocument": {"n": 3}, "documentKey": {"_id": 3}}\n\n',
    )
    assert [json.loads(e["data"])["fullDocument"]["n"] for e in sse_events(got)] == [1, 2, 3]
    sub.end("removed")
    greenlet.join(timeout=5)
    assert greenlet.dead and sse_events(read_all(peer))[-1]["event"] == "end"
    ours.close()
    peer.close()


def test_a_peer_that_stops_reading_gets_everything_in_order_once_it_reads(hub, engine):
    sub = hub.subscribe("c", "all", None, None, "sse")
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sink = SocketSink(sub, ours, SSE_CHUNKED, b"", 30.0)
    greenlet = gevent.spawn(sink.serve)
    wait_for(lambda: sub.sink is sink)
    for burst in range(10):
        engine.insert(*range(burst * 4, burst * 4 + 4))
        gevent.sleep(0.005)
    wait_for(lambda: sub.sink is None or sub.pending)  # the socket filled: detached, queuing
    got = b""
    peer.settimeout(0.5)
    while got.count(b"event:change") < 40:
        got += peer.recv(1 << 16)
    # chunked framing stayed whole: every chunk's length matches what follows it
    bodies, i = [], 0
    while i < len(got):
        end = got.index(b"\r\n", i)
        n = int(got[i:end], 16)
        bodies.append(got[end + 2 : end + 2 + n])
        assert got[end + 2 + n : end + 4 + n] == b"\r\n"
        i = end + 4 + n
    numbers = [json.loads(e["data"])["fullDocument"]["n"] for e in sse_events(b"".join(bodies))]
    assert numbers == list(range(40))
    wait_for(lambda: sub.sink is sink)  # caught up: direct writes again
    sub.end("shutdown")
    greenlet.join(timeout=5)
    ours.close()
    peer.close()


def test_a_pong_never_lands_inside_a_partly_sent_frame(hub, engine):
    sub = hub.subscribe("c", "all", None, None, "websocket")
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sink = SocketSink(sub, ours, WEBSOCKET, transports.WS_PING, 30.0)
    greenlet = gevent.spawn(sink.serve)
    wait_for(lambda: sub.sink is sink)
    big = Batch([Message("change", json.dumps({"pad": "x" * 200_000}), 1, "1")])
    sub.push(big)  # far more than the socket takes: most of it waits in the sink's tail
    assert sub.sink is None and sink.tail
    sink.send_control(transports.ws_frame(b"p1", 0xA))  # a pong while the frame is half sent
    sub.push(Batch([change(2)]))
    got = b""
    peer.settimeout(1)
    expected = len(encode(big.items[0], WEBSOCKET)) + len(transports.ws_frame(b"p1", 0xA))
    expected += len(encode(change(2), WEBSOCKET))
    while len(got) < expected:
        got += peer.recv(1 << 16)
    frames = ws_frames(got)
    assert [op for op, _ in frames] == [0x1, 0xA, 0x1]  # the big frame whole, then the pong
    assert frames[1][1] == b"p1" and json.loads(frames[2][1]) == {"_id": {"_data": f"{2:032X}"}, "n": 2}
    sub.end("shutdown")
    greenlet.join(timeout=5)
    ours.close()
    peer.close()


def test_pongs_count_against_the_queue_bound(hub):
    sub = hub.subscribe("c", "all", None, None, "websocket")
    sink = SocketSink(sub, socket.socketpair()[0], WEBSOCKET, b"", 30.0)  # never attached
    for _ in range(sub.limit + 1):
        sink.send_control(b"\x8a\x00")
    assert sub.ended is not None and sub.ended.reason == "overflow"


def test_an_idle_stream_gets_heartbeats(hub):
    sub = hub.subscribe("c", "all", None, None, "sse")
    sink, greenlet, ours, peer = serve(sub, interval=0.1)
    got = read_all(peer, timeout=0.5)
    assert got.count(b": hb\n\n") >= 2
    sub.end("gone")  # the peer went away: no end frame is written
    greenlet.join(timeout=5)
    assert read_all(peer, timeout=0.3).count(b"event:") == 0
    ours.close()
    peer.close()


def stuck_in_a_write(hub, monkeypatch, form):
    """A subscriber whose transport is stuck sending to a peer that never reads (grace 0.2 s)."""
    monkeypatch.setattr(transports, "OVERFLOW_GRACE_SECONDS", 0.2)
    sub = hub.subscribe("c", "all", None, None, "sse" if form == SSE_PLAIN else "websocket")
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sink = SocketSink(sub, ours, form, b"", 30.0)
    greenlet = gevent.spawn(sink.serve)
    wait_for(lambda: sub.sink is sink)
    sub.push(Batch([Message("change", json.dumps({"pad": "x" * 100_000}), 1, "1")]))
    gevent.sleep(0.05)  # serve is now stuck sending the tail
    return sub, greenlet, ours, peer


def test_an_overflowed_client_that_never_reads_is_cut_off_after_the_grace(hub, engine, monkeypatch):
    sub, greenlet, ours, peer = stuck_in_a_write(hub, monkeypatch, SSE_PLAIN)
    for n in range(2, 60):
        sub.push(Batch([change(n)]))
    assert sub.ended is not None and sub.ended.reason == "overflow"
    greenlet.join(timeout=5)
    assert greenlet.dead  # the socket was shut down: the stuck write ended
    ours.close()
    peer.close()


def test_gunicorn_refuses_tls_with_one_clear_line(tmp_path):
    """Direct writes would bypass TLS, so the server does not start with a certificate."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, free_port

    env = {**os.environ, "PORT": str(free_port()), "DATA_DIR": str(tmp_path / "d")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "--certfile",
            str(tmp_path / "cert.pem"),
            "--keyfile",
            str(tmp_path / "key.pem"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("changefeed:")]
    assert lines == [
        "changefeed: refusing to start with certfile/keyfile: it does not terminate TLS; "
        "put a TLS proxy (nginx, Caddy, a load balancer) in front of it"
    ]


def test_a_revoked_client_that_stopped_reading_is_cut_off_after_the_grace(hub, engine, monkeypatch):
    """Not only overflow: any end must reach a client stuck in a write, or it holds its socket."""
    sub, greenlet, ours, peer = stuck_in_a_write(hub, monkeypatch, WEBSOCKET)  # then the stream goes quiet
    sub.end("revoked")
    greenlet.join(timeout=5)
    assert greenlet.dead and sub.on_end is None
    ours.close()
    peer.close()
