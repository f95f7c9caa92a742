"""`/_openapi.json` (public): the OpenAPI 3.1 description of the API, docs/openapi.json as committed.

The file is the contract (docs/openapi.py writes it; tests/test_openapi.py checks it against
the routes): it is read once per worker and served byte for byte.
"""

from __future__ import annotations

import functools
import os

from flask import Blueprint, Response

bp = Blueprint("openapi", __name__)

SPEC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "openapi.json")


@functools.cache
def spec_bytes() -> bytes:
    with open(SPEC_PATH, "rb") as f:
        return f.read()


@bp.get("/_openapi.json")
def spec():
    return Response(spec_bytes(), mimetype="application/json", headers={"Cache-Control": "no-cache"})
