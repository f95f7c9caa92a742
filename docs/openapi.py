"""Writes docs/openapi.json, the OpenAPI 3.1 description of changefeed's HTTP API.

The JSON file is the contract (served at `/_openapi.json`, checked by tests/test_openapi.py
and exercised against a live server by tests/test_schemathesis.py); this script is how it
is kept: edit it, then run

    .venv/bin/python docs/openapi.py

and commit both. tests/test_openapi.py fails when the two disagree.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "openapi.json")

JSON = "application/json"
SSE = "text/event-stream"
HTML = "text/html"
PROMETHEUS = "text/plain"  # with version=0.0.4 or 1.0.0 (prometheus_client >= 0.22) and charset


def ref(kind: str, name: str) -> dict:
    return {"$ref": f"#/components/{kind}/{name}"}


def schema(name: str) -> dict:
    return ref("schemas", name)


def param(name: str) -> dict:
    return ref("parameters", name)


def json_content(s: dict, **extra) -> dict:
    return {JSON: {"schema": s, **extra}}


# ---------------------------------------------------------------------- security

SEC_ACL = [
    {"basicAuth": []},
    {"bearerAuth": []},
    {},
]  # {}: anonymous, when an ACL rule lets $unauthenticated in
SEC_USER = [{"basicAuth": []}, {"bearerAuth": []}]  # any authenticated user, whatever the ACL says
SEC_STREAM = [{"basicAuth": []}, {"bearerAuth": []}, {"accessToken": []}, {"tokenCookie": []}, {}]
SEC_PUBLIC: list = []

SECURITY_SCHEMES = {
    "basicAuth": {
        "type": "http",
        "scheme": "basic",
        "description": "A user of the `users` collection (bcrypt). Failed logins are throttled per "
        "(client address, user name): past AUTH_MAX_FAILURES within AUTH_FAILURE_WINDOW_SECONDS "
        "the next attempts get 429 with Retry-After. A 401 carries "
        '`WWW-Authenticate: Basic realm="changefeed"` unless the request sends '
        "`No-Auth-Challenge` or `?noauthchallenge`.",
    },
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A token from `POST /token` (HS256, TOKEN_TTL_SECONDS). A password change "
        "revokes the user's tokens.",
    },
    "accessToken": {
        "type": "apiKey",
        "in": "query",
        "name": "access_token",
        "description": "The bearer token in the query string, for browsers' EventSource (which cannot "
        "send headers). Accepted on stream URLs only: anywhere else it is a 400.",
    },
    "tokenCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "changefeed_token",
        "description": "The HttpOnly cookie set by `POST /token/cookie`. Accepted on stream URLs only "
        "(elsewhere it is ignored).",
    },
}

# ---------------------------------------------------------------------- schemas

SCHEMAS: dict = {
    "Error": {
        "type": "object",
        "description": "Every 4xx and 5xx the application writes: RESTHeart's error body "
        "(a `\"` in the message is shown as `'`).",
        "required": ["http status code", "http status description", "message"],
        "properties": {
            "http status code": {"type": "integer", "minimum": 400, "maximum": 599},
            "http status description": {"type": "string"},
            "message": {"type": "string"},
        },
        "additionalProperties": False,
    },
    "ObjectId": {
        "type": "object",
        "description": "An ObjectId in Extended JSON.",
        "required": ["$oid"],
        "properties": {"$oid": {"type": "string", "pattern": "^[0-9a-f]{24}$"}},
        "additionalProperties": False,
    },
    "Id": {
        "description": "A document id: a string, an ObjectId or an integer (Relaxed Extended JSON).",
        "anyOf": [
            {"type": "string"},
            {"type": "integer"},
            schema("ObjectId"),
            {
                "type": "object",
                "required": ["$numberLong"],
                "properties": {"$numberLong": {"type": "string"}},
                "additionalProperties": False,
            },
        ],
    },
    "Document": {
        "type": "object",
        "description": "A stored document in Relaxed Extended JSON, with the fields the caller's "
        "permission shows; `_etag` is stamped by every write. Password hashes are never shown.",
        "properties": {"_id": schema("Id"), "_etag": schema("ObjectId")},
        "additionalProperties": True,
    },
    "NewDocument": {
        "type": "object",
        "description": "A document to write (Extended JSON). Field names must not start with `$` nor "
        "hold NUL; `_id` is a string, an ObjectId or an integer (not `_streams`, `_meta`, `_size`, "
        "`_indexes`, `_aggrs`, `_schemas` nor `*`); `_etag` is managed by the server. At most 100 "
        "levels deep, integers within int64.",
        "properties": {"_id": schema("Id")},
        "additionalProperties": True,
    },
    "Update": {
        "type": "object",
        "description": "Fields to set, or update operators: `$set $unset $inc $mul $push $pull $addToSet "
        "$rename $min $max $currentDate` (and `$setOnInsert` with `?wm=upsert`).",
        "additionalProperties": True,
    },
    "WriteResult": {
        "type": "object",
        "required": ["_id"],
        "properties": {"_id": schema("Id")},
        "additionalProperties": False,
    },
    "BulkInsertResult": {
        "type": "object",
        "required": ["inserted", "_ids"],
        "properties": {
            "inserted": {"type": "integer", "minimum": 1},
            "_ids": {"type": "array", "items": schema("Id")},
        },
        "additionalProperties": False,
    },
    "BulkResult": {
        "type": "object",
        "required": ["inserted", "deleted", "modified", "matched"],
        "properties": {
            "inserted": {"type": "integer", "minimum": 0},
            "deleted": {"type": "integer", "minimum": 0},
            "modified": {"type": "integer", "minimum": 0},
            "matched": {"type": "integer", "minimum": 0},
        },
        "additionalProperties": False,
    },
    "Size": {
        "type": "object",
        "required": ["_size"],
        "properties": {"_size": {"type": "integer", "minimum": 0}},
        "additionalProperties": False,
    },
    "Empty": {"type": "object", "maxProperties": 0},
    "DryRunResult": {
        "type": "object",
        "description": "`?dryRun=true`: the write would succeed; nothing was stored.",
        "required": ["valid", "dryRun", "collection", "exists"],
        "properties": {
            "valid": {"const": True},
            "dryRun": {"const": True},
            "collection": {"type": "string"},
            "exists": {"type": "boolean", "description": "whether the collection exists now"},
        },
        "additionalProperties": False,
    },
    "StreamDefinition": {
        "type": "object",
        "description": "A change stream: RESTHeart's format, keys possibly escaped (`_$match`, "
        "`fullDocument::name`). Validated when written: a fault is a 400 naming the stream.",
        "required": ["uri"],
        "properties": {
            "uri": {"type": "string", "pattern": "^[A-Za-z0-9._~-]{1,100}$"},
            "stages": {"type": "array", "items": {"type": "object"}},
            "notify_when": {"type": "object"},
        },
    },
    "CollectionProperties": {
        "type": "object",
        "description": "Collection metadata, kept as sent (plain JSON); `streams` defines the streams.",
        "properties": {"streams": {"type": "array", "items": schema("StreamDefinition")}},
        "additionalProperties": True,
    },
    "StoredProperties": {
        "type": "object",
        "description": "Collection metadata as stored, with its `_etag` (and `_id`).",
        "additionalProperties": True,
    },
    "CollectionNames": {"type": "array", "items": {"type": "string"}},
    "StreamLink": {
        "type": "object",
        "required": ["uri", "url", "stages"],
        "properties": {
            "uri": {"type": "string"},
            "url": {"type": "string", "description": "PUBLIC_URL + path, or the path alone"},
            "stages": {"type": "array"},
        },
        "additionalProperties": False,
    },
    "StreamEvent": {
        "type": "object",
        "description": "One Server-Sent Event (each `data:` is one JSON object). `change`: a MongoDB-shaped "
        "change event, its resume token as `id:`; `reset`: the history a Last-Event-ID asked for is gone "
        "(reason, and the position the stream goes on from); `end`: the stream ended (redefinition, "
        "shutdown); `revoked`/`expired`: the caller's access or token ended; `error`: the stream failed. "
        "Heartbeats are comments. Over WebSocket each event is one text frame with the same JSON, its "
        "resume token first as `_id`.",
        "required": ["data", "event"],
        "properties": {
            "event": {"type": "string", "enum": ["change", "reset", "end", "revoked", "expired", "error"]},
            "data": {"type": "string", "contentMediaType": JSON},
            "id": {"type": "string", "description": 'a resume token, `{"_data": "..."}`'},
            "retry": {"type": "integer", "minimum": 0},
        },
    },
    "Token": {
        "type": "object",
        "required": ["access_token", "token_type", "expires_in"],
        "properties": {
            "access_token": {"type": "string"},
            "token_type": {"const": "Bearer"},
            "expires_in": {"type": "integer", "minimum": 0},
        },
        "additionalProperties": False,
    },
    "CookieToken": {
        "type": "object",
        "required": ["token_type", "expires_in"],
        "properties": {"token_type": {"const": "cookie"}, "expires_in": {"type": "integer", "minimum": 0}},
        "additionalProperties": False,
    },
    "Health": {
        "type": "object",
        "required": ["status", "engine"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "engine": {"type": "string", "enum": ["embedded", "mongo"]},
            "storage": {"type": "string", "description": "why writes fail now (a full disk), on /_health"},
            "error": {"type": "string", "description": "why the server is unavailable (503)"},
        },
        "additionalProperties": False,
    },
    "Status": {
        "type": "object",
        "description": "This worker's watchers, cursors and clients.",
        "required": ["pid", "engine", "watchers", "cursors", "clients", "streams"],
        "properties": {
            "pid": {"type": "integer"},
            "engine": {"type": "string"},
            "watchers": {"type": "integer", "minimum": 0},
            "cursors": {"type": "integer", "minimum": 0},
            "clients": {"type": "integer", "minimum": 0},
            "streams": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["collection", "uri", "clients", "sse", "websocket", "events", "bindings"],
                    "properties": {
                        "collection": {"type": "string"},
                        "uri": {"type": "string"},
                        "clients": {"type": "integer"},
                        "sse": {"type": "integer"},
                        "websocket": {"type": "integer"},
                        "events": {"type": "integer"},
                        "bindings": {"type": "integer"},
                    },
                },
            },
            "greenlets": {"type": "integer", "description": "detail=1"},
            "handlers": {"type": "integer", "description": "detail=1: connection handlers in memory"},
            "open_fds": {"type": ["integer", "null"], "description": "detail=1"},
            "collected": {"description": "sweep=1: what the collection and heap trim freed"},
        },
        "additionalProperties": True,
    },
}

# ---------------------------------------------------------------------- headers

HEADERS = {
    "ETag": {"description": "The `_etag` of what was read or written.", "schema": {"type": "string"}},
    "Location": {
        "description": "The new document's URL (its id percent-encoded; `?id_type=STRING` or "
        "`?id_type=NUMBER` where the id would read otherwise).",
        "schema": {"type": "string"},
    },
    "RetryAfter": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 1},
    },
    "Allow": {"description": "The methods this URL allows.", "schema": {"type": "string"}},
    "WWWAuthenticate": {
        "description": '`Basic realm="changefeed"`, unless the request sent '
        "`No-Auth-Challenge` or `?noauthchallenge`.",
        "schema": {"type": "string"},
    },
    "SetCookie": {
        "description": "`changefeed_token`: HttpOnly, SameSite=Strict, Path=/.",
        "schema": {"type": "string"},
    },
}


def header(name: str, required: bool = False) -> dict:
    return {**HEADERS[name], "required": True} if required else ref("headers", name)


# ---------------------------------------------------------------------- error responses


def error(description: str, headers: dict | None = None) -> dict:
    out = {"description": description, "content": json_content(schema("Error"))}
    if headers:
        out["headers"] = headers
    return out


RESPONSES = {
    "BadRequest": error(
        "Invalid request: a parameter or body that cannot be used (the message names it), a path not in "
        "normal form (encoded `/`, `..`, `//`), or `access_token` in the query of a non-stream URL."
    ),
    "Unauthorized": error(
        "No credentials (and no ACL rule for `$unauthenticated`), or wrong ones (even where an anonymous "
        "rule would match), or an expired or revoked token.",
        {"WWW-Authenticate": header("WWWAuthenticate")},
    ),
    "Forbidden": error(
        "Authenticated, but no ACL rule permits the request, or the permission forbids a part of it "
        "(a hidden field in a query, a write outside writeFilter, a mongo.* flag it lacks)."
    ),
    "NotFound": error("No such collection, document or stream (or the readFilter hides it)."),
    "MethodNotAllowed": error("Not a method this URL allows.", {"Allow": header("Allow", required=True)}),
    "Conflict": error(
        "An `If-Match` that does not match the stored `_etag` (or a missing one where it is required), "
        "a duplicate `_id`, or a write that kept racing another."
    ),
    "PayloadTooLarge": error("The request body is larger than MAX_CONTENT_LENGTH."),
    "UnsupportedMediaType": error("The body is not `application/json` (or `+json`)."),
    "TooManyRequests": error(
        "Past a limit: failed Basic logins for this (address, user), password checks in progress, "
        "open streams per user or address, watchers or bindings per worker.",
        {"Retry-After": header("RetryAfter")},
    ),
    "Unavailable": error(
        "The database is unreachable, or locked by another process (with `Retry-After`), or the worker "
        "is shutting down.",
        {"Retry-After": header("RetryAfter")},
    ),
    "InsufficientStorage": error(
        "The database's disk is full: the write was not made, nothing stored was lost."
    ),
}

ERR = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    429: "TooManyRequests",
    503: "Unavailable",
    507: "InsufficientStorage",
}


def errors(*codes: int) -> dict:
    return {str(c): ref("responses", ERR[c]) for c in codes}


AUTH_ERRORS = (400, 401, 403, 429, 503)  # every ACL-governed request
BODY_ERRORS = (413, 415)
WRITE_ERRORS = (409, 507)

# ---------------------------------------------------------------------- parameters

PARAMETERS = {
    "coll": {
        "name": "coll",
        "in": "path",
        "required": True,
        "description": "A collection name: not empty, at most 120 bytes, not starting with `_` or "
        "`system.`, without `$` or NUL, not `token` (writes refuse such names with a 400; reads of "
        "a collection that does not exist are a 404).",
        "schema": {"type": "string", "minLength": 1},
        "example": "messages",
    },
    "docId": {
        "name": "doc_id",
        "in": "path",
        "required": True,
        "description": "The document id, percent-encoded (any character; `/` as `%2F`). 24 hex digits "
        "are an ObjectId unless `id_type=STRING`.",
        "schema": {"type": "string", "minLength": 1},
    },
    "uri": {
        "name": "uri",
        "in": "path",
        "required": True,
        "description": "The stream's `uri` in the collection's `streams`.",
        "schema": {"type": "string", "minLength": 1},
        "example": "all",
    },
    "filter": {
        "name": "filter",
        "in": "query",
        "description": "A MongoDB query as JSON (Extended JSON); several are combined with `$and`. "
        "`$where`, `$function` and `$accumulator` are refused.",
        "schema": {"type": "array", "items": {"type": "string"}},
        "style": "form",
        "explode": True,
    },
    "bulkFilter": {
        "name": "filter",
        "in": "query",
        "required": True,
        "description": 'Which documents (required; `{"_id":{"$exists":true}}` for all of them).',
        "schema": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "style": "form",
        "explode": True,
    },
    "sort": {
        "name": "sort",
        "in": "query",
        "description": 'A sort as JSON (`{"name":1}`) or field names (`name`, `-age`).',
        "schema": {"type": "array", "items": {"type": "string"}},
        "style": "form",
        "explode": True,
    },
    "keys": {
        "name": "keys",
        "in": "query",
        "description": 'A projection as JSON (`{"name":1}`).',
        "schema": {"type": "array", "items": {"type": "string"}},
        "style": "form",
        "explode": True,
    },
    "page": {
        "name": "page",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 1},
    },
    "pagesize": {
        "name": "pagesize",
        "in": "query",
        "schema": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 100},
    },
    "idType": {
        "name": "id_type",
        "in": "query",
        "description": "How the URL's id is read (RESTHeart's `id_type`, case-insensitive).",
        "schema": {
            "type": "string",
            "enum": ["STRING_OID", "STRING", "OID", "NUMBER"],
            "default": "STRING_OID",
        },
    },
    "wm": {
        "name": "wm",
        "in": "query",
        "description": "Write mode (also `writeMode`); needs a permission with mongo.allowWriteMode.",
        "schema": {"type": "string", "enum": ["insert", "update", "upsert"], "default": "update"},
    },
    "ifMatch": {
        "name": "If-Match",
        "in": "header",
        "description": "The `_etag` the write expects (409 when the stored one differs).",
        "schema": {"type": "string"},
    },
    "ifMatchRequired": {
        "name": "If-Match",
        "in": "header",
        "required": True,
        "description": "The collection's `_etag` (`GET /{coll}/_meta`); a missing or different one is a 409.",
        "schema": {"type": "string"},
    },
    "ifNoneMatch": {
        "name": "If-None-Match",
        "in": "header",
        "description": "An `_etag`: 304 without a body when it is the document's.",
        "schema": {"type": "string"},
    },
    "dryRun": {
        "name": "dryRun",
        "in": "query",
        "description": "`true`: run the write's checks (name, permission, body, streams, If-Match) and "
        "store nothing: 200, or the error the write would get (400, 403, 404, 409, 415). Only `true` "
        "and `false`; a near miss of the name (`dryrun`) is a 400.",
        "schema": {"type": "string", "enum": ["true", "false"], "default": "false"},
    },
    "avars": {
        "name": "avars",
        "in": "query",
        "description": 'Values of the stream\'s variables as a JSON object (`{"n":"uji"}`); a bound value '
        "is always a value. Names starting with `@` or `$` are a 400.",
        "schema": {"type": "string"},
        "example": '{"n":"uji"}',
    },
    "lastEventIdQuery": {
        "name": "lastEventId",
        "in": "query",
        "description": 'Resume after this token (`{"_data":"..."}`): the WebSocket form of Last-Event-ID.',
        "schema": {"type": "string"},
    },
    "lastEventIdHeader": {
        "name": "Last-Event-ID",
        "in": "header",
        "description": "Resume after this token (browsers send it by themselves); a token the store "
        "cannot resume from exactly gets `event:reset` first, a value that is not a token is a 400.",
        "schema": {"type": "string"},
    },
    "fullDocumentBeforeChange": {
        "name": "fullDocumentBeforeChange",
        "in": "query",
        "description": "`true`: events carry the pre-image (under the caller's projectResponse).",
        "schema": {"type": "string", "enum": ["true", "false"], "default": "false"},
    },
    "streamVariables": {
        "name": "variables",
        "in": "query",
        "description": "Any other query parameter binds a variable of the same name (`?n=uji`; a JSON "
        "value is parsed, anything else is a string); `avars` wins over it.",
        "schema": {
            "type": "object",
            "propertyNames": {"pattern": "^[a-z][a-z0-9]{0,15}$"},
            "additionalProperties": {"type": "string"},
        },
        "style": "form",
        "explode": True,
    },
    "detail": {
        "name": "detail",
        "in": "query",
        "description": "`1`: count greenlets, connection handlers and open descriptors (walks every "
        "object). Admins only (403).",
        "schema": {"type": "string", "enum": ["1"]},
    },
    "sweep": {
        "name": "sweep",
        "in": "query",
        "description": "`1`: a full garbage collection and heap trim, now. Admins only (403).",
        "schema": {"type": "string", "enum": ["1"]},
    },
    "demoSrc": {
        "name": "src",
        "in": "query",
        "description": "The stream URL the page's EventSource opens (default `/messages/_streams/all`).",
        "schema": {"type": "string"},
    },
    "consoleAsset": {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "A static file of the console (script, style sheet, image).",
        "schema": {"type": "string", "minLength": 1},
    },
}

# ---------------------------------------------------------------------- operations


def op(
    op_id: str,
    summary: str,
    tag: str,
    responses: dict,
    security: list,
    parameters: list | None = None,
    body: dict | None = None,
    description: str | None = None,
) -> dict:
    out: dict = {"operationId": op_id, "summary": summary, "tags": [tag]}
    if description:
        out["description"] = description
    out["security"] = security
    if parameters:
        out["parameters"] = parameters
    if body:
        out["requestBody"] = body
    out["responses"] = responses
    return out


def ok(description: str, s: dict | None = None, headers: dict | None = None, media: str = JSON) -> dict:
    out: dict = {"description": description}
    if headers:
        out["headers"] = headers
    if s is not None:
        out["content"] = {media: {"schema": s}}
    return out


def json_body(s: dict, description: str, example=None) -> dict:
    media: dict = {"schema": s}
    if example is not None:
        media["example"] = example
    return {"required": True, "description": description, "content": {JSON: media}}


TUTORIAL_STREAMS = {
    "streams": [
        {
            "uri": "all",
            "stages": [{"_$match": {"_$or": [{"operationType": "insert"}, {"operationType": "update"}]}}],
        }
    ]
}


def only(allow: str, op_id: str, methods: list[str], params: list) -> dict:
    """The 405 answers of a reserved URL, for the methods it refuses."""
    return {
        m: op(
            f"{op_id}{m.capitalize()}",
            f"Not allowed: this URL allows {allow}",
            "reserved",
            {**errors(400, 401, 403, 405, 429, 503)},
            SEC_ACL,
            params,
        )
        for m in methods
    }


ETAG = {"ETag": header("ETag")}
SSE_HEADERS_DOC = {
    "Cache-Control": {"schema": {"type": "string", "const": "no-cache"}},
    "X-Accel-Buffering": {"schema": {"type": "string", "const": "no"}},
}

STREAM_PARAMS = [
    param("coll"),
    param("uri"),
    param("avars"),
    param("lastEventIdQuery"),
    param("lastEventIdHeader"),
    param("fullDocumentBeforeChange"),
    param("streamVariables"),
]
STREAM_ERRORS = errors(400, 401, 403, 404, 429, 503)
STREAM_DESCRIPTION = (
    "One URL, two transports. Send `Accept: text/event-stream` for Server-Sent Events, or a WebSocket "
    "handshake (`Upgrade: websocket`, HTTP/1.1, Sec-WebSocket-Version 13) for WebSocket; anything else "
    "is a 400 (after the 404 of an unknown stream). Every refusal (credentials, ACL, unknown stream, "
    "bad variables, bad Last-Event-ID, limits) comes before the 200 or the 101, as a JSON error body: "
    "an open stream never goes silent. The SSE body never ends by itself: `retry:`, a `:connected` "
    "comment, then events and heartbeat comments every SSE_HEARTBEAT_SECONDS."
)

PATHS: dict = {
    # ------------------------------------------------------------------ probes and pages
    "/_health": {
        "get": op(
            "health",
            "Liveness: the worker answers",
            "probes",
            {
                "200": ok("Alive (writes may still fail: see `storage`).", schema("Health")),
            },
            SEC_PUBLIC,
        )
    },
    "/_ready": {
        "get": op(
            "ready",
            "Readiness: the engine answers, the security collections are set up, "
            "writes do not fail for a full disk",
            "probes",
            {
                "200": ok("Ready.", schema("Health")),
                "503": ok("Not ready: the reason is in `error` (send traffic elsewhere).", schema("Health")),
            },
            SEC_PUBLIC,
        )
    },
    "/_status": {
        "get": op(
            "status",
            "This worker's watchers, cursors and clients",
            "probes",
            {"200": ok("Status of the worker that answered.", schema("Status")), **errors(*AUTH_ERRORS)},
            SEC_ACL,
            [param("detail"), param("sweep")],
            description="Governed by the ACL (admins pass); `detail=1` and `sweep=1` are for admins only.",
        )
    },
    "/metrics": {
        "get": op(
            "metrics",
            "Prometheus metrics",
            "probes",
            {
                "200": ok(
                    "The metrics in Prometheus' text exposition format (`text/plain; version=0.0.4`; "
                    "prometheus_client 0.22 and later write `version=1.0.0`), every worker's samples.",
                    {"type": "string"},
                    media=PROMETHEUS,
                ),
                **errors(400, 401, 403, 429, 503),
            },
            SEC_ACL,
        )
    },
    "/_openapi.json": {
        "get": op(
            "openapi",
            "This document",
            "pages",
            {"200": ok("The OpenAPI 3.1 description of this API.", {"type": "object"})},
            SEC_PUBLIC,
        )
    },
    "/_demo": {
        "get": op(
            "demo",
            "A page whose EventSource shows a stream's events",
            "pages",
            {
                "200": ok(
                    "The page (it holds no data; the ACL decides what it shows).",
                    {"type": "string"},
                    media=HTML,
                ),
                "302": {
                    "description": "The console took the demo's place: `/_console` with the same query.",
                    "headers": {"Location": {"schema": {"type": "string"}}},
                },
            },
            SEC_PUBLIC,
            [param("demoSrc")],
        )
    },
    "/_console": {
        "get": op(
            "console",
            "The browser console",
            "pages",
            {
                "200": ok(
                    "The console page (strict Content-Security-Policy).", {"type": "string"}, media=HTML
                ),
                "304": {"description": "Not modified (If-None-Match / If-Modified-Since)."},
            },
            SEC_PUBLIC,
        )
    },
    "/_console/{name}": {
        "get": op(
            "consoleAsset",
            "A static file of the console",
            "pages",
            {
                "200": {"description": "The file.", "content": {"*/*": {"schema": {}}}},
                "304": {"description": "Not modified (If-None-Match / If-Modified-Since)."},
                **errors(404),
            },
            SEC_PUBLIC,
            [param("consoleAsset")],
        )
    },
    "/favicon.ico": {
        "get": op(
            "favicon",
            "The site icon",
            "pages",
            {
                "200": {"description": "The icon.", "content": {"image/*": {"schema": {}}}},
                "304": {"description": "Not modified (If-None-Match / If-Modified-Since)."},
            },
            SEC_PUBLIC,
        )
    },
    # ------------------------------------------------------------------ tokens
    "/token": {
        "post": op(
            "issueToken",
            "A bearer token for the caller",
            "tokens",
            {
                "200": ok("A token; one minted with a token expires no later than it.", schema("Token")),
                **errors(400, 401, 429, 503),
            },
            SEC_USER,
        )
    },
    "/token/cookie": {
        "post": op(
            "issueCookie",
            "The token as an HttpOnly cookie, for browsers' EventSource",
            "tokens",
            {
                "200": ok("The cookie is set.", schema("CookieToken"), {"Set-Cookie": header("SetCookie")}),
                **errors(400, 401, 429, 503),
            },
            SEC_USER,
        ),
        "delete": op(
            "clearCookie",
            "Clear the token cookie",
            "tokens",
            {
                "200": ok("The cookie is cleared.", schema("Empty"), {"Set-Cookie": header("SetCookie")}),
                **errors(400, 401, 429, 503),
            },
            SEC_USER,
        ),
    },
    # ------------------------------------------------------------------ collections
    "/": {
        "get": op(
            "listCollections",
            "Collection names",
            "collections",
            {"200": ok("The names.", schema("CollectionNames")), **errors(*AUTH_ERRORS)},
            SEC_ACL,
        )
    },
    "/{coll}": {
        "parameters": [param("coll")],
        "get": op(
            "listDocuments",
            "Documents of a collection",
            "documents",
            {
                "200": ok("A page of documents.", {"type": "array", "items": schema("Document")}),
                **errors(*AUTH_ERRORS, 404),
            },
            SEC_ACL,
            [param("filter"), param("sort"), param("keys"), param("page"), param("pagesize")],
        ),
        "post": op(
            "createDocuments",
            "Insert a document, or an array of them",
            "documents",
            {
                "201": {
                    "description": "Inserted: `{_id}` with Location and ETag for one document, "
                    "`{inserted, _ids}` for an array.",
                    "headers": {"Location": header("Location"), "ETag": header("ETag")},
                    "content": json_content({"anyOf": [schema("WriteResult"), schema("BulkInsertResult")]}),
                },
                **errors(*AUTH_ERRORS, 404, *BODY_ERRORS, *WRITE_ERRORS),
            },
            SEC_ACL,
            body=json_body(
                {
                    "anyOf": [
                        schema("NewDocument"),
                        {"type": "array", "minItems": 1, "items": schema("NewDocument")},
                    ]
                },
                "A document, or a non-empty array of documents (bulk insert).",
                {"message": "Hello SSE!", "name": "uji"},
            ),
        ),
        "put": op(
            "putCollection",
            "Create or replace a collection's properties",
            "collections",
            {
                "200": ok(
                    "Replaced (ETag), or with `dryRun=true` valid and not stored.",
                    {"anyOf": [schema("Empty"), schema("DryRunResult")]},
                    ETAG,
                ),
                "201": ok("Created.", schema("Empty"), ETAG),
                **errors(*AUTH_ERRORS, *BODY_ERRORS, *WRITE_ERRORS),
            },
            SEC_ACL,
            [param("dryRun"), param("ifMatch")],
            json_body(
                schema("CollectionProperties"),
                "The properties, `streams` included (validated: a 400 names the bad stream).",
                TUTORIAL_STREAMS,
            ),
            "Needs a permission with mongo.allowManagementRequests.",
        ),
        "patch": op(
            "patchCollection",
            "Merge into a collection's properties",
            "collections",
            {
                "200": ok(
                    "Merged (ETag), or with `dryRun=true` valid and not stored.",
                    {"anyOf": [schema("Empty"), schema("DryRunResult")]},
                    ETAG,
                ),
                **errors(*AUTH_ERRORS, 404, *BODY_ERRORS, *WRITE_ERRORS),
            },
            SEC_ACL,
            [param("dryRun"), param("ifMatch")],
            json_body(schema("CollectionProperties"), "Properties to merge.", TUTORIAL_STREAMS),
            "Needs a permission with mongo.allowManagementRequests.",
        ),
        "delete": op(
            "dropCollection",
            "Drop a collection",
            "collections",
            {"204": {"description": "Dropped."}, **errors(*AUTH_ERRORS, 404, *WRITE_ERRORS)},
            SEC_ACL,
            [param("ifMatchRequired")],
            description="Needs `If-Match` and a permission with mongo.allowManagementRequests; "
            "`users` and `acl` cannot be dropped (400).",
        ),
    },
    "/{coll}/_meta": {
        "parameters": [param("coll")],
        "get": op(
            "getMeta",
            "A collection's properties as stored",
            "collections",
            {"200": ok("The properties.", schema("StoredProperties"), ETAG), **errors(*AUTH_ERRORS, 404)},
            SEC_ACL,
        ),
        **only("GET and HEAD", "metaWrites", ["post", "put", "patch", "delete"], []),
    },
    "/{coll}/_size": {
        "parameters": [param("coll")],
        "get": op(
            "countDocuments",
            "How many documents match",
            "documents",
            {
                "200": ok("The count (under the caller's readFilter).", schema("Size")),
                **errors(*AUTH_ERRORS, 404),
            },
            SEC_ACL,
            [param("filter")],
        ),
        **only("GET and HEAD", "sizeWrites", ["post", "put", "patch", "delete"], []),
    },
    "/{coll}/*": {
        "parameters": [param("coll")],
        "patch": op(
            "bulkUpdate",
            "Update every document the filter matches",
            "documents",
            {
                "200": ok("What was matched and modified.", schema("BulkResult")),
                **errors(*AUTH_ERRORS, 404, *BODY_ERRORS, *WRITE_ERRORS),
            },
            SEC_ACL,
            [param("bulkFilter")],
            json_body(schema("Update"), "Fields to set, or update operators."),
            "Needs a permission with mongo.allowBulkPatch.",
        ),
        "delete": op(
            "bulkDelete",
            "Delete every document the filter matches",
            "documents",
            {
                "200": ok("What was deleted.", schema("BulkResult")),
                **errors(*AUTH_ERRORS, 404, *WRITE_ERRORS),
            },
            SEC_ACL,
            [param("bulkFilter")],
            description="Needs a permission with mongo.allowBulkDelete.",
        ),
        **only("PATCH and DELETE (bulk writes with ?filter=)", "bulkOthers", ["get", "post", "put"], []),
    },
    "/{coll}/{doc_id}": {
        "parameters": [param("coll"), param("docId"), param("idType")],
        "get": op(
            "getDocument",
            "A document",
            "documents",
            {
                "200": ok("The document, as the caller's permission shows it.", schema("Document"), ETAG),
                "304": {"description": "Not modified (If-None-Match).", "headers": ETAG},
                **errors(*AUTH_ERRORS, 404),
            },
            SEC_ACL,
            [param("ifNoneMatch")],
        ),
        "put": op(
            "replaceDocument",
            "Replace a document (`wm=upsert` creates it, `wm=insert` only creates)",
            "documents",
            {
                "200": ok("Replaced.", schema("WriteResult"), ETAG),
                "201": ok("Created.", schema("WriteResult"), ETAG),
                **errors(*AUTH_ERRORS, 404, *BODY_ERRORS, *WRITE_ERRORS),
            },
            SEC_ACL,
            [param("wm"), param("ifMatch")],
            json_body(schema("NewDocument"), "The new document (an `_id` in it must be the URL's)."),
        ),
        "patch": op(
            "updateDocument",
            "Update a document's fields",
            "documents",
            {
                "200": ok("Updated.", schema("WriteResult"), ETAG),
                "201": ok("Created (`wm=upsert`).", schema("WriteResult"), ETAG),
                **errors(*AUTH_ERRORS, 404, *BODY_ERRORS, *WRITE_ERRORS),
            },
            SEC_ACL,
            [param("wm"), param("ifMatch")],
            json_body(schema("Update"), "Fields to set, or update operators."),
        ),
        "delete": op(
            "deleteDocument",
            "Delete a document",
            "documents",
            {"204": {"description": "Deleted."}, **errors(*AUTH_ERRORS, 404, *WRITE_ERRORS)},
            SEC_ACL,
            [param("ifMatch")],
        ),
    },
    # ------------------------------------------------------------------ streams
    "/{coll}/_streams": {
        "parameters": [param("coll")],
        "get": op(
            "listStreams",
            "A collection's streams, with their URLs",
            "streams",
            {
                "200": ok("The streams.", {"type": "array", "items": schema("StreamLink")}),
                **errors(*AUTH_ERRORS, 404),
            },
            SEC_ACL,
        ),
        **only("GET, HEAD and OPTIONS", "streamsWrites", ["post", "put", "patch", "delete"], []),
    },
    "/{coll}/_streams/{uri}": {
        "parameters": [param("coll"), param("uri")],
        "get": op(
            "stream",
            "A change stream over SSE or WebSocket",
            "streams",
            {
                "101": {
                    "description": "WebSocket: each event is one text frame "
                    "(its resume token first, as `_id`)."
                },
                "200": {
                    "description": "Server-Sent Events (never ends by itself).",
                    "headers": SSE_HEADERS_DOC,
                    "content": {SSE: {"schema": schema("StreamEvent")}},
                },
                **STREAM_ERRORS,
            },
            SEC_STREAM,
            STREAM_PARAMS,
            description=STREAM_DESCRIPTION,
        ),
        "head": op(
            "streamHead",
            "The headers a stream's GET would get, after the same checks",
            "streams",
            {
                "200": {
                    "description": "The stream would open (nothing is subscribed).",
                    "headers": SSE_HEADERS_DOC,
                },
                **STREAM_ERRORS,
            },
            SEC_STREAM,
            STREAM_PARAMS,
        ),
        **only("GET, HEAD and OPTIONS", "streamWrites", ["post", "put", "patch", "delete"], []),
    },
}

TAGS = [
    {"name": "collections", "description": "Collections and their properties (stream definitions)."},
    {"name": "documents", "description": "RESTHeart-compatible document API."},
    {"name": "streams", "description": "Change streams over Server-Sent Events and WebSocket."},
    {"name": "tokens", "description": "Bearer tokens and cookies for browsers."},
    {"name": "probes", "description": "Health, readiness, status and metrics."},
    {"name": "pages", "description": "Public pages and files."},
    {"name": "reserved", "description": "Reserved URLs: methods they refuse with 405."},
]


def build() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "changefeed",
            "version": "1",
            "summary": "MongoDB-style change events over SSE and WebSocket, "
            "with a RESTHeart-compatible REST API.",
            "description": "Every 4xx/5xx the application writes has the body "
            '`{"http status code": ..., "http status description": ..., "message": ...}` (schema Error). '
            "Who may do what is the `acl` collection (RESTHeart's model): an operation secured by Basic "
            "or Bearer also admits anonymous clients where a rule for `$unauthenticated` matches. "
            "OPTIONS on any URL is the CORS preflight (204, no authentication); HEAD is allowed wherever "
            "GET is. Ids and documents are Relaxed Extended JSON.",
        },
        "tags": TAGS,
        "security": SEC_ACL,
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "responses": RESPONSES,
            "parameters": PARAMETERS,
            "headers": HEADERS,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {os.path.relpath(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
