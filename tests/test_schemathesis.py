"""schemathesis against a live gunicorn: the server answers as docs/openapi.json says.

Every operation of the spec is generated from it (examples, then fuzzing; a fixed seed and
Hypothesis' derandomized mode, so a run is repeatable) and sent to a real server started
with the real gunicorn.conf.py (conftest.LiveServer), with four checks: no 5xx
(`not_a_server_error`), only documented statuses (`status_code_conformance`) and content
types (`content_type_conformance`), and bodies that match their schema
(`response_schema_conformance`). Once as admin (a bearer token of admin:secret; Basic for
`POST /token`, since a bcrypt check per request would take most of the run), once
anonymous for the public URLs and a few protected ones (their 401s).

Stream URLs are sent with `Accept: text/event-stream` (their 400 without it is tested in
test_live_streams.py), on the tutorial's collection as the spec's examples name it, its
streams restored before each case; an SSE body never ends, so schemathesis reads it for
SSE_READ_SECONDS and checks the head and the events it got.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import ADMIN, ADMIN_HEADER, LiveServer
from .test_openapi import PENDING_PATHS, SPEC_PATH, routes

pytestmark = pytest.mark.live

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
REQUEST_TIMEOUT = 2.0  # seconds
SSE_READ_SECONDS = 0.5  # how long an SSE answer (which never ends) is read: its head and `retry:`
# per operation, in the fuzzing phase (the examples and coverage phases add their own cases);
# SCHEMATHESIS_MAX_EXAMPLES=200 for a longer hunt by hand
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))
SEED = 13

CONFIG = {
    "seed": SEED,
    "generation": {
        "mode": "all",  # valid inputs and invalid ones (which must be documented 4xx)
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,
        "allow-x00": False,
        "with-security-parameters": False,  # credentials are the test's, not generated
    },
    "phases": {"stateful": {"enabled": False}},
    "request-timeout": REQUEST_TIMEOUT,
    "max-redirects": 3,
}

# Values of a path parameter that make the URL another route (a concrete path the spec
# documents separately, which OpenAPI matches first) or a path a client normalizes away.
COLLIDING = {
    "coll": {
        "_health",
        "_ready",
        "_status",
        "_demo",
        "_openapi.json",
        "_console",
        "metrics",
        "favicon.ico",
        "token",
        "static",
    },
    "doc_id": {"_meta", "_size", "_streams", "*", "cookie"},
    "uri": set(),
}
SECURITY_COLLECTIONS = {"users", "acl"}  # writes there could lock the test out: redirected
DOT_SEGMENTS = {".", ".."}

STREAM_DEFINITION = {
    "streams": [
        {"uri": "all", "stages": [{"_$match": {"operationType": {"_$in": ["insert", "update"]}}}]},
        {"uri": "mine", "stages": [{"_$match": {"fullDocument::name": {"_$var": "n"}}}]},
    ]
}

STATS: Counter = Counter()

schema = schemathesis.openapi.from_path(SPEC_PATH, config=schemathesis.Config.from_dict(CONFIG))


def _seed(url: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    put = requests.put(f"{url}/messages", json=STREAM_DEFINITION, headers=headers, timeout=10)
    assert put.status_code in (200, 201), put.text
    post = requests.post(
        f"{url}/messages", json={"message": "hello", "name": "uji"}, headers=headers, timeout=10
    )
    assert post.status_code == 201, post.text


def _restore_streams(target: Target) -> None:
    put = requests.put(
        f"{target.url}/messages",
        json=STREAM_DEFINITION,
        headers={"Authorization": f"Bearer {target.token}"},
        timeout=REQUEST_TIMEOUT,
    )
    assert put.status_code in (200, 201), put.text


class Target:
    def __init__(self, live: LiveServer, token: str, unrouted: set[str]):
        self.url = live.url
        self.token = token
        self.unrouted = unrouted


@pytest.fixture(scope="module")
def target(tmp_path_factory, request):
    """One live server (the real gunicorn.conf.py, as `live_factory` starts it) for the whole
    run, seeded with the tutorial's collection, and the spec's pending paths it does not route
    yet (tests/test_openapi.py: PENDING_PATHS), which are skipped until their work lands."""
    from app import create_app

    app = create_app({"DATA_DIR": str(tmp_path_factory.mktemp("routes") / "data")})
    unrouted = PENDING_PATHS - set(routes(app))
    app.extensions["changefeed.hub"].close_all()
    app.extensions["changefeed.engine"].close()

    live = LiveServer(
        str(tmp_path_factory.mktemp("schemathesis") / "data"),
        SSE_HEARTBEAT_SECONDS=60,
        STREAM_LINGER_SECONDS=0.2,
        AUTH_MAX_FAILURES=1000,
    ).start()
    started, failed_before = time.monotonic(), request.session.testsfailed
    try:
        token = requests.post(f"{live.url}/token", auth=ADMIN, timeout=10).json()["access_token"]
        _seed(live.url, token)
        yield Target(live, token, unrouted)
    finally:
        live.stop()
        _report(request, time.monotonic() - started, request.session.testsfailed - failed_before)


def _report(request, seconds: float, failed: int) -> None:
    operations = sum(1 for k in STATS if k.startswith("op:"))
    runs = sum(1 for k in STATS if k.startswith("run:"))
    line = (
        f"schemathesis: {operations} operations tested ({runs} runs: as admin, anonymous), "
        f"{STATS['examples']} examples, {failed} failures, "
        f"{STATS['skipped']} pending operations skipped, {seconds:.1f} s"
    )
    statuses = ", ".join(f"{k[7:]}: {v}" for k, v in sorted(STATS.items()) if k.startswith("status:"))
    streams = ", ".join(f"{k[7:]}: {v}" for k, v in sorted(STATS.items()) if k.startswith("stream:"))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{line}\n  statuses {{{statuses}}}; stream URL {{{streams}}}")


def _rerouted(case) -> None:
    """Keep each case on its own operation: see COLLIDING and SECURITY_COLLECTIONS."""
    params = case.path_parameters
    if not params:
        return
    for name, value in list(params.items()):
        if not isinstance(value, str):
            continue
        if value in DOT_SEGMENTS or value in COLLIDING.get(name, ()):
            params[name] = "x" + value
    coll = params.get("coll")
    if coll in SECURITY_COLLECTIONS and case.method.upper() != "GET":
        params["coll"] = "x" + coll


def _run(target: Target, case, headers: dict, who: str) -> None:
    if case.operation.path in target.unrouted:
        STATS["skipped"] += 1
        pytest.skip(f"{case.operation.path} is not routed yet (PENDING_PATHS)")
    _rerouted(case)
    timeout: float | tuple[float, float] = REQUEST_TIMEOUT
    if case.operation.path == "/{coll}/_streams/{uri}" and case.method.upper() in ("GET", "HEAD"):
        headers = {**headers, "Accept": "text/event-stream"}
        timeout = (REQUEST_TIMEOUT, SSE_READ_SECONDS)
        _restore_streams(target)  # other operations' examples rewrite /messages too
    STATS[f"op:{case.operation.label}"] += 1
    STATS[f"run:{who}:{case.operation.label}"] += 1
    STATS["examples"] += 1
    response = case.call_and_validate(base_url=target.url, headers=headers, checks=CHECKS, timeout=timeout)
    STATS[f"status:{response.status_code}"] += 1
    if case.operation.path == "/{coll}/_streams/{uri}":
        STATS[f"stream:{case.method.upper()} {response.status_code}"] += 1


# Protected operations also run anonymously, for their 401s.
ANONYMOUS_ALSO = {
    "listCollections",
    "listDocuments",
    "getDocument",
    "createDocuments",
    "stream",
    "status",
    "metrics",
    "issueToken",
}


HYPOTHESIS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@schema.parametrize()
@HYPOTHESIS
def test_api_as_admin(case, target):
    if case.operation.definition.raw.get("operationId") in ("issueToken", "issueCookie"):
        headers = {"Authorization": ADMIN_HEADER}  # admin:secret itself
    else:
        headers = {"Authorization": f"Bearer {target.token}"}
    _run(target, case, headers, "admin")


@schema.include(
    func=lambda ctx: (
        ctx.operation.definition.raw.get("security") == []
        or ctx.operation.definition.raw.get("operationId") in ANONYMOUS_ALSO
    )
).parametrize()
@HYPOTHESIS
def test_api_anonymous(case, target):
    _run(target, case, {}, "anonymous")
