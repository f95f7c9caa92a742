"""Domain errors shared by services and engines.

Each carries the HTTP status it maps to, so `blueprints/errors.py` can render any of them
in RESTHeart's error format without a table of its own. Messages name the fault.
"""

from __future__ import annotations


class ChangefeedError(Exception):
    """Base of every error the app turns into an HTTP response."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ChangefeedError):
    status = 400


class Unauthorized(ChangefeedError):
    status = 401


class Forbidden(ChangefeedError):
    status = 403


class NotFound(ChangefeedError):
    status = 404


class MethodNotAllowed(ChangefeedError):
    status = 405

    def __init__(self, message: str, allow: str):
        super().__init__(message)
        self.headers = {"Allow": allow}


def retry_after_header(seconds: float) -> dict[str, str]:
    """`Retry-After` in whole seconds (rounded up, at least 1)."""
    return {"Retry-After": str(max(1, int(seconds + 0.999)))}


class TooManyRequests(ChangefeedError):
    """A client went past one of its limits; `retry_after` seconds until it may try again."""

    status = 429

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        if retry_after is not None:
            self.headers = retry_after_header(retry_after)


class Conflict(ChangefeedError):
    status = 409


class UnsupportedMediaType(ChangefeedError):
    status = 415


class Unavailable(ChangefeedError):
    """The service cannot do it now (database unreachable or locked); `retry_after`: the
    seconds after which trying again makes sense, sent as Retry-After."""

    status = 503

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        if retry_after is not None:
            self.headers = retry_after_header(retry_after)


class InsufficientStorage(ChangefeedError):
    """The database's disk is full: the write was not made (nothing else was lost)."""

    status = 507


class CollectionNotFound(NotFound):
    def __init__(self, coll: str):
        super().__init__(f"Collection '{coll}' does not exist")
        self.coll = coll


class DocumentNotFound(NotFound):
    def __init__(self, coll: str, doc_id):
        super().__init__(f"Document '{doc_id}' does not exist in collection '{coll}'")


class DuplicateKey(Conflict):
    def __init__(self, coll: str, doc_id):
        super().__init__(f"Duplicate key: a document with _id {doc_id} already exists in '{coll}'")


class EtagMismatch(Conflict):
    def __init__(self, what: str):
        super().__init__(f"The ETag of {what} does not match the If-Match header")


class HistoryLost(ChangefeedError):
    """A resume token points before the retained change history (or to another store)."""

    status = 400
