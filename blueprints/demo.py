"""`/_demo`: a public page whose EventSource shows a stream's events, the tutorial's browser client.

`/_demo?src=/messages/_streams/all` connects to that stream (add `?access_token=` to the
src for a protected stream). The page holds no data; what it shows, the ACL decides.
"""

from __future__ import annotations

from flask import Blueprint, Response

bp = Blueprint("demo", __name__)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>changefeed demo</title>
<style>body{font:14px system-ui;margin:2em}li{font-family:monospace;margin:.3em 0}</style></head>
<body>
<h1>changefeed</h1>
<p>Stream: <code id="src"></code> <span id="state">connecting</span> (<span id="errors">0</span> errors)</p>
<ul id="events"></ul>
<script>
const src = new URLSearchParams(location.search).get('src') || '/messages/_streams/all';
document.getElementById('src').textContent = src;
const es = new EventSource(src);
let errors = 0;
es.onopen = () => { document.getElementById('state').textContent = 'open'; };
es.onerror = () => {
  errors += 1;
  document.getElementById('errors').textContent = errors;
  document.getElementById('state').textContent = es.readyState === 2 ? 'closed' : 'reconnecting';
};
function show(kind, event) {
  const li = document.createElement('li');
  li.className = kind;
  li.dataset.id = event.lastEventId;
  li.textContent = kind + ' ' + event.data;
  document.getElementById('events').appendChild(li);
}
for (const kind of ['change', 'reset', 'error', 'end', 'revoked', 'expired']) {
  // a failed connection fires a plain 'error' Event too: only the server's events are shown
  es.addEventListener(kind, event => { if (event instanceof MessageEvent) show(kind, event); });
}
</script></body></html>
"""


@bp.get("/_demo")
def demo():
    return Response(PAGE, mimetype="text/html")
