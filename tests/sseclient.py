"""A small SSE client over a real socket (http.client), for live tests.

It keeps the wire details visible: the `retry:` line, comments (heartbeats), `id:`,
`event:` and `data:` fields, and a clean end of the chunked body.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Event:
    id: str | None = None
    event: str = "message"
    data: str = ""
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    def json(self):
        return json.loads(self.data)


class SSEClient:
    def __init__(
        self, url: str, headers: dict | None = None, timeout: float = 10.0, rcvbuf: int | None = None
    ):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.conn.connect()
        self.sock = self.conn.sock  # http.client lets go of it when the server says Connection: close
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.conn.request("GET", path, headers={"Accept": "text/event-stream", **(headers or {})})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = self.resp.headers
        self.ended = False

    def body(self) -> str:
        return self.resp.read().decode()

    def next(self, timeout: float | None = None) -> Event | None:
        """Next dispatched block (an event, or a comment/retry-only block); None at end of stream."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        ev = Event()
        seen = False
        while True:
            line = self.resp.readline()
            if not line:
                self.ended = True
                return ev if seen else None
            line = line.decode().rstrip("\n").rstrip("\r")
            if line == "":
                if seen:
                    return ev
                continue
            seen = True
            if line.startswith(":"):
                ev.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            if name == "id":
                ev.id = value
            elif name == "event":
                ev.event = value
            elif name == "data":
                ev.data = value if not ev.data else ev.data + "\n" + value
            elif name == "retry":
                ev.retry = int(value)

    def next_event(self, timeout: float = 10.0, kinds=("change", "reset", "error", "end")) -> Event | None:
        """Skip comment-only blocks; return the next real event (or None at the end)."""
        while True:
            ev = self.next(timeout)
            if ev is None or ev.event in kinds:
                return ev

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.conn.close()
