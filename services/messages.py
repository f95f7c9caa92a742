"""The messages the hub hands subscribers: a change, an error, a reset, the end; and batches.

Transports encode each message once per wire form and cache the bytes on it (`wire`), so a
message shared by many subscribers is framed once.
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import extjson
from .hidden import Visibility
from .storage import Change

# Event fields that are the driver's or the server's, not the user's.
_INTERNAL_FIELDS = ("_id", "ns", "clusterTime", "txnNumber", "lsid", "collectionUUID")

# Why the hub ended a subscriber, and the message that says so (transports add their codes).
END_REASONS = {
    "shutdown": "server shutting down",
    "removed": "stream removed or redefined",
    "overflow": "client fell behind; reconnect with lastEventId to resume",
    "revoked": "access withdrawn",
    "expired": "token expired",
    "error": "internal error",
    "gone": "client went away",
    "closed": "",  # the client sent a WebSocket close frame: the end is the reply
    "too_big": "message too big",
    "protocol": "protocol error",
    "invalid_data": "invalid frame payload data",
}


class Message:
    """One thing a subscriber is told: a change, an error, a reset, or the end.

    `data` is the JSON text clients get; `id` the resume token as text (None for `end`);
    `reason`/`text` say why an `end` happened. `wire` caches the message's encodings, one
    per wire form, filled by the transports: a message is encoded once per form, however
    many subscribers get it.
    """

    __slots__ = ("kind", "data", "position", "id", "reason", "text", "wire", "event", "size")

    def __init__(
        self,
        kind: str,
        data: str,
        position: Any = None,
        id: str | None = None,
        reason: str = "",
        text: str = "",
    ):
        self.kind = kind  # "change" | "error" | "reset" | "end"
        self.data = data
        self.position = position  # set for changes only
        self.id = id
        self.reason = reason
        self.text = text
        self.wire: dict[str, bytes] = {}
        self.event: dict | None = None  # a change's event as clients see it (per-subscriber filters)
        # What the byte bounds (STREAM_REPLAY_BYTES, STREAM_CLIENT_QUEUE_BYTES) count: the
        # JSON text, and as much again for the wire encodings cached with it.
        self.size = 2 * len(data) + 64

    def __repr__(self) -> str:
        return f"Message({self.kind!r}, {self.data!r})"


class Batch:
    """Messages dispatched together to every subscriber of a watcher (`wire`: their joined
    encodings, per wire form, cached by the transports like a message's; `position`: of its
    last change, None if it has none)."""

    __slots__ = ("items", "wire", "position", "made", "size")

    def __init__(self, items: list[Message]):
        self.items = items
        self.wire: dict[str, bytes] = {}
        self.position = next((m.position for m in reversed(items) if m.position is not None), None)
        self.made = time.time()  # about when its changes happened (metrics: a client's position age)
        self.size = sum(m.size for m in items)  # what it counts against a queue's byte bound


def payload(event: dict, before: bool = False) -> dict:
    """The event as clients see it: the user's fields, without token, ns or clusterTime, and
    without the pre-image (`fullDocumentBeforeChange`) unless the client asked (`before`)."""
    return {
        k: v
        for k, v in event.items()
        if k not in _INTERNAL_FIELDS and (before or k != "fullDocumentBeforeChange")
    }


def token_text(token: dict) -> str:
    """The token as compact JSON, the SSE `id:` and what Last-Event-ID sends back."""
    data = token.get("_data")
    if len(token) == 1 and isinstance(data, str) and data.isalnum():
        return '{"_data":"' + data + '"}'
    return json.dumps(token, separators=(",", ":"))


def change_message(change: Change, visibility: Visibility | None = None) -> Message | None:
    """The message of one change, or None when the pipeline filtered it out.

    `visibility` (the caller's projectResponse) hides fields of the event's documents and
    update description.
    """
    tid = token_text(change.token)
    if change.error is not None:
        return Message("error", json.dumps({"error": change.error, "id": change.token}), id=tid)
    if change.event is None:
        return None
    event = change.event if visibility is None else visibility.project_event(change.event)
    message = Message("change", extjson.dumps(payload(event)), change.position, tid)
    message.event = event
    return message


def error_message(text: str) -> Message:
    return Message("error", json.dumps({"error": text}))


def reset_message(reason: str, token: dict) -> Message:
    """`reset`: the resume point is gone; the stream goes on from `token` (now)."""
    return Message("reset", json.dumps({"reason": reason, "resumeFrom": token}), id=token_text(token))


def end_message(reason: str, text: str = "") -> Message:
    text = text or END_REASONS.get(reason, reason)
    return Message("end", json.dumps({"reason": reason, "message": text}), reason=reason, text=text)
