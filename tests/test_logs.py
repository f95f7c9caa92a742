"""Log lines (issue 13, item 4): a stream's access line, written when it ends, gives its
duration, events and bytes; LOG_FORMAT=json makes every line one JSON object. Live."""

from __future__ import annotations

import json
import re
import socket

import pytest
import requests

from services import config as settings

from .test_live_streams import open_sse, post, put_streams, wait_for


def _stream_three_events_and_close(base: str) -> None:
    put_streams(base, body={"streams": [{"uri": "all", "stages": []}]})
    sse = open_sse(base, "/messages/_streams/all")
    for n in range(3):
        post(base, {"n": n})
    assert [sse.next_event().event for _ in range(3)] == ["change"] * 3
    sse.close()


def test_a_streams_access_line_gives_its_duration_events_and_bytes(live):
    _stream_three_events_and_close(live.url)
    line = re.compile(
        r'^127\.0\.0\.1 "GET /messages/_streams/all HTTP/1\.1" 200 \d+ (\d+\.\d{6})s "[^"]*" '
        r"events=(\d+) bytes=(\d+)$",
        re.M,
    )
    found = wait_for(lambda: line.search(live.read_log()), timeout=5)
    assert found, live.read_log()[-2000:]
    assert float(found.group(1)) > 0 and int(found.group(2)) == 3 and int(found.group(3)) > 300


def test_log_format_json_writes_one_object_per_line(live_factory):
    server = live_factory(LOG_FORMAT="json", LOG_LEVEL="info")
    _stream_three_events_and_close(server.url)
    assert requests.get(f"{server.url}/_health", timeout=5).status_code == 200
    # a request gevent refuses itself (a header line without a colon): its message too
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /_health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")

    def lines() -> list[dict]:
        return [json.loads(text) for text in server.read_log().splitlines() if text.strip()]

    def stream_line():
        return next((e for e in lines() if e.get("path") == "/messages/_streams/all" and "events" in e), None)

    entry = wait_for(stream_line, timeout=5)
    assert entry, server.read_log()[-2000:]  # every line parsed as JSON to get here
    assert entry["events"] == 3 and entry["stream_bytes"] > 300 and entry["status"] == "200"
    assert entry["method"] == "GET" and entry["seconds"] > 0 and entry["logger"] == "gunicorn.access"
    messages = [e for e in lines() if "message" in e]
    assert any(e["logger"] == "gunicorn.error" for e in messages)  # gunicorn's own lines too
    assert all({"time", "level", "pid"} <= e.keys() for e in lines())


def test_a_text_access_line_cannot_be_split_by_what_the_client_sent(live):
    """A newline decoded from %0a in the path, or a control character in the User-Agent, is
    escaped: one request, one line, and no forged second line."""
    forged = '127.0.0.1 "GET /admin HTTP/1.1" 200 146 0.000500s "curl'
    requests.get(f"{live.url}/zz%0a{forged.replace(' ', '%20')}", headers={"User-Agent": "a\x1bb"}, timeout=5)
    line = wait_for(
        lambda: next((x for x in live.read_log().splitlines() if x.startswith('127.0.0.1 "GET /zz')), None)
    )
    assert line and "/zz\\n127.0.0.1" in line and "a\\x1bb" in line, live.read_log()[-1000:]
    assert not any(
        x.startswith('127.0.0.1 \\"GET /admin') or x.startswith(forged) for x in live.read_log().splitlines()
    )


def test_log_format_takes_text_or_json_only():
    assert settings.load(overrides={"LOG_FORMAT": "JSON"})["LOG_FORMAT"] == "json"
    with pytest.raises(settings.ConfigError, match="LOG_FORMAT must be one of text, json"):
        settings.load(overrides={"LOG_FORMAT": "yaml"})
