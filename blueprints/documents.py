"""Documents: list with query arguments, count, insert (one or bulk), read, replace, update,
delete, and the bulk PATCH/DELETE of `/<coll>/*`.

Every write goes through the engine, which records its change events in the same
transaction. The caller's permission (services.permissions.Grant) shapes each request:
its readFilter narrows reads, projectResponse hides fields (and forbids querying them),
mergeRequest is merged into every write, and writeFilter plus the users rules are checked
by the engine inside the write. Writes to `users` hash the password, and no response ever
shows it.
"""

from __future__ import annotations

import datetime
from typing import Any

from bson.errors import InvalidId
from bson.objectid import ObjectId
from flask import Blueprint, request

from services import acl, auth, query, updates
from services.errors import BadRequest, DocumentNotFound, MethodNotAllowed
from services.paths import decode_segment, location_segment
from services.permissions import Grant

from . import security
from .common import (
    check_field_names,
    check_name,
    empty_response,
    engine,
    int_arg,
    json_body,
    json_response,
    parse_id,
)

bp = Blueprint("documents", __name__)

_WRITE_MODES = ("insert", "update", "upsert")
ACL = "acl"
# Names with a meaning in a document URL (RESTHeart's reserved resources, and `*` for bulk
# writes): a document with such an id could never be addressed, so none may be written.
RESERVED_IDS = frozenset({"_streams", "_meta", "_size", "_indexes", "_aggrs", "_schemas", "*"})
BULK = "*"


def _check_id(doc_id: Any) -> Any:
    """Only ids a URL can name: strings, ObjectIds and integers (`?id_type=NUMBER`)."""
    if isinstance(doc_id, str):
        if doc_id in RESERVED_IDS:
            raise BadRequest(f"'{doc_id}' is a reserved name and cannot be used as a document id")
        if not doc_id:
            raise BadRequest("a string _id must not be empty (it could not be addressed by a URL)")
    elif isinstance(doc_id, bool) or not isinstance(doc_id, (ObjectId, int)):
        raise BadRequest(
            f"an _id must be a string, an ObjectId or an integer, not {_type_name(doc_id)} "
            "(a document with such an id could not be addressed by a URL)"
        )
    elif isinstance(doc_id, int):
        return int(doc_id)  # 5 and {"$numberLong": "5"} are one _id, as in MongoDB
    return doc_id


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    return type(value).__name__


_ID_TYPES = ("STRING_OID", "STRING", "OID", "NUMBER")


def _url_id(segment: str) -> Any:
    """The document id named by a URL segment (canonical form, services.paths).

    RESTHeart's `?id_type=`: STRING_OID (default: 24 hex digits are an ObjectId, anything
    else a string), STRING (always a string: how a 24-hex string id is addressed), OID,
    NUMBER (an integer id).
    """
    text = decode_segment(segment)
    id_type = request.args.get("id_type", "STRING_OID").upper()
    if id_type == "STRING":
        if not text:
            raise BadRequest("invalid document id")
        return text
    if id_type == "OID":
        try:
            return ObjectId(text)
        except InvalidId:
            raise BadRequest(
                f"id_type=OID needs 24 hexadecimal digits, got '{query.shown(text, 40)}'"
            ) from None
    if id_type == "NUMBER":
        try:
            number = int(text)
        except ValueError:
            raise BadRequest(f"id_type=NUMBER needs an integer, got '{query.shown(text, 40)}'") from None
        if not -(1 << 63) <= number < (1 << 63):
            raise BadRequest("id_type=NUMBER needs an integer that fits in 64 bits")
        return number
    if id_type != "STRING_OID":
        raise BadRequest(
            f"illegal id_type parameter: {query.shown(id_type, 40)}; use one of {', '.join(_ID_TYPES)}"
        )
    return parse_id(text)


def _prepared(coll: str, doc: dict, grant: Grant, doc_id: Any = None) -> dict:
    """A document to write: the permission's mergeRequest merged in, then checked (field
    names, id, users and ACL rules)."""
    doc = grant.merged_document(doc)
    # an ACL document's mongo object holds queries ($or, $in ...): validate_mongo checks it
    check_field_names({k: v for k, v in doc.items() if k != "mongo"} if coll == ACL else doc)
    if "_id" in doc:
        doc = {**doc, "_id": _check_id(doc["_id"])}
    doc = {k: v for k, v in doc.items() if k != "_etag"}
    if coll == auth.USERS:
        doc = auth.prepare_user(doc, doc_id, keep_hashes=grant.admin, gate=security.bcrypt_gate())
    if coll == ACL:
        acl.validate_acl_document(doc)  # checked when written, not only when loaded
    return doc


def _write_mode(default: str, grant: Grant) -> str:
    raw = request.args.get("wm") or request.args.get("writeMode")
    if raw is not None:
        grant.require(grant.allow_write_mode, "allowWriteMode", "the wm parameter")
    mode = (raw or default).lower()
    if mode not in _WRITE_MODES:
        raise BadRequest(f"illegal wm parameter: {query.shown(mode)}; use one of insert, update, upsert")
    return mode


