"""`python -m bench.attacks [--compare DIR]`: floods against the server's limits, measured.

Each scenario starts the real server (gunicorn.conf.py, one worker, default limits),
runs one attacker in a separate process, and measures what a bystander sees:

* ws-flood: one WebSocket client sends 60 MiB (as 60 x 1 MiB continuation frames, and as
  ~960 messages just under the 64 KiB limit), then messages under the limit for 5 s
  without pause; a prober process times `GET /_health` every 5 ms: p50, p99 and max
  latency, and the close code the flooder got;
* logins: median answer time for an unknown user, a wrong password, and a wrong password
  for a user who just logged in; how many of 200 quick guesses still reach a password
  check; a legitimate user's latency while 20 clients guess wrong passwords of 20 users;
* anon-flood: 5,000 anonymous SSE connections from one address: how many got 200 / 429;
* bindings: 3,000 distinct `avars` bindings: watchers held, answers 200 / 429.

With --compare DIR (a checkout of an older commit) every scenario also runs against it,
side by side in the same run. Results are printed as JSON and a Markdown table is
appended to bench/RESULTS.md. Load goes to 127.0.0.1 only; every loop is bounded in count
and time; servers are stopped by their process ids.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import resource
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request

from .__main__ import ROOT, Server, machine
from .loadgen import client_frame

STREAMS = {
    "streams": [
        {"uri": "all", "stages": []},
        {"uri": "mine", "stages": [{"$match": {"fullDocument.name": {"$var": "n"}}}]},
    ]
}
PUBLIC = {
    "_id": "pub",
    "predicate": "path-prefix(/messages/_streams)",
    "priority": 0,
    "roles": ["$unauthenticated"],
}
MiB = 1 << 20


def _call(
    port: int,
    method: str,
    path: str,
    body=None,
    auth: tuple | None = ("admin", "secret"),
    timeout: float = 30,
) -> tuple[int, float]:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        e.read()
        status = e.code
    return status, (time.perf_counter() - t0) * 1000


def _prober(port: int, seconds: float, out, stop=None) -> None:
    lat, deadline = [], time.time() + seconds
    while time.time() < deadline and not (stop is not None and stop.is_set()):
        try:
            _, ms = _call(port, "GET", "/_health", auth=None, timeout=60)
        except OSError:
            ms = 60_000.0
        lat.append(ms)
        time.sleep(0.005)
    out.put(lat)


def _flooder(port: int, shape: str, out) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /messages/_streams/all HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    sent, t0, code = 0, time.perf_counter(), None
    try:
        if shape == "continuation":
            frames = [client_frame(0x1 if i == 0 else 0x0, b"a" * MiB, fin=i == 59) for i in range(60)]
            for f in frames:
                s.sendall(f)
                sent += MiB
        else:
            small = client_frame(0x2, b"b" * 65535)
            deadline = time.time() + 5
            cap = 60 * MiB if shape == "small-messages" else 1 << 40  # "sustained": for 5 s
            while sent < cap and time.time() < deadline:
                s.sendall(small)
                sent += 65535
    except OSError:
        pass
    elapsed = time.perf_counter() - t0
    s.settimeout(2)
    try:
        data = s.recv(64)
        if len(data) >= 4 and data[0] & 0x0F == 0x8:
            code = struct.unpack("!H", data[2:4])[0]
    except OSError:
        pass
    s.close()
    out.put({"sent_mib": round(sent / MiB, 1), "seconds": round(elapsed, 2), "close_code": code})


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p * len(values)))], 1) if values else 0.0


def scenario_ws_flood(data_root: str) -> dict:
    server = Server(os.path.join(data_root, "ws"))
    try:
        server.put("/messages", STREAMS)
        _call(server.port, "POST", "/acl", PUBLIC)
        out = {}
        for shape in ("continuation", "small-messages", "sustained"):
            q: mp.Queue = mp.Queue()
            probe = mp.Process(target=_prober, args=(server.port, 8.0, q))
            probe.start()
            time.sleep(1.0)
            fq: mp.Queue = mp.Queue()
            flood = mp.Process(target=_flooder, args=(server.port, shape, fq))
            flood.start()
            flood.join(60)
            result = fq.get(timeout=5) if not fq.empty() else {"error": "flooder did not report"}
            probe.join(60)
            lat = q.get(timeout=5)
            result.update(
                {
                    "health_p50_ms": _pct(lat, 0.5),
                    "health_p99_ms": _pct(lat, 0.99),
                    "health_max_ms": round(max(lat), 1),
                    "health_probes": len(lat),
                }
            )
            out[shape] = result
        return out
    finally:
        server.stop()


def _guesser(port: int, user: str, n: int, out) -> None:
    codes = []
    for i in range(n):
        try:
            codes.append(_call(port, "GET", "/", auth=(user, f"wrong{i}"), timeout=60)[0])
        except OSError:
            codes.append(0)
    out.put(codes)


def scenario_logins(data_root: str) -> dict:
    server = Server(os.path.join(data_root, "login"))
    try:
        port = server.port
        for user in ("alice", "carol", *(f"victim{i}" for i in range(20))):
            _call(port, "POST", "/users", {"_id": user, "password": f"pw-{user}", "roles": []})
        _call(port, "GET", "/", auth=("carol", "pw-carol"))  # carol just logged in (remembered)
        unknown = [_call(port, "GET", "/", auth=(f"nobody{i}", "x"))[1] for i in range(8)]
        wrong = [_call(port, "GET", "/", auth=("alice", f"bad{i}"))[1] for i in range(8)]
        wrong_recent = [_call(port, "GET", "/", auth=("carol", f"bad{i}"))[1] for i in range(8)]
        # alice's address is past 10 failures soon; count how many of 200 quick guesses got a check
        t0 = time.perf_counter()
        codes = [_call(port, "GET", "/", auth=("alice", f"more{i}"))[0] for i in range(200)]
        elapsed = time.perf_counter() - t0
        checked = sum(c == 401 for c in codes)
        # a legitimate, remembered user while 20 clients guess 15 wrong passwords each for 20
        # other existing users
        legit_alone = [_call(port, "GET", "/", auth=("carol", "pw-carol"))[1] for i in range(20)]
        q: mp.Queue = mp.Queue()
        guessers = [mp.Process(target=_guesser, args=(port, f"victim{i}", 15, q)) for i in range(20)]
        for g in guessers:
            g.start()
        time.sleep(0.5)
        legit = []
        deadline = time.time() + 8
        while time.time() < deadline and any(g.is_alive() for g in guessers):
            legit.append(_call(port, "GET", "/", auth=("carol", "pw-carol"))[1])
            time.sleep(0.05)
        for g in guessers:
            g.join(120)
        return {
            "unknown_user_ms_median": round(statistics.median(unknown), 1),
            "wrong_password_ms_median": round(statistics.median(wrong), 1),
            "wrong_password_recent_user_ms_median": round(statistics.median(wrong_recent), 1),
            "guesses_sent": len(codes),
            "guesses_checked": checked,
            "guess_seconds": round(elapsed, 2),
            "checked_guesses_per_s": round(checked / elapsed, 1),
            "legit_alone_ms_median": round(statistics.median(legit_alone), 1),
            "legit_under_guessing_ms_median": round(statistics.median(legit), 1) if legit else None,
            "legit_under_guessing_ms_max": round(max(legit), 1) if legit else None,
        }
    finally:
        server.stop()


def _open_many(port: int, paths: list[str], auth: str | None) -> tuple[list[socket.socket], dict]:
    socks, counts = [], {}
    for path in paths:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra = f"Authorization: {auth}\r\n" if auth else ""
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{extra}\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            part = s.recv(4096)
            if not part:
                break
            head += part
        status = int(head.split(b" ", 2)[1]) if head else 0
        counts[status] = counts.get(status, 0) + 1
        socks.append(s)
    return socks, counts


def scenario_anon_flood(data_root: str, n: int = 5000) -> dict:
    server = Server(os.path.join(data_root, "anon"))
    try:
        server.put("/messages", STREAMS)
        _call(server.port, "POST", "/acl", PUBLIC)
        socks, counts = _open_many(server.port, ["/messages/_streams/all"] * n, None)
        status = server.get("/_status")
        for s in socks:
            s.close()
        return {
            "attempts": n,
            "answers": {str(k): v for k, v in sorted(counts.items())},
            "clients_held": status.get("clients"),
        }
    finally:
        server.stop()


def scenario_bindings(data_root: str, n: int = 3000) -> dict:
    server = Server(os.path.join(data_root, "bind"))
    try:
        server.put("/messages", STREAMS)
        auth = "Basic " + base64.b64encode(b"admin:secret").decode()
        paths = [f"/messages/_streams/mine?avars=%7B%22n%22%3A%22u{i}%22%7D" for i in range(n)]
        socks, counts = _open_many(server.port, paths, auth)
        time.sleep(1)
        status = server.get("/_status")
        cpu0 = server.cpu_seconds()
        time.sleep(5)
        idle_cpu = (server.cpu_seconds() - cpu0) / 5
        for s in socks:
            s.close()
        return {
            "bindings": n,
            "answers": {str(k): v for k, v in sorted(counts.items())},
            "watchers": status.get("watchers"),
            "idle_cpu_share": round(idle_cpu, 3),
        }
    finally:
        server.stop()


def _peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def scenario_far_resume(data_root: str, small: int = 20_000, large: int = 40, clients: int = 20) -> dict:
    """`clients` SSE clients resume from before `small` small and `large` 4 MiB events and
    read everything as fast as they can; a prober times /_health meanwhile."""
    import selectors

    server = Server(os.path.join(data_root, "far"))
    try:
        server.put("/far", {"streams": [{"uri": "all", "stages": []}]})
        auth = ("admin", "secret")
        # the token before everything: open a stream, take the id of a first event
        _call(server.port, "POST", "/far", {"first": True}, auth)
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        s.sendall(
            b"GET /far/_streams/all HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Basic "
            + base64.b64encode(b"admin:secret")
            + b"\r\n\r\n"
        )
        _call(server.port, "POST", "/far", {"second": True}, auth)
        data = b""
        while b"id:" not in data:
            data += s.recv(65536)
        token = data.split(b"id:", 1)[1].split(b"\n", 1)[0].decode()
        s.close()
        for i in range(0, small, 1000):
            _call(
                server.port,
                "POST",
                "/far",
                [{"n": j} for j in range(i, min(small, i + 1000))],
                auth,
                timeout=120,
            )
        big = "x" * (4 << 20)
        for i in range(large):
            _call(server.port, "POST", "/far", {"big": i, "payload": big}, auth, timeout=120)
        _call(server.port, "POST", "/far", {"marker": "done"}, auth)
        q: mp.Queue = mp.Queue()
        stop = mp.Event()
        probe = mp.Process(target=_prober, args=(server.port, 180.0, q, stop))
        probe.start()
        time.sleep(0.5)
        sel = selectors.DefaultSelector()
        t0 = time.perf_counter()
        finished = {}
        for i in range(clients):
            c = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            c.sendall(
                (
                    "GET /far/_streams/all HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                    f"Authorization: Basic {base64.b64encode(b'admin:secret').decode()}\r\n"
                    f"Last-Event-ID: {token}\r\n\r\n"
                ).encode()
            )
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ, {"tail": b"", "bytes": 0, "i": i})
        deadline = time.time() + 120
        while len(finished) < clients and time.time() < deadline:
            for key, _ in sel.select(timeout=1):
                try:
                    part = key.fileobj.recv(1 << 20)
                except BlockingIOError:
                    continue
                st = key.data
                st["bytes"] += len(part)
                window = st["tail"] + part
                if b'"marker": "done"' in window or not part:
                    finished[st["i"]] = time.perf_counter() - t0
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                st["tail"] = window[-64:]
        elapsed = time.perf_counter() - t0
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        stop.set()
        lat = q.get(timeout=90)
        probe.join(10)
        status = server.get("/_status")
        return {
            "small_events": small,
            "large_events": large,
            "clients": clients,
            "clients_finished": len(finished),
            "seconds_to_last": round(elapsed, 1),
            "health_p50_ms": _pct(lat, 0.5),
            "health_p99_ms": _pct(lat, 0.99),
            "health_max_ms": round(max(lat), 1) if lat else None,
            "worker_peak_rss_mb": round(_peak_rss_kb(server.worker_pid) / 1024),
            "same_worker": status.get("pid") == server.worker_pid,
        }
    finally:
        server.stop()


SCENARIOS = {
    "ws-flood": scenario_ws_flood,
    "logins": scenario_logins,
    "anon-flood": scenario_anon_flood,
    "bindings": scenario_bindings,
    "far-resume": scenario_far_resume,
}


ROWS = [
    ("ws-flood", "continuation", "WebSocket: 60 x 1 MiB continuation frames"),
    ("ws-flood", "small-messages", "WebSocket: 60 MiB in messages of 65,535 B"),
    ("ws-flood", "sustained", "WebSocket: messages of 65,535 B for 5 s"),
]


def report(results: dict) -> str:
    """A Markdown section: one table of the floods, one of the logins, per checkout side by side."""
    labels = list(results["runs"])
    runs = results["runs"]
    out = [
        f"\n## Security floods, {time.strftime('%Y-%m-%d %H:%M')} UTC\n\n",
        f"Command: `{results['command']}`. Machine: {results['machine']}. One worker, real gunicorn.conf.py, "
        "default limits; attacker and `/_health` prober are separate processes on the same 2 cores.\n\n",
    ]
    out.append("| attack | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n")

    def cell(label: str, scenario: str, fmt) -> str:
        data = runs.get(label, {}).get(scenario)
        if data is None:
            return "not run"
        if "error" in data:
            return data["error"]
        return fmt(data)

    for scenario, shape, title in ROWS:
        out.append(
            f"| {title}: sent, close code, `/_health` p50 / p99 / max | "
            + " | ".join(
                cell(
                    lb,
                    scenario,
                    lambda d, s=shape: (
                        f"{d[s]['sent_mib']} MiB in {d[s]['seconds']} s, close {d[s]['close_code']}, "
                        f"{d[s]['health_p50_ms']} / {d[s]['health_p99_ms']} / {d[s]['health_max_ms']} ms"
                    ),
                )
                for lb in labels
            )
            + " |\n"
        )
    out.append(
        "| 5,000 anonymous SSE connections from one address: answers | "
        + " | ".join(
            cell(lb, "anon-flood", lambda d: ", ".join(f"{v} x {k}" for k, v in d["answers"].items()))
            for lb in labels
        )
        + " |\n"
    )
    out.append(
        "| 3,000 distinct avars bindings (one user): answers, watchers, idle CPU | "
        + " | ".join(
            cell(
                lb,
                "bindings",
                lambda d: (
                    ", ".join(f"{v} x {k}" for k, v in d["answers"].items())
                    + f"; {d['watchers']} watchers; {round(d['idle_cpu_share'] * 100)} % of a core"
                ),
            )
            for lb in labels
        )
        + " |\n"
    )
    out.append(
        "| 20 clients resume over 20,000 small + 40 x 4 MiB events: `/_health` p50 / p99 / max, "
        "worker peak RSS, same worker | "
        + " | ".join(
            cell(
                lb,
                "far-resume",
                lambda d: (
                    f"{d['health_p50_ms']} / {d['health_p99_ms']} / "
                    f"{d['health_max_ms']} ms, {d['worker_peak_rss_mb']} MB, "
                    f"{'yes' if d['same_worker'] else 'no'}"
                ),
            )
            for lb in labels
        )
        + " |\n"
    )
    for key, title in (
        ("unknown_user_ms_median", "login, unknown user: median ms"),
        ("wrong_password_ms_median", "login, wrong password: median ms"),
        ("wrong_password_recent_user_ms_median", "login, wrong password of a remembered user: median ms"),
        ("guesses_checked", "of 200 quick guesses for one user, reaching a password check"),
        ("legit_under_guessing_ms_median", "legitimate user while 20 clients guess: median ms"),
        ("legit_under_guessing_ms_max", "legitimate user while 20 clients guess: max ms"),
    ):
        out.append(
            f"| {title} | "
            + " | ".join(cell(lb, "logins", lambda d, k=key: str(d[k])) for lb in labels)
            + " |\n"
        )
    return "".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    ap.add_argument("--compare", metavar="DIR", help="an older checkout measured side by side")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    names = args.only or list(SCENARIOS)
    data_root = tempfile.mkdtemp(prefix="changefeed-attacks-")
    results: dict = {
        "machine": machine(),
        "command": " ".join(["python -m bench.attacks", *sys.argv[1:]]),
        "runs": {},
    }
    roots = [("this checkout", ROOT)]
    if args.compare:
        roots.append(
            ("compare: " + os.path.basename(os.path.abspath(args.compare)), os.path.abspath(args.compare))
        )
    try:
        for name in names:
            for label, root in roots:
                Server.root = root
                print(f"{name} / {label} ...", file=sys.stderr, flush=True)
                try:
                    results["runs"].setdefault(label, {})[name] = SCENARIOS[name](data_root)
                except Exception as exc:  # an old commit may fall over: that is a result too
                    results["runs"].setdefault(label, {})[name] = {"error": f"{type(exc).__name__}: {exc}"}
            Server.root = ROOT
    finally:
        shutil.rmtree(data_root, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if not args.no_report:
        with open(args.out, "a") as f:
            f.write(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
