"""docs/openapi.json: a valid OpenAPI 3.1 document, written by docs/openapi.py, served at
`/_openapi.json`, and naming exactly the routes the app has (with their methods).

tests/test_schemathesis.py checks the server's answers against it on a live gunicorn.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
from openapi_spec_validator import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_PATH = os.path.join(ROOT, "docs", "openapi.json")

# Flask rules that are no part of the API, with the reason.
UNDOCUMENTED_RULES: dict[str, str] = {}  # none: the app has no static route (app.py)

# Documented paths whose routes other work is still adding: in the spec so that it is
# complete, not yet required in url_map (tests/test_schemathesis.py skips them while they are
# not routed). Remove each one once its route lands. (Issue 13's /metrics, /_console,
# /_console/{name} and /favicon.ico were here until their routes landed.)
PENDING_PATHS: set[str] = set()

# Answered for every URL without a view of their own: OPTIONS by the CORS preflight hook
# (blueprints/cors.py, 204), HEAD by Flask for every GET rule. They are described once, in
# info.description; HEAD is documented as an operation where it has a meaning of its own.
IMPLICIT_METHODS = {"OPTIONS", "HEAD"}

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def load_spec() -> dict:
    with open(SPEC_PATH, encoding="utf-8") as f:
        return json.load(f)


def openapi_path(rule: str) -> str:
    """`/<coll>/<doc_id>` -> `/{coll}/{doc_id}` (converters dropped: `<path:x>` -> `{x}`)."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def routes(app) -> dict[str, set[str]]:
    """The app's routes: OpenAPI path -> methods (without the implicit ones)."""
    out: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule in UNDOCUMENTED_RULES:
            continue
        out.setdefault(openapi_path(rule.rule), set()).update(
            m for m in rule.methods if m not in IMPLICIT_METHODS
        )
    return out


def documented(spec: dict) -> dict[str, set[str]]:
    return {path: {m.upper() for m in item if m in HTTP_METHODS} for path, item in spec["paths"].items()}


def operations(spec: dict):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def resolve(spec: dict, value: dict) -> dict:
    while "$ref" in value:
        node = spec
        for part in value["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        value = node
    return value


def test_the_document_is_valid_openapi_3_1():
    spec = load_spec()
    validate(spec)  # raises, naming the fault
    assert spec["openapi"].startswith("3.1")


def test_the_committed_file_is_what_the_generator_writes():
    module_spec = importlib.util.spec_from_file_location(
        "docs_openapi", os.path.join(ROOT, "docs", "openapi.py")
    )
    generator = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(generator)
    with open(SPEC_PATH, encoding="utf-8") as f:
        committed = f.read()
    assert committed == generator.render(), "docs/openapi.json is stale: run .venv/bin/python docs/openapi.py"


def test_every_route_is_documented_with_its_methods(app):
    spec_paths = documented(load_spec())
    missing = {}
    for path, methods in routes(app).items():
        absent = methods - spec_paths.get(path, set())
        if absent:
            missing[path] = sorted(absent)
    assert not missing, f"routes missing from docs/openapi.json: {missing}"


def test_every_documented_operation_has_a_route(app):
    real = routes(app)
    extra = {}
    for path, methods in documented(load_spec()).items():
        if path in PENDING_PATHS:
            continue
        routed = real.get(path, set())
        absent = {m for m in methods if m not in routed and not (m == "HEAD" and "GET" in routed)}
        if absent:
            extra[path] = sorted(absent)
    assert not extra, f"documented, but no such route: {extra}"


def test_pending_paths_are_documented():
    assert PENDING_PATHS <= set(load_spec()["paths"])


def test_every_error_response_has_the_error_body():
    spec = load_spec()
    error_schema = {"$ref": "#/components/schemas/Error"}
    wrong = []
    for path, method, operation in operations(spec):
        for status, response in operation["responses"].items():
            if not status.startswith(("4", "5")):
                continue
            response = resolve(spec, response)
            body = response.get("content", {}).get("application/json", {}).get("schema")
            if path in ("/_health", "/_ready"):  # the probes' 503 is their own body, not an error
                assert body == {"$ref": "#/components/schemas/Health"}
                continue
            if body != error_schema:
                wrong.append(f"{method.upper()} {path} {status}")
    assert not wrong, f"error responses without the Error schema: {wrong}"


def test_statuses_where_they_apply():
    spec = load_spec()
    for path, method, operation in operations(spec):
        responses = operation["responses"]
        label = f"{method.upper()} {path}"
        if operation.get("security", spec["security"]) != []:
            assert {"401", "429"} <= set(responses), label  # credentials, and the login throttle
        if "requestBody" in operation:
            assert {"400", "413", "415"} <= set(responses), label
        if "429" in responses:
            assert "Retry-After" in resolve(spec, responses["429"])["headers"], label
        if "405" in responses:
            assert "Allow" in resolve(spec, responses["405"])["headers"], label
    # the reserved URLs answer 405 for every method they refuse
    assert "405" in spec["paths"]["/{coll}/_meta"]["post"]["responses"]
    assert "405" in spec["paths"]["/{coll}/*"]["get"]["responses"]
    # ETag / If-Match where the server uses them
    for path, method in [("/{coll}/{doc_id}", "get"), ("/{coll}/{doc_id}", "put"), ("/{coll}/_meta", "get")]:
        assert "ETag" in spec["paths"][path][method]["responses"]["200"]["headers"]
    for path, method in [("/{coll}/{doc_id}", "put"), ("/{coll}/{doc_id}", "delete"), ("/{coll}", "delete")]:
        names = {resolve(spec, p)["name"] for p in spec["paths"][path][method].get("parameters", [])}
        assert "If-Match" in names, f"{method} {path}"
    stream = spec["paths"]["/{coll}/_streams/{uri}"]["get"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert {"accessToken": []} in stream["security"]


@pytest.mark.parametrize("path", ["/_health", "/_ready", "/_openapi.json"])
def test_public_operations_are_public(anon, path):
    assert load_spec()["paths"][path]["get"]["security"] == []
    assert anon.get(path).status_code == 200


def test_openapi_json_serves_the_committed_file(anon):
    response = anon.get("/_openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    with open(SPEC_PATH, "rb") as f:
        assert response.data == f.read()


def test_openapi_json_is_no_collection_name(client):
    response = client.put("/_openapi.json", json={})  # routed to PUT /{coll}, which refuses the name
    assert response.status_code == 400
    assert "reserved" in response.get_json()["message"]