def _etag(doc: dict) -> dict:
    return {"ETag": str(doc["_etag"])} if doc.get("_etag") is not None else {}


def _location(coll: str, doc_id: Any) -> str:
    """The document's URL; a string id that reads as an ObjectId gets `?id_type=STRING`."""
    url = f"{request.script_root}/{coll}/{location_segment(str(doc_id))}"
    if isinstance(doc_id, str) and not isinstance(parse_id(doc_id), str):
        url += "?id_type=STRING"
    elif isinstance(doc_id, int):
        url += "?id_type=NUMBER"
    return url


def _query_args(grant: Grant) -> tuple[dict, list, dict | None]:
    filter_ = query.parse_filter(request.args.getlist("filter"), grant.check_filter)
    sort = query.parse_sort(request.args.getlist("sort"))
    keys = query.parse_keys(request.args.getlist("keys"))
    grant.check_query(None, sort, keys)
    return filter_, sort, keys


@bp.get("/<coll>")
def list_documents(coll: str):
    grant = security.grant(coll)
    filter_, sort, keys = _query_args(grant)
    page = int_arg("page", 1, 1, 1_000_000)
    pagesize = int_arg("pagesize", 100, 0, 1000)
    if pagesize == 0:  # RESTHeart: no documents (the engine's limit 0 would mean "all")
        engine().get_collection(coll)  # still 404 for an unknown collection
        return json_response([])
    docs = engine().find(coll, grant.restrict(filter_), sort, keys, (page - 1) * pagesize, pagesize)
    return json_response([grant.shown(d) for d in docs])


@bp.get("/<coll>/_size")
def count_documents(coll: str):
    grant = security.grant(coll)
    filter_ = query.parse_filter(request.args.getlist("filter"), grant.check_filter)
    return json_response({"_size": engine().count(coll, grant.restrict(filter_))})


@bp.post("/<coll>")
def create_documents(coll: str):
    check_name(coll)
    grant = security.grant(coll)
    body = json_body(allow_array=True)
    guard = grant.write_guard(coll)
    if isinstance(body, list):
        docs = engine().insert_documents(coll, [_prepared(coll, d, grant) for d in body], guard)
        return json_response({"inserted": len(docs), "_ids": [d["_id"] for d in docs]}, status=201)
    doc = engine().insert_documents(coll, [_prepared(coll, body, grant)], guard)[0]
    headers = {"Location": _location(coll, doc["_id"]), **_etag(doc)}
    return json_response({"_id": doc["_id"]}, status=201, headers=headers)


@bp.get("/<coll>/<doc_id>")
def get_document(coll: str, doc_id: str):
    grant = security.grant(coll)
    oid = _url_id(doc_id)
    doc = engine().get_document(coll, oid)
    if grant.read_filter and not query.matches(grant.read_filter, doc):
        # the permission's readFilter hides it: as absent as in GET /<coll> (checked on the
        # document itself, not by a second query, so the answer takes as long either way)
        raise DocumentNotFound(coll, str(oid))
    headers = _etag(doc)
    if request.headers.get("If-None-Match", "").strip('"') == headers.get("ETag"):
        return empty_response(304, headers)
    return json_response(grant.shown(doc), headers=headers)


@bp.put("/<coll>/<doc_id>")
def replace_document(coll: str, doc_id: str):
    grant = security.grant(coll)
    oid = _check_id(_url_id(doc_id))
    body = json_body()
    if "_id" in body and body["_id"] != oid:
        raise BadRequest("the _id in the body does not match the URL")
    mode = _write_mode("update", grant)
    doc = _prepared(coll, body, grant, oid)
    guard = grant.write_guard(coll)
    if mode == "insert":
        stored = engine().insert_documents(coll, [{**doc, "_id": oid}], guard)[0]
        created = True
    else:
        created, stored = engine().replace_document(
            coll, oid, doc, upsert=mode == "upsert", if_match=request.headers.get("If-Match"), guard=guard
        )
    return json_response({"_id": stored["_id"]}, status=201 if created else 200, headers=_etag(stored))


def _update_spec(coll: str, body: dict, grant: Grant) -> dict:
    """The PATCH body as a validated operator update, with mergeRequest and user rules applied."""
    spec = updates.normalize_patch(body)
    for op, fields in spec.items():
        if isinstance(fields, dict) and any(k == "_etag" or k.startswith("_etag.") for k in fields):
            raise BadRequest("_etag is managed by the server and cannot be updated")
        if coll == auth.USERS and isinstance(fields, dict) and any(k.startswith("password") for k in fields):
            if op != "$set" or not isinstance(fields.get("password"), str):
                raise BadRequest("a user's password can only be set to a new string")
            fields["password"] = auth.prepare_user(
                {"_id": "x", "password": fields["password"]},
                keep_hashes=grant.admin,
                gate=security.bcrypt_gate(),
            )["password"]
        if (
            coll == auth.USERS
            and op == "$rename"
            and isinstance(fields, dict)
            and any(isinstance(to, str) and to.startswith("password") for to in fields.values())
        ):
            raise BadRequest("a user's password can only be set to a new string")
    for op, fields in spec.items():
        # values that become stored fields must not carry '$' names (as POST refuses them)
        if not isinstance(fields, dict):
            continue
        if op in ("$set", "$setOnInsert", "$min", "$max"):
            check_field_names(list(fields.values()))
        elif op in ("$push", "$addToSet"):
            for value in fields.values():
                each = isinstance(value, dict) and "$each" in value
                check_field_names(value["$each"] if each else value)
    grant.check_update(spec)
    return grant.merged_update(spec)


