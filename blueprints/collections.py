"""Collections: list, create or replace properties, merge properties, drop, read `_meta`."""

from __future__ import annotations

from flask import Blueprint, request

from services import pipeline
from services.errors import BadRequest

from . import security
from .common import check_name, empty_response, engine, json_body, json_response

bp = Blueprint("collections", __name__)


def _props(body: dict, coll: str) -> dict:
    """Validate collection properties; a bad stream definition is a 400 naming it."""
    if "streams" in body:
        try:
            pipeline.validate_streams(body["streams"])
        except pipeline.PipelineError as exc:  # a 400 as it is; say which collection
            raise pipeline.PipelineError(f"invalid streams of collection '{coll}': {exc}") from None
    return body


def _management(coll: str) -> None:
    """PUT, PATCH and DELETE of a collection change it for everyone: mongo.allowManagementRequests."""
    grant = security.grant(coll)
    grant.require(
        grant.allow_management,
        "allowManagementRequests",
        f"changing the collection '{coll}' (its properties and stream definitions)",
    )


def _etag_headers(props: dict) -> dict:
    etag = props.get("_etag")
    if isinstance(etag, dict):
        etag = etag.get("$oid")
    return {"ETag": str(etag)} if etag else {}


@bp.get("/")
def list_collections():
    return json_response(engine().list_collections())


@bp.put("/<coll>")
def put_collection(coll: str):
    check_name(coll)
    _management(coll)
    props = _props(json_body(extended=False), coll)
    created, stored = engine().put_collection(coll, props, request.headers.get("If-Match"))
    return json_response({}, status=201 if created else 200, headers=_etag_headers(stored))


@bp.patch("/<coll>")
def patch_collection(coll: str):
    check_name(coll)
    _management(coll)
    props = _props(json_body(extended=False), coll)
    stored = engine().patch_collection(coll, props, request.headers.get("If-Match"))
    return json_response({}, status=200, headers=_etag_headers(stored))


@bp.delete("/<coll>")
def drop_collection(coll: str):
    check_name(coll)
    _management(coll)
    if coll in ("users", "acl"):
        raise BadRequest(f"the '{coll}' collection holds security data and cannot be dropped")
    engine().drop_collection(coll, request.headers.get("If-Match", ""))
    return empty_response(204)


@bp.get("/<coll>/_meta")
def get_meta(coll: str):
    props = engine().get_collection(coll)
    return json_response(props, headers=_etag_headers(props))
