"""The stream console (`/_console`) in headless Chromium against the real gunicorn.

Debian's `chromium`, driven by Playwright for Python with `executable_path` (`playwright
install` is never needed). A test logs in through the form, picks the collection and the
stream from the lists, connects, and reads the live table (`#events tr`, newest first:
`data-op`, `data-id`, the changed fields as `.field.updated[data-field=...]`, the full JSON
in `pre.json`), the state (`#state[data-state]`) and the counters. Writes go through
`requests`, as another client's would. The page is served under a strict CSP: every test
checks that Chromium reported no violation.

`docs/console.png` is the screenshot taken here at 1280x800.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import requests

from .conftest import ADMIN, ROOT
from .test_browser import CHROMIUM, CHROMIUM_ARGS, restart_on_same_port
from .test_live_streams import post

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # test_browser skips the module with the instructions first
    sync_playwright = None

pytestmark = [pytest.mark.browser, pytest.mark.live]

STREAMS = [
    {"uri": "all", "stages": []},
    {"uri": "inserts", "stages": [{"_$match": {"operationType": "insert"}}]},
]
ROWS = "#events tr"
# the README's screenshot, retaken only when asked (CONSOLE_SCREENSHOT=1): a test run leaves
# the working tree as it found it
SCREENSHOT = os.path.join(ROOT, "docs", "console.png")


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None or not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} and the playwright package are needed for the console tests")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    yield ctx
    ctx.close()


class Console:
    """One console page and what it reports; CSP violations are collected as they come."""

    def __init__(self, context, base: str):
        self.base = base
        self.page = context.new_page()
        self.violations: list[str] = []
        self.page.on(
            "console",
            lambda m: "Content Security Policy" in m.text and self.violations.append(m.text),
        )
        self.page.goto(f"{base}/_console")

    def login(self, user: str = "admin", password: str = "secret", cookie: bool = False) -> None:
        p = self.page
        p.get_by_label("User").fill(user)
        p.get_by_label("Password").fill(password)
        if cookie:
            p.get_by_label("HttpOnly cookie for streams").check()
        p.get_by_role("button", name="Log in").click()
        p.wait_for_selector("#whoami:not([hidden])", timeout=10_000)

    def pick(self, coll: str, uri: str, transport: str = "SSE") -> None:
        p = self.page
        p.wait_for_selector(f"#collection option[value='{coll}']", state="attached", timeout=10_000)
        p.get_by_label("Collection", exact=True).select_option(coll)
        p.wait_for_selector(f"#stream option[value='{uri}']", state="attached", timeout=10_000)
        p.get_by_label("Stream", exact=True).select_option(uri)
        p.get_by_label(transport, exact=True).check()

    def connect(self) -> None:
        self.page.get_by_role("button", name="Connect", exact=True).click()
        self.wait_state("open")

    def state(self) -> str:
        return self.page.get_attribute("#state", "data-state")

    def wait_state(self, state: str, timeout_ms: int = 10_000) -> None:
        self.page.wait_for_function(
            f"() => document.getElementById('state').dataset.state === {json.dumps(state)}",
            timeout=timeout_ms,
        )

    def wait_rows(self, n: int, selector: str = ROWS, timeout_ms: int = 10_000) -> None:
        self.page.wait_for_function(
            f"() => document.querySelectorAll({json.dumps(selector)}).length >= {n}", timeout=timeout_ms
        )

    def rows(self, selector: str = ROWS) -> list[dict]:
        """The table's rows, oldest first: kind, op, id and the event's JSON."""
        items = self.page.eval_on_selector_all(
            selector,
            "els => els.map(e => ({kind: e.dataset.kind, op: e.dataset.op, id: e.dataset.id,"
            " json: e.querySelector('pre.json').textContent}))",
        )
        return [{**i, "data": json.loads(i["json"])} for i in reversed(items)]

    def count(self, name: str) -> int:
        return int(self.page.text_content(f"#count-{name}"))


def seqs(console: Console) -> list:
    return [
        r["data"]["fullDocument"]["seq"]
        for r in console.rows("#events tr.change")
        if "fullDocument" in r["data"]
    ]


def test_watch_inserts_and_updates_live_and_resume_after_a_restart(live_factory, tmp_path, context):
    server = live_factory(str(tmp_path / "data"), STREAM_LINGER_SECONDS=0.5)
    base = server.url
    r = requests.put(f"{base}/messages", auth=ADMIN, json={"streams": STREAMS, "owner": "ops"}, timeout=10)
    assert r.status_code == 201, r.text
    requests.put(f"{base}/notes", auth=ADMIN, json={"streams": []}, timeout=10)

    console = Console(context, base)
    assert console.state() == "idle"
    console.login()
    assert console.page.text_content("#user") == "admin"
    console.pick("messages", "all")
    console.connect()

    # an insert shows within a second of the POST's answer
    post(base, {"seq": 1, "message": "Hello SSE!", "name": "uji"})
    started = time.monotonic()
    console.page.wait_for_selector("#events tr[data-op='insert']", timeout=1_000)
    assert time.monotonic() - started < 1.0
    first = console.rows()[0]
    assert first["data"]["fullDocument"]["message"] == "Hello SSE!"
    assert json.loads(first["id"]).keys() == {"_data"}
    assert console.page.text_content("#last-id") == first["id"]
    assert console.page.text_content("#lag").endswith(" ms")
    assert console.page.get_by_role("button", name="Reconnect from last id").is_enabled()
    key = first["data"]["documentKey"]["_id"]["$oid"]
    assert console.page.text_content("#events tr td.key") == key

    # an update: its changed field highlighted, a removed one struck out
    r = requests.patch(
        f"{base}/messages/{key}",
        auth=ADMIN,
        json={"$set": {"message": "Hello SSE! (edited)"}, "$unset": {"name": ""}},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    console.wait_rows(1, "#events tr[data-op='update']")
    update = console.page.locator("#events tr[data-op='update']")
    assert (
        update.locator(".field.updated[data-field='message']").inner_text()
        == 'message: "Hello SSE! (edited)"'
    )
    assert update.locator(".field.removed[data-field='name']").count() == 1
    assert update.locator(".field.updated").count() == 1  # _etag (every write stamps it) is in the JSON only
    # the full JSON opens from the row
    update.locator("summary").click()
    assert update.locator("pre.json").is_visible()
    assert console.count("events") == 2

    # the server restarts under the page; one insert lands while it is away, one after
    again = restart_on_same_port(server)
    try:
        console.page.wait_for_function(
            "() => ['ended', 'reconnecting'].includes(document.getElementById('state').dataset.state)",
            timeout=10_000,
        )
        again.start()
        post(base, {"seq": 2, "message": "while the page was away"})
        console.wait_state("open", 15_000)
        console.wait_rows(3, "#events tr.change", 15_000)
        post(base, {"seq": 3, "message": "after the page is back"})
        console.wait_rows(4, "#events tr.change")
        time.sleep(0.5)  # a duplicate would arrive right behind it
        changes = console.rows("#events tr.change")
        assert [c["op"] for c in changes] == ["insert", "update", "insert", "insert"]
        assert [c["data"].get("fullDocument", {}).get("seq") for c in changes] == [1, 1, 2, 3]
        assert len({c["id"] for c in changes}) == 4  # no duplicate rows
        assert console.count("events") == 4
        assert console.count("reconnects") == 1
        assert console.page.locator("#events tr.end").count() == 1  # the server's shutdown end
        assert "server shutting down" in console.page.text_content("#events tr.end")

        # pause: counts, shows nothing, then shows what it held
        console.page.get_by_role("button", name="Pause").click()
        post(base, {"seq": 4, "message": "while paused"})
        console.page.wait_for_function("() => document.getElementById('count-events').textContent === '5'")
        assert console.page.locator("#events tr.change").count() == 4
        assert console.page.text_content("#paused-count") == "1"
        console.page.get_by_role("button", name="Resume").click()
        assert console.page.locator("#events tr.change").count() == 5

        # a delete, for the screenshot's badges
        requests.delete(f"{base}/messages/{key}", auth=ADMIN, timeout=10)
        console.wait_rows(6, "#events tr.change")
        console.page.wait_for_timeout(1_400)  # the new-row flash has faded
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        shot = console.page.screenshot(path=SCREENSHOT if os.environ.get("CONSOLE_SCREENSHOT") else None)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        assert console.violations == []
    finally:
        again.stop()


def test_websocket_under_the_csp_and_a_reset_after_the_history_was_pruned(live_factory, tmp_path, context):
    server = live_factory(str(tmp_path / "data"), CHANGE_LOG_MAX_EVENTS=100, STREAM_LINGER_SECONDS=0.2)
    base = server.url
    assert (
        requests.put(f"{base}/messages", auth=ADMIN, json={"streams": STREAMS}, timeout=10).status_code == 201
    )

    console = Console(context, base)
    console.login(cookie=True)  # the stream URL carries no token: the HttpOnly cookie does
    assert "cookie" in console.page.text_content("#auth-mode")
    console.pick("messages", "inserts", transport="WebSocket")
    console.connect()
    assert console.page.text_content("#url").startswith("ws://127.0.0.1:")
    assert "access_token" not in console.page.text_content("#url")
    post(base, {"seq": 1})
    console.wait_rows(1)
    assert console.rows()[0]["data"]["fullDocument"]["seq"] == 1

    # away while 250 inserts go by: the change log keeps 100, the watcher is gone
    console.page.get_by_role("button", name="Disconnect").click()
    assert console.state() == "closed"
    r = requests.post(f"{base}/messages", auth=ADMIN, json=[{"seq": 100 + i} for i in range(250)], timeout=30)
    assert r.status_code in (200, 201), r.text
    time.sleep(0.6)  # past STREAM_LINGER_SECONDS: no watcher memory to resume from

    console.page.get_by_role("button", name="Reconnect from last id").click()
    console.wait_state("reset")
    assert console.count("resets") == 1
    reset = console.rows("#events tr.reset")
    assert len(reset) == 1 and reset[0]["data"]["resumeFrom"]
    assert console.page.text_content("#last-id") == reset[0]["id"]
    assert console.page.locator("#events tr.change").count() == 1  # nothing replayed past the gap
    post(base, {"seq": 999})
    console.wait_rows(2, "#events tr.change")
    assert console.rows()[-1]["data"]["fullDocument"]["seq"] == 999
    assert console.state() == "open"
    assert console.violations == []


def test_definition_editor_validates_without_saving_then_saves(live, context):
    base = live.url
    body = {"streams": STREAMS, "owner": "ops"}
    assert requests.put(f"{base}/messages", auth=ADMIN, json=body, timeout=10).status_code == 201
    before = requests.get(f"{base}/messages/_meta", auth=ADMIN, timeout=10)

    console = Console(context, base)
    console.login()
    console.pick("messages", "all")
    editor = console.page.get_by_label("streams of messages (JSON array)")
    console.page.wait_for_function("() => document.getElementById('streams-json').value.includes('inserts')")
    assert json.loads(editor.input_value()) == STREAMS

    bad = [*STREAMS, {"uri": "bad", "stages": [{"_$foo": 1}]}]
    editor.fill(json.dumps(bad))
    real = requests.patch(f"{base}/messages?dryRun=true", auth=ADMIN, json={"streams": bad}, timeout=10)
    assert real.status_code == 400
    message = console.page.locator("#editor-message")
    for button in ("Validate", "Save"):
        console.page.get_by_role("button", name=button, exact=True).click()
        console.page.wait_for_function(
            "() => document.getElementById('editor-message').textContent.includes('400')"
        )
        assert real.json()["message"] in message.inner_text()
        assert "bad" in message.get_attribute("class")
        after = requests.get(f"{base}/messages/_meta", auth=ADMIN, timeout=10)
        assert after.json() == before.json() and after.headers["ETag"] == before.headers["ETag"]
        console.page.evaluate("document.getElementById('editor-message').textContent = ''")

    editor.fill("[not json")
    console.page.get_by_role("button", name="Validate").click()
    assert "not valid JSON" in message.inner_text()

    good = [*STREAMS, {"uri": "updates", "stages": [{"_$match": {"operationType": "update"}}]}]
    editor.fill(json.dumps(good))
    console.page.get_by_role("button", name="Save").click()
    console.page.wait_for_function(
        "() => document.getElementById('editor-message').textContent.startsWith('saved')"
    )
    stored = requests.get(f"{base}/messages/_meta", auth=ADMIN, timeout=10).json()
    assert stored["streams"] == good and stored["owner"] == "ops"  # PATCH: other properties kept
    console.page.wait_for_selector("#stream option[value='updates']", state="attached")
    assert console.violations == []


def test_phone_width_and_the_public_pages(live, browser):
    base = live.url
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = ctx.new_page()
        page.goto(f"{base}/_console")
        page.wait_for_selector("#login-form")
        # one column, nothing wider than the screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for label in ("User", "Password", "Collection", "Stream", "SSE", "WebSocket"):
            assert page.get_by_label(label, exact=True).count() == 1, label
    finally:
        ctx.close()

    r = requests.get(f"{base}/_console", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    assert r.headers["Referrer-Policy"] == "no-referrer"
    for asset, kind in (("console.js", "javascript"), ("console.css", "text/css")):
        r = requests.get(f"{base}/_console/{asset}", timeout=10)
        assert r.status_code == 200 and kind in r.headers["Content-Type"], asset
        assert r.headers["Content-Security-Policy"] == csp
    assert requests.get(f"{base}/_console/index.html", timeout=10).status_code == 404
    outside = requests.get(f"{base}/_console/%2e%2e%2fapp.py", timeout=10)
    assert outside.status_code in (400, 404) and "create_app" not in outside.text
    icon = requests.get(f"{base}/favicon.ico", timeout=10)
    assert icon.status_code == 200 and icon.headers["Content-Type"].startswith("image/svg+xml")
    assert icon.text.startswith("<svg")
    r = requests.get(f"{base}/_demo?src=%2Fmessages%2F_streams%2Fall", allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"].endswith(
        "/_console?src=%2Fmessages%2F_streams%2Fall"
    )
    r = requests.get(f"{base}/_demo", allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"].endswith("/_console")


def test_websocket_resumes_by_itself_after_a_restart(live_factory, tmp_path, context):
    """The console reopens a WebSocket the server closed (1001) with ?lastEventId=<last _id>."""
    server = live_factory(str(tmp_path / "data"), STREAM_LINGER_SECONDS=0.2)
    base = server.url
    assert (
        requests.put(f"{base}/messages", auth=ADMIN, json={"streams": STREAMS}, timeout=10).status_code == 201
    )
    console = Console(context, base)
    console.login()
    console.pick("messages", "inserts", transport="WebSocket")
    console.connect()
    post(base, {"seq": 1})
    console.wait_rows(1, "#events tr.change")
    again = restart_on_same_port(server)
    try:
        console.wait_rows(1, "#events tr.end")  # the close frame: 1001, server shutting down
        assert "server shutting down" in console.page.text_content("#events tr.end")
        again.start()
        post(base, {"seq": 2})
        console.wait_state("open", 20_000)
        console.wait_rows(2, "#events tr.change", 10_000)
        post(base, {"seq": 3})
        console.wait_rows(3, "#events tr.change")
        time.sleep(0.5)
        assert seqs(console) == [1, 2, 3]
        assert len({r["id"] for r in console.rows("#events tr.change")}) == 3
        assert console.count("reconnects") == 1 and console.count("resets") == 0
        assert console.violations == []
    finally:
        again.stop()
