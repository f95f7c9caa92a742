"""The embedded engine: documents and their change log in one SQLite file (WAL mode).

Every write appends its change events to the `changes` table in the same transaction as
the document write, so a change is never lost nor reported for a write that failed. The
row's sequence number is the position; the token is `{"_data": <epoch><seq>}` in hex,
where the epoch is random per data directory, so that a token from another store is
recognised instead of being silently misread.

Several gunicorn workers may share one data directory. Each process tails the change log:
a local write wakes its tailer at once, writes of other processes are found by a short
poll (`EMBEDDED_POLL_SECONDS`). The tailer keeps the recent rows in memory (`_Feed`),
where every change stream of the process reads them; a stream that falls behind the
in-memory window reads from the table instead.

sqlite3 calls are not cooperative under gevent (a lock wait would freeze the worker), so
they run in threads when the process is monkey-patched: a 1 s lock wait then stalls the
other greenlets for ~14 ms instead of ~1 s (docs/stack-notes.md, section 4). Reads and
writes never share a thread or a connection: reads run on pooled connections in gevent's
threadpool, writes one at a time on the engine's own write connection in a thread of their
own (`blocking.run_write`). Under WAL a reader needs no lock, so while another process holds
the write lock, writes queue (each for at most `busy_timeout` seconds in all, then a 503
with Retry-After) and every read, stream open and login goes on.

Storage faults are translated here, the only module that sees sqlite3: a full disk
(SQLITE_FULL) is a 507 and sets `storage_problem()` (what `/_ready` reports) until a write
succeeds or free space grows; a lock held past the busy timeout (SQLITE_BUSY) is a 503.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import bson
import gevent
import gevent.event
from bson import json_util
from bson.objectid import ObjectId
from bson.timestamp import Timestamp

from .. import blocking, updates
from ..errors import (
    BadRequest,
    CollectionNotFound,
    Conflict,
    DocumentNotFound,
    DuplicateKey,
    HistoryLost,
    InsufficientStorage,
    Unavailable,
)
from ..query import run_query
from .base import Change, ChangeStream, Engine, MetaChange, WriteGuard, check_etag

if TYPE_CHECKING:
    from ..pipeline import Pipeline

log = logging.getLogger(__name__)

_CANONICAL = json_util.CANONICAL_JSON_OPTIONS
_FEED_ROWS = 20_000  # rows each process keeps in memory for its streams ...
_FEED_BYTES = 16 << 20  # ... and bytes of their text, whichever bound is reached first
_SHARED_DECODE_MAX = 64 << 10  # a row's decoded event is kept for its readers up to this size
_DB_BATCH = 1_000
_DB_BATCH_BYTES = 8 << 20
_TAIL_BATCH = 5_000
_POOL_MAX = 12  # SQLite read connections per process (gevent's threadpool runs 10 calls at once)
_FREED_BYTES = 1 << 20  # free space grown by this much since a disk-full write clears the fault
_PRUNE_EVERY_SECONDS = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY, props TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    coll TEXT NOT NULL, key TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (coll, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY, coll TEXT NOT NULL, kind TEXT NOT NULL,
    ts REAL NOT NULL, event TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS changes_by_coll ON changes (coll, seq);
"""


def encode(value: dict) -> bytes:
    """BSON: keeps every type (int32 vs int64, Decimal128, dates, binary) and decodes ~5x
    faster than canonical Extended JSON, which matters when a client catches up."""
    return bson.encode(value)


def decode(data: bytes | str) -> Any:
    """Decode a stored document or event (BSON; canonical Extended JSON in older stores)."""
    if isinstance(data, (bytes, memoryview)):
        return bson.decode(bytes(data))
    return json_util.loads(data, json_options=_CANONICAL)


def _key(doc_id: Any) -> str:
    """The primary-key text of an `_id`: canonical Extended JSON, exact about types."""
    return json_util.dumps(doc_id, json_options=_CANONICAL)


