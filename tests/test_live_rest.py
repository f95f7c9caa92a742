"""Live tests: gunicorn with the real gunicorn.conf.py, real sockets, `requests` as the client.

What a new user does after `make run`: the tutorial's PUT /messages, POST and PATCH with
`-u admin:secret`, and what they see when they forget the credentials or mistype a setting.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import requests

from services.storage.embedded import decode

from .conftest import ADMIN, ROOT, free_port

pytestmark = pytest.mark.live

ALL_STREAM = {
    "uri": "all",
    "stages": [{"_$match": {"_$or": [{"operationType": "insert"}, {"operationType": "update"}]}}],
}
ERROR_KEYS = ["http status code", "http status description", "message"]


def change_events(data_dir: str, coll: str) -> list[dict]:
    conn = sqlite3.connect(os.path.join(data_dir, "changefeed.sqlite3"))
    try:
        rows = conn.execute(
            "SELECT event FROM changes WHERE coll=? AND kind='event' ORDER BY seq", (coll,)
        ).fetchall()
    finally:
        conn.close()
    return [decode(r[0]) for r in rows]


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_tutorial_put_post_patch(live):
    r = requests.put(f"{live.url}/messages", json={"streams": [ALL_STREAM]}, auth=ADMIN, timeout=5)
    assert r.status_code == 201
    assert len(r.headers["ETag"]) == 24
    meta = requests.get(f"{live.url}/messages/_meta", auth=ADMIN, timeout=5).json()
    assert meta["streams"] == [ALL_STREAM]  # stored as sent: `_$match` is not unescaped

    r = requests.post(
        f"{live.url}/messages", json={"message": "Hello SSE!", "name": "uji"}, auth=ADMIN, timeout=5
    )
    assert r.status_code == 201
    location = r.headers["Location"]
    doc_id = r.json()["_id"]["$oid"]
    assert location.endswith(f"/messages/{doc_id}")
    url = location if location.startswith("http") else live.url + location

    r = requests.patch(url, json={"message": "Hello again", "$unset": {"name": 1}}, auth=ADMIN, timeout=5)
    assert r.status_code == 200
    etag = r.headers["ETag"]
    doc = requests.get(url, auth=ADMIN, timeout=5).json()
    assert doc == {"_id": {"$oid": doc_id}, "message": "Hello again", "_etag": {"$oid": etag}}

    insert, update = change_events(live.data_dir, "messages")
    assert insert["operationType"] == "insert"
    assert insert["fullDocument"]["message"] == "Hello SSE!" and insert["fullDocument"]["name"] == "uji"
    assert str(insert["documentKey"]["_id"]) == doc_id
    assert update["operationType"] == "update"
    assert update["updateDescription"]["updatedFields"]["message"] == "Hello again"
    assert update["updateDescription"]["removedFields"] == ["name"]
    assert update["ns"] == {"db": "restheart", "coll": "messages"}


def test_curl_style_credentials_in_the_url(live):
    """`curl http://admin:secret@host/...` sends the same Basic header as `-u admin:secret`."""
    url = live.url.replace("http://", "http://admin:secret@")
    assert requests.get(url + "/", timeout=5).json() == ["acl", "users"]


def test_401_without_credentials(live):
    r = requests.get(f"{live.url}/", timeout=5)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="changefeed"'
    assert list(r.json()) == ERROR_KEYS
    r = requests.post(f"{live.url}/messages", json={"a": 1}, headers={"No-Auth-Challenge": "1"}, timeout=5)
    assert r.status_code == 401
    assert "WWW-Authenticate" not in r.headers
    r = requests.get(f"{live.url}/", auth=("admin", "wrong"), timeout=5)
    assert r.status_code == 401
    assert r.json()["http status code"] == 401


def test_bad_requests_over_the_wire(live):
    requests.put(f"{live.url}/messages", json={}, auth=ADMIN, timeout=5)
    r = requests.post(
        f"{live.url}/messages",
        data="{not json",
        auth=ADMIN,
        timeout=5,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and list(r.json()) == ERROR_KEYS
    r = requests.post(
        f"{live.url}/messages", data="{}", auth=ADMIN, timeout=5, headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 415 and list(r.json()) == ERROR_KEYS
    r = requests.get(
        f"{live.url}/messages", params={"filter": json.dumps({"$where": "1"})}, auth=ADMIN, timeout=5
    )
    assert r.status_code == 400 and "$where" in r.json()["message"]
    assert change_events(live.data_dir, "messages") == []


def test_access_log_has_request_lines(live):
    requests.put(f"{live.url}/logged", json={}, auth=ADMIN, timeout=5)
    requests.post(f"{live.url}/logged", json={"x": 1}, auth=ADMIN, timeout=5)
    requests.get(
        f"{live.url}/logged",
        params={"filter": '{"x":1}', "access_token": "SECRET-TOKEN"},
        auth=ADMIN,
        timeout=5,
    )
    requests.get(f"{live.url}/logged", timeout=5)

    def logged():
        text = live.read_log()
        return text if '"GET /logged HTTP/1.1" 401' in text else None

    text = wait_for(logged)
    assert text, live.read_log()
    assert '"PUT /logged HTTP/1.1" 201' in text
    assert '"POST /logged HTTP/1.1" 201' in text
    assert '"GET /logged HTTP/1.1" 400' in text  # access_token off a stream URL is refused
    assert "SECRET-TOKEN" not in text
    assert "127.0.0.1" in text


def test_two_workers_both_serve(live_factory, tmp_path):
    server = live_factory(str(tmp_path / "two"), WORKERS=2)
    pids = set()
    deadline = time.time() + 20
    while len(pids) < 2 and time.time() < deadline:
        # a new connection each time, so the kernel spreads them over both workers
        r = requests.get(f"{server.url}/_status", auth=ADMIN, timeout=5, headers={"Connection": "close"})
        assert r.status_code == 200
        pids.add(r.json()["pid"])
    assert len(pids) == 2, pids

    # writes through either worker land in the one shared store
    assert requests.put(f"{server.url}/shared", json={}, auth=ADMIN, timeout=5).status_code == 201
    for i in range(20):
        r = requests.post(
            f"{server.url}/shared", json={"_id": i}, auth=ADMIN, timeout=5, headers={"Connection": "close"}
        )
        assert r.status_code == 201
    for _ in range(6):
        r = requests.get(
            f"{server.url}/shared",
            params={"pagesize": 100},
            auth=ADMIN,
            timeout=5,
            headers={"Connection": "close"},
        )
        assert sorted(d["_id"] for d in r.json()) == list(range(20))
    events = change_events(server.data_dir, "shared")
    assert [e["documentKey"]["_id"] for e in events] == list(range(20))
    # exactly one admin, though two workers started on an empty store at once
    users = requests.get(f"{server.url}/users", auth=ADMIN, timeout=5).json()
    assert [u["_id"] for u in users] == ["admin"]


@pytest.mark.parametrize(
    "name, value",
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("WORKERS", "0"),
        ("WORKERS", "many"),
        ("LOG_LEVEL", "loud"),
        ("MONGO_URI", "http://x"),
        ("MAX_CONTENT_LENGTH", "-1"),
    ],
)
def test_bad_setting_stops_start_up_with_one_line(tmp_path, name, value):
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "DATA_DIR": str(tmp_path / "d"),
        name: value,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "gunicorn.conf.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    output = (proc.stdout + proc.stderr).strip()
    lines = output.splitlines()
    assert len(lines) == 1, output
    assert name in lines[0] and value in lines[0]
    assert "Traceback" not in output
