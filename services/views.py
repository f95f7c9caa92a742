"""What each subscriber's binding makes of a shared stream, and which bindings an event can reach.

One watcher (and on MongoDB one change-stream cursor) serves a stream of a collection,
whoever asks: it runs only the stages every subscriber runs alike
(`pipeline.shared_stage_count`). What depends on the subscriber is a `View`: its readFilter,
its bound stages (variables, `$ifvar` choices), its projectResponse and its notify_when.
Subscribers with the same binding share one view, so an event is evaluated and encoded once
per binding, not once per client.

`Router` keeps a watcher's views and sends each event only to the views it can match: a
view whose leading filter has an equality on a field (a variable bound in a `$match`, a
readFilter's `owner: @user._id`, notify_when) is indexed by that field's value, so an
insert for one tenant costs a dictionary lookup and one evaluation, not one per tenant.
The index is a pre-filter: it may send a view an event it then drops, never the reverse
(values that MongoDB holds equal, such as 5, 5.0 and NumberDecimal("5"), have one key here;
values it cannot key exactly, such as dates or documents, leave the view unindexed).

Hand-written: no library indexes MongoDB queries by their equality predicates.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import Any

from bson import Decimal128, Int64, ObjectId

from . import extjson
from .hidden import Visibility
from .messages import Batch, Message, payload
from .pipeline import EventError, NotifyFilter, Pipeline
from .query import matches

log = logging.getLogger(__name__)

_MAX_IN_VALUES = 64  # a `$in` of more values than this is not worth indexing
_UNKEYED = object()
_SIDES = ("fullDocument", "fullDocumentBeforeChange")


def value_key(value: Any) -> Any:
    """A hashable key equal for values MongoDB's equality holds equal, or _UNKEYED.

    Numbers of every BSON type share keys by value (Python's 5 == 5.0 == Decimal("5"), with
    equal hashes). A boolean shares the key of 1 or 0: MongoDB holds them apart, the
    evaluator (mongomock) does not, and a shared key only costs an evaluation. NaN, dates,
    documents, arrays, null and regexes are not keyed (null also matches a missing field).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, ObjectId)):
        return value
    if isinstance(value, (int, Int64)):
        return int(value)
    if isinstance(value, float):
        return _UNKEYED if math.isnan(value) else value
    if isinstance(value, Decimal128):
        number = value.to_decimal()
        return _UNKEYED if number.is_nan() else number
    return _UNKEYED


def values_at(doc: Any, path: str) -> list[Any]:
    """Every value a query on `path` may compare with, arrays traversed (a superset)."""
    out: list[Any] = []
    _collect(doc, path.split("."), 0, out)
    return out


def _collect(node: Any, parts: list[str], i: int, out: list[Any]) -> None:
    if i == len(parts):
        out.append(node)
        if isinstance(node, list):
            out.extend(node)
        return
    if isinstance(node, dict):
        if parts[i] in node:
            _collect(node[parts[i]], parts, i + 1, out)
    elif isinstance(node, list):
        part = parts[i]
        if part.isdigit() and int(part) < len(node):
            _collect(node[int(part)], parts, i + 1, out)
        for element in node:
            if isinstance(element, (dict, list)):
                _collect(element, parts, i, out)


def equality_entries(query: Any) -> list[tuple[str, Any]] | None:
    """(path, key) pairs one of which an event must have for `query` to match it, or None.

    From a top-level field equality (`{"a": v}`, `{"a": {"$eq": v}}`, a small `$in`), an
    `$and` member, or an `$or` whose every branch has one.
    """
    if not isinstance(query, dict):
        return None
    for key, value in query.items():
        if key == "$and" and isinstance(value, list):
            for member in value:
                found = equality_entries(member)
                if found:
                    return found
        elif key == "$or" and isinstance(value, list) and value:
            branches = [equality_entries(member) for member in value]
            if all(branches):
                return [entry for branch in branches for entry in branch or ()]
        elif not key.startswith("$"):
            found = _field_entries(key, value)
            if found:
                return found
    return None


