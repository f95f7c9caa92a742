"""Headless Chromium against the real server: the EventSource clients of RESTHeart's tutorial:
the public page through the ACL rule alone, and a protected stream with a token in the URL.

The browser is Debian's `chromium`, driven by Playwright for Python with `executable_path`
(`playwright install` downloads browsers and is never needed). The page is the app's own
public `/_demo?src=<stream url>`, which redirects to the console (`/_console?src=`): a plain
`new EventSource(src)` as in the tutorial, no login; the tests read what it shows: rows of
`#events` (`tr.change`, newest first, the event's JSON in `pre.json`), `#state` and
`#count-errors`. The console runs under a CSP without 'unsafe-eval', so every
`wait_for_function` here is a function, never an expression string (Playwright evals those).
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import quote

import pytest
import requests

from .conftest import ADMIN, LiveServer
from .test_live_streams import post, put_streams

CHROMIUM = "/usr/bin/chromium"
ENABLE = (
    "install Debian's chromium (apt-get install chromium) and `pip install playwright` "
    "to run the browser tests"
)

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found: {ENABLE}", allow_module_level=True)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip(f"the playwright package is missing: {ENABLE}", allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.live]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

# The tutorial's streams plus one that no ACL rule opens.
STREAMS = {
    "streams": [
        {
            "uri": "all",
            "stages": [{"_$match": {"_$or": [{"operationType": "insert"}, {"operationType": "update"}]}}],
        },
        {"uri": "secret", "stages": [{"_$match": {"operationType": "insert"}}]},
    ]
}
# Step 6 of the tutorial, as written.
PUBLIC_RULE = {
    "_id": "unauthenticatedCanConnectToMessagesStream",
    "predicate": "path-prefix(/messages/_streams/all)",
    "priority": 0,
    "roles": ["$unauthenticated"],
}

CHANGES = "document.querySelectorAll('#events tr.change')"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def context(browser):
    ctx = browser.new_context()  # no cookies, no credentials: the page is what a stranger sees
    yield ctx
    ctx.close()


def demo(base: str, src: str) -> str:
    return f"{base}/_demo?src={quote(src, safe='')}"


def open_page(context, url: str):
    page = context.new_page()
    page.goto(url)
    page.wait_for_function(
        "() => document.getElementById('state').textContent !== 'connecting'", timeout=10_000
    )
    return page


def wait_changes(page, n: int, timeout_ms: int = 15_000) -> None:
    page.wait_for_function(f"() => {CHANGES}.length >= {n}", timeout=timeout_ms)


def shown(page) -> list[dict]:
    """The change events the page shows, oldest first, as the stream's JSON payloads, with their ids."""
    items = page.eval_on_selector_all(
        "#events tr.change",
        "els => els.map(e => ({id: e.dataset.id, text: e.querySelector('pre.json').textContent}))",
    )
    return [{"id": item["id"], **json.loads(item["text"])} for item in reversed(items)]


def seqs(page) -> list:
    return [ev["fullDocument"].get("seq") for ev in shown(page)]


def setup_messages(base: str) -> None:
    assert put_streams(base, body=STREAMS) == 201
    r = requests.post(f"{base}/acl", auth=ADMIN, json=PUBLIC_RULE, timeout=10)
    assert r.status_code == 201, r.text


def restart_on_same_port(server: LiveServer, **env) -> LiveServer:
    """Stop `server` (SIGTERM) and start a new gunicorn on its data dir and its port."""
    server.stop()
    again = LiveServer(server.data_dir, **env)
    again.port, again.url = server.port, server.url
    again.env["PORT"] = str(server.port)
    again.log_path = server.log_path  # appended to: one log for the whole story
    return again


