"""Tools for the fault suite (tests/test_faults.py): readers that always resume, a writer
that records what was acknowledged, process kills by pid, and the counts of a run.

A reader reconnects with its last token whenever its connection drops (SSE: the
`Last-Event-ID` header; WebSocket: `?lastEventId=` with the last frame's `_id` as compact
JSON, as the README says) and records every change's `fullDocument.n` in the order it
arrived. The writer inserts `{"n": 0}`, `{"n": 1}` ... one at a time; `n` is acknowledged
when its 201 arrived. Every acknowledged `n` must reach every reader exactly once, in
order; an unacknowledged one (no response, or a refusal) may arrive at most once.

Every loop here is bounded in count and in time, every connection goes to 127.0.0.1, and
processes are stopped by pid only.

FAULTS_INJECT=drop|dup|swap makes the first SSE and the first WebSocket reader of every
run mishandle one event (it
forgets it, records it twice, or records two in the wrong order), to check that the suite
catches a loss, a duplicate and a reordering: every scenario must then fail.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.parse
from collections import Counter

import requests
import websocket

from .conftest import ADMIN, ADMIN_HEADER, LiveServer
from .sseclient import SSEClient

COLL = "faults"
STREAM = f"/{COLL}/_streams/all"
STREAMS = {"streams": [{"uri": "all", "stages": [{"_$match": {"operationType": "insert"}}]}]}
SERVER_ENV = {"SSE_HEARTBEAT_SECONDS": 1, "WS_PING_SECONDS": 1, "STREAM_LINGER_SECONDS": 0.5}
READ_TIMEOUT = 5.0  # heartbeats and pings come every second: 5 s of silence is a dead connection
BACKOFF = 0.1  # between a drop and the next attempt

# Errors that mean "the connection is gone": the reader reconnects.
NETWORK_ERRORS = (
    OSError,  # socket.timeout, ConnectionRefusedError, ConnectionResetError, BrokenPipeError
    http.client.HTTPException,
    websocket.WebSocketException,
)


# ---------------------------------------------------------------- counting


def tally(acked, unacked, received, maybe=()) -> dict:
    """The counts of one reader: `acked` must each arrive once, `unacked` may arrive once,
    `received` is every n in the order it arrived; `maybe`: other n that may arrive once
    (not counted, beyond duplicates).

    lost: acknowledged and never received; duplicated: a receipt of an n already received;
    out_of_order: a first receipt of an acknowledged n lower than an acknowledged n received
    before it (an unacknowledged write may have committed late, after a timeout, so it has no
    place in the order); unexpected: a receipt of an n that was never written (a phantom, or
    a replay from before the reader's resume point)."""
    acked = set(acked)
    unacked = set(unacked)
    maybe = set(maybe)
    seen: set = set()
    duplicated = out_of_order = unexpected = unacked_arrived = 0
    high = None
    for n in received:
        if n in seen:
            duplicated += 1
            continue
        seen.add(n)
        if n in unacked:
            unacked_arrived += 1
        elif n in maybe:
            pass
        elif n not in acked:
            unexpected += 1
        else:
            if high is not None and n < high:
                out_of_order += 1
            high = n if high is None else max(high, n)
    return {
        "lost": len(acked - seen),
        "duplicated": duplicated,
        "out_of_order": out_of_order,
        "unexpected": unexpected,
        "unacked_arrived": unacked_arrived,
    }


def position(token: str | None) -> int | None:
    """The store position a token names (the embedded engine's sequence number)."""
    try:
        return int(json.loads(token)["_data"][16:], 16)
    except (TypeError, ValueError, KeyError):
        return None


def regressions(reader) -> int:
    """Changes whose token is not after the one before (over reconnects, and after a reset,
    after the reset's token): a stream's positions only grow."""
    count = 0
    last = None
    marks = {x["after"]: x["position"] for x in reader.resets}
    for i, p in enumerate(reader.positions):
        if i in marks:
            last = marks[i]
        if p is None or (last is not None and p <= last):
            count += 1
        last = p if p is not None else last
    return count


# ---------------------------------------------------------------- processes


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), fields[0]