def _field_entries(path: str, condition: Any) -> list[tuple[str, Any]] | None:
    if isinstance(condition, dict) and condition and all(str(k).startswith("$") for k in condition):
        if "$eq" in condition:
            values = [condition["$eq"]]
        elif "$in" in condition and isinstance(condition["$in"], list):
            values = condition["$in"]
            if not values or len(values) > _MAX_IN_VALUES:
                return None
        else:
            return None
    else:
        values = [condition]
    keys = [value_key(v) for v in values]
    if any(k is _UNKEYED for k in keys):
        return None
    return [(path, k) for k in keys]


def scoped(event: dict, read_filter: dict) -> dict | None:
    """The event as a caller whose permission's readFilter is `read_filter` may see it.

    The filter is tested on the document after the change (`fullDocument`) and before it
    (`fullDocumentBeforeChange`, the pre-image): after only, the document entered what the
    caller may read, and the pre-image (someone else's document) is removed; before only,
    it left: the caller is told (a delete, or an update or replace whose `fullDocument` and
    `updateDescription` are removed: they describe a document it may no longer read);
    neither: not the caller's. Without a pre-image a delete cannot be placed and is not sent.
    """
    after = event.get("fullDocument")
    before = event.get("fullDocumentBeforeChange")
    now_in = isinstance(after, dict) and matches(read_filter, after)
    was_in = isinstance(before, dict) and matches(read_filter, before)
    if now_in:
        if was_in or "fullDocumentBeforeChange" not in event:
            return event
        return {k: v for k, v in event.items() if k != "fullDocumentBeforeChange"}
    if was_in:
        return {k: v for k, v in event.items() if k not in ("fullDocument", "updateDescription")}
    return None


class View:
    """One binding of a stream: what its subscribers' events go through, once per batch.

    In order: `read_filter` (the permission's, on documents: `scoped`), `pipeline` (the
    subscriber's own stages, bound; None if none), `visibility` (projectResponse), `notify`
    (the bound notify_when); `before`: the client asked for the pre-image in its events.
    `entries`: the index entries an event must hit (None: every event is evaluated).
    """

    __slots__ = (
        "key",
        "read_filter",
        "pipeline",
        "visibility",
        "notify",
        "before",
        "entries",
        "subscribers",
        "reuses_messages",
        "identity",
    )

    def __init__(
        self,
        key: str,
        pipeline: Pipeline | None,
        visibility: Visibility | None,
        notify: NotifyFilter | None,
        read_filter: dict | None = None,
        before: bool = False,
    ):
        self.key = key
        self.read_filter = read_filter or None
        self.pipeline = pipeline
        self.visibility = visibility
        self.notify = notify
        self.before = before
        self.subscribers: set = set()
        # filters only: a kept event is the watcher's own message (its encodings are shared)
        self.reuses_messages = (
            visibility is None and not before and (pipeline is None or pipeline.filters_only)
        )
        # nothing of its own: every event goes out as the watcher's message
        self.identity = (
            read_filter is None and pipeline is None and visibility is None and notify is None and not before
        )
        self.entries = self._index_entries()

    def _index_entries(self) -> list[tuple[str, Any]] | None:
        leading = []
        if self.pipeline is not None:
            for stage in self.pipeline.stages:
                ((name, arg),) = stage.items()
                if name != "$match":
                    break
                leading.append(arg)
        # the subscriber's own stages come after the readFilter: the likelier to be selective
        for query in reversed(leading):
            found = equality_entries(query)
            if found:
                return found
        if self.read_filter is not None:
            found = equality_entries(self.read_filter)
            if found:  # the document after the change or before it
                return [(f"{side}.{path}", key) for path, key in found for side in _SIDES]
        if self.notify is not None and (self.pipeline is None or self.pipeline.filters_only):
            # notify_when reads the event after the stages: here the event as it came
            return equality_entries(self.notify.query)
        return None

    def evaluate(self, batch: Batch, messages: list[Message] | None = None) -> Batch | None:
        """`messages` (default: all of `batch`) as this view's subscribers get them: a
        Batch (the same `batch` when nothing changed), or None when nothing is left."""
        if self.identity:
            return batch if messages is None else Batch(messages)
        items = batch.items if messages is None else messages
        kept: list[Message] = []
        same = messages is None
        for message in items:
            out = message if message.kind != "change" else self._change(message)
            if out is not None:
                kept.append(out)
            same = same and out is message
        if not kept:
            return None
        return batch if same else Batch(kept)

    def _change(self, message: Message) -> Message | None:
        event = message.event
        if event is None:  # (every change message carries its event)
            return None
        changed = False
        if self.read_filter is not None:
            scoped_event = scoped(event, self.read_filter)
            if scoped_event is None:
                return None
            changed, event = scoped_event is not event, scoped_event
        if self.pipeline is not None:
            try:
                event = self.pipeline.apply(event)
            except EventError as exc:
                log.warning("stream pipeline error at %s: %s", message.id, exc)
                return Message(
                    "error",
                    json.dumps({"error": str(exc), "id": json.loads(message.id or "null")}),
                    id=message.id,
                )
            if event is None:
                return None
        if self.visibility is not None:
            event = self.visibility.project_event(event)
        if self.notify is not None and not self.notify(event):
            return None
        if self.reuses_messages and not changed:
            return message
        out = Message("change", extjson.dumps(payload(event, self.before)), message.position, message.id)
        out.event = event
        return out


