"""The MongoDB engine: PyMongo against a replica set or a sharded cluster.

Documents live in ``<MONGO_DB>.<collection>``; change events are MongoDB's own change
streams (``collection.watch(stages, full_document="updateLookup", resume_after=...)``).
Any number of changefeed nodes can share one database: MongoDB is the bus, resume tokens
are valid on every node.

Process model. One ``MongoClient`` per worker process, created lazily on first use (after
gevent patched the worker; the constructor never touches the network). The first use
checks the topology with ``hello``: a standalone server (no ``setName``, not
``msg: "isdbgrid"``) raises ``RuntimeError`` saying how to start a replica set. Before
``start()`` (i.e. while ``create_app`` runs) an unreachable server is retried with capped,
jittered backoff and logged; after ``start()`` every call fails fast with ``Unavailable``
(HTTP 503, also what ``/_health`` reports through ``current_token()``) while a background
greenlet keeps retrying.

Collection properties. MongoDB collections are created by ``put_collection`` /
``ensure_collection``; a collection "exists" for changefeed when it has a properties
document in ``_properties``::

    {"_id": "<coll>", "props": "<JSON text>", "etag": "<hex ObjectId>"}

``props`` is the JSON *text* of exactly what ``get_collection`` returns (``{"_id": "_meta",
..., "_etag": {"$oid": hex}}``, as the embedded engine stores it). It is a string because
stream stages contain ``$``-prefixed keys, which MongoDB refuses at the top level and
accepts only in nested fields from 5.0 on; a string is safe on every version. ``etag`` is
duplicated as a plain field so that If-Match checks are a filter of the write itself.

Cross-node notes. ``start()`` runs one greenlet per process that watches the database with
a filter on ``_properties``, ``acl``, ``users`` and on ``drop``/``rename`` events:

* a write to ``_properties`` -> ``MetaChange("props", coll)``; its delete -> ``"drop"``;
* a ``drop``/``rename`` of any collection (also outside changefeed) -> ``MetaChange("drop")``,
  so the hub ends that collection's clients on every node;
* a change in ``acl``/``users`` -> ``doc listeners(coll, _id)`` and a new ACL version.

``collection_version(coll)``: an in-process counter bumped by every local write to the
collection and by every event of it that the greenlet sees. While that greenlet is not
connected it returns a fresh value on every call (callers reload: always exact, never stale).

Streams (``_MongoStream``). Positions are ``_data`` hex strings (upper case), which
compare in event order within a deployment (a token is the hex of a KeyString that starts
with the event's clusterTime, and upper-case hex keeps byte order); the position object also
carries its full token (``_typeBits`` kept) for ``token(position)``. Tokens handed to the
hub are JSON-safe: ``_typeBits``, when present, is Extended JSON ``{"$binary": ...}``.

* Resumable errors: PyMongo resumes once by itself; beyond that the stream re-opens with
  ``resume_after`` = the last token it returned (or the last post-batch token), with capped,
  jittered backoff: nothing is lost or repeated.
* ``ChangeStreamHistoryLost`` (286), ``ChangeStreamFatalError`` (280, except the "_id was
  modified by the pipeline" form) and ``InvalidResumeToken`` (260), on open or on resume:
  ``HistoryLost``.
* A pipeline error (any other non-resumable ``OperationFailure``): a ``Change`` with
  ``error`` is returned once, then the stream re-opens after the last good token with
  backoff (capped at 30 s). The same error at the same position is not reported again.
  MongoDB kills the cursor on such an error and the failing event cannot be skipped
  without risking a loss, so the stream waits for the fault to go away (``updateLookup``
  finds another document, or the stream is redefined, which restarts its watcher).
* ``invalidate`` (the collection was dropped or renamed): one ``Change`` with
  ``error="collection '<c>' was dropped or renamed; the stream has ended"`` at the
  invalidate token, then the stream is ``ended`` (``closed``) and ``try_next`` only waits
  and returns None. The greenlet above turns the preceding ``drop``/``rename`` into
  ``MetaChange("drop")``, on which the hub ends the clients with reason ``removed``.
  Resuming *from* an invalidate token uses ``start_after`` (the stream then follows the
  new collection of that name).
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import enum
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import gevent
from bson import json_util
from bson.binary import Binary
from bson.objectid import ObjectId
from pymongo import MongoClient, ReturnDocument
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    CursorNotFound,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from .. import updates
from ..backoff import Backoff
from ..errors import (
    BadRequest,
    CollectionNotFound,
    Conflict,
    DocumentNotFound,
    DuplicateKey,
    EtagMismatch,
    HistoryLost,
    Unavailable,
)
from .base import Change, ChangeStream, Engine, MetaChange, UnsuitableServer, WriteGuard

if TYPE_CHECKING:
    from ..pipeline import Pipeline

log = logging.getLogger(__name__)

PROPERTIES = "_properties"
SECURITY_COLLECTIONS = ("acl", "users")
ENDED_MESSAGE = "collection '%s' was dropped or renamed; the stream has ended"
REPLICA_SET_HELP = (
    "changefeed's MongoDB engine needs a replica set or a sharded cluster (change streams "
    "do not exist on a standalone mongod), but {where} is a standalone server. Start mongod "
    "as a one-node replica set: `mongod --replSet rs0 --dbpath <dir>` and then, once, "
    "`mongosh --eval 'rs.initiate()'` (or `docker compose -f docker-compose.mongo.yml up -d`, "
    "see the README), and add `?replicaSet=rs0` or `?directConnection=true` to MONGO_URI."
)
RS_GHOST_HELP = (
    "{where} was started with --replSet but the replica set is not initiated yet: run "
    "`mongosh --eval 'rs.initiate()'` once (the docker compose file in the README does it)."
)
_HISTORY_CODES = (286, 280, 260)
# Pre-4.4 servers put no labels on errors; these codes are the ones the drivers' change-streams
# specification names as resumable for them (43, CursorNotFound, is resumable on any server).
_TRANSIENT_CODES = frozenset(
    {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 63, 150, 13388, 234, 133, 43}
)
_META_PIPELINE = [
    {
        "$match": {
            "$or": [
                {"ns.coll": {"$in": [PROPERTIES, *SECURITY_COLLECTIONS]}},
                {"operationType": {"$in": ["drop", "rename", "dropDatabase"]}},
            ]
        }
    },
    {"$project": {"operationType": 1, "ns": 1, "documentKey": 1, "to": 1}},
]
# Prepended to every stream of `users`: password hashes never reach a stage or a client.
_USERS_GUARD = [
    {"$unset": ["fullDocument.password", "fullDocumentBeforeChange.password"]},
    {
        "$set": {
            "updateDescription": {
                "$cond": [
                    {"$eq": [{"$type": "$updateDescription"}, "object"]},
                    {
                        "updatedFields": {
                            "$arrayToObject": {
                                "$filter": {
                                    "input": {"$objectToArray": "$updateDescription.updatedFields"},
                                    "cond": {
                                        "$and": [
                                            {"$ne": ["$$this.k", "password"]},
                                            {"$ne": [{"$indexOfBytes": ["$$this.k", "password."]}, 0]},
                                        ]
                                    },
                                }
                            }
                        },
                        "removedFields": {
                            "$filter": {
                                "input": "$updateDescription.removedFields",
                                "cond": {"$ne": ["$$this", "password"]},
                            }
                        },
                        "truncatedArrays": "$updateDescription.truncatedArrays",
                    },
                    "$$REMOVE",
                ]
            }
        }
    },
]


class Position(str):
    """A token's `_data` (upper case): compares in event order; keeps the whole token."""

    token: dict

    def __new__(cls, data: str, token: dict | None = None) -> Position:
        pos = super().__new__(cls, data.upper())
        pos.token = token if token is not None else {"_data": data}
        return pos