def now_utc() -> dt.datetime:
    """Naive UTC at millisecond precision, as BSON dates (and PyMongo) have them."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class _Row:
    """One change-log row. A small row's event is decoded once, on first use, and shared by
    every stream that reads it; a large one is decoded for each reader and not kept, so the
    feed holds one encoding of it (its text), not two."""

    __slots__ = ("seq", "coll", "kind", "text", "_event")

    def __init__(self, seq: int, coll: str, kind: str, text: str):
        self.seq, self.coll, self.kind, self.text = seq, coll, kind, text
        self._event: dict | None = None

    def event(self) -> dict:
        if self._event is not None:
            return self._event
        event = decode(self.text)
        if len(self.text) <= _SHARED_DECODE_MAX:
            self._event = event
        return event


class _Feed:
    """The recent change-log rows of this process, complete after `start_seq`: at most about
    `_FEED_ROWS` rows and `_FEED_BYTES` of their text (a stream further behind reads the
    database)."""

    def __init__(self, start_seq: int):
        self.start_seq = start_seq
        self.tail = start_seq
        self.seqs: list[int] = []
        self.rows: list[_Row] = []
        self.bytes = 0
        self._changed = gevent.event.Event()

    def extend(self, rows: list[_Row]) -> None:
        for row in rows:
            self.seqs.append(row.seq)
            self.rows.append(row)
            self.bytes += len(row.text)
            self.tail = row.seq
        if len(self.rows) > _FEED_ROWS * 1.25 or self.bytes > _FEED_BYTES * 1.25:
            # trimmed in steps of a quarter, not row by row: the lists shift once per step
            drop, left = max(0, len(self.rows) - _FEED_ROWS), self.bytes
            left -= sum(len(r.text) for r in self.rows[:drop])
            while drop < len(self.rows) and left > _FEED_BYTES:
                left -= len(self.rows[drop].text)
                drop += 1
            if drop:
                self.start_seq = self.seqs[drop - 1]
                del self.seqs[:drop], self.rows[:drop]
                self.bytes = left
        changed, self._changed = self._changed, gevent.event.Event()
        changed.set()

    def wait(self, timeout: float) -> None:
        self._changed.wait(timeout)

    def after(self, seq: int) -> int:
        """Index of the first row after `seq` (caller checks `seq >= start_seq`)."""
        return bisect.bisect_right(self.seqs, seq)


class _Txn:
    """What one write transaction may do: change documents and append change events."""

    def __init__(self, conn: sqlite3.Connection, engine: EmbeddedEngine, lean: bool = False):
        self.conn = conn
        self.engine = engine
        self.lean = lean  # the disk is full: delete events go without their pre-image
        self.now = now_utc()
        self.ts = time.time()
        row = conn.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        self.seq = int(row[0])
        self.wrote = False

    def _next_seq(self) -> int:
        self.seq += 1
        self.conn.execute("UPDATE meta SET value=? WHERE key='last_seq'", (str(self.seq),))
        self.wrote = True
        return self.seq

    def emit(
        self,
        coll: str,
        op: str,
        doc_id: Any = None,
        full: dict | None = None,
        desc: dict | None = None,
        before: dict | None = None,
    ) -> None:
        """Log one change event. `before`: the document as it was, for an update, a replace or
        a delete: MongoDB's pre-image, `fullDocumentBeforeChange`, which the change log always
        records (MongoDB 6.0+ does when the collection enables changeStreamPreAndPostImages)."""
        if self.lean and op == "delete":
            before = None
        seq = self._next_seq()
        event: dict[str, Any] = {
            "operationType": op,
            "clusterTime": Timestamp(int(self.ts), seq & 0x7FFFFFFF),
            "wallTime": self.now,
        }
        if full is not None:
            event["fullDocument"] = full
        event["ns"] = {"db": self.engine.db_name, "coll": coll}
        if op != "drop":
            event["documentKey"] = {"_id": doc_id}
        if desc is not None:
            event["updateDescription"] = desc
        if before is not None:
            event["fullDocumentBeforeChange"] = before  # last, as MongoDB appends it
        self.conn.execute(
            "INSERT INTO changes (seq, coll, kind, ts, event) VALUES (?, ?, 'event', ?, ?)",
            (seq, coll, self.ts, encode(event)),
        )

    def meta(self, kind: str, coll: str) -> None:
        seq = self._next_seq()
        self.conn.execute(
            "INSERT INTO changes (seq, coll, kind, ts, event) VALUES (?, ?, ?, ?, '{}')",
            (seq, coll, kind, self.ts),
        )

    # -- reads and writes inside the transaction --

    def collection(self, coll: str) -> dict:
        row = self.conn.execute("SELECT props FROM collections WHERE name=?", (coll,)).fetchone()
        if row is None:
            raise CollectionNotFound(coll)
        return json.loads(row[0])

    def document(self, coll: str, doc_id: Any) -> dict | None:
        row = self.conn.execute(
            "SELECT doc FROM documents WHERE coll=? AND key=?", (coll, _key(doc_id))
        ).fetchone()
        return None if row is None else decode(row[0])

    def store(self, coll: str, doc: dict, new: bool) -> None:
        key = _key(doc["_id"])
        if new:
            try:
                self.conn.execute(
                    "INSERT INTO documents (coll, key, doc) VALUES (?, ?, ?)", (coll, key, encode(doc))
                )
            except sqlite3.IntegrityError:
                raise DuplicateKey(coll, json_util.dumps(doc["_id"])) from None
        else:
            self.conn.execute("UPDATE documents SET doc=? WHERE coll=? AND key=?", (encode(doc), coll, key))


def _as_result(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """`fn(*args)` in a threadpool thread, its error travelling back as a value: an exception
    raised there is printed with a traceback by gevent (every 404/409 would spam the log)."""
    try:
        return True, fn(*args)
    except Exception as exc:
        return False, exc


class EmbeddedEngine(Engine):
    """SQLite storage with an in-transaction change log. See the module docstring."""

    name = "embedded"

    def __init__(
        self,
        data_dir: str,
        db_name: str = "restheart",
        retention_days: float = 7.0,
        max_events: int = 1_000_000,
        poll_seconds: float = 0.02,
        busy_timeout_seconds: float = 5.0,
    ):
        super().__init__()
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "changefeed.sqlite3")
        self.db_name = db_name
        self.retention_seconds = retention_days * 86400
        self.max_events = max_events
        self.poll_seconds = poll_seconds
        self.busy_timeout = busy_timeout_seconds
        self._pool: list[sqlite3.Connection] = []
        self._inline: sqlite3.Connection | None = None  # for point reads on the hub thread (_read_now)
        self._pool_lock = threading.Lock()
        self._pool_slots = threading.BoundedSemaphore(_POOL_MAX)
        self._writer: sqlite3.Connection | None = None  # used by one write at a time
        self._write_slot = threading.BoundedSemaphore(1)
        self._full: tuple[str, int | None] | None = None  # disk-full message, free bytes then
        self._local_write = gevent.event.Event()
        self._tailer: gevent.Greenlet | None = None
        self._last_prune = 0.0
        self._last_prune_seq = 0
        self._run(self._init_schema)
        self.epoch, last_seq, _ = self._run(self._read_meta)
        self._feed = _Feed(last_seq)

    # -- connections and threads --

    def _connect(self) -> sqlite3.Connection:
        timeout = self.busy_timeout
        conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # a no-op read once the file is in WAL mode
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        return conn

    def _read_now(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a point read `fn(conn, *args)` (rows by key) on the calling thread.

        What a request reads to authenticate and open a stream (the user, the collection's
        properties, the store's position) takes microseconds; a round trip through the
        threadpool takes far longer once the worker is busy, because the thread then
        waits for the GIL (up to the interpreter's 5 ms switch interval) before it can
        hand the result back: 10,000 clients connecting at once queued behind each other
        for seconds (bench/robustness.py, storm). Readers never wait for writers under
        WAL; in the rare case this connection finds the database busy (another process
        recovering the WAL), the read goes to the threadpool and waits there instead.
        """
        if not blocking.patched():
            return self._run(fn, *args)
        conn = self._inline
        if conn is None:
            # opened (it may wait for the file) in the threadpool, like any connection
            conn = self._inline = self._run(lambda _: self._connect_for_the_hub())
        try:
            return fn(conn, *args)
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                return self._run(fn, *args)
            raise self._storage_error(exc, "read") from None

    def _connect_for_the_hub(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA busy_timeout=0")  # never wait on the hub thread (_read_now)
        return conn

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(conn, *args)` on a pooled connection, in the threadpool under gevent."""
        # At most _POOL_MAX connections ever exist: SQLite keeps the file descriptor of a
        # closed connection open while others hold locks on the file, so extra connections
        # made in a burst would never give their descriptors back.
        self._pool_slots.acquire()
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            try:
                conn = self._connect()
            except BaseException:
                self._pool_slots.release()
                raise

        try:
            ok, result = blocking.run(_as_result, fn, conn, *args)
        finally:
            with self._pool_lock:
                self._pool.append(conn)
            self._pool_slots.release()
        if not ok:
            if isinstance(result, sqlite3.OperationalError):
                raise self._storage_error(result, "read") from None
            raise result
        return result

    def _write(self, fn: Callable[[_Txn], Any], lean_when_full: bool = False) -> Any:
        """Run `fn` in one IMMEDIATE transaction; its change events commit with it.

        One write at a time per process, on the write connection in the write thread, so
        that writes waiting for another process's lock never hold what reads need. The
        whole wait (for this process's earlier writes, then for the lock) is bounded by
        `busy_timeout`; after it: Unavailable (503, Retry-After). A full disk:
        InsufficientStorage (507). `lean_when_full` (deletes): while the disk is full (the
        last write found it so, or this one does), delete events leave out the pre-image,
        so that a delete frees the space of its documents instead of needing as much again
        for the change log (streams then treat it as MongoDB's delete without pre-images).
        """
        deadline = time.monotonic() + self.busy_timeout
        if not self._write_slot.acquire(timeout=self.busy_timeout):
            raise self._locked()
        try:
            lean = lean_when_full and self._full is not None
            if lean:
                log.warning("the disk is full: deleting without pre-images in the change log")
            try:
                result, wrote = self._write_once(fn, deadline, lean=lean)
            except sqlite3.OperationalError as exc:
                if lean or not (lean_when_full and _is_full(exc)):
                    raise self._storage_error(exc, "write") from None
                log.warning("the disk is full (%s): deleting without pre-images in the change log", exc)
                try:
                    result, wrote = self._write_once(fn, deadline, lean=True)
                except sqlite3.OperationalError as again:
                    raise self._storage_error(again, "write") from None
        finally:
            self._write_slot.release()
        if self._full is not None:
            log.info("writes succeed again; the disk-full condition is over")
            self._full = None
        if wrote:
            self._local_write.set()
        return result

    def _write_once(self, fn: Callable[[_Txn], Any], deadline: float, lean: bool) -> tuple[Any, bool]:
        def run() -> tuple[Any, bool]:
            if self._writer is None:
                self._writer = self._connect()
            conn = self._writer
            wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
            conn.execute(f"PRAGMA busy_timeout={wait_ms}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                txn = _Txn(conn, self, lean)
                result = fn(txn)
                if txn.wrote and (
                    time.time() - self._last_prune > _PRUNE_EVERY_SECONDS
                    or txn.seq - self._last_prune_seq >= max(100, self.max_events // 10)
                ):
                    self._last_prune, self._last_prune_seq = time.time(), txn.seq
                    self._prune(conn, txn.seq)
                conn.execute("COMMIT")
            except BaseException as exc:
                _rollback(conn, exc)
                if conn.in_transaction:  # the rollback failed: never reuse a connection mid-transaction
                    self._writer = None
                    try:
                        conn.close()
                    except sqlite3.Error:
                        pass
                raise
            return result, txn.wrote

        ok, result = blocking.run_write(_as_result, run)
        if not ok:
            raise result
        return result

    def _locked(self) -> Unavailable:
        seconds = self.busy_timeout
        log.warning("a write waited %.3g s for the database's write lock and gave up", seconds)
        return Unavailable(
            f"the database is locked by another process (a write waited {seconds:g} s); try again",
            retry_after=seconds,
        )

    def _storage_error(self, exc: sqlite3.OperationalError, what: str) -> Exception:
        """The domain error for an SQLite failure, logged once, on one line."""
        if _is_full(exc):
            self._full = (str(exc), self._free_bytes())
            log.error("a %s failed: the database's disk is full: %s", what, exc)
            return InsufficientStorage(f"the database's disk is full: {exc}")
        if _is_busy(exc):
            return self._locked()
        return exc

    def _free_bytes(self) -> int | None:
        try:
            st = os.statvfs(os.path.dirname(self.path))
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def storage_problem(self) -> str | None:
        """Why writes fail now (the last one found the disk full), or None.

        Cleared by the next write that succeeds, or here when the file system has gained
        space since (`_FREED_BYTES`): a server out of rotation gets no writes to find out.
        """
        full = self._full
        if full is None:
            return None
        message, free_then = full
        free_now = self._free_bytes()
        if free_then is not None and free_now is not None and free_now >= free_then + _FREED_BYTES:
            log.info("the database's disk has %d bytes free again", free_now)
            self._full = None
            return None
        return f"the database's disk is full: {message}"

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        # A worker that starts while another process holds the write lock must not wait for
        # it: a store that is set up already is only read.
        try:
            if len(conn.execute("SELECT key FROM meta").fetchall()) == 3:
                return
        except sqlite3.OperationalError:
            pass  # no such table: a new store
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)  # idempotent; executescript manages its own transaction
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(8).upper(),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('last_seq', '0')")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('pruned_through', '0')")
            conn.execute("COMMIT")
        except BaseException as exc:
            _rollback(conn, exc)
            raise

    @staticmethod
    def _read_meta(conn: sqlite3.Connection) -> tuple[str, int, int]:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        return meta["epoch"], int(meta["last_seq"]), int(meta["pruned_through"])

    def _prune(self, conn: sqlite3.Connection, last_seq: int) -> None:
        """Drop change-log rows older than the window or beyond the size cap."""
        cutoff_ts = time.time() - self.retention_seconds
        cutoff_seq = last_seq - self.max_events
        row = conn.execute(
            "SELECT MAX(seq) FROM changes WHERE seq < ? AND (ts < ? OR seq <= ?)",
            (last_seq, cutoff_ts, cutoff_seq),
        ).fetchone()
        if row[0] is None:
            return
        conn.execute("DELETE FROM changes WHERE seq <= ?", (row[0],))
        conn.execute(
            "UPDATE meta SET value=? WHERE key='pruned_through' AND CAST(value AS INTEGER) < ?",
            (str(row[0]), row[0]),
        )

    def prune(self) -> None:
        """Apply the retention window now (also done every 30 s by writes)."""

        def run(txn: _Txn) -> None:
            self._prune(txn.conn, txn.seq)

        self._write(run)

    # -- lifecycle --

    def start(self) -> None:
        if self._tailer is None:
            self._tailer = gevent.spawn(self._tail_forever)

    def close(self) -> None:
        if self._tailer is not None:
            self._tailer.kill(block=False)
            self._tailer = None

    def _tail_forever(self) -> None:
        while True:
            try:
                self._local_write.wait(self.poll_seconds)
                self._local_write.clear()
                self.tail_once()
            except gevent.GreenletExit:
                raise
            except Exception:
                log.exception("change-log tailer failed; retrying")
                gevent.sleep(1)

    def tail_once(self) -> None:
        """Pull new change-log rows into the feed and tell the listeners."""
        while True:
            rows = self._run(self._fetch_after, self._feed.tail)
            if not rows:
                return
            self._deliver(rows)
            if len(rows) < _TAIL_BATCH:
                return

    def _deliver(self, rows: list[_Row]) -> None:
        self._feed.extend(rows)
        for row in rows:
            if row.kind != "event":
                for listener in self._meta_listeners:
                    self._call(listener, MetaChange(row.kind, row.coll))
            elif self._doc_listeners and row.coll in ("users", "acl"):
                key = row.event().get("documentKey", {}).get("_id")
                for doc_listener in self._doc_listeners:
                    self._call(doc_listener, row.coll, key)

    @staticmethod
    def _call(listener: Callable, *args: Any) -> None:
        try:
            listener(*args)
        except Exception:
            log.exception("change listener failed")

    @staticmethod
    def _fetch_after(conn: sqlite3.Connection, seq: int) -> list[_Row]:
        cur = conn.execute(
            "SELECT seq, coll, kind, event FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, _TAIL_BATCH),
        )
        return [_Row(*r) for r in cur.fetchall()]

    # -- collections --

    def list_collections(self) -> list[str]:
        rows = self._run(lambda c: c.execute("SELECT name FROM collections ORDER BY name").fetchall())
        return [r[0] for r in rows]

    def get_collection(self, coll: str) -> dict:
        row = self._read_now(
            lambda c: c.execute("SELECT props FROM collections WHERE name=?", (coll,)).fetchone()
        )
        if row is None:
            raise CollectionNotFound(coll)
        return json.loads(row[0])

    def put_collection(self, coll: str, props: dict, if_match: str | None = None) -> tuple[bool, dict]:
        def run(txn: _Txn) -> tuple[bool, dict]:
            try:
                old = txn.collection(coll)
            except CollectionNotFound:
                old = None
            if old is not None:
                check_etag(old, if_match, f"collection '{coll}'")
            stored = {"_id": "_meta", **{k: v for k, v in props.items() if k not in ("_id", "_etag")}}
            stored["_etag"] = _new_etag()
            if old is None:
                txn.conn.execute(
                    "INSERT INTO collections VALUES (?, ?, ?)", (coll, json.dumps(stored), txn.ts)
                )
            else:
                txn.conn.execute("UPDATE collections SET props=? WHERE name=?", (json.dumps(stored), coll))
            txn.meta("props", coll)
            return old is None, stored

        return self._write(run)

    def patch_collection(self, coll: str, props: dict, if_match: str | None = None) -> dict:
        def run(txn: _Txn) -> dict:
            old = txn.collection(coll)
            check_etag(old, if_match, f"collection '{coll}'")
            stored = {**old, **{k: v for k, v in props.items() if k not in ("_id", "_etag")}}
            stored["_etag"] = _new_etag()
            txn.conn.execute("UPDATE collections SET props=? WHERE name=?", (json.dumps(stored), coll))
            txn.meta("props", coll)
            return stored

        return self._write(run)

    def drop_collection(self, coll: str, if_match: str) -> None:
        def run(txn: _Txn) -> None:
            old = txn.collection(coll)
            if not if_match:
                raise Conflict("The collection's ETag must be provided using the 'If-Match' header")
            check_etag(old, if_match, f"collection '{coll}'")
            txn.conn.execute("DELETE FROM documents WHERE coll=?", (coll,))
            txn.conn.execute("DELETE FROM collections WHERE name=?", (coll,))
            txn.emit(coll, "drop")
            txn.meta("drop", coll)

        self._write(run)

    # -- documents --

    def _all_documents(self, coll: str) -> list[dict]:
        def run(conn: sqlite3.Connection) -> list[str] | None:
            if conn.execute("SELECT 1 FROM collections WHERE name=?", (coll,)).fetchone() is None:
                return None
            return [r[0] for r in conn.execute("SELECT doc FROM documents WHERE coll=?", (coll,))]

        texts = self._run(run)
        if texts is None:
            raise CollectionNotFound(coll)
        return [decode(t) for t in texts]

    def find(self, coll, filter, sort, projection, skip, limit):
        docs = self._all_documents(coll)
        return run_query(docs, filter, sort or [("_id", -1)], projection, skip, limit)

    def count(self, coll: str, filter: dict) -> int:
        return len(run_query(self._all_documents(coll), filter, [], None, 0, 0))

    def get_document(self, coll: str, doc_id: Any) -> dict:
        def run(conn: sqlite3.Connection) -> tuple[bool, str | None]:
            exists = conn.execute("SELECT 1 FROM collections WHERE name=?", (coll,)).fetchone()
            row = conn.execute(
                "SELECT doc FROM documents WHERE coll=? AND key=?", (coll, _key(doc_id))
            ).fetchone()
            return exists is not None, row[0] if row else None

        # the accounts and rules every request reads are small: on the hub thread; other
        # documents may be 16 MB, which the threadpool reads without holding the loop
        exists, text = self._read_now(run) if coll in ("users", "acl") else self._run(run)
        if not exists:
            raise CollectionNotFound(coll)
        if text is None:
            raise DocumentNotFound(coll, _show_id(doc_id))
        return decode(text)

    def insert_documents(self, coll: str, docs: list[dict], guard: WriteGuard | None = None) -> list[dict]:
        def run(txn: _Txn) -> list[dict]:
            txn.collection(coll)
            stored = []
            for doc in docs:
                doc = dict(doc)
                doc.setdefault("_id", ObjectId())
                doc = {"_id": doc.pop("_id"), **doc, "_etag": ObjectId()}
                if guard is not None:
                    guard(None, doc)
                txn.store(coll, doc, new=True)
                txn.emit(coll, "insert", doc["_id"], full=doc)
                stored.append(doc)
            return stored

        return self._write(run)

    def replace_document(self, coll, doc_id, doc, upsert, if_match=None, guard=None):
        def run(txn: _Txn) -> tuple[bool, dict]:
            txn.collection(coll)
            old = txn.document(coll, doc_id)
            if old is None and not upsert:
                raise DocumentNotFound(coll, _show_id(doc_id))
            if old is not None:
                if guard is not None:
                    guard(old, None)
                check_etag(old, if_match, f"document '{_show_id(doc_id)}'")
            new = {"_id": doc_id, **{k: v for k, v in doc.items() if k not in ("_id", "_etag")}}
            new["_etag"] = ObjectId()
            if guard is not None:
                guard(old, new)
            txn.store(coll, new, new=old is None)
            txn.emit(coll, "insert" if old is None else "replace", doc_id, full=new, before=old)
            return old is None, new

        return self._write(run)

    def update_document(self, coll, doc_id, spec, if_match=None, upsert=False, guard=None):
        def run(txn: _Txn) -> tuple[bool, dict]:
            txn.collection(coll)
            return self._update_in(
                txn, coll, doc_id, txn.document(coll, doc_id), spec, if_match, upsert, guard
            )

        return self._write(run)

    @staticmethod
    def _update_in(
        txn: _Txn,
        coll: str,
        doc_id: Any,
        old: dict | None,
        spec: dict,
        if_match: str | None,
        upsert: bool,
        guard: WriteGuard | None,
    ) -> tuple[bool, dict]:
        """One operator update inside `txn`, `old` being the document as stored now."""
        if old is None:
            if not upsert:
                raise DocumentNotFound(coll, _show_id(doc_id))
            base = {"_id": doc_id}
            insert_spec = dict(spec)
            if "$setOnInsert" in insert_spec:
                insert_spec["$set"] = {**insert_spec.get("$set", {}), **insert_spec.pop("$setOnInsert")}
            new, _ = updates.apply_update(base, _with_etag(insert_spec), txn.now)
            if guard is not None:
                guard(None, new)
            txn.store(coll, new, new=True)
            txn.emit(coll, "insert", doc_id, full=new)
            return True, new
        if guard is not None:
            guard(old, None)  # before the ETag and the operators look at it
        check_etag(old, if_match, f"document '{_show_id(doc_id)}'")
        _, desc = updates.apply_update(old, spec, txn.now)  # dry run: is it a no-op?
        if desc is None:
            return False, old  # a no-op writes nothing and emits nothing (MongoDB logs no oplog entry)
        new, desc = updates.apply_update(old, _with_etag(spec), txn.now)
        if guard is not None:
            guard(old, new)
        txn.store(coll, new, new=False)
        txn.emit(coll, "update", doc_id, full=new, desc=desc, before=old)
        return False, new

    def delete_document(
        self, coll: str, doc_id: Any, if_match: str | None = None, guard: WriteGuard | None = None
    ) -> None:
        def run(txn: _Txn) -> None:
            txn.collection(coll)
            old = txn.document(coll, doc_id)
            if old is None:
                raise DocumentNotFound(coll, _show_id(doc_id))
            if guard is not None:
                guard(old, None)
            check_etag(old, if_match, f"document '{_show_id(doc_id)}'")
            txn.conn.execute("DELETE FROM documents WHERE coll=? AND key=?", (coll, _key(doc_id)))
            txn.emit(coll, "delete", doc_id, before=old)

        self._write(run, lean_when_full=True)

    def _matching(self, txn: _Txn, coll: str, filter: dict) -> list[dict]:
        txn.collection(coll)
        docs = [decode(r[0]) for r in txn.conn.execute("SELECT doc FROM documents WHERE coll=?", (coll,))]
        return run_query(docs, filter, [("_id", 1)], None, 0, 0)

    def update_many(self, coll, filter, spec, guard=None):
        """All matching documents in one transaction: all updated, or (on a refusal) none."""

        def run(txn: _Txn) -> tuple[int, int]:
            matched = modified = 0
            for old in self._matching(txn, coll, filter):
                _, new = self._update_in(txn, coll, old["_id"], old, spec, None, False, guard)
                matched += 1
                modified += new is not old
            return matched, modified

        return self._write(run)

    def delete_many(self, coll, filter, guard=None):
        """All matching documents in one transaction: all deleted, or (on a refusal) none."""

        def run(txn: _Txn) -> int:
            docs = self._matching(txn, coll, filter)
            for old in docs:
                if guard is not None:
                    guard(old, None)
                txn.conn.execute("DELETE FROM documents WHERE coll=? AND key=?", (coll, _key(old["_id"])))
                txn.emit(coll, "delete", old["_id"], before=old)
            return len(docs)

        return self._write(run, lean_when_full=True)

    def collection_version(self, coll: str) -> int:
        """The position of the collection's last change: equal values mean nothing changed."""
        row = self._run(lambda c: c.execute("SELECT MAX(seq) FROM changes WHERE coll=?", (coll,)).fetchone())
        return row[0] or 0

    def ensure_collection(self, coll: str) -> None:
        """Create an empty collection if it does not exist (users, acl at start-up).

        Read first: a worker booting while another process holds the write lock goes on."""
        exists = self._run(lambda c: c.execute("SELECT 1 FROM collections WHERE name=?", (coll,)).fetchone())
        if exists is not None:
            return

        def run(txn: _Txn) -> None:
            if txn.conn.execute("SELECT 1 FROM collections WHERE name=?", (coll,)).fetchone() is None:
                stored = {"_id": "_meta", "_etag": _new_etag()}
                txn.conn.execute(
                    "INSERT INTO collections VALUES (?, ?, ?)", (coll, json.dumps(stored), txn.ts)
                )
                txn.meta("props", coll)

        self._write(run)

    # -- change streams --

    def token(self, seq: int) -> dict:
        return {"_data": f"{self.epoch}{seq:016X}"}

    def position(self, token: dict) -> int:
        if not isinstance(token, dict) or set(token) != {"_data"} or not isinstance(token["_data"], str):
            raise BadRequest('resume token must be a JSON object {"_data": "<hex>"}')
        data = token["_data"]
        if len(data) != 32 or any(c not in "0123456789ABCDEFabcdef" for c in data):
            raise BadRequest("resume token _data must be 32 hexadecimal digits")
        return int(data[16:], 16)

    def current_token(self) -> dict:
        return self.token(self._feed.tail)

    def latest_position(self) -> int:
        return max(self._feed.tail, self._read_now(self._read_meta)[1])

    def history_window(self) -> float | None:
        row = self._run(lambda c: c.execute("SELECT ts FROM changes ORDER BY seq LIMIT 1").fetchone())
        return max(0.0, time.time() - row[0]) if row else None

    def resume_problem(self, token: dict) -> str | None:
        seq = self.position(token)
        if token["_data"][:16].upper() != self.epoch:
            return "the resume token was issued by another data store (or before it was reset)"
        _, last_seq, pruned = self._read_now(self._read_meta)
        if seq > last_seq:
            return "the resume token is ahead of every change this store has made"
        if seq < pruned:
            return "the resume token is older than the retained change history"
        return None

    def watch(self, coll: str, pipeline: Pipeline | None, resume_after: dict | None = None) -> ChangeStream:
        if resume_after is None:
            return _EmbeddedStream(self, coll, pipeline, self._feed.tail)
        problem = self.resume_problem(resume_after)
        if problem is not None:
            raise HistoryLost(problem)
        return _EmbeddedStream(self, coll, pipeline, self.position(resume_after))

    def read_batch(self, coll: str, after: int, upto: int) -> tuple[list[_Row], bool]:
        """Rows of `coll` in (after, upto], from the table, and whether they are all of them;
        :raise HistoryLost: if pruned.

        At most _DB_BATCH rows or _DB_BATCH_BYTES of events (and at least one row), so that
        a stream catching up over large documents holds a bounded amount of memory.
        """

        def run(conn: sqlite3.Connection) -> tuple[int, list[_Row], bool]:
            pruned = int(conn.execute("SELECT value FROM meta WHERE key='pruned_through'").fetchone()[0])
            cur = conn.execute(
                "SELECT seq, coll, kind, event FROM changes WHERE coll=? AND seq > ? AND seq <= ? "
                "ORDER BY seq LIMIT ?",
                (coll, after, upto, _DB_BATCH),
            )
            rows, size, cut = [], 0, False
            for r in cur:
                rows.append(_Row(*r))
                size += len(r[3])
                if size >= _DB_BATCH_BYTES:
                    cut = True
                    break
            return pruned, rows, not cut and len(rows) < _DB_BATCH

        pruned, rows, complete = self._run(run)
        if after < pruned:
            raise HistoryLost("the stream fell behind the retained change history")
        return rows, complete


def _code(exc: sqlite3.Error) -> int:
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF  # the primary result code


def _is_full(exc: sqlite3.Error) -> bool:
    """SQLITE_FULL: the disk (or max_page_count) has no room for the write."""
    return _code(exc) == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc)


def _is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY/LOCKED: another connection held the lock past the busy timeout."""
    return _code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "database is locked" in str(exc)


def _rollback(conn: sqlite3.Connection, cause: BaseException) -> None:
    """Roll back if a transaction is still open. SQLite has already rolled back after some
    errors (SQLITE_FULL among them); a ROLLBACK then fails, and must not replace `cause`."""
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        log.warning("ROLLBACK after %s failed: %s", type(cause).__name__, exc)


class _EmbeddedStream(ChangeStream):
    """A change stream over the process feed (or the table when behind), through a pipeline."""

    def __init__(self, engine: EmbeddedEngine, coll: str, pipeline: Pipeline | None, start: int):
        self.engine = engine
        self.coll = coll
        self.pipeline = pipeline
        self._without_passwords = coll == "users"
        self._pos = start
        self._backlog: list[_Row] = []
        self._closed = False

    @property
    def position(self) -> int:
        return self._pos

    def close(self) -> None:
        self._closed = True

    def _next_row(self) -> _Row | None:
        if self._backlog:
            return self._backlog.pop(0)
        feed = self.engine._feed
        if self._pos < feed.start_seq:
            # read once: the read yields, and the tailer may trim the feed meanwhile; the
            # rows up to this value are the ones read, wherever the feed starts by then
            upto = feed.start_seq
            try:
                rows, complete = self.engine.read_batch(self.coll, self._pos, upto)
            except HistoryLost as exc:
                self.ended, self.end_reason = True, exc.message
                self._closed = True
                raise
            if complete:
                rows.append(_Row(upto, "", "skip", ""))  # advance to where the feed was
            self._backlog = rows
            return self._backlog.pop(0)
        i = feed.after(self._pos)
        if i < len(feed.rows):
            return feed.rows[i]
        return None

    def try_next(self, timeout: float) -> Change | None:
        deadline = time.monotonic() + timeout
        if self._closed:
            gevent.sleep(min(max(timeout, 0.0), 1.0))
            return None
        while not self._closed:
            row = self._next_row()
            if row is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.engine._feed.wait(remaining)
                continue
            self._pos = max(self._pos, row.seq)
            if row.kind != "event" or row.coll != self.coll:
                continue
            token = self.engine.token(row.seq)
            event = {"_id": token, **row.event()}
            if self._without_passwords:
                event = without_passwords(event)
            if self.pipeline is None:
                return Change(row.seq, token, event)  # read-only from here on: nothing mutates events
            try:
                out = self.pipeline.apply(event)
            except Exception as exc:  # EventError or an evaluator bug: report in-band, go on
                return Change(row.seq, token, None, error=str(exc))
            if out is not None:
                return Change(row.seq, token, out)
        return None


def without_passwords(event: dict) -> dict:
    """A `users` event without password hashes: they never reach a stage or a client."""
    event = dict(event)
    for field in ("fullDocument", "fullDocumentBeforeChange"):
        if isinstance(event.get(field), dict):
            event[field] = {k: v for k, v in event[field].items() if k != "password"}
    desc = event.get("updateDescription")
    if isinstance(desc, dict):
        desc = dict(desc)
        desc["updatedFields"] = {
            k: v
            for k, v in (desc.get("updatedFields") or {}).items()
            if k != "password" and not k.startswith("password.")
        }
        desc["removedFields"] = [f for f in desc.get("removedFields") or [] if f != "password"]
        event["updateDescription"] = desc
    return event


def _new_etag() -> dict:
    """Collection properties are plain JSON as sent, so their ETag is kept as {"$oid": hex}."""
    return {"$oid": str(ObjectId())}


def _with_etag(spec: dict) -> dict:
    spec = dict(spec)
    spec["$set"] = {**spec.get("$set", {}), "_etag": ObjectId()}
    return spec


def _show_id(doc_id: Any) -> str:
    return str(doc_id)
