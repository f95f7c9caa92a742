"""Issue-12 scenarios: memory bounded in bytes and given back, and connection storms.

`python -m bench --only robustness [--compare DIR] [--smoke]` runs each scenario on this
checkout (and first on DIR's, side by side) and appends a table to bench/RESULTS.md:

- big_documents: one SSE client; the worker's RSS after one 15 MB document, after 30
  documents of 4 MB, and after the client left (the watcher lingers 1 s);
- churn_rounds: three rounds of N connections (half SSE, half WebSocket) opened and
  closed; RSS after each round (the target: the third within 15 % of the first);
- storm: an established SSE client's insert-to-event latency (a probe process posts a
  document every 50 ms to a collection of its own, so the figure is the storm's collateral,
  not fan-out work) while N clients connect to another stream, while they all close at
  once, and the time until N clients reconnecting with Last-Event-ID after a restart are
  all streaming.
Every loop is bounded in count and time; all load goes to 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import re
import socket
import struct
import threading
import time

from . import loadgen

_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
STREAM = {"streams": [{"uri": "all", "stages": []}]}


def _rss_mb(server) -> float:
    return round(server.rss_kb() / 1024, 1)


def _post_json(port: int, path: str, body, conn: http.client.HTTPConnection | None = None) -> None:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST",
            path,
            json.dumps(body),
            {"Authorization": loadgen.AUTH, "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        resp.read()
        if resp.status != 201:
            raise RuntimeError(f"POST {path}: {resp.status}")
    finally:
        if own:
            conn.close()


class _Drain(threading.Thread):
    """One SSE client that reads everything and counts the bytes."""

    def __init__(self, port: int, path: str):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(loadgen._request(path, "sse", f"127.0.0.1:{port}"))
        self.received = 0
        self.start()

    def run(self) -> None:
        try:
            while data := self.sock.recv(1 << 20):
                self.received += len(data)
        except OSError:
            pass

    def wait_for(self, n: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while self.received < n and time.time() < deadline:
            time.sleep(0.05)
        if self.received < n:
            raise RuntimeError(f"the client got {self.received} of {n} bytes")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def scenario_big_documents(server_cls, data_dir: str, smoke: bool = False) -> dict:
    big, n_medium, medium = (1 << 20, 3, 256 << 10) if smoke else (15 << 20, 30, 4 << 20)
    server = server_cls(data_dir, STREAM_LINGER_SECONDS=1, MAX_CONTENT_LENGTH=str(32 << 20))
    try:
        server.put("/bench", STREAM)
        client = _Drain(server.port, "/bench/_streams/all")
        time.sleep(1)
        rss0 = _rss_mb(server)
        _post_json(server.port, "/bench", {"blob": "a" * big})
        client.wait_for(big, 60)
        time.sleep(1)
        rss1 = _rss_mb(server)
        for i in range(n_medium):
            _post_json(server.port, "/bench", {"i": i, "blob": "b" * medium})
        client.wait_for(big + n_medium * medium, 120)
        time.sleep(1)
        rss2 = _rss_mb(server)
        client.close()
        time.sleep(4)  # the disconnect, the watcher's linger (1 s), a sweep
        rss3 = _rss_mb(server)
        return {
            "rss_start_mb": rss0,
            "after_one_big_mb": rss1,
            "one_big_added_mb": round(rss1 - rss0, 1),
            "after_mediums_mb": rss2,
            "mediums_added_mb": round(rss2 - rss1, 1),
            "after_client_left_mb": rss3,
            "kept_after_client_left_mb": round(rss3 - rss0, 1),
            "big_mb": big >> 20,
            "mediums": f"{n_medium} x {medium >> 10} KB",
        }
    finally:
        server.stop()


def scenario_churn_rounds(server_cls, data_dir: str, n: int, rounds: int = 3) -> dict:
    server = server_cls(data_dir, STREAM_LINGER_SECONDS=1)
    try:
        server.put("/bench", STREAM)
        time.sleep(0.5)
        rss = [_rss_mb(server)]
        for _ in range(rounds):
            clients = loadgen.Clients("127.0.0.1", server.port)
            clients.open(n, "/bench/_streams/all", ["sse", "ws"], timeout=120)
            clients.close_all_conns()
            clients.close()
            time.sleep(4)  # disconnect cleanup, linger, a sweep
            rss.append(_rss_mb(server))
        status = server.get("/_status?detail=1")
        first = rss[1]
        return {
            "connections_per_round": n,
            "rss_mb": rss,
            "last_vs_first_round_pct": round((rss[-1] - first) / first * 100, 1),
            "growth_per_round_mb": round((rss[-1] - first) / max(1, rounds - 1), 1),
            "greenlets_after": status.get("greenlets"),
            "clients_after": status["clients"],
        }
    finally:
        server.stop()


def _probe(port: int, seconds: float, out_path: str, stop, period: float = 0.05) -> None:
    """An established SSE client and a writer: insert-to-event latency, every `period`."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    sock.sendall(loadgen._request("/probe/_streams/all", "sse", f"127.0.0.1:{port}"))
    buf = b""
    while b"connected" not in buf:
        buf += sock.recv(65536)
    sock.settimeout(5)
    samples = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    deadline = time.time() + seconds
    k = 0
    while time.time() < deadline and not stop.is_set():
        k += 1
        marker = f"probe-{k}".encode()
        t0 = time.time()
        try:
            _post_json(port, "/probe", {"probe": marker.decode()}, conn)
        except (OSError, RuntimeError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        arrived = None
        buf = buf[-64:]
        while arrived is None and time.time() < t0 + 30:
            try:
                data, anc, _f, _a = sock.recvmsg(262144, 64)
            except TimeoutError:
                continue
            if not data:
                break
            buf += data
            if marker + b'"' in buf:
                arrived = time.time()
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(raw) >= 16:
                        sec, nsec = struct.unpack("qq", raw[:16])
                        arrived = sec + nsec / 1e9
        if arrived is None:
            break
        samples.append((t0, (arrived - t0) * 1000))
        time.sleep(max(0.0, period - (time.time() - t0)))
    sock.close()
    with open(out_path, "w") as f:
        json.dump(samples, f)


def _in_phase(samples: list, start: float, end: float) -> dict:
    return loadgen.summarize([ms for t, ms in samples if start <= t < end])


def scenario_storm(server_cls, data_dir: str, n: int) -> dict:
    server = server_cls(data_dir, STREAM_LINGER_SECONDS=5)
    out = data_dir + ".probe.json"
    try:
        server.put("/bench", STREAM)
        server.put("/probe", STREAM)  # the established client's own stream: collateral only
        ctx = multiprocessing.get_context("fork")
        stop = ctx.Event()
        probe = ctx.Process(target=_probe, args=(server.port, 120, out, stop))
        probe.start()
        time.sleep(2)
        t_quiet = time.time()
        time.sleep(2)
        t_connect = time.time()
        clients = loadgen.Clients("127.0.0.1", server.port)
        clients.open(n, "/bench/_streams/all", ["sse"], window=n, timeout=120)
        t_open = time.time()
        time.sleep(2)
        t_close = time.time()
        clients.close_all_conns()
        clients.close()
        time.sleep(3)
        t_after = time.time()
        stop.set()
        probe.join(40)
        last = _current_token(server.port)
    finally:
        server.stop()
    with open(out) as f:
        samples = json.load(f)
    # the restart: n clients with their last id reconnect at once to a new server, while
    # a probe that connected first measures again
    server = server_cls(data_dir, port=server.port, STREAM_LINGER_SECONDS=5)
    out2 = data_dir + ".probe2.json"
    try:
        stop = ctx.Event()
        probe = ctx.Process(target=_probe, args=(server.port, 120, out2, stop))
        probe.start()
        time.sleep(2)
        clients = loadgen.Clients("127.0.0.1", server.port)
        t0 = time.time()
        clients.open(
            n, "/bench/_streams/all", ["sse"], window=n, timeout=120, extra=f"Last-Event-ID: {last}\r\n"
        )
        t1 = time.time()
        stop.set()
        probe.join(40)
        clients.close_all_conns()
        clients.close()
    finally:
        server.stop()
    with open(out2) as f:
        samples2 = json.load(f)
    return {
        "clients": n,
        "quiet": _in_phase(samples, t_quiet, t_connect),
        "while_connecting": _in_phase(samples, t_connect, t_open),
        "connect_seconds": round(t_open - t_connect, 2),
        "while_closing": _in_phase(samples, t_close, t_after),
        "while_reconnecting": _in_phase(samples2, t0, t1),
        "reconnect_after_restart_seconds": round(t1 - t0, 2),
    }


def _current_token(port: int) -> str:
    """The id of the latest event, as a reconnecting client would send it."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(loadgen._request("/bench/_streams/all", "sse", f"127.0.0.1:{port}"))
    threading.Timer(0.5, lambda: _post_json(port, "/bench", {"mark": 1})).start()
    sock.settimeout(10)
    buf = b""
    found = re.search(rb"\nid: ?([^\r\n]+)\r?\n", buf)
    while found is None:
        buf += sock.recv(65536)
        found = re.search(rb"\nid: ?([^\r\n]+)\r?\n", buf)
    sock.close()
    return found.group(1).decode()


SCENARIOS = ("big_documents", "churn_rounds", "storm")


def run(server_cls, data_root: str, args) -> dict:
    """Each scenario on --compare's checkout first (when given), then on this one."""
    n = 200 if args.smoke else 10_000
    wanted = [s for s in (args.scenarios or ",".join(SCENARIOS)).split(",") if s]
    roots = ([os.path.abspath(args.compare)] if args.compare else []) + [server_cls.root]
    here = server_cls.root
    out: dict = {"n": n}
    try:
        for name in wanted:
            for root in roots:
                server_cls.root = root
                label = "baseline" if root != here else "this"
                data_dir = os.path.join(data_root, f"{name}-{label}")
                if name == "big_documents":
                    result = scenario_big_documents(server_cls, data_dir, args.smoke)
                elif name == "churn_rounds":
                    result = scenario_churn_rounds(server_cls, data_dir, n)
                else:
                    result = scenario_storm(server_cls, data_dir, n)
                out.setdefault(name, {})[label] = result
                print(name, label, json.dumps(result), flush=True)
    finally:
        server_cls.root = here
    if args.compare:
        out["baseline_dir"] = os.path.basename(os.path.abspath(args.compare))
    return out


def _fmt(value) -> str:
    return "n/a" if value is None else str(value)


def report(results: dict) -> str:
    r = results["robustness"]
    lines = [
        "",
        "## Faults: memory in bytes and connection storms (issue 12), "
        + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "",
        f"Command: `{results['command']}`. Machine: {results['machine']}.",
        f"Baseline: {r.get('baseline_dir', 'none')} (measured first, in the same run).",
        "",
        "| scenario | figure | baseline | this commit |",
        "|---|---|---|---|",
    ]

    def row(scenario: str, figure: str, pick) -> None:
        both = r.get(scenario, {})
        values = [pick(both[k]) if k in both else None for k in ("baseline", "this")]
        lines.append(f"| {scenario} | {figure} | {_fmt(values[0])} | {_fmt(values[1])} |")

    if "big_documents" in r:
        row("big_documents", "RSS added by one 15 MB document (MB)", lambda x: x["one_big_added_mb"])
        row("big_documents", "RSS added by 30 x 4 MB documents (MB)", lambda x: x["mediums_added_mb"])
        row("big_documents", "RSS kept after the client left (MB)", lambda x: x["kept_after_client_left_mb"])
    if "churn_rounds" in r:
        row("churn_rounds", f"RSS start, after rounds 1-3 of {r['n']} (MB)", lambda x: x["rss_mb"])
        row("churn_rounds", "round 3 vs round 1 (%)", lambda x: x["last_vs_first_round_pct"])
    if "storm" in r:
        for phase, text in (
            ("quiet", "quiet"),
            ("while_connecting", f"while {r['n']} connect"),
            ("while_closing", f"while {r['n']} close at once"),
            ("while_reconnecting", f"while {r['n']} reconnect after a restart"),
        ):
            row(
                "storm",
                f"probe insert-to-event p99 / max (samples), {text} (ms)",
                lambda x, p=phase: f"{x[p]['p99']} / {x[p]['max']} ({x[p]['n']})" if p in x else None,
            )
        row("storm", f"{r['n']} connect, all streaming after (s)", lambda x: x["connect_seconds"])
        row(
            "storm",
            f"{r['n']} reconnect with Last-Event-ID after a restart, all streaming after (s)",
            lambda x: x["reconnect_after_restart_seconds"],
        )
    lines.append("")
    return "\n".join(lines) + "\n"
