"""The engine port: what the REST API, the auth layer and the stream hub need from storage.

An engine owns documents, collection properties and the change feed. Two engines
implement it: `embedded` (SQLite, the default) and `mongo` (PyMongo on a replica set).
Both must produce identical change events and raise the same domain errors
(`services.errors`), so nothing above this package knows which one runs.

Concurrency: engines are used from many greenlets of one gevent worker at once. Calls may
block the calling greenlet but never the gevent hub. Every worker process opens its own
engine after the fork (`open_engine` is called by `create_app`, never at import time).

Tokens: a resume token is the event's `_id`, `{"_data": "<hex>"}`, opaque to clients.
`position(token)` turns one into a value the hub can compare (later events compare
greater); it raises `BadRequest` for a token the engine could never have issued.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import DocumentNotFound, EtagMismatch

if TYPE_CHECKING:
    from ..pipeline import Pipeline

# A write guard: called inside the write, atomically with it, with the document before and
# after (None for an insert's "before" and a delete's "after"); it raises a ChangefeedError
# (services.errors) to refuse the write, which then changes nothing and emits nothing.
# Engines call guard(stored, None) as soon as they have the stored document, before anything
# else looks at it (the ETag, the update's operators: their errors would describe it), and
# guard(stored, new) once the new document is known.
WriteGuard = Callable[[dict | None, dict | None], None]


def check_etag(stored: dict, if_match: str | None, what: str) -> None:
    """An `If-Match` (a list of tags, or `*`) against a stored document's or collection's
    `_etag` (collection properties keep it as {"$oid": hex}): 409 when none matches."""
    if if_match is None:
        return
    etag = stored.get("_etag")
    if isinstance(etag, dict):
        etag = etag.get("$oid")
    tags = {t.strip().strip('"') for t in if_match.split(",")}
    if "*" in tags:
        return
    if etag is None or str(etag) not in tags:
        raise EtagMismatch(what)


class UnsuitableServer(RuntimeError):
    """The database is reachable but cannot serve changefeed (a standalone mongod: no change
    streams). No retry helps; the message says what to do. Start-up stops on it."""


@dataclass(frozen=True)
class MetaChange:
    """A change to something other than documents: collection properties, a drop.

    Every worker is told of every MetaChange, wherever it was made, so that streams of a
    redefined collection close everywhere and caches of users and ACL stay exact.
    """

    kind: str  # "props" (collection properties written) or "drop" (collection dropped)
    coll: str


@dataclass
class Change:
    """One change event as the engine produced it, with its position."""

    position: Any
    token: dict
    event: dict | None  # the event after the stream's pipeline; None when filtered out
    error: str | None = None  # a run-time pipeline error for this event, reported in-band


class ChangeStream(ABC):
    """A cursor over one collection's change events, after a pipeline, like PyMongo's.

    A stream ends for good when its collection is dropped or renamed (MongoDB's
    `invalidate`) or when its position falls out of the retained history (`try_next` then
    raises HistoryLost once): `ended` is then true and `end_reason` says why, and
    `try_next` returns None (after waiting up to its timeout, so loops do not spin).
    Use it as a context manager, or call `close()`, to release its cursor.
    """

    ended: bool = False
    end_reason: str = ""

    @abstractmethod
    def try_next(self, timeout: float) -> Change | None:
        """Return the next change (possibly filtered: `event` None) or None after `timeout` seconds.

        :raise HistoryLost: the stream's position is no longer in the retained history.
        """

    @property
    @abstractmethod
    def position(self) -> Any:
        """The position of the last change returned (or where the stream started)."""

    @abstractmethod
    def close(self) -> None:
        """Release the cursor."""

    def __enter__(self) -> ChangeStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Engine(ABC):
    """The storage engine interface. See the module docstring for the contract."""

    name = "engine"

    def start(self) -> None:  # noqa: B027 - optional hook: most engines need nothing here
        """Start per-process background work (change-log tailing). Called once per worker."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work and release connections."""

    # -- collections -------------------------------------------------------------------

    @abstractmethod
    def list_collections(self) -> list[str]: ...

    @abstractmethod
    def get_collection(self, coll: str) -> dict:
        """Return the collection's properties as stored, with `_id: "_meta"` and `_etag`.

        :raise CollectionNotFound:
        """

    @abstractmethod
    def put_collection(self, coll: str, props: dict, if_match: str | None = None) -> tuple[bool, dict]:
        """Create the collection or replace its properties; return (created, stored props)."""

    @abstractmethod
    def patch_collection(self, coll: str, props: dict, if_match: str | None = None) -> dict:
        """Merge top-level properties into an existing collection's; return the stored props."""

    @abstractmethod
    def drop_collection(self, coll: str, if_match: str) -> None:
        """Drop the collection, its documents and its properties; emits a `drop` event."""

    @abstractmethod
    def ensure_collection(self, coll: str) -> None:
        """Create an empty collection if it does not exist (users and acl at start-up)."""

    # -- documents ---------------------------------------------------------------------

    @abstractmethod
    def find(
        self,
        coll: str,
        filter: dict,
        sort: list[tuple[str, int]],
        projection: dict | None,
        skip: int,
        limit: int,
    ) -> list[dict]: ...

    @abstractmethod
    def count(self, coll: str, filter: dict) -> int: ...

    @abstractmethod
    def get_document(self, coll: str, doc_id: Any) -> dict:
        """:raise DocumentNotFound: (or CollectionNotFound)"""

    # Every write takes an optional `guard` (see WriteGuard): the permission checks that must
    # hold for the document as it is when the write happens, not as it was read before.

    @abstractmethod
    def insert_documents(self, coll: str, docs: list[dict], guard: WriteGuard | None = None) -> list[dict]:
        """Insert all or nothing; return the stored documents (with `_id` and `_etag`).

        :raise DuplicateKey:
        """

    @abstractmethod
    def replace_document(
        self,
        coll: str,
        doc_id: Any,
        doc: dict,
        upsert: bool,
        if_match: str | None = None,
        guard: WriteGuard | None = None,
    ) -> tuple[bool, dict]:
        """Replace (or, with upsert, create) a document; return (created, stored document)."""

    @abstractmethod
    def update_document(
        self,
        coll: str,
        doc_id: Any,
        spec: dict,
        if_match: str | None = None,
        upsert: bool = False,
        guard: WriteGuard | None = None,
    ) -> tuple[bool, dict]:
        """Apply an operator update (see services.updates); return (created, stored document)."""

    @abstractmethod
    def delete_document(
        self, coll: str, doc_id: Any, if_match: str | None = None, guard: WriteGuard | None = None
    ) -> None: ...

    def update_many(
        self, coll: str, filter: dict, spec: dict, guard: WriteGuard | None = None
    ) -> tuple[int, int]:
        """Apply an operator update to every document matching `filter`; return (matched, modified).

        Each document is updated atomically with its guard (the embedded engine does all of
        them in one transaction; on MongoDB, as with updateMany, a failure part-way leaves
        the documents before it updated).
        """
        matched = modified = 0
        for before in self.find(coll, filter, [("_id", 1)], None, 0, 0):
            try:
                _, after = self.update_document(coll, before["_id"], spec, guard=guard)
            except DocumentNotFound:
                continue  # deleted meanwhile
            matched += 1
            if after.get("_etag") != before.get("_etag"):  # a no-op update keeps the ETag
                modified += 1
        return matched, modified

    def delete_many(self, coll: str, filter: dict, guard: WriteGuard | None = None) -> int:
        """Delete every document matching `filter`; return how many (see update_many)."""
        deleted = 0
        for doc in self.find(coll, filter, [("_id", 1)], {"_id": 1}, 0, 0):
            try:
                self.delete_document(coll, doc["_id"], guard=guard)
            except DocumentNotFound:
                continue
            deleted += 1
        return deleted

    # -- change streams ----------------------------------------------------------------

    @abstractmethod
    def watch(self, coll: str, pipeline: Pipeline | None, resume_after: dict | None = None) -> ChangeStream:
        """Open a change stream on `coll` through a compiled pipeline (None: every event).

        Without `resume_after` the stream starts at the current end of the feed. A stream
        of `users` never carries password hashes, whatever its pipeline: each engine strips
        them before the pipeline runs.
        :raise HistoryLost: `resume_after` is older than the retained history.
        """

    def latest_position(self) -> Any:
        """The position of the store's latest change, as the store itself has it now (this
        process's streams may not have read that far yet). A reset goes on from here."""
        return self.position(self.current_token())

    def history_window(self) -> float | None:  # noqa: B027  (optional: None is a fine answer)
        """Seconds since the oldest change a client can still resume from, or None when the
        store cannot tell (metrics: services/metrics.py)."""
        return None

    @abstractmethod
    def resume_problem(self, token: dict) -> str | None:
        """Why `token` cannot be resumed exactly here, or None: issued by another data store
        (or before it was reset), ahead of every change the store has made, or older than the
        retained history. The hub asks before it joins a client to a live stream or to its
        replay buffer, where no engine stream would check the token.
        :raise BadRequest: a malformed token.
        """

    @abstractmethod
    def collection_version(self, coll: str) -> Any:
        """A value that changes whenever the collection's documents change (ACL cache key)."""

    @abstractmethod
    def position(self, token: dict) -> Any:
        """Return the comparable position of a token; :raise BadRequest: if malformed."""

    @abstractmethod
    def token(self, position: Any) -> dict:
        """The resume token of a position (the inverse of `position`)."""

    @abstractmethod
    def current_token(self) -> dict:
        """A token for "now": resuming after it yields only later changes."""

    def tail_once(self) -> None:  # noqa: B027 - optional hook
        """Make every change already committed, by any process, visible to this process's
        streams now. Engines whose streams read the database directly need do nothing."""

    def storage_problem(self) -> str | None:
        """Why writes fail now although the engine is reachable (a full disk), or None.
        `/_ready` answers 503 with it; engines that cannot tell return None."""
        return None

    def on_meta_change(self, listener: Callable[[MetaChange], None]) -> None:
        """Call `listener` in this process for every MetaChange made by any process."""
        self._meta_listeners.append(listener)

    def on_document_change(self, listener: Callable[[str, Any], None]) -> None:
        """Call `listener(coll, document_key)` for every document change (users/acl caches)."""
        self._doc_listeners.append(listener)

    def __init__(self) -> None:
        self._meta_listeners: list[Callable[[MetaChange], None]] = []
        self._doc_listeners: list[Callable[[str, Any], None]] = []
