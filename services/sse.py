"""Server-Sent Events framing (WHATWG HTML §9.2), pure functions over bytes.

Departures from RESTHeart's framing, on purpose:
1. A `retry:` line opens every stream, so EventSource reconnects at a known pace.
2. Heartbeats are comment lines (`: hb`), which EventSource ignores and proxies count as traffic.
3. No space after the colon (`id:`, `event:`, `data:`), as RESTHeart and the tutorial show.
"""

from __future__ import annotations


def _line(field: str, value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"SSE {field} must be a single line")
    return f"{field}:{value}\n"


def event(data: str, *, event: str | None = None, id: str | None = None) -> bytes:
    """One event: `id:`, `event:`, then one `data:` line per line of `data`, then a blank line."""
    parts = []
    if id is not None:
        if "\0" in id:
            raise ValueError("SSE id must not contain NUL")
        parts.append(_line("id", id))
    if event is not None:
        parts.append(_line("event", event))
    for line in data.splitlines() or [""]:
        parts.append(f"data:{line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def comment(text: str = "") -> bytes:
    """A comment block; EventSource ignores it, proxies see traffic."""
    lines = text.splitlines() or [""]
    return ("".join(f":{' ' + line if line else ''}\n" for line in lines) + "\n").encode("utf-8")


def retry(milliseconds: int) -> bytes:
    """The reconnection delay, sent once when a stream opens."""
    return f"retry:{int(milliseconds)}\n".encode()
