"""Storage faults on the embedded engine (issue 12, item 4): a full disk is a 507 with its
cause and makes /_ready say 503, a database locked by another process is a 503 with
Retry-After after EMBEDDED_BUSY_TIMEOUT_SECONDS, and neither stalls reads or stream opens.

Disk full is made two ways: deterministically with SQLite's `max_page_count` on the
engine's write connection (in-process), and for real with a small tmpfs (live, when this
machine lets us mount one: root and a working `mount`; skipped otherwise).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import flask
import gevent
import pytest
import requests

from app import create_app
from blueprints import errors as error_views
from services.errors import InsufficientStorage, Unavailable
from services.storage.embedded import EmbeddedEngine

from .conftest import ADMIN, ADMIN_HEADER
from .sseclient import SSEClient

STREAMS = {"streams": [{"uri": "all", "stages": []}]}
BIG = "x" * 200_000  # a document of ~200 kB: 50 pages of 4 kB


# -- the error types and how they render --------------------------------------------


def test_errors_render_with_status_and_retry_after():
    app = flask.Flask(__name__)
    error_views.init_app(app)

    @app.get("/full")
    def full():
        raise InsufficientStorage("the database's disk is full: database or disk is full")

    @app.get("/locked")
    def locked():
        raise Unavailable("the database is locked by another process", retry_after=1.2)

    @app.get("/down")
    def down():
        raise Unavailable("MongoDB is unreachable")

    client = app.test_client()
    r = client.get("/full")
    assert r.status_code == 507
    assert r.json["http status description"] == "Insufficient Storage"
    assert "disk is full" in r.json["message"]
    r = client.get("/locked")
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"
    assert "locked by another process" in r.json["message"]
    r = client.get("/down")
    assert r.status_code == 503 and "Retry-After" not in r.headers


# -- disk full, deterministic: max_page_count on the write connection -----------------


def cap_pages(engine: EmbeddedEngine, extra: int) -> None:
    """Let the database grow by at most `extra` pages. max_page_count is per connection;
    every write runs on the engine's one write connection, so this caps all writes."""

    def run(txn) -> None:
        pages = txn.conn.execute("PRAGMA page_count").fetchone()[0]
        txn.conn.execute(f"PRAGMA max_page_count={pages + extra}")

    engine._write(run)


def uncap_pages(engine: EmbeddedEngine) -> None:
    engine._write(lambda txn: txn.conn.execute("PRAGMA max_page_count=4294967294"))


@pytest.fixture
def capped(data_dir):
    engine = EmbeddedEngine(data_dir)
    app = create_app({"DATA_DIR": data_dir, "STREAM_LINGER_SECONDS": 0.2}, engine=engine)
    app.testing = True
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = ADMIN_HEADER
    yield engine, client
    app.extensions["changefeed.hub"].close_all()
    engine.close()


def fill(client, body: dict, limit: int) -> int:
    """POST copies of `body` until one answers 507 (at most `limit`); their count."""
    for n in range(limit):
        r = client.post("/things", json=body)
        if r.status_code == 507:
            return n
        assert r.status_code == 201, r.get_data(as_text=True)
    raise AssertionError(f"no 507 after {limit} writes")


def test_disk_full_is_507_with_cause_and_ready_503_until_a_write_succeeds(capped, caplog):
    engine, client = capped
    assert client.put("/things", json={}).status_code in (200, 201)
    for i in range(3):
        assert client.post("/things", json={"_id": f"big{i}", "s": BIG}).status_code == 201
    assert client.post("/things", json={"_id": "small", "n": 1}).status_code == 201
    cap_pages(engine, 20)
    caplog.set_level(logging.INFO, logger="services")
    caplog.clear()

    r = client.post("/things", json={"s": BIG})
    assert r.status_code == 507, r.get_data(as_text=True)
    assert r.json["message"] == "the database's disk is full: database or disk is full"
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and "database or disk is full" in errors[0].getMessage()
    assert errors[0].exc_info is None  # one line, no traceback
    assert "cannot rollback" not in caplog.text and "internal error" not in r.get_data(as_text=True)

    ready = client.get("/_ready")
    assert ready.status_code == 503 and "disk is full" in ready.json["error"]
    health = client.get("/_health")
    assert health.status_code == 200 and "disk is full" in health.json["storage"]

    fill(client, {"s": "y" * 3000}, 500)  # now even small writes fail
    assert client.get("/_ready").status_code == 503
    assert client.patch("/things/small", json={"$set": {"s": BIG}}).status_code == 507
    assert client.get("/things/small").json["n"] == 1  # reads go on; nothing was lost

    # a delete frees the space of its document (its event keeps no pre-image when full)
    r = client.delete("/things/big0")
    assert r.status_code == 204, r.get_data(as_text=True)
    r = client.post("/things", json={"_id": "after", "n": 2})
    assert r.status_code == 201, r.get_data(as_text=True)
    assert client.get("/_ready").status_code == 200
    assert "storage" not in client.get("/_health").json
    assert client.get("/things/big1").json["s"] == BIG
    uncap_pages(engine)


