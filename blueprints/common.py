"""Helpers every blueprint uses: app services, request bodies, names, ids, JSON responses."""

from __future__ import annotations

import json
from typing import Any

from bson import json_util
from bson.errors import InvalidId
from bson.objectid import ObjectId
from flask import Response, current_app, g, request

from services.errors import BadRequest, UnsupportedMediaType
from services.query import MAX_NESTING, check_bson_limits
from services.query import shown as query_shown

RELAXED = json_util.RELAXED_JSON_OPTIONS
RESERVED_NAMES = {"_streams", "_meta", "_health", "_demo", "_status", "token", "_size"}
MAX_NAME_BYTES = 120


def engine():
    return current_app.extensions["changefeed.engine"]


def hub():
    return current_app.extensions["changefeed.hub"]


def users():
    return current_app.extensions["changefeed.users"]


def dumps(value: Any) -> str:
    """Relaxed Extended JSON, as PyMongo writes it and as events are sent."""
    return json_util.dumps(value, json_options=RELAXED)


def json_response(value: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(value), status=status, headers=headers, mimetype="application/json")


def empty_response(status: int, headers: dict | None = None) -> Response:
    return Response(b"", status=status, headers=headers)


def check_name(name: str, what: str = "collection") -> str:
    """Refuse reserved or invalid collection names with a 400 that says why."""
    if not name:
        raise BadRequest(f"{what} name must not be empty")
    if name in RESERVED_NAMES or name.startswith("_"):
        raise BadRequest(f"'{name}' is a reserved name and cannot be used as a {what} name")
    if name.startswith("system."):
        raise BadRequest(f"{what} names starting with 'system.' are reserved")
    if "$" in name or "\0" in name:
        raise BadRequest(f"{what} name must not contain '$' or NUL")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise BadRequest(f"{what} name is longer than {MAX_NAME_BYTES} bytes")
    return name


def parse_id(raw: str) -> Any:
    """A 24-hex id is an ObjectId, anything else a string (RESTHeart's STRING_OID)."""
    if len(raw) == 24:
        try:
            return ObjectId(raw)
        except InvalidId:
            pass
    if not raw:
        raise BadRequest("invalid document id")
    return raw


def parsed_body(extended: bool = True) -> Any:
    """The JSON request body, parsed once per request (the ACL's body predicates and the view
    share it); raises what `json_body` would for a body that is not JSON."""
    cache = g.setdefault("parsed_bodies", {})
    if extended not in cache:
        try:
            cache[extended] = (True, _parse_body(extended))
        except (BadRequest, UnsupportedMediaType) as exc:
            cache[extended] = (False, exc)
    ok, value = cache[extended]
    if not ok:
        raise value
    return value


def _parse_body(extended: bool) -> Any:
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got '{request.content_type or 'none'}'"
        )
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
        value = json_util.loads(text) if extended else json.loads(text)
    except RecursionError:
        raise BadRequest(f"the request body is nested deeper than {MAX_NESTING} levels") from None
    except Exception as exc:  # noqa: BLE001 - Extended JSON decoders raise many types (InvalidBSON, decimal ...)
        raise BadRequest(f"the request body is not valid JSON: {query_shown(str(exc))}") from None
    check_bson_limits(value, "the request body")
    return value


def json_body(allow_array: bool = False, extended: bool = True) -> Any:
    """Parse the JSON request body: 415 unless application/json, 400 unless an object.

    `extended` decodes Extended JSON ({"$oid": ...}, {"$date": ...}) as documents need;
    collection properties are kept exactly as sent, so they are parsed as plain JSON.
    """
    value = parsed_body(extended)
    kinds = "a JSON object or array" if allow_array else "a JSON object"
    if isinstance(value, list):
        if not allow_array:
            raise BadRequest("data must be a json object")
        if not value or not all(isinstance(v, dict) for v in value):
            raise BadRequest("a bulk POST must be a non-empty array of JSON objects")
    elif not isinstance(value, dict):
        raise BadRequest(f"data must be {kinds}")
    return value


def check_field_names(doc: Any, path: str = "") -> None:
    """Refuse field names MongoDB cannot store or that would be read back as operators."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if not isinstance(key, str):
                continue
            if key.startswith("$"):
                raise BadRequest(f"field names cannot start with '$' (found '{path}{key}')")
            if "\0" in key:
                raise BadRequest("field names cannot contain NUL")
            check_field_names(value, f"{path}{key}.")
    elif isinstance(doc, list):
        for item in doc:
            check_field_names(item, path)


def flag_arg(name: str, on: str = "true", off: str = "false") -> bool:
    """A yes/no query parameter: absent or `off` is False, `on` is True; any other value,
    or the parameter given twice, is a 400 (never read as one or the other)."""
    values = request.args.getlist(name)
    if not values:
        return False
    if len(values) > 1:
        raise BadRequest(f"{name} must be given once")
    if values[0] not in (on, off):
        raise BadRequest(f"{name} must be {on} or {off}, found {query_shown(values[0])}")
    return values[0] == on


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"illegal {name} parameter, it must be a whole number: {raw}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"illegal {name} parameter, it must be between {lo} and {hi}: {raw}")
    return value
