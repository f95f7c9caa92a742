"""The fault suite (issue 12, part 1): kill -9 of workers and of the whole server under a
continuous writer and resuming SSE and WebSocket readers, and resume tokens from the
future or another store; each live through gunicorn with the real gunicorn.conf.py.

Each scenario prints one report row (`pytest -s` shows them; FAULTS_REPORT=<file> also
appends them there as JSON lines) and asserts exact zeros: no acknowledged write lost, none
received twice, none out of order, nothing received that was never written.
`FAULTS_INJECT=drop|dup|swap` (tests/faultkit.py) makes every live scenario fail, on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import requests

from .conftest import ADMIN, ADMIN_HEADER, LiveServer
from .faultkit import (
    COLL,
    SERVER_ENV,
    Writer,
    drain,
    kill_busiest_worker,
    kill_whole_server,
    max_gap,
    per_reader,
    prepare,
    recovery,
    report,
    restart_on_same_port,
    row,
    start_readers,
    tally,
    wait_until,
)

pytestmark = pytest.mark.live

SSE_READERS = 5
WS_READERS = 5
RATE = 40.0  # inserts per second, one at a time
KILLS = 2
STEADY = 2.0  # seconds of writes before each kill, and after the last recovery


@pytest.fixture
def servers():
    """Live servers started by a test (restarts included), stopped by pid at the end."""
    started: list[LiveServer] = []

    class Servers:
        def start(self, data_dir: str, **env) -> LiveServer:
            server = LiveServer(data_dir, **{**SERVER_ENV, **env})
            started.append(server)
            return server.start(30)

        def restart(self, old: LiveServer) -> LiveServer:
            new = restart_on_same_port(old)
            started.append(new)
            return new

    yield Servers()
    for server in started:
        server.stop()


def _all_heard_since(readers, at: float) -> bool:
    return all(r.times and r.times[-1] > at for r in readers)


def _dropped_per_kill(readers, kills: list[float], within: float = 15.0) -> list[int]:
    """How many readers lost their connection after each kill (before the next one)."""
    ends = [*kills[1:], kills[-1] + within] if kills else []
    return [
        sum(any(at <= t < end for t in r.drops) for r in readers) for at, end in zip(kills, ends, strict=True)
    ]


def _worst(values: list) -> float | None:
    return None if not values or None in values else max(values)


def _assert_clean(result: dict, readers, acked, unacked, drained: bool, maybe=()) -> None:
    detail = per_reader(readers, acked, unacked, maybe)
    assert drained, f"not every reader got the last acknowledged write: {detail}"
    for key in ("lost", "duplicated", "out_of_order", "unexpected", "token_regressions", "errors"):
        assert result[key] == 0, f"{key}: {result} {detail}"


# ---------------------------------------------------------------- the counter itself


def test_the_tally_counts_losses_duplicates_reorderings_and_phantoms():
    acked, unacked = [0, 1, 2, 3, 4], [5]
    assert tally(acked, unacked, [0, 1, 2, 3, 4]) == {
        "lost": 0,
        "duplicated": 0,
        "out_of_order": 0,
        "unexpected": 0,
        "unacked_arrived": 0,
    }
    assert tally(acked, unacked, [0, 1, 3, 4])["lost"] == 1
    assert tally(acked, unacked, [0, 1, 2, 2, 3, 4])["duplicated"] == 1
    assert tally(acked, unacked, [0, 2, 1, 3, 4])["out_of_order"] == 1
    assert tally(acked, unacked, [-1, 0, 1, 2, 3, 4])["unexpected"] == 1
    t = tally(acked, unacked, [0, 1, 2, 3, 4, 5])
    assert t["unacked_arrived"] == 1 and t["unexpected"] == 0
    assert tally(acked, unacked, [0, 1, 2, 3, 4, 5, 5])["duplicated"] == 1
    # an unacknowledged write may commit late (its request timed out): no order for it
    assert tally([0, 2], [1], [0, 2, 1])["out_of_order"] == 0
    assert tally([0, 1, 2], [], [0, 2, 1])["out_of_order"] == 1
    assert tally([0], [], [-1, 0], maybe=[-1]) == tally([0], [], [0])
    assert tally([0], [], [-1, -1, 0], maybe=[-1])["duplicated"] == 1


# ---------------------------------------------------------------- 1. kill -9 of a worker


@pytest.mark.parametrize(
    "workers, auth",
    [(2, "basic"), (1, "basic"), (1, "bearer")],
    ids=["2-workers-basic", "1-worker-basic", "1-worker-bearer"],
)
def test_kill_9_of_a_worker_under_writes_loses_repeats_and_reorders_nothing(servers, tmp_path, workers, auth):
    """Readers log in with Basic auth (a password check, bcrypt, on each new worker) or a
    bearer token (none): the difference in recovery time is the cost of the checks."""
    server = servers.start(str(tmp_path / "data"), WORKERS=workers)
    token = prepare(server.url)
    header = ADMIN_HEADER
    if auth == "bearer":
        r = requests.post(f"{server.url}/token", auth=ADMIN, timeout=10)
        assert r.status_code == 200, r.text
        header = "Bearer " + r.json()["access_token"]
    readers = start_readers(server.url, token, SSE_READERS, WS_READERS, auth=header)
    writer = Writer(server.url, rate=RATE)
    kills, victims = [], []
    try:
        writer.start()
        assert wait_until(lambda: _all_heard_since(readers, writer.started_at), 10)
        for _ in range(KILLS):
            time.sleep(STEADY)
            killed_at, pid, held = kill_busiest_worker(server, workers)
            kills.append(killed_at)
            victims.append({"pid": pid, "connections": held})
            assert wait_until(lambda at=killed_at: _all_heard_since(readers, at), 30), per_reader(
                readers, writer.acked, writer.unacked
            )
        time.sleep(STEADY)
    finally:
        writer.stop()
        last = max(writer.acked) if writer.acked else None
        drained = drain(readers, last)
    result = row(
        f"kill -9 of one worker (WORKERS={workers}, {auth} auth)",
        readers,
        writer,
        writer.acked,
        writer.unacked,
        workers=workers,
        auth=auth,
        kills=len(kills),
        readers_dropped_per_kill=_dropped_per_kill(readers, kills),
        victims=victims,
        recovery_s=_worst(recovery(readers, kills)),
        recovery_per_kill_s=recovery(readers, kills),
        **max_gap(readers, writer.started_at, writer.stopped_at, kills),
        writer_answers=dict(writer.answers),
        duration_s=round(writer.stopped_at - writer.started_at, 1),
    )
    report(result)
    assert len(kills) == KILLS
    # the victim held readers, so each kill tested resumption (all of them with one worker)
    assert all(n >= 1 for n in result["readers_dropped_per_kill"]), result
    if workers == 1:
        assert result["readers_dropped_per_kill"] == [len(readers)] * KILLS, result
    assert result["acknowledged"] >= RATE * STEADY, result
    _assert_clean(result, readers, writer.acked, writer.unacked, drained)
    assert result["resets"] == 0, result


# ---------------------------------------------------------------- 2. kill -9 of the whole server


def test_kill_9_of_the_whole_server_and_a_restart_loses_and_repeats_nothing(servers, tmp_path):
    server = servers.start(str(tmp_path / "data"), WORKERS=2)
    token = prepare(server.url)
    readers = start_readers(server.url, token, SSE_READERS, WS_READERS)
    writer = Writer(server.url, rate=RATE)
    kills, outages = [], []
    try:
        writer.start()
        assert wait_until(lambda: _all_heard_since(readers, writer.started_at), 10)
        for _ in range(KILLS):
            time.sleep(STEADY)
            killed_at = kill_whole_server(server)
            kills.append(killed_at)
            server = servers.restart(server)
            outages.append(round(time.monotonic() - killed_at, 3))
            assert wait_until(lambda at=killed_at: _all_heard_since(readers, at), 30), per_reader(
                readers, writer.acked, writer.unacked
            )
        time.sleep(STEADY)
    finally:
        writer.stop()
        last = max(writer.acked) if writer.acked else None
        drained = drain(readers, last)
    result = row(
        "kill -9 of the whole server, restart on the same DATA_DIR and port (WORKERS=2)",
        readers,
        writer,
        writer.acked,
        writer.unacked,
        workers=2,
        kills=len(kills),
        readers_dropped_per_kill=_dropped_per_kill(readers, kills),
        server_down_s=outages,
        recovery_s=_worst(recovery(readers, kills)),
        recovery_per_kill_s=recovery(readers, kills),
        **max_gap(readers, writer.started_at, writer.stopped_at, kills),
        writer_answers=dict(writer.answers),
        duration_s=round(writer.stopped_at - writer.started_at, 1),
    )
    report(result)
    assert len(kills) == KILLS
    assert result["readers_dropped_per_kill"] == [len(readers)] * KILLS, result
    assert result["acknowledged"] >= RATE * STEADY, result
    _assert_clean(result, readers, writer.acked, writer.unacked, drained)
    assert result["resets"] == 0, result


# ---------------------------------------------------------------- 3. future and foreign tokens

RESET_READERS = 3  # SSE and as many WebSocket readers per token
NEW_WRITES = 20


def _future(token: str, ahead: int = 1000) -> str:
    data = json.loads(token)["_data"]
    return json.dumps({"_data": data[:16] + f"{int(data[16:], 16) + ahead:016X}"}, separators=(",", ":"))


def _reset_then_live(label: str, base: str, token: str, reason: str, history: list[int], first: int) -> None:
    """Readers resuming from `token` each get one `reset` naming `reason` as the first thing
    on their stream, then every one of NEW_WRITES new inserts, once and in order.

    `history`: the n of the store's changes before the readers connected, in commit order.
    The reset's token is the worker's position, which can trail the store by changes its
    watcher has not dispatched yet (services/hub.py, `live_from = watcher.position`); those
    come after the reset, consistently with its token. So a reader may get a suffix of
    `history` between the reset and the new inserts (counted as `history_after_reset`), but
    nothing at or before the reset's position (`token_regressions`), no gap in it, and no
    change of another store (`unexpected`)."""
    readers = start_readers(base, token, RESET_READERS, RESET_READERS)
    writer = Writer(base, rate=RATE, max_writes=NEW_WRITES, first=first)
    try:
        got_reset = wait_until(lambda: all(r.resets for r in readers), 10)
        writer.start()
        writer.join(30)
    finally:
        writer.stop()
        last = max(writer.acked) if writer.acked else None
        drained = drain(readers, last)
    silent = [r.name for r in readers if not r.resets]
    late = [r.name for r in readers if r.resets and r.resets[0]["at"] - r.connected_at[0] > 5]
    old = set(history)
    before = {r.name: [n for n in r.received if n in old] for r in readers}
    result = row(
        label,
        readers,
        writer,
        writer.acked,
        writer.unacked,
        maybe=history,  # at most once, and checked below
        silent_readers=len(silent),
        reset_reasons=sorted({x["reason"] for r in readers for x in r.resets}),
        history_after_reset=sum(len(b) for b in before.values()),
        # from each reader's connection to its reset (the reset is the first thing it gets)
        recovery_s=round(
            max((r.resets[0]["at"] - r.connected_at[0] for r in readers if r.resets), default=0), 3
        ),
    )
    report(result)
    assert got_reset and not silent, f"no reset, a silent stream: {silent}"
    assert not late, f"reset later than 5 s: {late}"
    for r in readers:
        assert len(r.resets) == 1 and r.resets[0]["first"], (r.name, r.resets)
        assert reason in r.resets[0]["reason"], (r.name, r.resets)
        got = before[r.name]
        assert got == (history[-len(got) :] if got else []), f"{r.name}: {got} is not the end of {history}"
        assert r.received[: len(got)] == got, f"{r.name}: history after new writes: {r.received}"
    assert result["acknowledged"] == NEW_WRITES, result
    _assert_clean(result, readers, writer.acked, writer.unacked, drained, history)


def test_a_token_from_the_future_another_store_or_a_wiped_store_gets_reset_then_live(servers, tmp_path):
    a = servers.start(str(tmp_path / "a"), WORKERS=2)
    b = servers.start(str(tmp_path / "b"))
    seed_a = prepare(a.url)
    seed_b = prepare(b.url)
    # history before the readers connect, written through either worker just before
    r = requests.post(f"{a.url}/{COLL}", auth=ADMIN, json=[{"n": -100 - i} for i in range(10)], timeout=10)
    assert r.status_code == 201, r.text
    history = [-1, *range(-100, -110, -1)]

    _reset_then_live(
        "token ahead of the store (WORKERS=2)", a.url, _future(seed_a), "ahead of every change", history, 0
    )
    history += range(NEW_WRITES)
    _reset_then_live(
        "token of another data store (WORKERS=2)", a.url, seed_b, "another data store", history, 1000
    )

    # a wiped data directory: the server comes back empty on the same port, clients keep
    # their tokens (-200 went with the wipe: it must never arrive)
    requests.post(f"{b.url}/{COLL}", auth=ADMIN, json={"n": -200}, timeout=10)
    b.stop()
    shutil.rmtree(b.data_dir)
    os.makedirs(b.data_dir)
    b = servers.restart(b)
    prepare(b.url)
    _reset_then_live(
        "token from before the data directory was wiped", b.url, seed_b, "another data store", [-1], 2000
    )