def test_delete_many_frees_space_too(capped):
    engine, client = capped
    assert client.put("/things", json={}).status_code in (200, 201)
    for i in range(4):
        assert client.post("/things", json={"_id": i, "kind": "big", "s": BIG}).status_code == 201
    cap_pages(engine, 5)
    fill(client, {"s": "y" * 3000}, 500)
    r = client.delete("/things/*?filter=" + '{"kind":"big"}')
    assert r.status_code == 200, r.get_data(as_text=True)
    assert client.post("/things", json={"s": "y" * 3000}).status_code == 201
    uncap_pages(engine)


def test_rollback_failure_never_replaces_the_error(data_dir, caplog):
    """After SQLITE_FULL, SQLite has rolled back already: no ROLLBACK is sent (it would fail
    with 'cannot rollback - no transaction is active' and hide the real cause)."""
    engine = EmbeddedEngine(data_dir)
    engine.ensure_collection("c")
    cap_pages(engine, 2)
    caplog.set_level(logging.INFO)
    with pytest.raises(InsufficientStorage, match="disk is full: database or disk is full"):
        engine.insert_documents("c", [{"s": BIG}])
    assert "cannot rollback" not in caplog.text
    assert "disk is full" in (engine.storage_problem() or "")
    uncap_pages(engine)  # a write that succeeds clears the fault
    assert engine.storage_problem() is None
    engine.insert_documents("c", [{"s": BIG}])
    engine.close()


def test_a_rollback_that_leaves_the_transaction_open_does_not_block_later_writes(data_dir, monkeypatch):
    """Writes share one connection: if a ROLLBACK ever failed and left it inside a
    transaction, every later BEGIN would fail. The connection is replaced instead."""
    from services.storage import embedded

    engine = EmbeddedEngine(data_dir)
    engine.ensure_collection("c")
    engine.insert_documents("c", [{"_id": 1}])
    monkeypatch.setattr(embedded, "_rollback", lambda conn, cause: None)  # as if it had failed
    with pytest.raises(Exception, match="duplicate|exists"):
        engine.insert_documents("c", [{"_id": 2}, {"_id": 1}])
    engine.insert_documents("c", [{"_id": 3}])
    assert [d["_id"] for d in engine.find("c", {}, [("_id", 1)], None, 0, 0)] == [1, 3]
    engine.close()


# -- locked by another process ----------------------------------------------------------


