"""`make bench`: run changefeed under its real gunicorn config and measure it from another process.

Usage: python -m bench [--sizes 1000,5000,10000] [--bursts 8] [--out bench/RESULTS.md] [--smoke]

Scenarios: insert-to-client latency with 100 SSE clients; fan-out to N SSE clients;
mixed SSE/WebSocket; catch-up of 10,000 missed events; RSS per idle connection and after
the clients leave. Load goes to 127.0.0.1 only; every loop is bounded in count and time;
the server is stopped by its process id at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import closing

from . import loadgen, robustness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    root = ROOT  # the checkout whose gunicorn.conf.py and code run (--compare swaps it)

    def __init__(self, data_dir: str, port: int | None = None, **env):
        self.port = port or free_port()
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "DATA_DIR": data_dir,
            "LOG_LEVEL": "warning",
            # every load-generator client is admin from one address: lift the per-user and
            # per-address stream limits (1,000 and 200 by default) above the largest N
            "STREAM_MAX_PER_USER": "100000",
            "STREAM_MAX_PER_ADDRESS": "100000",
            **{k: str(v) for k, v in env.items()},
        }
        self.log = open(os.path.join(data_dir + ".log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", os.path.join(self.root, "gunicorn.conf.py")],
            cwd=self.root,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                self.get("/_health")
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("server did not start")
        self.worker_pid = self.get("/_status")["pid"]

    def get(self, path: str):
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": loadgen.AUTH}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def put(self, path: str, body) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            method="PUT",
            headers={"Authorization": loadgen.AUTH, "Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=10).read()

    def rss_kb(self) -> int:
        with open(f"/proc/{self.worker_pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.worker_pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def bursts(
    server: Server, clients: loadgen.Clients, n_bursts: int, per_burst: int = 1, gap: float = 0.3
) -> dict:
    """Insert `per_burst` marked documents per burst; time each client's receipt of the last."""
    from_resp, from_send, last_client, cpu = [], [], [], 0.0
    deliveries = 0
    for b in range(n_bursts + 1):  # burst 0 warms up and is not counted
        markers = [f"mk-{b}-{i}" for i in range(per_burst)]
        body = [{"marker": m} for m in markers] if per_burst > 1 else {"marker": markers[0]}
        c0 = server.cpu_seconds()
        t_send, t_resp = loadgen.post("127.0.0.1", server.port, "/bench", body)
        clients.wait_markers(markers, time.time() + 30)
        arrivals = [c.seen.get(markers[-1]) for c in clients.conns.values()]
        missing = sum(a is None for a in arrivals)
        if missing:
            raise RuntimeError(f"burst {b}: {missing} clients missed the marker")
        time.sleep(0.05)
        if b == 0:
            time.sleep(gap)
            continue
        cpu += server.cpu_seconds() - c0
        deliveries += len(arrivals) * per_burst
        from_resp += [max(0.0, (a - t_resp) * 1000) for a in arrivals]
        from_send += [(a - t_send) * 1000 for a in arrivals]
        last_client.append((max(arrivals) - t_send) * 1000)
        time.sleep(gap)
    return {
        "from_response": loadgen.summarize(from_resp),
        "from_send": loadgen.summarize(from_send),
        "last_client_ms": loadgen.summarize(last_client),
        "cpu_us_per_delivery": round(cpu / deliveries * 1e6, 2) if deliveries else None,
        "deliveries": deliveries,
    }


def scenario_latency(data_root: str, n: int, n_bursts: int) -> dict:
    server = Server(os.path.join(data_root, f"lat{n}"))
    try:
        server.put(
            "/bench", {"streams": [{"uri": "all", "stages": [{"$match": {"operationType": "insert"}}]}]}
        )
        clients = loadgen.Clients("127.0.0.1", server.port)
        clients.open(n, "/bench/_streams/all", ["sse"])
        result = bursts(server, clients, n_bursts, gap=0.1)
        clients.close()
        return result
    finally:
        server.stop()


