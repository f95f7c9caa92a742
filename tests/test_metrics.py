"""GET /metrics (issue 13, item 1): every family, summed across gunicorn's workers, moving as a
scripted scenario runs (connect, insert, overflow, revoke, reset, hang up, a worker killed).

Live: gunicorn with the real gunicorn.conf.py, which gives the workers a multiprocess
directory. Counters are compared before and after each step; gauges are waited for (the
worker that answers a scrape refreshes its own at once, the others every REFRESH_SECONDS).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ADMIN
from .sseclient import SSEClient
from .test_live_streams import open_sse, post, put_streams, wait_for

FAMILIES = [
    "changefeed_stream_clients",
    "changefeed_watchers",
    "changefeed_cursors",
    "changefeed_events",
    "changefeed_deliveries",
    "changefeed_delivery_lag_seconds",
    "changefeed_client_queue_events",
    "changefeed_disconnects",
    "changefeed_resumes",
    "changefeed_resets",
    "changefeed_http_requests",
    "changefeed_http_request_duration_seconds",
    "changefeed_auth_failures",
    "changefeed_history_window_seconds",
    "changefeed_oldest_client_position_age_seconds",
]


def scrape(base: str) -> dict:
    """{(sample name, frozen labels): value} of one scrape."""
    r = requests.get(f"{base}/metrics", auth=ADMIN, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain"), r.text[:300]
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    out["_families"] = {f.name for f in text_string_to_metric_families(r.text)}
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for k, v in samples.items() if k != "_families" and k[0] == name and want <= k[1])


def test_metrics_are_protected_and_move_with_a_scenario_across_two_workers(live_factory):
    server = live_factory(
        WORKERS=2, STREAM_CLIENT_QUEUE=5, SSE_HEARTBEAT_SECONDS=1, STREAM_LINGER_SECONDS=0.5
    )
    base = server.url
    assert requests.get(f"{base}/metrics", timeout=5).status_code == 401
    put_streams(base, body={"streams": [{"uri": "all", "stages": []}]})
    before = scrape(base)
    per_stream = {"changefeed_stream_clients", "changefeed_events"}  # once a stream is open
    assert set(FAMILIES) - per_stream <= before["_families"], set(FAMILIES) - before["_families"]

    # connect: six clients, wherever the kernel puts them, counted once each
    clients = [open_sse(base, "/messages/_streams/all") for _ in range(6)]
    assert wait_for(
        lambda: total(scrape(base), "changefeed_stream_clients", transport="sse") == 6, timeout=15
    )
    assert set(FAMILIES) <= scrape(base)["_families"]
    # insert: three events reach six clients
    for n in range(3):
        post(base, {"n": n})
    last_id = None
    for c in clients:
        got = [c.next_event() for _ in range(3)]
        assert [e.event for e in got] == ["change"] * 3
        last_id = got[-1].id
    now = scrape(base)
    assert total(now, "changefeed_deliveries_total") - total(before, "changefeed_deliveries_total") == 18
    assert total(now, "changefeed_events_total", collection="messages", stream="all") >= 3
    assert (
        value(now, "changefeed_delivery_lag_seconds_count")
        - value(before, "changefeed_delivery_lag_seconds_count")
        >= 3
    )
    assert total(now, "changefeed_watchers") >= 1 and total(now, "changefeed_cursors") >= 1
    assert value(now, "changefeed_history_window_seconds") > 0
    assert (
        total(now, "changefeed_http_requests_total", method="POST", route="/<coll>", status="201")
        - total(before, "changefeed_http_requests_total", method="POST", route="/<coll>", status="201")
        == 3
    )
    # a failed login
    assert requests.get(f"{base}/", auth=("admin", "wrong"), timeout=5).status_code == 401
    # a reset: a token ahead of the store
    future = '{"_data":"' + json.loads(last_id)["_data"][:16] + "F" * 16 + '"}'
    ahead = open_sse(base, "/messages/_streams/all", headers={"Last-Event-ID": future})
    assert ahead.next_event().event == "reset"
    # a resume from memory
    again = open_sse(base, "/messages/_streams/all", headers={"Last-Event-ID": last_id})
    # revoke: a reader whose account is deleted
    requests.post(
        f"{base}/users", auth=ADMIN, json={"_id": "bob", "password": "pw-bob", "roles": ["r"]}, timeout=10
    ).raise_for_status()
    rule = {"_id": "r", "predicate": "path-prefix(/messages/_streams)", "roles": ["r"], "priority": 1}
    requests.post(f"{base}/acl", auth=ADMIN, json=rule, timeout=10).raise_for_status()
    bob_auth = "Basic " + base64.b64encode(b"bob:pw-bob").decode()
    bob = SSEClient(base + "/messages/_streams/all", headers={"Authorization": bob_auth})
    assert bob.status == 200
    assert requests.delete(f"{base}/users/bob", auth=ADMIN, timeout=10).status_code == 204
    ended = bob.next_event(timeout=10, kinds=("change", "revoked", "end"))
    assert ended is not None and ended.event == "revoked"
    # overflow: a client that stops reading falls more than 5 events behind
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(
        b"GET /messages/_streams/all HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
        b"Authorization: Basic YWRtaW46c2VjcmV0\r\n\r\n"
    )
    time.sleep(0.5)
    blob = "x" * 200_000
    for n in range(60):  # 12 MB: more than the socket buffers hold, then 5 more events
        post(base, {"n": n, "blob": blob})

    def moved() -> bool:
        s = scrape(base)
        return (
            total(s, "changefeed_disconnects_total", reason="overflow") >= 1
            and total(s, "changefeed_disconnects_total", reason="revoked") >= 1
            and total(s, "changefeed_resets_total", reason="ahead") >= 1
            and total(s, "changefeed_resumes_total", source="buffer")
            + total(s, "changefeed_resumes_total", source="live")
            >= 1
            and total(s, "changefeed_auth_failures_total", method="basic") >= 1
            and value(s, "changefeed_client_queue_events_count") >= 1
        )

    assert wait_for(moved, timeout=15), {
        k: v for k, v in scrape(base).items() if k != "_families" and v and "http" not in k[0]
    }
    for c in [*clients, ahead, again, bob]:  # they stopped reading too: ended by now
        c.close()
    stalled.close()
    assert wait_for(lambda: total(scrape(base), "changefeed_stream_clients") == 0, timeout=15)
    # hang up: three clients that close count as `gone`, and the gauges come back down
    gone = total(scrape(base), "changefeed_disconnects_total", reason="gone")
    fresh = [open_sse(base, "/messages/_streams/all") for _ in range(3)]
    assert wait_for(lambda: total(scrape(base), "changefeed_stream_clients") == 3, timeout=15)
    for c in fresh:
        c.close()
    assert wait_for(lambda: total(scrape(base), "changefeed_stream_clients") == 0, timeout=15)
    assert total(scrape(base), "changefeed_disconnects_total", reason="gone") - gone == 3

    # a worker killed with streams open: its live gauges drop out of the sum
    held = [open_sse(base, "/messages/_streams/all") for _ in range(6)]
    assert wait_for(lambda: total(scrape(base), "changefeed_stream_clients") == 6, timeout=15)
    victim = server.status()["pid"]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: total(scrape(base), "changefeed_stream_clients") < 6, timeout=15)
    for c in held:
        c.close()


def test_reset_reasons_map_to_a_bounded_label():
    from services import metrics

    cases = {
        "the resume token was issued by another data store (or before it was reset)": "foreign",
        "the resume token is ahead of every change this store has made": "ahead",
        "the resume token is ahead of every change this cluster has made": "ahead",
        "the resume token is older than the retained change history": "history_lost",
        "the stream fell behind the retained change history": "history_lost",
        "cannot resume the change stream: ChangeStreamHistoryLost": "history_lost",
        "something new": "other",
    }
    assert {text: metrics.reset_kind(text) for text in cases} == cases
    assert set(cases.values()) <= set(metrics.RESET_KINDS)


def test_an_acl_rule_opens_metrics_to_a_scrapers_role(client, anon):
    """As the README shows it: a role named by a rule on path(/metrics) may scrape, and
    nothing else; without the rule it is refused like any URL."""
    basic = "Basic " + base64.b64encode(b"scraper:pw-scraper").decode()
    assert (
        client.post(
            "/users", json={"_id": "scraper", "password": "pw-scraper", "roles": ["scraper"]}
        ).status_code
        == 201
    )
    assert anon.get("/metrics", headers={"Authorization": basic}).status_code == 403
    rule = {"_id": "scrape", "predicate": "path(/metrics)", "roles": ["scraper"], "priority": 1}
    assert client.post("/acl", json=rule).status_code == 201
    r = anon.get("/metrics", headers={"Authorization": basic})
    assert r.status_code == 200 and r.content_type.startswith("text/plain; version=0.0.4")
    assert b"changefeed_http_requests_total" in r.data
    assert anon.get("/messages", headers={"Authorization": basic}).status_code == 403