def test_public_page_receives_events_and_resumes_after_a_restart(live_factory, tmp_path, context):
    data_dir = str(tmp_path / "data")
    server = live_factory(data_dir)
    base = server.url
    setup_messages(base)

    # The public page connects with no credentials, through the tutorial's ACL rule only.
    stream_requests = []
    context.on("request", lambda req: "/_streams/" in req.url and stream_requests.append(req))
    page = open_page(context, demo(base, "/messages/_streams/all"))
    assert page.text_content("#state") == "open", page.text_content("#state-detail")
    post(base, {"seq": 1, "message": "Hello SSE!"})
    post(base, {"seq": 2, "message": "Hello again"})
    wait_changes(page, 2)
    assert seqs(page) == [1, 2]
    assert all(json.loads(ev["id"]).keys() == {"_data"} for ev in shown(page))

    # The server goes away under the page; one insert lands while it is down (on the data
    # dir, through the next server before the browser is back) and one right after.
    again = restart_on_same_port(server)
    try:
        page.wait_for_function(
            "() => document.getElementById('state').textContent === 'reconnecting'", timeout=10_000
        )
        again.start()
        post(base, {"seq": 3, "message": "while the page was away"})
        page.wait_for_function(
            f"() => document.getElementById('state').textContent === 'open' && {CHANGES}.length >= 3",
            timeout=15_000,
        )
        post(base, {"seq": 4, "message": "after the page is back"})
        wait_changes(page, 4)
        time.sleep(0.5)  # a duplicate would arrive right behind the 4th
        assert seqs(page) == [1, 2, 3, 4]
        events = shown(page)
        assert len({ev["id"] for ev in events}) == 4
        assert all(ev["operationType"] == "insert" for ev in events)
        # the page saw the server's clean `end` and came back by itself: no code beyond EventSource
        assert page.locator("#events tr.end").count() >= 1
        assert page.locator("#events tr.error").count() == 0  # connection errors are counted, not rows
        assert int(page.text_content("#count-errors")) >= 1
        assert page.text_content("#state") == "open", page.text_content("#state-detail")
        # and it came back through the browser's own Last-Event-ID, the id of the 2nd event
        sent = [req.all_headers().get("last-event-id") for req in stream_requests]
        assert len(sent) >= 2 and sent[0] is None
        assert set(sent[1:]) == {events[1]["id"]}
    finally:
        again.stop()


def test_token_in_the_url_opens_a_protected_stream_and_nothing_opens_without(live, context):
    base = live.url
    setup_messages(base)
    r = requests.post(f"{base}/token", auth=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    statuses = {}
    context.on(
        "response",
        lambda resp: (
            "/_streams/" in resp.url
            and resp.request.method == "GET"  # (the console asks a refused stream's status with HEAD)
            and statuses.setdefault(resp.url.split("/_streams/")[1].split("access_token=")[0], []).append(
                resp.status
            )
        ),
    )

    public = open_page(context, demo(base, "/messages/_streams/all"))
    with_token = open_page(context, demo(base, f"/messages/_streams/secret?access_token={quote(token)}"))
    # RESTHeart's `?noauthchallenge`: a 401 without the Basic challenge, so the browser does
    # not hold the request for a login prompt and the EventSource fails at once.
    refused = open_page(context, demo(base, "/messages/_streams/secret?noauthchallenge"))
    # With the challenge, headless Chromium waits on the prompt that no one answers.
    prompted = context.new_page()
    prompted.goto(demo(base, "/messages/_streams/secret"))
    assert public.text_content("#state") == "open", public.text_content("#state-detail")
    assert with_token.text_content("#state") == "open", with_token.text_content("#state-detail")
    # 401 to an EventSource is fatal: one error, closed, and it does not retry
    assert refused.text_content("#state") == "closed"
    assert refused.text_content("#count-errors") == "1"
    assert "HTTP 401" in refused.text_content("#state-detail")

    post(base, {"seq": 1, "message": "for everyone"})
    post(base, {"seq": 2, "message": "also for everyone"})
    wait_changes(public, 2)
    wait_changes(with_token, 2)
    assert seqs(public) == [1, 2]
    assert seqs(with_token) == [1, 2]

    time.sleep(3)  # give the pages without credentials every chance to receive something
    for page in (refused, prompted):
        assert page.locator("#events tr").count() == 0
        assert page.text_content("#state") != "open"
    assert refused.text_content("#state") == "closed" and refused.text_content("#count-errors") == "1"
    assert statuses == {"all": [200], "secret?": [200], "secret?noauthchallenge": [401]}
    # the prompted page's request got its 401 too (the browser holds it back from the page)
    assert live.read_log().count('"GET /messages/_streams/secret HTTP/1.1" 401') == 2