class Router:
    """A watcher's views, and which of them each event can reach."""

    def __init__(self) -> None:
        self.views: dict[str, View] = {}
        self.unindexed: set[View] = set()
        self.indexed: set[View] = set()
        self.by_path: dict[str, dict[Any, set[View]]] = {}

    def view(self, key: str, make: Any) -> View:
        """The view of `key`, made by `make()` and indexed if it is new."""
        view = self.views.get(key)
        if view is None:
            view = self.views[key] = make()
            if view.entries is None:
                self.unindexed.add(view)
            else:
                self.indexed.add(view)
                for path, value in view.entries:
                    self.by_path.setdefault(path, {}).setdefault(value, set()).add(view)
        return view

    def remove(self, view: View) -> None:
        if self.views.get(view.key) is not view:
            return
        del self.views[view.key]
        self.unindexed.discard(view)
        self.indexed.discard(view)
        for path, value in view.entries or ():
            by_value = self.by_path[path]
            group = by_value[value]
            group.discard(view)
            if not group:
                del by_value[value]
                if not by_value:
                    del self.by_path[path]

    def candidates(self, event: dict) -> set[View]:
        """The indexed views `event` can match."""
        found: set[View] = set()
        for path, by_value in self.by_path.items():
            for value in values_at(event, path):
                key = value_key(value)
                if key is not _UNKEYED:
                    group = by_value.get(key)
                    if group:
                        found |= group
        return found

    def route(self, batch: Batch) -> Iterator[tuple[View, Batch]]:
        """(view, what it gets of `batch`) for every view with something to get."""
        for view in self.unindexed:
            out = view.evaluate(batch)
            if out is not None:
                yield view, out
        if not self.indexed:
            return
        picked: dict[View, list[Message]] = {}
        for message in batch.items:
            if message.kind != "change":
                views: Any = self.indexed  # errors, resets: every subscriber is told
            elif message.event is None:
                continue
            else:
                views = self.candidates(message.event)
            for view in views:
                bucket = picked.get(view)
                if bucket is None:
                    picked[view] = [message]
                else:
                    bucket.append(message)
        for view, messages in picked.items():
            out = view.evaluate(batch, messages)
            if out is not None:
                yield view, out
