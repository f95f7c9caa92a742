"""One error format for every 4xx/5xx the app writes: RESTHeart's JSON error body."""

from __future__ import annotations

import json
import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES

from services.errors import ChangefeedError

log = logging.getLogger(__name__)


def error_response(status: int, message: str, headers: dict | None = None) -> Response:
    """`{"http status code", "http status description", "message"}`, `"` shown as `'`."""
    body = {
        "http status code": status,
        "http status description": HTTP_STATUS_CODES.get(status, "Error"),
        "message": message.replace('"', "'").replace("\t", "  "),
    }
    return Response(json.dumps(body), status=status, headers=headers, mimetype="application/json")


def init_app(app: Flask) -> None:
    @app.errorhandler(ChangefeedError)
    def domain_error(exc: ChangefeedError):
        return error_response(exc.status, exc.message, getattr(exc, "headers", None))

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge):
        limit = app.config.get("MAX_CONTENT_LENGTH")
        return error_response(413, f"the request body is larger than MAX_CONTENT_LENGTH ({limit} bytes)")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        status = exc.code or 500
        message = exc.description or HTTP_STATUS_CODES.get(status, "Error")
        if status == 405:
            message = "method not allowed on this URL"
        elif status == 404:
            message = "no resource at this URL"
        headers = {}
        response = exc.get_response()
        for name in ("Allow", "WWW-Authenticate"):
            if name in response.headers:
                headers[name] = response.headers[name]
        return error_response(status, message, headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal error; see the server log")
