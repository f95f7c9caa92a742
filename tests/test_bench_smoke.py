"""The benchmark harness keeps working: `python -m bench --smoke` (N=50) against real gunicorn."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.live


def test_bench_smoke_runs_every_scenario():
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["latency_100"]["from_send"]["n"] == 10 * 6  # 10 clients x 6 bursts, none missed
    assert result["fanout"][0]["single"]["deliveries"] == 50 * 3
    assert result["fanout"][0]["clients_after_leave"] == 0
    assert result["mixed"]["batch10"]["deliveries"] == 50 * 10 * 3
    assert result["catch_up"]["events_received"] == 201  # 200 missed + the marker, each exactly once
    assert result["many_streams"]["watchers"] == 1 and result["many_streams"]["cursors"] == 1  # 20 bindings
    readers = result["read_filters"]  # 20 users, each its own readFilter, one client each
    assert readers["watchers"] == 1 and readers["clients"] == 20
    assert readers["all_users"]["latency"]["n"] == 6  # every event reached its owner, and only it
    assert result["churn"]["clients_after"] == 0 and result["churn"]["watchers_after"] == 0
    # no client greenlet is left; gevent's threadpool (10 threads, 2 greenlets each) may have grown
    assert result["churn"]["greenlets_after"] <= result["churn"]["greenlets_before"] + 2 * 10 + 2
    assert result["churn"]["fds_after"] <= result["churn"]["fds_before"] + 2 * 12  # the SQLite pool
    assert result["multi_worker"]["from_send"]["n"] == 20 * 6