@bp.patch("/<coll>/<doc_id>")
def update_document(coll: str, doc_id: str):
    grant = security.grant(coll)
    oid = _check_id(_url_id(doc_id))
    body = json_body()
    mode = _write_mode("update", grant)
    spec = _update_spec(coll, body, grant)
    if coll == ACL:
        _validate_acl_update(oid, spec, upsert=mode == "upsert")
    try:
        created, stored = engine().update_document(
            coll,
            oid,
            spec,
            if_match=request.headers.get("If-Match"),
            upsert=mode == "upsert",
            guard=grant.write_guard(coll),
        )
    except updates.UpdateError as exc:  # a 400 as it is; without stored values the caller may not see
        raise updates.UpdateError(grant.redact(exc.message)) from None
    return json_response({"_id": stored["_id"]}, status=201 if created else 200, headers=_etag(stored))


def _validate_acl_update(oid: Any, spec: dict, upsert: bool) -> None:
    """Apply a PATCH to the current ACL document in memory and validate the result."""
    try:
        current = engine().get_document(ACL, oid)
    except DocumentNotFound:
        if not upsert:
            raise
        insert_spec = dict(spec)
        if "$setOnInsert" in insert_spec:
            insert_spec["$set"] = {**insert_spec.get("$set", {}), **insert_spec.pop("$setOnInsert")}
        spec, current = insert_spec, {"_id": oid}
    result, _ = updates.apply_update(current, spec, datetime.datetime.now(datetime.UTC))
    acl.validate_acl_document(result)


@bp.delete("/<coll>/<doc_id>")
def delete_document(coll: str, doc_id: str):
    grant = security.grant(coll)
    oid = _check_id(_url_id(doc_id))
    engine().delete_document(
        coll, oid, if_match=request.headers.get("If-Match"), guard=grant.write_guard(coll)
    )
    return empty_response(204)


# ---------------------------------------------------------------------- bulk writes


def _bulk_filter(grant: Grant) -> dict:
    values = request.args.getlist("filter")
    if not values:
        raise BadRequest(
            'a bulk write needs a filter parameter, e.g. ?filter={"_id":{"$exists":true}} for every document'
        )
    filter_ = query.parse_filter(values, grant.check_bulk_filter)
    # documents outside the writeFilter are not candidates (the guard checks each one again)
    return {"$and": [grant.write_filter, filter_]} if grant.write_filter else filter_


@bp.patch(f"/<coll>/{BULK}")
def bulk_update(coll: str):
    grant = security.grant(coll)
    grant.require(grant.allow_bulk_patch, "allowBulkPatch", "a bulk PATCH")
    filter_ = _bulk_filter(grant)
    spec = _update_spec(coll, json_body(), grant)
    if coll == ACL:
        raise BadRequest("bulk updates of the acl collection are not supported; PATCH each document")
    try:
        matched, modified = engine().update_many(coll, filter_, spec, grant.write_guard(coll))
    except updates.UpdateError as exc:  # a 400 as it is; without stored values the caller may not see
        raise updates.UpdateError(grant.redact(exc.message)) from None
    return json_response({"inserted": 0, "deleted": 0, "modified": modified, "matched": matched})


@bp.delete(f"/<coll>/{BULK}")
def bulk_delete(coll: str):
    grant = security.grant(coll)
    grant.require(grant.allow_bulk_delete, "allowBulkDelete", "a bulk DELETE")
    deleted = engine().delete_many(coll, _bulk_filter(grant), grant.write_guard(coll))
    return json_response({"inserted": 0, "deleted": deleted, "modified": 0, "matched": deleted})


# ---------------------------------------------------------------------- reserved URLs


def _only_reads(**_: Any):
    raise MethodNotAllowed(
        f"{request.method} is not allowed on this URL; it allows GET, HEAD and OPTIONS",
        allow="GET, HEAD, OPTIONS",
    )


def _only_bulk_writes(**_: Any):
    raise MethodNotAllowed(
        f"{request.method} is not allowed on this URL; it allows PATCH, DELETE and OPTIONS "
        "(bulk writes with ?filter=)",
        allow="PATCH, DELETE, OPTIONS",
    )


_WRITES = ["POST", "PUT", "PATCH", "DELETE"]
for _path, _name in (
    ("/<coll>/_streams", "streams_writes"),
    ("/<coll>/_streams/<uri>", "stream_writes"),
    ("/<coll>/_meta", "meta_writes"),
    ("/<coll>/_size", "size_writes"),
):
    bp.add_url_rule(_path, _name, _only_reads, methods=_WRITES)
bp.add_url_rule(f"/<coll>/{BULK}", "bulk_others", _only_bulk_writes, methods=["GET", "POST", "PUT"])
