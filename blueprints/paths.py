"""The router sees the same canonical path as the ACL (services.paths).

The WSGI server decodes the whole path at once (``/coll/a%2Fb`` becomes ``/coll/a/b``),
which would make a document id holding ``/`` unreachable and let the router and the ACL
read one request two ways. This middleware replaces ``PATH_INFO`` by the canonical path
computed from the raw request target, so the routes match exactly what the rules match;
a handler decodes its id segment once with ``services.paths.decode_segment``. A path
with no canonical form (or not in normal form) keeps its ``PATH_INFO`` and is refused
with a 400 by the security hook before any view runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from services.paths import is_normal, normalize_path

RAW_PATH = "changefeed.raw_path"
CANONICAL_PATH = "changefeed.canonical_path"  # None: refused


def raw_path(environ: dict) -> str:
    """The path as the client sent it (percent-encoded), without the query string."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO") or "/"
    return raw.split("?", 1)[0].split("#", 1)[0] or "/"


class CanonicalPaths:
    """WSGI middleware: PATH_INFO := the canonical path of the raw request target."""

    def __init__(self, app: Callable[..., Iterable[bytes]]):
        self.app = app

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        raw = raw_path(environ)
        # RAW_URI is the request line's bytes as latin-1 text; a client may send raw UTF-8
        try:
            text = raw.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            text = None
        canonical = normalize_path(text) if text is not None and is_normal(text) else None
        environ[RAW_PATH] = raw
        environ[CANONICAL_PATH] = canonical
        if canonical is not None:
            environ["PATH_INFO"] = canonical.encode("utf-8").decode("latin-1")
        return self.app(environ, start_response)
