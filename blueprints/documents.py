"""Documents: list with query arguments, insert (one or bulk), read, replace, update, delete.

Every write goes through the engine, which records its change events in the same
transaction. Writes to `users` hash the password, and no response ever shows it.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from services import auth, query, updates
from services.errors import BadRequest

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


def _shown(coll: str, doc: dict) -> dict:
    return auth.public_user(doc) if coll == auth.USERS else doc


def _prepared(coll: str, doc: dict, doc_id: Any = None) -> dict:
    check_field_names(doc)
    doc = {k: v for k, v in doc.items() if k != "_etag"}
    if coll == auth.USERS:
        doc = auth.prepare_user(doc, doc_id)
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
    if coll == auth.USERS and "password" in dumps(filter_):
        raise BadRequest("filtering on the password field is not allowed")
    sort = query.parse_sort(request.args.getlist("sort"))
    keys = query.parse_keys(request.args.getlist("keys"))
    page = int_arg("page", 1, 1, 1_000_000)
    pagesize = int_arg("pagesize", 100, 0, 1000)
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
    doc = engine().get_document(coll, parse_id(doc_id))
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
    for op in ("$set", "$setOnInsert"):
        check_field_names(list(spec.get(op, {}).values()))
    try:
        created, stored = engine().update_document(
            coll, oid, spec, if_match=request.headers.get("If-Match"), upsert=mode == "upsert"
        )
    except updates.UpdateError as exc:
        raise BadRequest(str(exc)) from None
    return json_response({"_id": stored["_id"]}, status=201 if created else 200, headers=_etag(stored))


@bp.delete("/<coll>/<doc_id>")
def delete_document(coll: str, doc_id: str):
    engine().delete_document(coll, parse_id(doc_id), if_match=request.headers.get("If-Match"))
    return empty_response(204)
