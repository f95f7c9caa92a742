"""Documents: list with query arguments, insert (one or bulk), read, replace, update, delete.

Every write goes through the engine, which records its change events in the same
transaction. Writes to `users` hash the password, and no response ever shows it.
"""

from __future__ import annotations

from typing import Any

from bson.regex import Regex
from flask import Blueprint, request

import datetime

from services import acl, auth, query, updates
from services.errors import BadRequest, DocumentNotFound

from . import security
from .common import (
    check_field_names,
    check_name,
    dumps,
    empty_response,
    engine,
    id_path,
    int_arg,
    json_body,
    json_response,
    parse_id,
)

bp = Blueprint("documents", __name__)

_WRITE_MODES = ("insert", "update", "upsert")
ACL = "acl"


def _validate_acl(doc: Any) -> None:
    """An ACL document is checked when written (400 naming the fault), not only when loaded."""
    try:
        acl.validate_acl_document(doc)
    except ValueError as exc:  # PredicateError is a ValueError
        raise BadRequest(f"invalid ACL document: {exc}") from None


def _shown(coll: str, doc: dict) -> dict:
    return auth.public_user(doc) if coll == auth.USERS else doc


def _prepared(coll: str, doc: dict, doc_id: Any = None) -> dict:
    check_field_names(doc)
    if isinstance(doc.get("_id"), (list, Regex)):
        raise BadRequest("the _id cannot be an array or a regular expression")
    doc = {k: v for k, v in doc.items() if k != "_etag"}
    if coll == auth.USERS:
        doc = auth.prepare_user(doc, doc_id)
    if coll == ACL:
        _validate_acl(doc)
    return doc


def _write_mode(default: str) -> str:
    mode = (request.args.get("wm") or request.args.get("writeMode") or default).lower()
    if mode not in _WRITE_MODES:
        raise BadRequest(f"illegal wm parameter: {mode}; use one of insert, update, upsert")
    return mode


def _etag(doc: dict) -> dict:
    return {"ETag": str(doc["_etag"])} if doc.get("_etag") is not None else {}


@bp.get("/<coll>")
def list_documents(coll: str):
    filter_ = query.parse_filter(request.args.getlist("filter"))
    restriction = security.read_filter()
    if restriction:
        filter_ = {"$and": [filter_, restriction]} if filter_ else restriction
    if coll == auth.USERS and "password" in dumps(filter_):
        raise BadRequest("filtering on the password field is not allowed")
    sort = query.parse_sort(request.args.getlist("sort"))
    keys = query.parse_keys(request.args.getlist("keys"))
    page = int_arg("page", 1, 1, 1_000_000)
    pagesize = int_arg("pagesize", 100, 0, 1000)
    if pagesize == 0:  # RESTHeart: no documents (the engine's limit 0 would mean "all")
        engine().get_collection(coll)  # still 404 for an unknown collection
        return json_response([])
    docs = engine().find(coll, filter_, sort, keys, (page - 1) * pagesize, pagesize)
    return json_response([_shown(coll, d) for d in docs])


@bp.post("/<coll>")
def create_documents(coll: str):
    check_name(coll)
    body = json_body(allow_array=True)
    if isinstance(body, list):
        docs = engine().insert_documents(coll, [_prepared(coll, d) for d in body])
        return json_response({"inserted": len(docs), "_ids": [d["_id"] for d in docs]}, status=201)
    doc = engine().insert_documents(coll, [_prepared(coll, body)])[0]
    headers = {"Location": f"{request.script_root}/{coll}/{id_path(doc['_id'])}", **_etag(doc)}
    return json_response({"_id": doc["_id"]}, status=201, headers=headers)


@bp.get("/<coll>/<doc_id>")
def get_document(coll: str, doc_id: str):
    oid = parse_id(doc_id)
    doc = engine().get_document(coll, oid)
    restriction = security.read_filter()
    if restriction and not engine().find(coll, {"$and": [{"_id": oid}, restriction]}, [], None, 0, 1):
        # the permission's readFilter hides it: as absent as in GET /<coll>
        raise DocumentNotFound(coll, str(oid))
    headers = _etag(doc)
    if request.headers.get("If-None-Match", "").strip('"') == headers.get("ETag"):
        return empty_response(304, headers)
    return json_response(_shown(coll, doc), headers=headers)


@bp.put("/<coll>/<doc_id>")
def replace_document(coll: str, doc_id: str):
    oid = parse_id(doc_id)
    body = json_body()
    if "_id" in body and body["_id"] != oid:
        raise BadRequest("the _id in the body does not match the URL")
    mode = _write_mode("update")
    doc = _prepared(coll, body, oid)
    if mode == "insert":
        stored = engine().insert_documents(coll, [{**doc, "_id": oid}])[0]
        created = True
    else:
        created, stored = engine().replace_document(
            coll, oid, doc, upsert=mode == "upsert", if_match=request.headers.get("If-Match")
        )
    return json_response({"_id": stored["_id"]}, status=201 if created else 200, headers=_etag(stored))


@bp.patch("/<coll>/<doc_id>")
def update_document(coll: str, doc_id: str):
    oid = parse_id(doc_id)
    body = json_body()
    mode = _write_mode("update")
    try:
        spec = updates.normalize_patch(body)
    except updates.UpdateError as exc:
        raise BadRequest(str(exc)) from None
    for op, fields in spec.items():
        if isinstance(fields, dict) and any(k == "_etag" or k.startswith("_etag.") for k in fields):
            raise BadRequest("_etag is managed by the server and cannot be updated")
        if coll == auth.USERS and isinstance(fields, dict) and any(k.startswith("password") for k in fields):
            if op != "$set" or not isinstance(fields.get("password"), str):
                raise BadRequest("a user's password can only be set to a new string")
            fields["password"] = auth.prepare_user({"_id": str(oid), **{"password": fields["password"]}})["password"]
        if coll == auth.USERS and op == "$rename" and isinstance(fields, dict) and any(
            isinstance(to, str) and to.startswith("password") for to in fields.values()
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
    if coll == ACL:
        _validate_acl_update(oid, spec, upsert=mode == "upsert")
    try:
        created, stored = engine().update_document(
            coll, oid, spec, if_match=request.headers.get("If-Match"), upsert=mode == "upsert"
        )
    except updates.UpdateError as exc:
        raise BadRequest(str(exc)) from None
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
    try:
        result, _ = updates.apply_update(current, spec, datetime.datetime.now(datetime.timezone.utc))
    except updates.UpdateError as exc:
        raise BadRequest(str(exc)) from None
    _validate_acl(result)


@bp.delete("/<coll>/<doc_id>")
def delete_document(coll: str, doc_id: str):
    engine().delete_document(coll, parse_id(doc_id), if_match=request.headers.get("If-Match"))
    return empty_response(204)