def alive(pid: int) -> bool:
    info = _ppid_and_state(pid)
    return info is not None and info[1] != "Z"


def worker_pids(master_pid: int) -> list[int]:
    """The live children of gunicorn's master (its workers), from /proc/<pid>/stat."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _ppid_and_state(int(entry))
            if info is not None and info[0] == master_pid and info[1] != "Z":
                pids.append(int(entry))
    return sorted(pids)


def _established_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "01":
                inodes.add(parts[9])
    return inodes


def connections_of(pid: int, port: int) -> int:
    """How many established connections to `port` the process `pid` holds."""
    inodes = _established_inodes(port)
    count = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            count += 1
    return count


def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/_health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def kill_busiest_worker(server: LiveServer, workers: int) -> tuple[float, int, int]:
    """kill -9 of the worker holding the most connections; waits (at most 30 s) until the
    master has replaced it. Returns the time of the kill, the pid and its connections."""
    master = server.proc.pid
    pids = wait_until(lambda: len(p := worker_pids(master)) == workers and p, 30)
    assert pids, f"expected {workers} workers of {master}: {worker_pids(master)}"
    victim = max(pids, key=lambda pid: connections_of(pid, server.port))
    held = connections_of(victim, server.port)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    assert wait_until(lambda: not alive(victim), 10), f"worker {victim} survived SIGKILL"
    assert wait_until(
        lambda: len(p := worker_pids(master)) == workers and victim not in p and healthy(server.url), 30
    ), f"no replacement for worker {victim}: {worker_pids(master)}"
    return killed_at, victim, held


def kill_whole_server(server: LiveServer) -> float:
    """kill -9 of gunicorn's master, then of each of its workers, by pid; returns the time
    of the kill once every process is gone (at most 10 s)."""
    master = server.proc.pid
    workers = worker_pids(master)
    os.kill(master, signal.SIGKILL)
    killed_at = time.monotonic()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.proc.wait(10)
    server.log.close()
    for pid in workers:
        assert wait_until(lambda pid=pid: not alive(pid), 10), f"worker {pid} survived SIGKILL"
    return killed_at


def restart_on_same_port(old: LiveServer, timeout: float = 30.0) -> LiveServer:
    """A new gunicorn on the data directory and port of `old` (which must be gone), with
    the same environment."""
    new = LiveServer(old.data_dir)
    new.port, new.url, new.log_path, new.env = old.port, old.url, old.log_path, dict(old.env)
    return new.start(timeout)


# ---------------------------------------------------------------- writer


class Writer(threading.Thread):
    """Inserts {"n": 0}, {"n": 1} ... one at a time, at most `rate` per second, until
    stopped (or `max_seconds`, or `max_writes`). A 201 acknowledges n; any other answer, or
    none, leaves it unacknowledged, and the next attempt takes the next n."""

    def __init__(
        self, base: str, rate: float = 40.0, max_seconds: float = 60.0, max_writes: int = 5000, first: int = 0
    ):
        super().__init__(daemon=True, name="writer")
        self.base = base
        self.first = first
        self.interval = 1.0 / rate
        self.rate = rate
        self.max_seconds = max_seconds
        self.max_writes = max_writes
        self.acked: list[int] = []
        self.unacked: list[int] = []
        self.answers: Counter = Counter()  # status code, or the exception's class name
        self.stop_event = threading.Event()
        self.started_at = self.stopped_at = 0.0

    def run(self) -> None:
        session = requests.Session()
        self.started_at = time.monotonic()
        deadline = self.started_at + self.max_seconds
        n = self.first
        try:
            while (
                not self.stop_event.is_set()
                and time.monotonic() < deadline
                and n < self.first + self.max_writes
            ):
                began = time.monotonic()
                try:
                    r = session.post(f"{self.base}/{COLL}", auth=ADMIN, json={"n": n}, timeout=5)
                    self.answers[r.status_code] += 1
                    (self.acked if r.status_code == 201 else self.unacked).append(n)
                except requests.RequestException as exc:
                    self.answers[type(exc).__name__] += 1
                    self.unacked.append(n)
                    session.close()
                    session = requests.Session()
                n += 1
                time.sleep(max(0.0, self.interval - (time.monotonic() - began)))
        finally:
            self.stopped_at = time.monotonic()
            session.close()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), "the writer did not stop"


# ---------------------------------------------------------------- readers


class Reader(threading.Thread):
    """One SSE or WebSocket client of STREAM that reconnects with its last token whenever
    its connection drops, until stopped (or `max_seconds`, or `max_connects`)."""

    def __init__(
        self,
        kind: str,
        base: str,
        index: int,
        token: str | None,
        max_seconds: float = 120.0,
        max_connects: int = 2000,
        inject: str | None = None,
        auth: str = ADMIN_HEADER,
    ):
        assert kind in ("sse", "ws")
        self.auth = auth
        super().__init__(daemon=True, name=f"{kind}-{index}")
        self.kind = kind
        self.base = base
        self.last_id = token
        self.max_seconds = max_seconds
        self.max_connects = max_connects
        self.inject = inject
        self.received: list[int] = []
        self.times: list[float] = []
        self.positions: list[int | None] = []  # each change's position in the store (its token)
        self.seen: set[int] = set()
        self.resets: list[dict] = []  # {"at", "reason", "first"}: first = before any change
        self.errors: list[str] = []  # in-band error events, bad frames, server errors
        self.refusals: Counter = Counter()  # handshake answers other than 200/101
        self.attempts = 0
        self.connects = 0
        self.drops: list[float] = []  # when a connection was found gone
        self.connected_at: list[float] = []
        self.last_drop_reason = ""
        self.stop_event = threading.Event()
        self._conn = None
        self._changes_this_connection = 0

    # -- the loop

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while (
            not self.stop_event.is_set() and time.monotonic() < deadline and self.attempts < self.max_connects
        ):
            self.attempts += 1
            try:
                if self.kind == "sse":
                    self._sse_session()
                else:
                    self._ws_session()
            except NETWORK_ERRORS as exc:
                self.last_drop_reason = repr(exc)
            except Exception as exc:  # a bad frame or event: recorded, and the reader goes on
                self.errors.append(repr(exc))
            finally:
                self._close()
            if self.stop_event.is_set():
                break
            self.drops.append(time.monotonic())
            self.stop_event.wait(BACKOFF)

    def _sse_session(self) -> None:
        headers = {"Authorization": self.auth}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        client = SSEClient(self.base + STREAM, headers=headers, timeout=READ_TIMEOUT)
        self._conn = client
        if client.status != 200:
            self.refusals[client.status] += 1
            if client.status >= 500 and client.status != 503:
                self.errors.append(f"HTTP {client.status}: {client.body()[:200]}")
            return
        self._connected()
        while not self.stop_event.is_set():
            ev = client.next(READ_TIMEOUT)
            if ev is None:
                return  # the stream ended: reconnect
            if ev.event == "change":
                self._change(ev.json(), ev.id)
            elif ev.event == "reset":
                self._reset(ev.json(), ev.id)
            elif ev.event == "error":
                self.errors.append(f"error event: {ev.data}")
            elif ev.event != "message":  # end (shutdown, overflow ...) or revoked: reconnect
                self.last_drop_reason = f"{ev.event}: {ev.data}"
                return

    def _ws_session(self) -> None:
        url = self.base.replace("http://", "ws://") + STREAM
        if self.last_id is not None:
            url += "?lastEventId=" + urllib.parse.quote(self.last_id)
        try:
            ws = websocket.create_connection(
                url, header=[f"Authorization: {self.auth}"], timeout=READ_TIMEOUT
            )
        except websocket.WebSocketBadStatusException as exc:
            self.refusals[exc.status_code] += 1
            if exc.status_code >= 500 and exc.status_code != 503:
                self.errors.append(f"HTTP {exc.status_code}: {(exc.resp_body or b'')[:200]!r}")
            return
        self._conn = ws
        self._connected()
        while not self.stop_event.is_set():
            text = ws.recv()
            if not text:  # a close frame
                self.last_drop_reason = f"close {ws.status}"
                return
            frame = json.loads(text)
            token = json.dumps(frame.get("_id"), separators=(",", ":"))
            if "operationType" in frame:
                self._change(frame, token)
            elif "resumeFrom" in frame:
                self._reset(frame, token)
            else:
                self.errors.append(f"frame: {text[:200]}")

    # -- what arrives

    def _connected(self) -> None:
        self.connects += 1
        self.connected_at.append(time.monotonic())
        self._changes_this_connection = 0

    def _change(self, event: dict, token: str) -> None:
        n = event["fullDocument"]["n"]
        self.last_id = token
        self._changes_this_connection += 1
        k = len(self.received)
        if self.inject == "drop" and k == 10 and n not in self.seen:
            self.inject = None
            self.seen.add(n)  # pretend it was handled, but it is lost
            return
        self.received.append(n)
        self.times.append(time.monotonic())
        self.positions.append(position(token))
        self.seen.add(n)
        if self.inject == "dup" and k == 10:
            self.inject = None
            self.received.append(n)
            self.times.append(time.monotonic())
            self.positions.append(position(token))
        if self.inject == "swap" and k == 11:
            self.inject = None
            self.received[-2], self.received[-1] = self.received[-1], self.received[-2]
            self.positions[-2], self.positions[-1] = self.positions[-1], self.positions[-2]

    def _reset(self, body: dict, token: str) -> None:
        self.resets.append(
            {
                "at": time.monotonic(),
                "reason": body.get("reason"),
                "first": self._changes_this_connection == 0,
                "position": position(token),
                "after": len(self.received),  # how many changes came before it
            }
        )
        self.last_id = token

    # -- control

    def has(self, n: int) -> bool:
        return n in self.seen

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if isinstance(conn, SSEClient):
                conn.close()
            else:
                conn.close(timeout=0.2)
        except Exception:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        conn = self._conn
        if conn is not None:  # wake a blocked read
            try:
                sock = conn.sock
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.join(timeout)
        assert not self.is_alive(), f"reader {self.name} did not stop"


# ---------------------------------------------------------------- a run


def prepare(base: str) -> str:
    """The stream, and a seed insert whose token every reader starts from (so a reader's
    first connection cannot miss the first writes, and the seed itself must not arrive)."""
    r = requests.put(f"{base}/{COLL}", auth=ADMIN, json=STREAMS, timeout=10)
    assert r.status_code in (200, 201), r.text
    sse = SSEClient(base + STREAM, headers={"Authorization": ADMIN_HEADER}, timeout=10)
    try:
        assert sse.status == 200
        first = sse.next(10)
        assert first is not None and "connected" in first.comments
        r = requests.post(f"{base}/{COLL}", auth=ADMIN, json={"n": -1, "seed": True}, timeout=10)
        assert r.status_code == 201, r.text
        ev = sse.next_event(10)
        assert ev is not None and ev.event == "change" and ev.json()["fullDocument"]["n"] == -1, ev
        return ev.id
    finally:
        sse.close()


def start_readers(
    base: str, token: str | None, sse: int, ws: int, inject: str | None = None, auth: str = ADMIN_HEADER
) -> list[Reader]:
    """`sse` and `ws` readers resuming from `token`, once each has connected (at most 20 s).
    `auth`: their Authorization header (Basic admin:secret, or "Bearer <token>")."""
    inject = inject if inject is not None else os.environ.get("FAULTS_INJECT") or None
    readers = [
        Reader("sse", base, i, token, inject=inject if i == 0 else None, auth=auth) for i in range(sse)
    ]
    readers += [Reader("ws", base, i, token, inject=inject if i == 0 else None, auth=auth) for i in range(ws)]
    for r in readers:
        r.start()
    assert wait_until(lambda: all(r.connects for r in readers), 20), [
        (r.name, r.refusals, r.last_drop_reason) for r in readers if not r.connects
    ]
    return readers


def drain(readers: list[Reader], last: int | None, timeout: float = 20.0, grace: float = 0.5) -> bool:
    """Wait until every reader has `last` (at most `timeout`), then `grace` seconds more for
    anything that would arrive late (a duplicate), then stop them."""
    ok = last is None or bool(wait_until(lambda: all(r.has(last) for r in readers), timeout))
    time.sleep(grace)
    for r in readers:
        r.stop()
    return ok


def recovery(readers: list[Reader], kills: list[float]) -> list[float | None]:
    """For each kill, the time until every reader it cut off got an event again on a new
    connection (None: some reader never did). Readers the kill did not reach are not
    counted, nor events already on their way when the kill happened."""
    result: list[float | None] = []
    for i, at in enumerate(kills):
        end = kills[i + 1] if i + 1 < len(kills) else float("inf")
        worst: float | None = 0.0
        for r in readers:
            if not any(at <= t < end for t in r.drops):
                continue
            again = next((c for c in r.connected_at if c > at), None)
            after = next((t for t in r.times if again is not None and t > again), None)
            if after is None:
                worst = None
                break
            worst = max(worst, after - at)  # type: ignore[type-var]
        result.append(None if worst is None else round(worst, 3))
    return result


def max_gap(readers: list[Reader], since: float, until: float, kills: list[float] = ()) -> dict:
    """The longest silence of any reader between two events received in [since, until]
    (`max_gap_s`), and where it began: seconds from the nearest kill (`max_gap_began_s`,
    negative before it)."""
    worst, began = 0.0, since
    for r in readers:
        times = [t for t in r.times if since <= t <= until]
        for a, b in zip(times, times[1:], strict=False):
            if b - a > worst:
                worst, began = b - a, a
    ref = min(kills, key=lambda k: abs(began - k)) if kills else since
    return {"max_gap_s": round(worst, 3), "max_gap_began_s": round(began - ref, 3)}


def row(
    scenario: str, readers: list[Reader], writer: Writer | None, acked, unacked, maybe=(), **extra
) -> dict:
    """The report row of a run: counts summed over readers (each must be zero)."""
    counts = Counter()
    for r in readers:
        counts.update(tally(acked, unacked, r.received, maybe))
    sse = sum(r.kind == "sse" for r in readers)
    result = {
        "scenario": scenario,
        "sse_readers": sse,
        "ws_readers": len(readers) - sse,
        "writer_rate_target": writer.rate if writer else None,
        "writer_rate": (
            round(len(writer.acked) / (writer.stopped_at - writer.started_at), 1)
            if writer and writer.stopped_at > writer.started_at
            else None
        ),
        "acknowledged": len(acked),
        "unacknowledged": len(unacked),
        "lost": counts["lost"],
        "duplicated": counts["duplicated"],
        "out_of_order": counts["out_of_order"],
        "unexpected": counts["unexpected"],
        "unacked_arrived": counts["unacked_arrived"],
        "resets": sum(len(r.resets) for r in readers),
        "token_regressions": sum(regressions(r) for r in readers),
        "errors": sum(len(r.errors) for r in readers),
        "reconnects": sum(max(0, r.connects - 1) for r in readers),
        "refusals": dict(sum((r.refusals for r in readers), Counter())),
        **extra,
    }
    return result


def report(result: dict) -> None:
    line = json.dumps(result, sort_keys=False, default=str)
    print(f"\nFAULTS {line}")
    path = os.environ.get("FAULTS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def per_reader(readers: list[Reader], acked, unacked, maybe=()) -> list[str]:
    """One line per reader with a nonzero count, for assertion messages."""
    lines = []
    for r in readers:
        t = tally(acked, unacked, r.received, maybe)
        if any(t[k] for k in ("lost", "duplicated", "out_of_order", "unexpected")) or r.errors:
            missing = sorted(set(acked) - set(r.received))[:10]
            lines.append(
                f"{r.name}: {t} connects={r.connects} missing={missing} errors={r.errors[:3]} "
                f"last_drop={r.last_drop_reason}"
            )
    return lines
