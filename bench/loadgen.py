"""A cheap SSE/WebSocket load generator: raw non-blocking sockets and epoll, no gevent.

It runs as its own process (the server under test is another), opens N clients in
windows, waits until each has its stream open, then times bursts: for every burst it
POSTs marked documents and records, per client, when the marker arrived. Everything is
bounded: connection windows, bursts, a per-burst deadline.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import socket
import statistics
import struct
import time
from dataclasses import dataclass, field

_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
AUTH = "Basic " + base64.b64encode(b"admin:secret").decode()


@dataclass
class Conn:
    sock: socket.socket
    kind: str  # "sse" or "ws"
    buf: bytearray = field(default_factory=bytearray)
    open: bool = False
    seen: dict = field(default_factory=dict)  # marker -> arrival time


def _request(path: str, kind: str, host: str, extra: str = "", auth: str = AUTH) -> bytes:
    if kind == "ws":
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nAuthorization: {auth}\r\n{extra}\r\n"
        ).encode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
        f"Authorization: {auth}\r\n{extra}\r\n"
    ).encode()


class Clients:
    """N streaming clients multiplexed on one epoll."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}

    def open(
        self,
        n: int,
        path: str,
        kinds: list[str],
        window: int = 500,
        timeout: float = 60.0,
        on_connect: bool = False,
        auth: str = AUTH,
        extra: str = "",
    ) -> float:
        """Open `n` clients; each counts as open at its first stream bytes (or at connect,
        with `on_connect`, for servers that send nothing before the first event)."""
        t0 = time.perf_counter()
        for start in range(0, n, window):
            batch = []
            for i in range(start, min(n, start + window)):
                kind = kinds[i % len(kinds)]
                s = socket.create_connection((self.host, self.port))
                # The kernel's receive time, so the figures do not include this process's delay.
                s.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
                s.setblocking(False)
                s.sendall(_request(path, kind, f"{self.host}:{self.port}", extra=extra, auth=auth))
                c = Conn(s, kind, open=on_connect)
                self.conns[s.fileno()] = c
                self.ep.register(s.fileno(), select.EPOLLIN)
                batch.append(c)
            deadline = time.time() + timeout
            while not all(c.open for c in batch):
                if time.time() > deadline:
                    raise RuntimeError(f"only {sum(c.open for c in batch)} of {len(batch)} streams opened")
                self.poll(0.5)
        return time.perf_counter() - t0

    def poll(self, timeout: float) -> None:
        for fd, _ in self.ep.poll(timeout):
            c = self.conns.get(fd)
            if c is None:
                continue
            now = time.time()
            try:
                data, anc, _flags, _addr = c.sock.recvmsg(262144, 64)
            except BlockingIOError:
                continue
            except OSError:
                data, anc = b"", []
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(raw) >= 16:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    now = sec + nsec / 1e9
            if not data:
                self.ep.unregister(fd)
                c.sock.close()
                del self.conns[fd]
                continue
            c.buf += data
            if not c.open or (c.buf.startswith(b"HTTP/") and b"\r\n\r\n" not in c.buf):
                if b"connected" in c.buf or (c.kind == "ws" and b"\r\n\r\n" in c.buf and b" 101 " in c.buf):
                    c.open = True
                    c.buf.clear()
                continue
            # markers look like "mk-<burst>-<i>"; scan once and keep a short tail
            text = bytes(c.buf)
            pos = 0
            while True:
                pos = text.find(b'"mk-', pos)
                if pos < 0:
                    break
                end = text.find(b'"', pos + 1)
                if end < 0:
                    break
                c.seen.setdefault(text[pos + 1 : end].decode(), now)
                pos = end
            del c.buf[: max(0, len(c.buf) - 64)]

    def wait_markers(self, markers: list[str], deadline: float, conns: list | None = None) -> None:
        want = set(markers)
        while time.time() < deadline:
            if all(want <= c.seen.keys() for c in (conns if conns is not None else self.conns.values())):
                return
            self.poll(0.2)

    def open_group(
        self, n: int, path: str, kind: str = "sse", timeout: float = 60.0, auth: str = AUTH
    ) -> list[Conn]:
        """Open `n` clients of one URL and return them (for scenarios with many stream keys)."""
        before = set(self.conns)
        self.open(n, path, [kind], timeout=timeout, auth=auth)
        return [c for fd, c in self.conns.items() if fd not in before]

    def close_all_conns(self) -> None:
        for fd, c in list(self.conns.items()):
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
            c.sock.close()
        self.conns.clear()

    def close(self) -> None:
        for c in self.conns.values():
            c.sock.close()
        self.conns.clear()
        self.ep.close()


def post(host: str, port: int, path: str, body) -> tuple[float, float]:
    """POST JSON on a fresh connection; return (send time, response time), wall clock."""
    data = json.dumps(body).encode()
    s = socket.create_connection((host, port))
    req = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTH}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data
    t0 = time.time()
    s.sendall(req)
    resp = b""
    while b"\r\n\r\n" not in resp:
        chunk = s.recv(65536)
        if not chunk:
            break
        resp += chunk
    t1 = time.time()
    s.close()
    if b" 201 " not in resp.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"POST failed: {resp[:200]!r}")
    return t0, t1


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100 * (len(values) - 1)))))
    return values[k]


def summarize(latencies_ms: list[float]) -> dict:
    return {
        "n": len(latencies_ms),
        "p50": round(statistics.median(latencies_ms), 2) if latencies_ms else None,
        "p99": round(percentile(latencies_ms, 99), 2),
        "max": round(max(latencies_ms), 2) if latencies_ms else None,
    }


def ws_accept_key(key: str) -> str:
    return base64.b64encode(
        hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    ).decode()


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A WebSocket frame as a client sends it, with an all-zero mask (the payload goes as it
    is, so building a large frame costs one copy)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload
