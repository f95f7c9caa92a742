"""Peer: a minimal flask-sse endpoint (Redis pub/sub), as flask-sse's quickstart shows.

GET /bench/_streams/all is flask-sse's stream; POST /bench publishes each JSON object.
Run: REDIS_URL=redis://127.0.0.1:6379 gunicorn -k gevent bench.peers.flask_sse_app:app
"""

import os

from flask import Flask, request
from flask_sse import sse

app = Flask(__name__)
app.config["REDIS_URL"] = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
app.register_blueprint(sse, url_prefix="/bench/_streams/all")


@app.post("/bench")
def publish():
    body = request.get_json()
    for item in body if isinstance(body, list) else [body]:
        sse.publish(item, type="change")
    return "", 201