def _bson_token(token: dict) -> dict:
    """A token as MongoDB wants it back (`_typeBits` as BinData)."""
    out: dict = {"_data": token["_data"]}
    if "_typeBits" in token:
        bits = token["_typeBits"]
        if isinstance(bits, dict):
            bits = json_util.loads(json.dumps(bits))
        out["_typeBits"] = Binary(bytes(bits), 0)
    return out


def _json_token(token: Any) -> dict:
    """A token as the hub and clients see it: plain JSON (`_typeBits` as Extended JSON)."""
    out: dict = {"_data": token["_data"]}
    if "_typeBits" in token:
        out["_typeBits"] = {
            "$binary": {"base64": base64.b64encode(bytes(token["_typeBits"])).decode(), "subType": "00"}
        }
    return out


def _position_of(token: Any) -> Position:
    return Position(token["_data"], _json_token(token))


def _errmsg(exc: PyMongoError) -> str:
    details = getattr(exc, "details", None)
    if isinstance(details, dict) and details.get("errmsg"):
        return str(details["errmsg"])
    return str(exc)


class Fault(enum.Enum):
    """What a PyMongo error means for a change stream: the one place that decides it."""

    RESUMABLE = "resumable"  # re-open after the last token, with backoff: nothing lost
    HISTORY_LOST = "history lost"  # the position left the oplog: HistoryLost, the stream ends
    PIPELINE = "pipeline error"  # reported in-band once, then retried with backoff


def classify(exc: PyMongoError) -> Fault:
    """Decide what a change-stream error means, as PyMongo's own `_resumable` does.

    Network errors and a lost cursor are resumable, and so is any error MongoDB labels
    `ResumableChangeStreamError` (4.4 and later) or, from older servers without labels, one
    of the codes the drivers' specification names as resumable. ChangeStreamHistoryLost (286),
    ChangeStreamFatalError (280) and InvalidResumeToken (260) mean the position is gone,
    except the 280 that says the pipeline modified `_id`: that is the pipeline's fault, as
    is every other error.
    """
    if isinstance(exc, (ConnectionFailure, CursorNotFound)):
        return Fault.RESUMABLE
    if isinstance(exc, OperationFailure):
        if exc.code in _HISTORY_CODES and not (exc.code == 280 and "_id field" in _errmsg(exc)):
            return Fault.HISTORY_LOST
        if exc.has_error_label("ResumableChangeStreamError") or exc.code in _TRANSIENT_CODES:
            return Fault.RESUMABLE
    return Fault.PIPELINE