class LockHolder:
    """Another process holding SQLite's write lock (BEGIN IMMEDIATE) until released."""

    SCRIPT = (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
        "c.execute('ROLLBACK')\n"
    )

    def __init__(self, path: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_locked_write_is_503_after_busy_timeout_and_reads_go_on(data_dir):
    app = create_app({"DATA_DIR": data_dir, "EMBEDDED_BUSY_TIMEOUT_SECONDS": 0.5})
    engine = app.extensions["changefeed.engine"]
    assert engine.busy_timeout == 0.5  # the setting reaches the engine
    engine.ensure_collection("c")
    engine.insert_documents("c", [{"_id": "d", "n": 1}])
    holder = LockHolder(engine.path)
    try:
        results: list = []

        def write(i: int) -> None:
            t0 = time.monotonic()
            try:
                engine.insert_documents("c", [{"_id": i}])
                results.append(("ok", time.monotonic() - t0))
            except Unavailable as exc:
                results.append((exc, time.monotonic() - t0))

        writers = [gevent.spawn(write, i) for i in range(30)]
        gevent.sleep(0.1)
        t0 = time.monotonic()
        assert engine.get_document("c", "d")["n"] == 1
        assert engine.get_collection("c")["_id"] == "_meta"
        assert time.monotonic() - t0 < 3
        gevent.joinall(writers, timeout=30)
        assert len(results) == 30
        for exc, elapsed in results:
            assert isinstance(exc, Unavailable), exc
            assert exc.status == 503 and exc.headers == {"Retry-After": "1"}
            assert "locked by another process" in exc.message
            assert elapsed < 0.5 + 3  # each waits for its own deadline, not behind the others
        # a worker that boots while the lock is held neither waits nor fails
        t0 = time.monotonic()
        other = create_app({"DATA_DIR": data_dir, "EMBEDDED_BUSY_TIMEOUT_SECONDS": 5})
        assert time.monotonic() - t0 < 3
        other.extensions["changefeed.engine"].close()
    finally:
        holder.release()
    engine.insert_documents("c", [{"_id": "after"}])
    assert engine.get_document("c", "after")["_id"] == "after"
    app.extensions["changefeed.hub"].close_all()
    engine.close()


@pytest.mark.live
def test_live_locked_database_503_retry_after_while_get_and_sse_answer(live_factory):
    server = live_factory(EMBEDDED_BUSY_TIMEOUT_SECONDS=1, STREAM_LINGER_SECONDS=0.5)
    base = server.url
    assert requests.put(f"{base}/things", auth=ADMIN, json=STREAMS, timeout=10).status_code in (200, 201)
    assert (
        requests.post(f"{base}/things", auth=ADMIN, json={"_id": "d", "n": 1}, timeout=10).status_code == 201
    )
    holder = LockHolder(os.path.join(server.data_dir, "changefeed.sqlite3"))
    results: list = []
    try:

        def post(i: int) -> None:
            t0 = time.monotonic()
            try:
                r = requests.post(f"{base}/things", auth=ADMIN, json={"_id": i}, timeout=60)
                results.append((r.status_code, r.headers.get("Retry-After"), r.text, time.monotonic() - t0))
            except requests.RequestException as exc:
                results.append((None, None, str(exc), time.monotonic() - t0))

        writers = [threading.Thread(target=post, args=(i,)) for i in range(30)]
        for w in writers:
            w.start()
        time.sleep(0.3)  # the writers are waiting for the lock now

        t0 = time.monotonic()
        r = requests.get(f"{base}/things/d", auth=ADMIN, timeout=60)
        get_seconds = time.monotonic() - t0
        assert r.status_code == 200 and r.json()["n"] == 1

        t0 = time.monotonic()
        sse = SSEClient(f"{base}/things/_streams/all", headers={"Authorization": ADMIN_HEADER}, timeout=60)
        try:
            assert sse.status == 200
            first = sse.next(60)
            sse_seconds = time.monotonic() - t0
            assert first is not None and "connected" in first.comments
        finally:
            sse.close()
        print(f"\nwhile 30 writes wait for the lock: GET {get_seconds:.3f} s, SSE open {sse_seconds:.3f} s")
        assert get_seconds < 3 and sse_seconds < 3

        for w in writers:
            w.join(60)
        assert len(results) == 30
        slowest = max(elapsed for *_, elapsed in results)
        print(f"writes answered 503 after {min(e for *_, e in results):.2f}..{slowest:.2f} s")
        for status, retry_after, text, _ in results:
            assert status == 503, text
            assert retry_after is not None and int(retry_after) >= 1
            assert "locked by another process" in text
        assert slowest < 1 + 5  # about the busy timeout, not 30 s nor queued one after another
        assert requests.get(f"{base}/_health", timeout=5).status_code == 200
    finally:
        holder.release()
    r = requests.post(f"{base}/things", auth=ADMIN, json={"_id": "after"}, timeout=10)
    assert r.status_code == 201, r.text


# -- disk full for real: a small tmpfs ----------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 24 MiB tmpfs mounted at tmp_path/mnt (needs root and a working mount)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real disk-full test needs root to mount a small tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.live
def test_live_real_disk_full_507_ready_and_recovery(live_factory, small_tmpfs):
    """A real full file system. Under WAL, SQLite cannot even delete once the WAL can neither
    grow nor be checkpointed into the main file (that needs room too): then a DELETE is a
    507 like any write, and recovery needs space from elsewhere; /_ready notices that
    space by itself. (Deletes freeing space where SQLite can: the max_page_count tests.)"""
    ballast = os.path.join(small_tmpfs, "ballast")  # space that an operator can free later
    with open(ballast, "wb") as f:
        f.write(b"\0" * (8 << 20))
    server = live_factory(data_dir=small_tmpfs)
    base = server.url
    s = requests.Session()
    s.auth = ADMIN
    assert s.put(f"{base}/things", json={}, timeout=10).status_code in (200, 201)
    big = "z" * 1_000_000
    statuses = []
    for i in range(40):  # 16 MiB hold fewer than 16 of these (documents, change log, WAL)
        r = s.post(f"{base}/things", json={"_id": f"big{i}", "s": big}, timeout=30)
        statuses.append(r.status_code)
        if r.status_code != 201:
            break
    assert statuses[-1] == 507 and statuses[0] == 201, statuses
    assert "disk is full" in r.json()["message"]
    for _ in range(200):  # and small writes too
        r = s.post(f"{base}/things", json={"s": "y" * 4000}, timeout=30)
        if r.status_code == 507:
            break
    assert r.status_code == 507
    ready = requests.get(f"{base}/_ready", timeout=5)
    assert ready.status_code == 503 and "disk is full" in ready.json()["error"]
    health = requests.get(f"{base}/_health", timeout=5)
    assert health.status_code == 200 and "disk is full" in health.json()["storage"]
    assert s.get(f"{base}/things/big0", timeout=10).status_code == 200  # reads go on
    r = s.delete(f"{base}/things/big1", timeout=30)
    assert r.status_code in (204, 507), r.text  # never a 500
    if r.status_code == 507:
        assert "disk is full" in r.json()["message"]
        assert requests.get(f"{base}/_ready", timeout=5).status_code == 503

    os.remove(ballast)  # space comes back outside the database: /_ready sees it, no write needed
    ready = requests.get(f"{base}/_ready", timeout=5)
    assert ready.status_code == 200, ready.text
    r = s.delete(f"{base}/things/big0", timeout=30)
    assert r.status_code == 204, r.text
    r = s.post(f"{base}/things", json={"_id": "small", "s": "y" * 4000}, timeout=30)
    assert r.status_code == 201, r.text
    assert requests.get(f"{base}/_ready", timeout=5).status_code == 200
    log = server.read_log()
    assert "database or disk is full" in log
    assert "cannot rollback" not in log and "Traceback" not in log and "internal error" not in log
