"""Collections: list, create or replace properties, merge properties, drop, read `_meta`.

`PUT`/`PATCH /<coll>?dryRun=true` run the same checks as the write (name, permission,
body, stream definitions, If-Match) and answer 200 `{"valid": true, ...}` or the write's
error, storing nothing: the console validates a stream definition before saving it.
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from services import pipeline
from services.errors import BadRequest, CollectionNotFound
from services.query import shown
from services.storage.base import check_etag

from . import security
from .common import check_name, empty_response, engine, flag_arg, json_body, json_response

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


def _dry_run() -> bool:
    """`?dryRun=true`: validate the write exactly as a real one, store nothing. Only `true`
    and `false` are values; a near miss of the name (`dryrun`, `DRYRUN`) is a 400, since
    ignoring it would store what its sender meant to test."""
    for name in request.args:
        if name != "dryRun" and name.lower() == "dryrun":
            raise BadRequest(f"unknown query parameter '{shown(name)}'; the dry run is ?dryRun=true")
    return flag_arg("dryRun")


def _dry_run_response(coll: str, exists: bool) -> Response:
    return json_response({"valid": True, "dryRun": True, "collection": coll, "exists": exists}, status=200)


@bp.get("/")
def list_collections():
    return json_response(engine().list_collections())


@bp.put("/<coll>")
def put_collection(coll: str):
    check_name(coll)
    _management(coll)
    dry_run = _dry_run()
    props = _props(json_body(extended=False), coll)
    if dry_run:
        try:
            current = engine().get_collection(coll)
        except CollectionNotFound:
            return _dry_run_response(coll, exists=False)
        check_etag(current, request.headers.get("If-Match"), f"collection '{coll}'")
        return _dry_run_response(coll, exists=True)
    created, stored = engine().put_collection(coll, props, request.headers.get("If-Match"))
    return json_response({}, status=201 if created else 200, headers=_etag_headers(stored))


@bp.patch("/<coll>")
def patch_collection(coll: str):
    check_name(coll)
    _management(coll)
    dry_run = _dry_run()
    props = _props(json_body(extended=False), coll)
    if dry_run:
        current = engine().get_collection(coll)  # 404 as the write would
        check_etag(current, request.headers.get("If-Match"), f"collection '{coll}'")
        return _dry_run_response(coll, exists=True)
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