def scenario_fanout(data_root: str, n: int, kinds: list[str], n_bursts: int) -> dict:
    server = Server(os.path.join(data_root, f"fan{n}{''.join(kinds)}"))
    try:
        server.put("/bench", {"streams": [{"uri": "all", "stages": []}]})
        rss0 = server.rss_kb()
        clients = loadgen.Clients("127.0.0.1", server.port)
        connect_s = clients.open(n, "/bench/_streams/all", kinds)
        time.sleep(1)
        rss1 = server.rss_kb()
        single = bursts(server, clients, n_bursts)
        batch = bursts(server, clients, max(3, n_bursts // 2), per_burst=10)
        # deliveries/s: one burst of 10 events reached every client in `last` ms
        dps = (
            round(n * 10 / (batch["last_client_ms"]["p50"] / 1000))
            if batch["last_client_ms"]["p50"]
            else None
        )
        clients.close()
        time.sleep(2.5)
        rss2 = server.rss_kb()
        status = server.get("/_status")
        return {
            "n": n,
            "kinds": kinds,
            "connect_s": round(connect_s, 2),
            "rss_per_conn_kb": round((rss1 - rss0) / n, 1),
            "rss_after_leave_mb": round(rss2 / 1024, 1),
            "rss_open_mb": round(rss1 / 1024, 1),
            "clients_after_leave": status["clients"],
            "single": single,
            "batch10": batch,
            "deliveries_per_s": dps,
        }
    finally:
        server.stop()


def _read_until(sock: socket.socket, marker: bytes, deadline: float) -> bytes:
    buf = b""
    while marker not in buf and time.time() < deadline:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
    return buf


def scenario_catch_up(data_root: str, missed: int) -> dict:
    """A client that missed `missed` events reconnects with Last-Event-ID: time to the last one."""
    server = Server(os.path.join(data_root, "catchup"), STREAM_LINGER_SECONDS=0)
    try:
        server.put("/bench", {"streams": [{"uri": "all", "stages": []}]})
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(loadgen._request("/bench/_streams/all", "sse", "bench"))
        _read_until(s, b"connected", time.time() + 10)
        loadgen.post("127.0.0.1", server.port, "/bench", {"marker": "mk-first"})
        buf = _read_until(s, b"mk-first", time.time() + 10)
        token = buf.split(b"id:", 1)[1].split(b"\n", 1)[0].decode()
        s.close()
        for i in range(0, missed, 1000):
            loadgen.post(
                "127.0.0.1", server.port, "/bench", [{"i": j} for j in range(i, min(missed, i + 1000))]
            )
        loadgen.post("127.0.0.1", server.port, "/bench", {"marker": "mk-last"})
        time.sleep(0.5)
        s = socket.create_connection(("127.0.0.1", server.port))
        t0 = time.perf_counter()
        s.sendall(loadgen._request("/bench/_streams/all", "sse", "bench", f"Last-Event-ID: {token}\r\n"))
        buf = _read_until(s, b"mk-last", time.time() + 60)
        elapsed = time.perf_counter() - t0
        s.close()
        return {
            "missed": missed,
            "events_received": buf.count(b"event:change"),
            "seconds_to_last": round(elapsed, 3),
        }
    finally:
        server.stop()


def scenario_many_streams(data_root: str, keys: int, per_key: int, n_bursts: int) -> dict:
    """`keys` distinct stream keys (one avars value each) with `per_key` clients each."""
    server = Server(os.path.join(data_root, "many"))
    try:
        server.put(
            "/bench",
            {"streams": [{"uri": "mine", "stages": [{"$match": {"fullDocument.k": {"$var": "k"}}}]}]},
        )
        write_only = write_cpu(server, {"k": -1})
        rss0 = server.rss_kb()
        clients = loadgen.Clients("127.0.0.1", server.port)
        groups = {}
        t0 = time.perf_counter()
        for k in range(keys):
            avars = urllib.parse.quote(json.dumps({"k": k}))
            groups[k] = clients.open_group(per_key, f"/bench/_streams/mine?avars={avars}")
        connect_s = time.perf_counter() - t0
        time.sleep(1)
        rss1 = server.rss_kb()
        status = server.get("/_status")
        watchers = status["watchers"]
        idle = idle_cpu_rate(server)
        lat, cpu, deliveries, window = [], 0.0, 0, 0.0
        for b in range(n_bursts + 1):
            k = (b * 7919) % keys
            marker = f"mk-many-{b}"
            c0, w0 = server.cpu_seconds(), time.perf_counter()
            t_send, _ = loadgen.post("127.0.0.1", server.port, "/bench", {"k": k, "marker": marker})
            clients.wait_markers([marker], time.time() + 30, groups[k])
            time.sleep(0.05)
            if b == 0:
                continue
            cpu += server.cpu_seconds() - c0
            window += time.perf_counter() - w0
            arrivals = [c.seen.get(marker) for c in groups[k]]
            if None in arrivals:
                raise RuntimeError(f"many streams: a client of key {k} missed its event")
            others = sum(marker in c.seen for kk, g in groups.items() if kk != k for c in g)
            if others:
                raise RuntimeError(f"many streams: {others} clients of other keys got key {k}'s event")
            lat += [(a - t_send) * 1000 for a in arrivals]
            deliveries += len(arrivals)
        # sustained: back to back inserts, each for one key, so that background work is a
        # small share; the clients read as they go
        n_sustained = 200
        c0 = server.cpu_seconds()
        for i in range(n_sustained):
            loadgen.post("127.0.0.1", server.port, "/bench", {"k": (i * 7919) % keys, "marker": f"mk-s-{i}"})
            clients.poll(0)
        sustained = (server.cpu_seconds() - c0) / n_sustained
        clients.close()
        return {
            "keys": keys,
            "per_key": per_key,
            "watchers": watchers,
            "cursors": status.get("cursors"),  # (not reported before issue 11)
            "connect_s": round(connect_s, 1),
            "rss_per_conn_kb": round((rss1 - rss0) / (keys * per_key), 1),
            "rss_open_mb": round(rss1 / 1024, 1),
            "latency": loadgen.summarize(lat),
            "cpu_ms_per_event": round(cpu / n_bursts * 1000, 2),
            # without the worker's background work in the same time (idle_cpu_rate)
            "cpu_ms_per_event_net": round((cpu - idle * window) / n_bursts * 1000, 2),
            "idle_cpu_ms_per_s": round(idle * 1000, 1),
            "write_only_cpu_ms": round(write_only * 1000, 2),
            "sustained_cpu_ms_per_event": round(sustained * 1000, 2),
        }
    finally:
        server.stop()


def write_cpu(server: Server, doc: dict, n: int = 200) -> float:
    """Worker CPU seconds per POST of `doc`, back to back, before any client: what the
    write itself costs (HTTP, auth, insert, change log), the floor of every event's cost."""
    for _ in range(20):  # warm up
        loadgen.post("127.0.0.1", server.port, "/bench", doc)
    c0 = server.cpu_seconds()
    for _ in range(n):
        loadgen.post("127.0.0.1", server.port, "/bench", doc)
    return (server.cpu_seconds() - c0) / n


def idle_cpu_rate(server: Server, seconds: float = 3.0) -> float:
    """Worker CPU seconds per second with the clients open and no event: the change-log
    poll (every 20 ms, for other workers' writes), heartbeats, timers."""
    c0, w0 = server.cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (server.cpu_seconds() - c0) / (time.perf_counter() - w0)


def scenario_read_filters(data_root: str, users: int, n_bursts: int) -> dict:
    """One stream, `users` users each with its own readFilter (owner: @user._id), one client
    each: the latency to one user's client with only that user connected, then with all.

    Users are created in bulk with a precomputed bcrypt hash (an admin may import hashes) at
    4 rounds, so that `users` logins cost milliseconds, not the default 12 rounds' seconds.
    """
    import bcrypt

    server = Server(os.path.join(data_root, "readfilters"))
    try:
        server.put("/bench", {"streams": [{"uri": "own", "stages": []}]})
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
        names = [f"u{i}" for i in range(users)]
        for start in range(0, users, 200):
            chunk = [{"_id": n, "password": hashed, "roles": ["member"]} for n in names[start : start + 200]]
            loadgen.post("127.0.0.1", server.port, "/users", chunk)
        rule = {
            "_id": "own",
            "predicate": "path-prefix(/bench/_streams/own)",
            "roles": ["member"],
            "priority": 1,
            "mongo": {"readFilter": {"owner": "@user._id"}},
        }
        loadgen.post("127.0.0.1", server.port, "/acl", rule)
        clients = loadgen.Clients("127.0.0.1", server.port)

        def auth(name: str) -> str:
            return "Basic " + base64.b64encode(f"{name}:pw".encode()).decode()

        def measure(group: dict, owners: list[str], label: str) -> dict:
            idle = idle_cpu_rate(server)
            lat, cpu, window = [], 0.0, 0.0
            for b in range(n_bursts + 1):
                owner = owners[(b * 7919) % len(owners)]
                marker = f"mk-{label}-{b}"
                c0, w0 = server.cpu_seconds(), time.perf_counter()
                t_send, _ = loadgen.post(
                    "127.0.0.1", server.port, "/bench", {"owner": owner, "marker": marker}
                )
                clients.wait_markers([marker], time.time() + 30, group[owner])
                time.sleep(0.05)
                if b == 0:
                    continue
                cpu += server.cpu_seconds() - c0
                window += time.perf_counter() - w0
                arrival = group[owner][0].seen.get(marker)
                if arrival is None:
                    raise RuntimeError(f"read filters: {owner} missed its event")
                others = sum(marker in c.seen for name, g in group.items() if name != owner for c in g)
                if others:
                    raise RuntimeError(f"read filters: {others} other users got {owner}'s event")
                lat.append((arrival - t_send) * 1000)
            return {
                "latency": loadgen.summarize(lat),
                "cpu_ms_per_event": round(cpu / n_bursts * 1000, 2),
                "cpu_ms_per_event_net": round((cpu - idle * window) / n_bursts * 1000, 2),
            }

        group = {names[0]: clients.open_group(1, "/bench/_streams/own", auth=auth(names[0]))}
        one = measure(group, names[:1], "one")
        t0 = time.perf_counter()
        for name in names[1:]:
            group[name] = clients.open_group(1, "/bench/_streams/own", auth=auth(name))
        connect_s = time.perf_counter() - t0
        time.sleep(1)
        status = server.get("/_status")
        everyone = measure(group, names, "all")
        clients.close()
        return {
            "users": users,
            "watchers": status["watchers"],
            "cursors": status.get("cursors"),
            "clients": status["clients"],
            "connect_s": round(connect_s, 1),
            "one_user": one,
            "all_users": everyone,
        }
    finally:
        server.stop()


def scenario_mongo_cursors(root: str, workers: int, bindings: int) -> dict:
    """bench/mongo_cursors.py against `root`'s code: cursors asked of a mockupdb primary."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "mongo_cursors.py"), "--root", root,
         "--workers", str(workers), "--bindings", str(bindings)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"mongo_cursors failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scenario_scoped(data_root: str, args, n_bursts: int) -> dict:
    """Issue 11's rows, each on --compare's checkout first (when given), then on this one."""
    keys, per_key, users = (20, 2, 20) if args.smoke else (1000, 10, 1000)
    roots = ([os.path.abspath(args.compare)] if args.compare else []) + [ROOT]
    out: dict = {}
    for root in roots:
        Server.root = root
        try:
            name = "this" if root == ROOT else "baseline"
            here = os.path.join(data_root, name)  # each checkout its own data
            os.makedirs(here, exist_ok=True)
            out[name] = {
                "root": root,
                "many_streams": scenario_many_streams(here, keys, per_key, n_bursts),
                "read_filters": scenario_read_filters(here, users, n_bursts),
                "mongo_cursors": scenario_mongo_cursors(root, 4, 100 if args.smoke else 1000),
            }
        finally:
            Server.root = ROOT
    return out


def scoped_report(r: dict) -> str:
    """The issue-11 rows as a markdown section, side by side when there is a baseline."""
    runs = r["scoped"]
    names = [n for n in ("baseline", "this") if n in runs]
    rows = []

    def row(label: str, get) -> None:
        cells = []
        for n in names:
            try:
                cells.append(str(get(runs[n])))
            except (KeyError, TypeError):
                cells.append("n/a")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    row("1 stream, 1,000 bindings x 10 SSE clients: watchers", lambda x: x["many_streams"]["watchers"])
    row("... cursors", lambda x: x["many_streams"]["cursors"])
    row("... worker CPU ms per event", lambda x: x["many_streams"]["cpu_ms_per_event"])
    row(
        "... the same without idle background work (net)", lambda x: x["many_streams"]["cpu_ms_per_event_net"]
    )
    row("... idle background CPU ms/s", lambda x: x["many_streams"]["idle_cpu_ms_per_s"])
    row(
        "... of which the write itself (POST, no client), CPU ms",
        lambda x: x["many_streams"]["write_only_cpu_ms"],
    )
    row(
        "... back-to-back inserts: worker CPU ms per event",
        lambda x: x["many_streams"]["sustained_cpu_ms_per_event"],
    )
    row(
        "... back-to-back: the stream's share (minus the write alone), CPU ms",
        lambda x: round(
            x["many_streams"]["sustained_cpu_ms_per_event"] - x["many_streams"]["write_only_cpu_ms"], 2
        ),
    )
    row(
        "... the stream's share (net minus the write), CPU ms",
        lambda x: round(
            x["many_streams"]["cpu_ms_per_event_net"] - x["many_streams"]["write_only_cpu_ms"], 2
        ),
    )
    row("... insert to the 10 matching clients p50 ms", lambda x: x["many_streams"]["latency"]["p50"])
    row("... insert to the 10 matching clients p99 ms", lambda x: x["many_streams"]["latency"]["p99"])
    row("... RSS MB with all open", lambda x: x["many_streams"]["rss_open_mb"])
    row("1,000 users, per-user readFilter, one stream: watchers", lambda x: x["read_filters"]["watchers"])
    row(
        "... one user connected: p50 / p99 ms",
        lambda x: "{} / {}".format(
            x["read_filters"]["one_user"]["latency"]["p50"], x["read_filters"]["one_user"]["latency"]["p99"]
        ),
    )
    row(
        "... 1,000 users connected: p50 / p99 ms",
        lambda x: "{} / {}".format(
            x["read_filters"]["all_users"]["latency"]["p50"], x["read_filters"]["all_users"]["latency"]["p99"]
        ),
    )
    row(
        "... worker CPU ms per event (one / all)",
        lambda x: "{} / {}".format(
            x["read_filters"]["one_user"]["cpu_ms_per_event"],
            x["read_filters"]["all_users"]["cpu_ms_per_event"],
        ),
    )
    row(
        "... net of idle work (one / all)",
        lambda x: "{} / {}".format(
            x["read_filters"]["one_user"]["cpu_ms_per_event_net"],
            x["read_filters"]["all_users"]["cpu_ms_per_event_net"],
        ),
    )
    row(
        "4 workers x 1,000 bindings on the mongo wire: cursors opened",
        lambda x: x["mongo_cursors"]["cursors_opened"],
    )
    row(
        "... subscribers opened (of 4,000) / seconds",
        lambda x: "{} / {}".format(x["mongo_cursors"]["subscribers"], x["mongo_cursors"]["open_s"]),
    )
    row("... getMore per second while idle", lambda x: x["mongo_cursors"]["get_mores_per_s"])
    m = r["machine"]
    head = " | ".join(f"{n} ({os.path.basename(runs[n]['root'])})" for n in names)
    return "\n".join(
        [
            "",
            f"## Scoped streams (issue 11), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"Command: `{r['command']}`. Machine: {m}.",
            "",
            f"| figure | {head} |",
            "|---|" + "---|" * len(names),
            *rows,
            "",
        ]
    )


def scenario_churn(data_root: str, total: int, window: int, seconds: float) -> dict:
    """`total` connects and disconnects in windows over about `seconds`; what is left after."""
    server = Server(os.path.join(data_root, "churn"), STREAM_LINGER_SECONDS=1)
    try:
        server.put("/bench", {"streams": [{"uri": "all", "stages": []}]})
        fds = lambda: len(os.listdir(f"/proc/{server.worker_pid}/fd"))  # noqa: E731
        time.sleep(0.5)
        fd0, rss0 = fds(), server.rss_kb()
        greenlets0 = server.get("/_status?detail=1")["greenlets"]
        rounds = max(1, total // window)
        pause = max(0.0, seconds / rounds - 0.2)
        t0 = time.perf_counter()
        for _ in range(rounds):
            clients = loadgen.Clients("127.0.0.1", server.port)
            clients.open(window, "/bench/_streams/all", ["sse", "ws"])
            clients.close_all_conns()
            clients.close()
            time.sleep(pause)
        elapsed = time.perf_counter() - t0
        time.sleep(3)  # disconnect cleanup (<2 s) and watcher linger (1 s)
        status = server.get("/_status?detail=1")
        return {
            "greenlets_before": greenlets0,
            "greenlets_after": status["greenlets"],
            "connections": rounds * window,
            "seconds": round(elapsed, 1),
            "fds_before": fd0,
            "fds_after": fds(),
            "rss_before_mb": round(rss0 / 1024, 1),
            "rss_after_mb": round(server.rss_kb() / 1024, 1),
            "clients_after": status["clients"],
            "watchers_after": status["watchers"],
        }
    finally:
        server.stop()


def scenario_multi_worker(data_root: str, n: int, n_bursts: int) -> dict:
    """Four workers on one data directory: insert-to-client latency for clients on every worker."""
    server = Server(os.path.join(data_root, "multi"), WORKERS=4)
    try:
        server.put("/bench", {"streams": [{"uri": "all", "stages": []}]})
        pids = {server.get("/_status")["pid"] for _ in range(40)}
        clients = loadgen.Clients("127.0.0.1", server.port)
        clients.open(n, "/bench/_streams/all", ["sse"])
        time.sleep(0.5)
        result = bursts(server, clients, n_bursts, gap=0.2)
        clients.close()
        result["workers_seen"] = len(pids)
        return result
    finally:
        server.stop()


class PeerServer:
    """A peer (bench/peers) in its own processes, measured like changefeed's worker."""

    def __init__(self, name: str, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.port = free_port()
        self.redis = None
        self.log = open(os.path.join(data_dir, f"{name}.log"), "ab")
        env = {**os.environ}
        if name == "sse-starlette":
            cmd = [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.peers.starlette_sse:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--no-access-log",
            ]
        else:
            redis_port = free_port()
            self.redis = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=self.log,
                stderr=self.log,
            )
            env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}"
            self.redis_port = redis_port
            cmd = [
                sys.executable,
                "-m",
                "gunicorn",
                "-k",
                "gevent",
                "--worker-connections",
                "20000",
                "--no-control-socket",
                "-b",
                f"127.0.0.1:{self.port}",
                "bench.peers.flask_sse_app:app",
            ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(0.5)
        children = []
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                children = [int(x) for x in f.read().split()]
        except OSError:
            pass
        self.worker_pid = children[0] if children else self.proc.pid

    rss_kb = Server.rss_kb
    cpu_seconds = Server.cpu_seconds

    def stop(self) -> None:
        for proc in (self.proc, self.redis):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.log.close()


def scenario_peer(data_root: str, name: str, n: int, n_bursts: int) -> dict:
    server = PeerServer(name, os.path.join(data_root, f"peer-{name}-{n}"))
    try:
        clients = loadgen.Clients("127.0.0.1", server.port)
        clients.open(n, "/bench/_streams/all", ["sse"], on_connect=name == "flask-sse")
        if name == "flask-sse":
            # flask-sse sends no bytes before its first event; wait until Redis has every subscriber
            import redis

            r = redis.Redis(port=server.redis_port)
            deadline = time.time() + 180
            while time.time() < deadline and r.pubsub_numsub("sse")[0][1] < n:
                clients.poll(0.2)
            r.close()
        time.sleep(1)
        single = bursts(server, clients, n_bursts)
        batch = bursts(server, clients, max(3, n_bursts // 2), per_burst=10)
        clients.close()
        dps = (
            round(n * 10 / (batch["last_client_ms"]["p50"] / 1000))
            if batch["last_client_ms"]["p50"]
            else None
        )
        return {"peer": name, "n": n, "single": single, "batch10": batch, "deliveries_per_s": dps}
    except Exception as exc:  # a peer that cannot hold the load is a result, not a crash
        return {"peer": name, "n": n, "error": str(exc)[:300]}
    finally:
        server.stop()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,5000,10000")
    ap.add_argument("--bursts", type=int, default=8)
    ap.add_argument("--catch-up", type=int, default=10000)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    ap.add_argument("--smoke", action="store_true", help="N=50, a few bursts, no report file")
    ap.add_argument(
        "--peers",
        action="store_true",
        help="also measure sse-starlette and flask-sse "
        "(needs `pip install uvicorn sse-starlette flask-sse redis` and Debian's redis-server)",
    )
    ap.add_argument("--peer-max", type=int, default=5000, help="largest N for the peers")
    ap.add_argument(
        "--only",
        choices=["churn", "fanout", "scoped", "robustness"],
        help="run one scenario and print it (scoped: the issue-11 rows, appended to --out)",
    )
    ap.add_argument(
        "--scenarios", help="with --only robustness: a comma list of " + ",".join(robustness.SCENARIOS)
    )
    ap.add_argument("--kinds", default="sse", help="with --only fanout: sse, ws or sse,ws (half each)")
    ap.add_argument("--repeat", type=int, default=1, help="with --only fanout: alternate this many times")
    ap.add_argument(
        "--compare",
        metavar="DIR",
        help="another checkout (e.g. a git worktree of an older "
        "commit) measured side by side: the fan-out scenarios alternate between the two",
    )
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sizes = [50] if args.smoke else [int(x) for x in args.sizes.split(",")]
    n_bursts = 3 if args.smoke else args.bursts
    missed = 200 if args.smoke else args.catch_up
    data_root = tempfile.mkdtemp(prefix="changefeed-bench-")
    results: dict = {"machine": machine(), "command": " ".join(["python -m bench", *sys.argv[1:]])}
    if args.only == "churn":
        results["churn"] = scenario_churn(
            data_root, 100 if args.smoke else 10000, 50 if args.smoke else 500, 2 if args.smoke else 60
        )
        print(json.dumps(results, indent=1))
        shutil.rmtree(data_root, ignore_errors=True)
        return 0
    if args.only == "scoped":
        results["scoped"] = scenario_scoped(data_root, args, n_bursts)
        print(json.dumps(results, indent=1))
        shutil.rmtree(data_root, ignore_errors=True)
        if not args.smoke:
            with open(args.out, "a") as f:
                f.write(scoped_report(results))
        return 0
    if args.only == "robustness":
        results["robustness"] = robustness.run(Server, data_root, args)
        print(json.dumps(results, indent=1))
        shutil.rmtree(data_root, ignore_errors=True)
        if not args.smoke:
            with open(args.out, "a") as f:
                f.write(robustness.report(results))
        return 0
    if args.only == "fanout":  # SSE fan-out alone, alternating with --compare's checkout
        runs = []
        for n in [n for n in sizes for _ in range(args.repeat)]:
            for root in ([os.path.abspath(args.compare)] if args.compare else []) + [ROOT]:
                Server.root = root
                run = scenario_fanout(data_root, n, args.kinds.split(","), n_bursts)
                runs.append({"root": root, "n": n, "single": run["single"], "batch10": run["batch10"]})
        Server.root = ROOT
        for run in runs:
            one = run["single"]
            print(
                f"{run['root']} N={run['n']}: 1 event p50/p99 "
                f"{one['from_send']['p50']}/{one['from_send']['p99']} ms, "
                f"CPU {one['cpu_us_per_delivery']} µs/delivery; 10-event bursts "
                f"CPU {run['batch10']['cpu_us_per_delivery']} µs/delivery"
            )
        shutil.rmtree(data_root, ignore_errors=True)
        return 0
    baseline: dict = {}

    def both(name: str, fn, *fn_args):
        """Run a scenario on this checkout; with --compare, on the other one first."""
        if args.compare:
            Server.root = os.path.abspath(args.compare)
            try:
                baseline[name] = fn(*fn_args)
            finally:
                Server.root = ROOT
        return fn(*fn_args)

    try:
        results["latency_100"] = both(
            "latency_100", scenario_latency, data_root, 10 if args.smoke else 100, n_bursts * 2
        )
        results["fanout"] = [
            both(f"fanout_{n}", scenario_fanout, data_root, n, ["sse"], n_bursts) for n in sizes
        ]
        mixed_n = sizes[0] if args.smoke else max(sizes)
        results["mixed"] = both("mixed", scenario_fanout, data_root, mixed_n, ["sse", "ws"], n_bursts)
        results["ws_only"] = both("ws_only", scenario_fanout, data_root, mixed_n, ["ws"], n_bursts)
        results["catch_up"] = both("catch_up", scenario_catch_up, data_root, missed)
        results["many_streams"] = both(
            "many_streams",
            scenario_many_streams,
            data_root,
            20 if args.smoke else 1000,
            2 if args.smoke else 10,
            n_bursts,
        )
        results["read_filters"] = both(
            "read_filters", scenario_read_filters, data_root, 20 if args.smoke else 1000, n_bursts * 2
        )
        results["churn"] = both(
            "churn",
            scenario_churn,
            data_root,
            100 if args.smoke else 10000,
            50 if args.smoke else 500,
            2 if args.smoke else 60,
        )
        results["multi_worker"] = both(
            "multi_worker", scenario_multi_worker, data_root, 20 if args.smoke else 100, n_bursts * 2
        )
        if args.compare:
            baseline["fanout"] = [baseline.pop(f"fanout_{n}") for n in sizes]
            results["baseline"] = {"dir": os.path.basename(os.path.abspath(args.compare)), **baseline}
        if args.peers:
            peer_sizes = [n for n in sizes if n <= args.peer_max] or sizes[:1]
            results["peers"] = [
                scenario_peer(data_root, name, n, n_bursts)
                for n in peer_sizes
                for name in ("sse-starlette", "flask-sse")
            ]
    finally:
        shutil.rmtree(data_root, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if not args.smoke:
        with open(args.out, "a") as f:
            f.write(report(results))
    return 0


def _metrics(r: dict) -> list[tuple[str, float | None, bool]]:
    """(figure, value, higher is better) for every figure the side-by-side table covers."""
    lat = r["latency_100"]
    out = [
        ("insert→client p50 ms (from POST response), N=100", lat["from_response"]["p50"], False),
        ("insert→client p99 ms (from POST response), N=100", lat["from_response"]["p99"], False),
        ("insert→client CPU µs/delivery, N=100", lat["cpu_us_per_delivery"], False),
    ]
    named = [(f"fan-out SSE N={f['n']}", f) for f in r["fanout"]]
    named += [(f"fan-out half SSE / half WS N={r['mixed']['n']}", r["mixed"])]
    named += [(f"fan-out WebSocket N={r['ws_only']['n']}", r["ws_only"])]
    for name, f in named:
        one, ten = f["single"], f["batch10"]
        out += [
            (f"{name}, 1 event p50 ms", one["from_send"]["p50"], False),
            (f"{name}, 1 event p99 ms", one["from_send"]["p99"], False),
            (f"{name}, 1 event last client p50 ms", one["last_client_ms"]["p50"], False),
            (f"{name}, 1 event CPU µs/delivery", one["cpu_us_per_delivery"], False),
            (f"{name}, 10-event bursts p99 ms", ten["from_send"]["p99"], False),
            (f"{name}, 10-event bursts CPU µs/delivery", ten["cpu_us_per_delivery"], False),
            (f"{name}, deliveries/s", f["deliveries_per_s"], True),
            (f"{name}, RSS KB per connection", f["rss_per_conn_kb"], False),
        ]
    m, ch, w = r["many_streams"], r["churn"], r["multi_worker"]
    out += [
        (f"catch-up of {r['catch_up']['missed']} missed events, s", r["catch_up"]["seconds_to_last"], False),
        (f"many streams ({m['keys']} keys x {m['per_key']}), p99 ms", m["latency"]["p99"], False),
        ("many streams, CPU ms/event", m["cpu_ms_per_event"], False),
        ("many streams, RSS KB per connection", m["rss_per_conn_kb"], False),
        (f"churn of {ch['connections']} connections, s", ch["seconds"], False),
        ("churn, RSS after, MB", ch["rss_after_mb"], False),
        ("4 workers, insert→client p99 ms (from send)", w["from_send"]["p99"], False),
    ]
    return out


def side_by_side(r: dict) -> list[str]:
    """Every figure of this run next to the baseline's (--compare), with the ratio."""
    base = r["baseline"]
    lines = [
        "",
        f"Side by side with `{base['dir']}`: each scenario ran on it first, then on this checkout, "
        "in this run.",
        "",
        "| figure | baseline | this checkout | this / baseline | worse by > 5 % |",
        "|---|---|---|---|---|",
    ]
    for (name, mine, higher), (_, theirs, _) in zip(_metrics(r), _metrics(base), strict=True):
        ratio = round(mine / theirs, 2) if mine and theirs else None
        worse = ratio is not None and (ratio < 0.95 if higher else ratio > 1.05)
        lines.append(
            f"| {name} | {theirs} | {mine} | {'' if ratio is None else ratio} | {'yes' if worse else ''} |"
        )
    return lines


def report(r: dict) -> str:
    lines = [
        f"\n## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        f"Command: `{r['command']}` (make bench). Machine: {r['machine']}. Load generator: a separate "
        "process on the same 2 cores (raw sockets + epoll). One gunicorn worker, real gunicorn.conf.py, "
        "embedded engine.\n",
        "| scenario | N | p50 ms | p99 ms | max ms | last client p50 ms | CPU µs/delivery | deliveries/s "
        "| RSS/conn KB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lat = r["latency_100"]
    lines.append(
        f"| insert→client (from POST response), SSE | 100 | {lat['from_response']['p50']} | "
        f"{lat['from_response']['p99']} | {lat['from_response']['max']} | {lat['last_client_ms']['p50']} | "
        f"{lat['cpu_us_per_delivery']} | | |"
    )
    for f in [*r["fanout"], r["mixed"], r["ws_only"]]:
        name = {("sse",): "fan-out SSE", ("ws",): "fan-out WebSocket"}.get(
            tuple(f["kinds"]), "fan-out half SSE / half WS"
        )
        if f.get("label"):
            name += f" ({f['label']})"
        s = f["single"]
        lines.append(
            f"| {name}, 1 event | {f['n']} | {s['from_send']['p50']} | {s['from_send']['p99']} | "
            f"{s['from_send']['max']} | {s['last_client_ms']['p50']} | {s['cpu_us_per_delivery']} | | "
            f"{f['rss_per_conn_kb']} |"
        )
        b = f["batch10"]
        lines.append(
            f"| {name}, bursts of 10 events | {f['n']} | {b['from_send']['p50']} | {b['from_send']['p99']} | "
            f"{b['from_send']['max']} | {b['last_client_ms']['p50']} | {b['cpu_us_per_delivery']} | "
            f"{f['deliveries_per_s']} | |"
        )
    m = r["many_streams"]
    lines.append(
        f"| many streams: {m['keys']} keys x {m['per_key']} clients, 1 event to one key | "
        f"{m['keys'] * m['per_key']} | {m['latency']['p50']} | {m['latency']['p99']} | "
        f"{m['latency']['max']} | | "
        f"{m['cpu_ms_per_event']} ms/event | | {m['rss_per_conn_kb']} |"
    )
    w = r["multi_worker"]
    lines.append(
        f"| 4 workers, insert→client (from send), SSE | 100 | {w['from_send']['p50']} | "
        f"{w['from_send']['p99']} | {w['from_send']['max']} | {w['last_client_ms']['p50']} | | | |"
    )
    c = r["catch_up"]
    lines.append(
        f"\nCatch-up: a client that missed {c['missed']} events received {c['events_received']} "
        f"and the last one after {c['seconds_to_last']} s.\n"
    )
    for f in [*r["fanout"], r["mixed"], r["ws_only"]]:
        lines.append(
            f"- N={f['n']} {'/'.join(f['kinds'])}: connect {f['connect_s']} s, "
            f"RSS {f['rss_open_mb']} MB open, "
            f"{f['rss_after_leave_mb']} MB after all left, clients registered after leaving: "
            f"{f['clients_after_leave']}"
        )
    lines.append(
        f"- Many streams: {m['watchers']} watchers for {m['keys']} keys, RSS {m['rss_open_mb']} MB, "
        f"connect {m['connect_s']} s; each event reached only its key's clients."
    )
    ch = r["churn"]
    lines.append(
        f"- Churn: {ch['connections']} connects and disconnects (half SSE, half WS) in {ch['seconds']} s; "
        f"worker fds {ch['fds_before']} -> {ch['fds_after']}, RSS {ch['rss_before_mb']} -> "
        f"{ch['rss_after_mb']} MB, clients {ch['clients_after']}, watchers {ch['watchers_after']} after"
        + (
            f", greenlets {ch['greenlets_before']} -> {ch['greenlets_after']}."
            if "greenlets_after" in ch
            else "."
        )
    )
    lines.append(f"- 4 workers: clients spread over {w['workers_seen']} worker processes.")
    if r.get("baseline"):
        lines += side_by_side(r)
    if r.get("peers"):
        lines += [
            "",
            "Peers, same harness and machine, in the same run (changefeed figures from the rows above):",
            "",
            "| peer | N | 1 event p99 ms | last client p50 ms | deliveries/s (10-event bursts) | "
            "changefeed p99 / peer p99 | changefeed deliveries/s / peer's |",
            "|---|---|---|---|---|---|---|",
        ]
        ours = {f["n"]: f for f in r["fanout"] if not f.get("label")}
        for p in r["peers"]:
            if "error" in p:
                lines.append(f"| {p['peer']} | {p['n']} | failed: {p['error']} | | | | |")
                continue
            mine = ours.get(p["n"])
            p99, dps = p["single"]["from_send"]["p99"], p["deliveries_per_s"]
            r1 = round(mine["single"]["from_send"]["p99"] / p99, 2) if mine and p99 else ""
            r2 = round(mine["deliveries_per_s"] / dps, 2) if mine and dps else ""
            lines.append(
                f"| {p['peer']} | {p['n']} | {p99} | {p['single']['last_client_ms']['p50']} | {dps} "
                f"| {r1} | {r2} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