def _now() -> dt.datetime:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _etag_tags(if_match: str | None) -> list | None:
    """The If-Match header as a list of ObjectIds to filter on; None: no check."""
    if if_match is None:
        return None
    tags = {t.strip().strip('"') for t in if_match.split(",")}
    if "*" in tags:
        return None
    return [ObjectId(t) for t in sorted(tags) if ObjectId.is_valid(t)]


def _check_etag(stored: Any, if_match: str | None, what: str) -> None:
    tags = _etag_tags(if_match)
    if tags is not None and stored not in tags:
        raise EtagMismatch(what)


def _with_etag(spec: dict) -> dict:
    spec = dict(spec)
    spec["$set"] = {**spec.get("$set", {}), "_etag": ObjectId()}
    return spec


def _dup_id(exc: PyMongoError, fallback: Any) -> str:
    details = getattr(exc, "details", None) or {}
    errors = details.get("writeErrors") or [details]
    first = errors[0] if errors else {}
    key = (first.get("keyValue") or {}).get("_id", (first.get("op") or {}).get("_id", fallback))
    return json_util.dumps(key)


def _code(exc: PyMongoError) -> int | None:
    if isinstance(exc, BulkWriteError):
        errors = exc.details.get("writeErrors") or []
        return errors[0].get("code") if errors else None
    return getattr(exc, "code", None)


