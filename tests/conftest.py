"""Fixtures: an in-process app on a fresh data directory, and live gunicorn servers.

The whole suite runs monkey-patched by gevent, as the workers are, so in-process tests
exercise the same cooperative code paths (threadpool sqlite, greenlet watchers).
"""

from gevent import monkey

monkey.patch_all()

import base64  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import closing  # noqa: E402

import pytest  # noqa: E402
import requests  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMIN = ("admin", "secret")
ADMIN_HEADER = "Basic " + base64.b64encode(b"admin:secret").decode()


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "data")


@pytest.fixture
def app(data_dir):
    from app import create_app

    app = create_app({"DATA_DIR": data_dir, "STREAM_LINGER_SECONDS": 0.2})
    app.testing = True
    yield app
    app.extensions["changefeed.hub"].close_all()
    app.extensions["changefeed.engine"].close()


@pytest.fixture
def client(app):
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = ADMIN_HEADER
    return client


@pytest.fixture
def anon(app):
    return app.test_client()


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """gunicorn with the real gunicorn.conf.py in a subprocess, on a free port."""

    def __init__(self, data_dir: str, **env):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "DATA_DIR": data_dir,
            "LOG_LEVEL": "warning",
            **{k: str(v) for k, v in env.items()},
        }
        self.proc = None
        self.log_path = os.path.join(os.path.dirname(data_dir), f"gunicorn-{self.port}.log")

    def start(self, timeout: float = 20.0) -> "LiveServer":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "gunicorn.conf.py")],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.read_log()}")
            try:
                if requests.get(self.url + "/_health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not start: {self.read_log()}")

    def read_log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()

    def status(self) -> dict:
        return requests.get(self.url + "/_status", auth=ADMIN, timeout=5).json()


@pytest.fixture
def live_factory(tmp_path):
    servers = []

    def make(data_dir=None, **env) -> LiveServer:
        server = LiveServer(data_dir or str(tmp_path / "data"), **env)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def live(live_factory):
    return live_factory(SSE_HEARTBEAT_SECONDS=1, STREAM_LINGER_SECONDS=0.5)