class MongoEngine(Engine):
    """PyMongo storage on a replica set. See the module docstring."""

    name = "mongo"

    def __init__(
        self,
        uri: str,
        db_name: str = "restheart",
        *,
        server_selection_timeout_ms: int = 5000,
        max_await_ms: int = 1000,
        client_options: dict | None = None,
    ):
        super().__init__()
        self.uri = uri
        self.db_name = db_name
        self.server_selection_timeout_ms = server_selection_timeout_ms
        self.max_await_ms = max_await_ms
        # Pre-images (fullDocumentBeforeChange) are asked for "whenAvailable" (MongoDB 6.0+:
        # null unless the collection enables changeStreamPreAndPostImages); a server that
        # does not know the option refuses it once, and the engine stops asking.
        self.pre_images = True
        self._newest_seen: Position | None = None  # the cluster's latest position, last asked
        self.client_options = client_options or {}
        self._client: MongoClient | None = None
        self._ready = False
        self._ready_lock = threading.Lock()
        self._started = False
        self._stopping = False
        self._meta: gevent.Greenlet | None = None
        self._meta_live = False
        self._versions: dict[str, int] = {}
        self._last_error: str | None = None

    # -- client and readiness --

    @property
    def client(self) -> MongoClient:
        if self._client is None:
            options = {
                "serverSelectionTimeoutMS": self.server_selection_timeout_ms,
                "connectTimeoutMS": 5000,
                "socketTimeoutMS": 60000,
                "appname": "changefeed",
                "uuidRepresentation": "standard",
                **self.client_options,
            }
            self._client = MongoClient(self.uri, **options)
        return self._client

    @property
    def db(self):
        return self.client[self.db_name]

    def _where(self) -> str:
        return self.uri.split("@")[-1].split("?")[0]  # never log credentials

    def check_topology(self) -> dict:
        """Run `hello` once; raise UnsuitableServer for a server without change streams."""
        hello = self.client.admin.command("hello")
        if hello.get("msg") == "isdbgrid" or hello.get("setName"):
            return hello
        if hello.get("isreplicaset"):
            raise UnsuitableServer(RS_GHOST_HELP.format(where=self._where()))
        raise UnsuitableServer(REPLICA_SET_HELP.format(where=self._where()))

    def _ensure_ready(self, block: bool | None = None) -> None:
        """Check the server once per process. Unreachable: retry (before start) or 503."""
        if self._ready:
            return
        block = (not self._started) if block is None else block
        backoff = Backoff(0.5, 15.0)
        while True:
            with self._ready_lock:
                if self._ready:
                    return
                try:
                    self.check_topology()
                    self._ready = True
                    if self._last_error:
                        log.info("MongoDB at %s is reachable again", self._where())
                    self._last_error = None
                    return
                except ConnectionFailure as exc:
                    message = f"MongoDB at {self._where()} is unreachable: {exc}"
                    if message != self._last_error:
                        log.warning("%s", message)
                    self._last_error = message
                    if not block:
                        raise Unavailable(message) from None
            delay = backoff.next()
            log.warning("retrying MongoDB at %s in %.1f s", self._where(), delay)
            gevent.sleep(delay)

    def _call(self, fn, *args, **kwargs):
        """Run one driver call; a connection failure becomes Unavailable (503)."""
        self._ensure_ready()
        try:
            return fn(*args, **kwargs)
        except ConnectionFailure as exc:
            raise Unavailable(f"MongoDB at {self._where()} is unreachable: {exc}") from None

    # -- lifecycle --

    def start(self) -> None:
        self._started = True
        self._stopping = False
        if self._meta is None:
            self._meta = gevent.spawn(self._meta_loop)

    def close(self) -> None:
        self._stopping = True
        if self._meta is not None:
            self._meta.kill(block=False)
            self._meta = None
        self._meta_live = False
        if self._client is not None:
            self._client.close()
            self._client = None
            self._ready = False

    def _meta_loop(self) -> None:
        backoff = Backoff(0.2, 30.0)
        token = None
        while not self._stopping:
            try:
                self._ensure_ready(block=False)
                kwargs: dict = {"max_await_time_ms": self.max_await_ms}
                if token is not None:
                    kwargs["resume_after"] = token
                with self.db.watch(_META_PIPELINE, **kwargs) as cs:
                    if not self._meta_live:
                        self._meta_live = True
                        for coll in list(self._versions):
                            self._bump(coll)  # changes may have been missed while down
                    backoff.reset()
                    while not self._stopping:
                        doc = cs.try_next()
                        token = cs.resume_token
                        if doc is not None:
                            self._dispatch(doc)
                        elif not cs.alive:
                            break  # invalidated (dropDatabase): re-open from its token
            except gevent.GreenletExit:
                raise
            except PyMongoError as exc:
                self._meta_live = False
                if classify(exc) is Fault.HISTORY_LOST:
                    log.warning("metadata watcher lost its position (%s); starting from now", _errmsg(exc))
                    token = None
                    for coll in list(self._versions):
                        self._bump(coll)
                else:
                    log.warning("metadata watcher failed: %s; retrying", _errmsg(exc))
                gevent.sleep(backoff.next())
            except Unavailable as exc:
                self._meta_live = False
                log.warning("metadata watcher: %s; retrying", exc)
                gevent.sleep(backoff.next())
            except Exception:
                self._meta_live = False
                log.exception("metadata watcher failed; retrying")
                gevent.sleep(backoff.next())
        self._meta_live = False

    def _dispatch(self, doc: dict) -> None:
        """Turn one event of the metadata stream into listener calls."""
        op = doc.get("operationType")
        coll = (doc.get("ns") or {}).get("coll")
        key = (doc.get("documentKey") or {}).get("_id")
        if coll == PROPERTIES:
            if not isinstance(key, str):
                return  # not one of ours: properties documents are keyed by collection name
            if op in ("insert", "update", "replace"):
                self._notify_meta(MetaChange("props", key))
            elif op == "delete":
                self._notify_meta(MetaChange("drop", key))
            return
        if op in ("drop", "rename") and coll:
            self._bump(coll)
            self._notify_meta(MetaChange("drop", coll))
            if coll in SECURITY_COLLECTIONS:
                self._notify_doc(coll, None)
            return
        if coll in SECURITY_COLLECTIONS and op in ("insert", "update", "replace", "delete"):
            self._bump(coll)
            self._notify_doc(coll, key)

    def _notify_meta(self, change: MetaChange) -> None:
        for listener in list(self._meta_listeners):
            try:
                listener(change)
            except Exception:
                log.exception("meta change listener failed")

    def _notify_doc(self, coll: str, key: Any) -> None:
        for listener in list(self._doc_listeners):
            try:
                listener(coll, key)
            except Exception:
                log.exception("document change listener failed")

    def _bump(self, coll: str) -> None:
        self._versions[coll] = self._versions.get(coll, 0) + 1

    # -- collections --

    def _props_doc(self, coll: str) -> dict | None:
        return self._call(self.db[PROPERTIES].find_one, {"_id": coll})

    def _require(self, coll: str) -> None:
        if self._call(self.db[PROPERTIES].find_one, {"_id": coll}, {"_id": 1}) is None:
            raise CollectionNotFound(coll)

    def _create_mongo_collection(self, coll: str) -> None:
        try:  # `create` itself, not create_collection (which lists collections first)
            self._call(self.db.command, "create", coll)
        except OperationFailure as exc:
            if exc.code != 48:  # NamespaceExists: created by another worker or node
                raise

    def list_collections(self) -> list[str]:
        cursor = self._call(self.db[PROPERTIES].find, {}, {"_id": 1}, sort=[("_id", 1)])
        return [d["_id"] for d in self._call(list, cursor)]

    def get_collection(self, coll: str) -> dict:
        doc = self._props_doc(coll)
        if doc is None:
            raise CollectionNotFound(coll)
        return json.loads(doc["props"])

    def put_collection(self, coll: str, props: dict, if_match: str | None = None) -> tuple[bool, dict]:
        for _ in range(5):
            old = self._props_doc(coll)
            if old is not None:
                _check_etag(ObjectId(old["etag"]), if_match, f"collection '{coll}'")
            etag = ObjectId()
            stored = {
                "_id": "_meta",
                **{k: v for k, v in props.items() if k not in ("_id", "_etag")},
                "_etag": {"$oid": str(etag)},
            }
            record = {"props": json.dumps(stored), "etag": str(etag)}
            if old is None:
                self._create_mongo_collection(coll)
                try:
                    self._call(self.db[PROPERTIES].insert_one, {"_id": coll, **record})
                except DuplicateKeyError:
                    continue  # created meanwhile by another node: replace it
                self._bump(coll)
                return True, stored
            result = self._call(
                self.db[PROPERTIES].update_one, {"_id": coll, "etag": old["etag"]}, {"$set": record}
            )
            if result.matched_count:
                self._bump(coll)
                return False, stored
        raise Conflict(f"the properties of '{coll}' kept changing; retry")

    def patch_collection(self, coll: str, props: dict, if_match: str | None = None) -> dict:
        for _ in range(5):
            old = self._props_doc(coll)
            if old is None:
                raise CollectionNotFound(coll)
            _check_etag(ObjectId(old["etag"]), if_match, f"collection '{coll}'")
            etag = ObjectId()
            stored = {
                **json.loads(old["props"]),
                **{k: v for k, v in props.items() if k not in ("_id", "_etag")},
            }
            stored["_etag"] = {"$oid": str(etag)}
            record = {"props": json.dumps(stored), "etag": str(etag)}
            result = self._call(
                self.db[PROPERTIES].update_one, {"_id": coll, "etag": old["etag"]}, {"$set": record}
            )
            if result.matched_count:
                self._bump(coll)
                return stored
        raise Conflict(f"the properties of '{coll}' kept changing; retry")

    def drop_collection(self, coll: str, if_match: str) -> None:
        old = self._props_doc(coll)
        if old is None:
            raise CollectionNotFound(coll)
        if not if_match:
            raise Conflict("The collection's ETag must be provided using the 'If-Match' header")
        flt: dict = {"_id": coll}
        tags = _etag_tags(if_match)
        if tags is not None:
            flt["etag"] = {"$in": [str(t) for t in tags]}
        result = self._call(self.db[PROPERTIES].delete_one, flt)
        if not result.deleted_count:
            if self._props_doc(coll) is None:
                raise CollectionNotFound(coll)
            raise EtagMismatch(f"collection '{coll}'")
        self._call(self.db.drop_collection, coll)  # emits drop (+ invalidate) on its streams
        self._bump(coll)

    def ensure_collection(self, coll: str) -> None:
        if self._props_doc(coll) is not None:
            return
        self._create_mongo_collection(coll)
        etag = ObjectId()
        stored = {"_id": "_meta", "_etag": {"$oid": str(etag)}}
        try:
            self._call(
                self.db[PROPERTIES].insert_one, {"_id": coll, "props": json.dumps(stored), "etag": str(etag)}
            )
        except DuplicateKeyError:
            pass  # another worker or node created it first

    # -- documents --

    def find(self, coll, filter, sort, projection, skip, limit):
        self._require(coll)
        try:
            cursor = self.db[coll].find(
                filter or {}, projection, skip=skip, limit=limit, sort=sort or [("_id", -1)]
            )
            return self._call(list, cursor)
        except OperationFailure as exc:
            raise BadRequest(f"cannot run the query: {_errmsg(exc)}") from None

    def count(self, coll: str, filter: dict) -> int:
        self._require(coll)
        try:
            return self._call(self.db[coll].count_documents, filter or {})
        except OperationFailure as exc:
            raise BadRequest(f"cannot run the query: {_errmsg(exc)}") from None

    def get_document(self, coll: str, doc_id: Any) -> dict:
        self._require(coll)
        doc = self._call(self.db[coll].find_one, {"_id": doc_id})
        if doc is None:
            raise DocumentNotFound(coll, str(doc_id))
        return doc

    def insert_documents(self, coll: str, docs: list[dict], guard: WriteGuard | None = None) -> list[dict]:
        self._require(coll)
        stored, seen = [], set()
        for doc in docs:
            doc = dict(doc)
            doc.setdefault("_id", ObjectId())
            doc = {"_id": doc.pop("_id"), **doc, "_etag": ObjectId()}
            if guard is not None:
                guard(None, doc)  # a new document: nothing to race with but a duplicate key
            key = json_util.dumps(doc["_id"])
            if key in seen:
                raise DuplicateKey(coll, key)
            seen.add(key)
            stored.append(doc)
        if not stored:
            return []
        try:
            if len(stored) == 1:
                self._call(self.db[coll].insert_one, stored[0])
            else:  # all or nothing, like the embedded engine: one transaction

                def insert(session):
                    self.db[coll].insert_many(stored, ordered=True, session=session)

                def run():
                    with self.client.start_session() as session:
                        session.with_transaction(insert)

                self._call(run)
        except (DuplicateKeyError, BulkWriteError, OperationFailure) as exc:
            if _code(exc) == 11000:
                raise DuplicateKey(coll, _dup_id(exc, None)) from None
            raise BadRequest(_errmsg(exc)) from None
        self._bump(coll)
        return stored

    def replace_document(self, coll, doc_id, doc, upsert, if_match=None, guard=None):
        self._require(coll)
        new = {
            "_id": doc_id,
            **{k: v for k, v in doc.items() if k not in ("_id", "_etag")},
            "_etag": ObjectId(),
        }
        if guard is not None:
            return self._guarded_replace(coll, doc_id, new, upsert, if_match, guard)
        flt: dict = {"_id": doc_id}
        tags = _etag_tags(if_match)
        if tags is not None:
            flt["_etag"] = {"$in": tags}
        try:
            result = self._call(self.db[coll].replace_one, flt, new, upsert=bool(upsert))
        except DuplicateKeyError:
            raise EtagMismatch(f"document '{doc_id}'") from None  # exists, with another ETag
        except OperationFailure as exc:
            raise BadRequest(_errmsg(exc)) from None
        if result.upserted_id is not None:
            self._bump(coll)
            return True, new
        if not result.matched_count:
            if self._call(self.db[coll].find_one, {"_id": doc_id}, {"_id": 1}) is None:
                raise DocumentNotFound(coll, str(doc_id))
            raise EtagMismatch(f"document '{doc_id}'")
        self._bump(coll)
        return False, new

    def _guarded_replace(
        self, coll: str, doc_id: Any, new: dict, upsert: bool, if_match: str | None, guard: WriteGuard
    ) -> tuple[bool, dict]:
        """Read, check the guard, then write only if the document is still the one checked."""
        target = self.db[coll]
        for _ in range(10):
            old = self._call(target.find_one, {"_id": doc_id})
            if old is None:
                if not upsert:
                    raise DocumentNotFound(coll, str(doc_id))
                guard(None, new)
                try:
                    self._call(target.insert_one, new)
                except DuplicateKeyError:
                    continue  # created meanwhile: check it as it is now
                except OperationFailure as exc:  # e.g. the collection's validator refused it
                    raise BadRequest(_errmsg(exc)) from None
                self._bump(coll)
                return True, new
            guard(old, None)
            _check_etag(old.get("_etag"), if_match, f"document '{doc_id}'")
            guard(old, new)
            try:
                result = self._call(target.replace_one, {"_id": doc_id, "_etag": old.get("_etag")}, new)
            except OperationFailure as exc:
                raise BadRequest(_errmsg(exc)) from None
            if result.matched_count:
                self._bump(coll)
                return False, new
        raise Conflict(f"document '{doc_id}' kept changing; retry")

    def update_document(self, coll, doc_id, spec, if_match=None, upsert=False, guard=None):
        self._require(coll)
        target = self.db[coll]
        for _ in range(10):
            old = self._call(target.find_one, {"_id": doc_id})
            try:
                if old is None:
                    if not upsert:
                        raise DocumentNotFound(coll, str(doc_id))
                    if guard is not None:
                        insert_spec = dict(spec)
                        if "$setOnInsert" in insert_spec:
                            insert_spec["$set"] = {
                                **insert_spec.get("$set", {}),
                                **insert_spec.pop("$setOnInsert"),
                            }
                        guard(None, updates.apply_update({"_id": doc_id}, insert_spec, _now())[0])
                    # Inserts only: an existing document (with an _etag) makes the upsert's
                    # insert fail with 11000 and we go round again.
                    new = self._call(
                        target.find_one_and_update,
                        {"_id": doc_id, "_etag": {"$exists": False}},
                        _with_etag(spec),
                        upsert=True,
                        return_document=ReturnDocument.AFTER,
                    )
                    self._bump(coll)
                    return True, new
                if guard is not None:
                    guard(old, None)  # before the ETag and the operators look at it
                _check_etag(old.get("_etag"), if_match, f"document '{doc_id}'")
                after, desc = updates.apply_update(old, spec, _now())
                if desc is None:
                    return False, old  # a no-op writes nothing and emits nothing, as MongoDB does
                if guard is not None:
                    guard(old, after)  # the write below is conditional on the ETag checked here
                # The write is conditional on the ETag just checked: check and write are atomic.
                new = self._call(
                    target.find_one_and_update,
                    {"_id": doc_id, "_etag": old.get("_etag")},
                    _with_etag(spec),
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                continue
            except OperationFailure as exc:
                raise updates.UpdateError(_errmsg(exc)) from None
            if new is not None:
                self._bump(coll)
                return False, new
            # changed (or deleted) between the read and the write: read again
        raise Conflict(f"document '{doc_id}' kept changing; retry")

    def delete_document(
        self, coll: str, doc_id: Any, if_match: str | None = None, guard: WriteGuard | None = None
    ) -> None:
        self._require(coll)
        if guard is not None:
            for _ in range(10):
                old = self._call(self.db[coll].find_one, {"_id": doc_id})
                if old is None:
                    raise DocumentNotFound(coll, str(doc_id))
                guard(old, None)
                _check_etag(old.get("_etag"), if_match, f"document '{doc_id}'")
                if self._call(
                    self.db[coll].delete_one, {"_id": doc_id, "_etag": old.get("_etag")}
                ).deleted_count:
                    self._bump(coll)
                    return
            raise Conflict(f"document '{doc_id}' kept changing; retry")
        flt: dict = {"_id": doc_id}
        tags = _etag_tags(if_match)
        if tags is not None:
            flt["_etag"] = {"$in": tags}
        result = self._call(self.db[coll].delete_one, flt)
        if not result.deleted_count:
            if self._call(self.db[coll].find_one, {"_id": doc_id}, {"_id": 1}) is None:
                raise DocumentNotFound(coll, str(doc_id))
            raise EtagMismatch(f"document '{doc_id}'")
        self._bump(coll)

    def collection_version(self, coll: str) -> Any:
        """Equal values mean nothing changed; exact only while the metadata watcher runs."""
        if not self._meta_live:
            return object()  # not watching: always different, callers reload
        return self._versions.setdefault(coll, 0)

    # -- change streams --

    def token(self, position: Any) -> dict:
        """The token of a position (the inverse of `position`)."""
        if isinstance(position, Position):
            return copy.deepcopy(position.token)
        return {"_data": str(position)}

    def position(self, token: dict) -> Position:
        if not isinstance(token, dict) or "_data" not in token or not set(token) <= {"_data", "_typeBits"}:
            raise BadRequest('resume token must be a JSON object {"_data": "<hex>"}')
        data = token["_data"]
        if (
            not isinstance(data, str)
            or not data
            or len(data) % 2
            or any(c not in "0123456789ABCDEFabcdef" for c in data)
        ):
            raise BadRequest("resume token _data must be a non-empty string of hexadecimal digit pairs")
        if "_typeBits" in token:
            try:
                bits = _bson_token(token)["_typeBits"]
            except Exception:
                raise BadRequest("resume token _typeBits must be binary data") from None
            return Position(data, _json_token({"_data": data, "_typeBits": bits}))
        return Position(data, {"_data": data})

    def history_window(self) -> float | None:
        """The oplog's window (its first entry's age), where the user may read local.oplog.rs;
        None otherwise (Atlas and least-privilege users usually may not)."""
        import time as _time

        def read() -> float | None:
            first = self.client["local"]["oplog.rs"].find({}, {"ts": 1}).sort("$natural", 1).limit(1)
            for entry in first:
                return max(0.0, _time.time() - entry["ts"].time)
            return None

        try:
            return self._call(read)
        except Exception:
            return None

    def resume_problem(self, token: dict) -> str | None:
        """A token ahead of the cluster's latest change (from another cluster, or from a
        restored backup) cannot be resumed; anything else is MongoDB's to judge when a
        stream resumes from it (a token it no longer has is its ChangeStreamHistoryLost).

        The cluster's latest position is asked only for a token beyond the newest one this
        process has seen: a storm of reconnecting clients costs one round trip, not one each."""
        position = self.position(token)
        if self._newest_seen is not None and position <= self._newest_seen:
            return None
        self._newest_seen = self.position(self.current_token())
        if position > self._newest_seen:
            return "the resume token is ahead of every change this cluster has made"
        return None

    def current_token(self) -> dict:
        """A high-water-mark token for now (valid to resume any stream of this database)."""
        self._ensure_ready(block=False)

        def read() -> dict | None:
            with self.db.watch(max_await_time_ms=1) as cs:
                return cs.resume_token

        try:
            token = self._call(read)
        except OperationFailure as exc:
            raise Unavailable(f"MongoDB cannot open a change stream: {_errmsg(exc)}") from None
        if token is None:
            raise Unavailable("MongoDB returned no postBatchResumeToken (server older than 4.0.7?)")
        return _json_token(token)

    def stages_for(self, coll: str, pipeline: Pipeline | None) -> list:
        """The stages sent after `$changeStream`: the users guard, then the pipeline's."""
        stages = list(pipeline.stages) if pipeline is not None else []
        if coll == "users":
            stages = copy.deepcopy(_USERS_GUARD) + stages
        return stages

    def watch(self, coll: str, pipeline: Pipeline | None, resume_after: dict | None = None) -> ChangeStream:
        start = self.position(resume_after) if resume_after is not None else None
        self._ensure_ready(block=False)
        return _MongoStream(self, coll, self.stages_for(coll, pipeline), start)


class _MongoStream(ChangeStream):
    """One PyMongo change stream plus the outer resume loop. See the module docstring."""

    def __init__(self, engine: MongoEngine, coll: str, stages: list, start: Position | None):
        self.engine = engine
        self.coll = coll
        self.stages = stages
        self._cs: Any = None
        self._start_after = False
        self._closed = False
        self._retry_at = 0.0
        self._backoff = Backoff(0.1, 30.0)
        self._pending: Change | None = None
        self._reported: tuple | None = None
        self._pos: Position = start if start is not None else Position("")
        try:
            self._open()
        except PyMongoError as exc:
            fault = classify(exc)
            if fault is Fault.HISTORY_LOST:
                raise HistoryLost(f"cannot resume the change stream: {_errmsg(exc)}") from None
            if fault is Fault.RESUMABLE:
                raise Unavailable(f"MongoDB at {engine._where()} is unreachable: {_errmsg(exc)}") from None
            if start is None:  # a pipeline error at open: reported by the first try_next
                self._pos = _position_of(engine.current_token())
            self._schedule()
            self._pending = self._error_change(exc)

    # -- the port --

    @property
    def position(self) -> Position:
        return self._pos

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._drop_cursor()

    def try_next(self, timeout: float) -> Change | None:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            if self._pending is not None:
                change, self._pending = self._pending, None
                return change
            if self._closed:
                gevent.sleep(min(max(timeout, 0.0), 1.0))
                return None
            if self._cs is None:
                wait = self._retry_at - time.monotonic()
                if wait > deadline - time.monotonic():
                    gevent.sleep(max(deadline - time.monotonic(), 0))
                    return None
                if wait > 0:
                    gevent.sleep(wait)
                try:
                    self._open()
                except PyMongoError as exc:
                    reported = self._fault(exc)
                    if reported is not None:
                        return reported
                    continue
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            self._set_await(max(1, min(remaining_ms, self.engine.max_await_ms)))
            cs = self._cs
            try:
                doc = cs.try_next()
            except PyMongoError as exc:
                if self._closed:
                    return None  # closed while the getMore waited: the error is of the close
                self._drop_cursor()
                reported = self._fault(exc)
                if reported is not None:
                    return reported
                continue
            if self._closed:  # closed while the getMore waited (the watcher stopped)
                return None
            self._backoff.reset()
            if doc is None:
                if not cs.alive:  # cursor closed by the server: an invalidate we filtered out
                    return self._end(cs.resume_token)
                token = cs.resume_token
                if token is not None and _position_of(token) > self._pos:
                    self._pos = _position_of(token)
                if time.monotonic() >= deadline:
                    return None
                continue
            if doc.get("operationType") == "invalidate":
                return self._end(doc["_id"])
            self._pos = _position_of(doc["_id"])
            self._start_after = False
            self._reported = None
            return Change(self._pos, _json_token(doc["_id"]), doc)

    # -- helpers --

    def _fault(self, exc: PyMongoError) -> Change | None:
        """Act on an error of open or getMore: retry later, report it, or end (HistoryLost)."""
        fault = classify(exc)
        if fault is Fault.HISTORY_LOST:
            message = f"cannot resume the change stream: {_errmsg(exc)}"
            self.ended, self.end_reason = True, message
            self.close()
            raise HistoryLost(message)
        self._schedule()
        if fault is Fault.RESUMABLE:
            log.warning("stream %s: %s; re-opening after the last token", self.coll, _errmsg(exc))
            return None
        return self._error_change(exc)

    def _open(self) -> None:
        kwargs: dict = {"full_document": "updateLookup", "max_await_time_ms": self.engine.max_await_ms}
        if self.engine.pre_images:
            kwargs["full_document_before_change"] = "whenAvailable"
        if self._pos:
            kwargs["start_after" if self._start_after else "resume_after"] = _bson_token(self._pos.token)
        target = self.engine.db[self.coll]
        try:
            self._cs = target.watch(self.stages, **kwargs)
        except OperationFailure as exc:
            if "fullDocumentBeforeChange" in _errmsg(exc) and kwargs.pop("full_document_before_change", None):
                log.warning("the server does not offer pre-images (MongoDB < 6.0): %s", _errmsg(exc))
                self.engine.pre_images = False
                self._open()
                return
            if exc.code == 260 and "invalidate" in _errmsg(exc) and not self._start_after and self._pos:
                # resumeAfter refuses an invalidate token; startAfter takes it
                self._start_after = True
                kwargs.pop("resume_after", None)
                kwargs["start_after"] = _bson_token(self._pos.token)
                self._cs = target.watch(self.stages, **kwargs)
            else:
                raise
        if not self._pos:
            token = self._cs.resume_token
            self._pos = (
                _position_of(token) if token is not None else _position_of(self.engine.current_token())
            )

    def _set_await(self, ms: int) -> None:
        # PyMongo fixes maxAwaitTimeMS per stream; the getMore reads it from the cursor.
        cs = self._cs
        if hasattr(cs, "_max_await_time_ms"):
            cs._max_await_time_ms = ms
        cursor = getattr(cs, "_cursor", None)
        if cursor is not None and hasattr(cursor, "_max_await_time_ms"):
            cursor._max_await_time_ms = ms

    def _drop_cursor(self) -> None:
        cs, self._cs = self._cs, None
        if cs is not None:
            try:
                cs.close()
            except PyMongoError:
                pass

    def _schedule(self) -> None:
        self._retry_at = time.monotonic() + self._backoff.next()

    def _error_change(self, exc: PyMongoError) -> Change | None:
        """A pipeline error, reported once per (position, message); None if already reported."""
        message = _errmsg(exc)
        key = (self._pos, message)
        if key == self._reported:
            return None
        self._reported = key
        log.warning("stream %s: pipeline error at %s: %s", self.coll, self._pos, message)
        return Change(self._pos, _json_token(self._pos.token), None, error=message)

    def _end(self, token: Any) -> Change:
        """The collection was dropped or renamed: report once, then stay closed."""
        if token is not None:
            self._pos = _position_of(token)
        self.ended, self.end_reason = True, ENDED_MESSAGE % self.coll
        self.close()
        return Change(self._pos, _json_token(self._pos.token), None, error=ENDED_MESSAGE % self.coll)
